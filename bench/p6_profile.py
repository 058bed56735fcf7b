#!/usr/bin/env python3
"""Where the agent's CPU per finished flow goes, under P6's churn.

    .venv/bin/python bench/p6_profile.py [--rate 10000] [--seconds 20] [--kinds destroy] [--json PATH]

The real agent (netfilter mode, one JSON stdout sink into a file, as P3/P6)
in the router of a fresh topology while tests/netns/churn.c makes short TCP
connections.  Over a window in the middle of the churn:

- the agent's CPU seconds (all threads, /proc) per finished flow;
- py-spy (`py-spy record --native --threads`, 100 samples/s, needs the
  py-spy package: `pip install py-spy`) samples every thread's Python and
  native stack; each sample is given to one stage by its innermost known
  frame (the table below: STAGES), samples of threads that wait (for the
  GIL, a queue, epoll, a sleep) are counted apart and not as CPU;
- the probe's own run time in the kernel (BPF run statistics, through
  BPF_ENABLE_STATS), which the packet path pays, not the agent.

Each thread's own CPU seconds (/proc/PID/task) are shared out among the
stages by that thread's samples (py-spy cannot tell a thread on a core from
one waiting for one, so samples are only compared within a thread), and
divided by the finished flows (DESTROY lines the agent wrote in the window).
py-spy's stops cost the agent some CPU too: the split is what is
comparable, P6 gives the agent's CPU per flow without a profiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CLK_TCK, ProcessMeter, Report, agent_config, arguments, bpf_run_stats, need_root  # noqa: E402

BPF_PROG_TYPE_NETFILTER = 32

# (stage, substrings of a frame): a stage's boundary functions.  The
# innermost boundary among a sample's frames decides its stage, so what a
# boundary calls (helpers, native code) counts for it unless it is a
# boundary itself (a syscall, the map delete, the sink's write).
STAGES = [
    ("BPF map lookup-and-delete (a bpf() per batch of finished flows, or per flow)",
     ("MapEntryTaker.take", "BatchTaker.take", "Probe.take_flow_states")),
    ("ctnetlink: recv syscalls", ("recv (libc", "recvfrom (libc", "recvmsg (libc", "recvmmsg (libc", "__libc_recv",
                                  "socket.recv_into", "recv_into (", "BatchReceiver.receive")),
    ("ctnetlink: parse events", ("DestroyEvents.read",)),
    ("ring record: decode and dispatch (NEW/UPDATE)", ("FlowSource._on_record",)),
    ("first-sight NEW, delivery counters", ("FlowSource._deliver",)),
    ("enrichment", ("Enricher.__call__",)),
    ("queue offer (reader side: locks, counters)", ("SinkWorker.offer", "Pipeline.offer")),
    ("write syscalls (sink)", ("write (libc", "__libc_write", "FileIO.write", "BufferedWriter.flush")),
    ("JSON encoding", ("StdoutSink.write",)),
    ("sink worker: take batches, counters", ("SinkWorker._run",)),
    ("garbage collector", ("gc_collect", "collect (gc", "gc_collect_main", "gc_collect_with_callback")),
    ("ring buffer read (_ring.Ring.take: records copied out in batches)", ("Probe.consume", "Ring.take")),
    ("flow ends: the loop (state folded into each DESTROY record, decoded)", ("FlowEnds.on_events",)),
    ("reader loop", ("FlowSource.run",)),
    ("main thread (stats, loss watch)", ("Agent.run",)),
]
# A sample with one of these among its three innermost frames waits: for
# the GIL, a lock or condition (a queue), epoll, a sleep.  Not CPU.
WAITING = ("pthread_cond_timedwait", "pthread_cond_wait", "take_gil", "sem_wait", "sem_clockwait",
           "PyThread_acquire_lock", "epoll_wait", "poll.poll", "__select", "poll (libc", "nanosleep",
           "clock_nanosleep", "futex", "do_futex_wait", "lll_lock_wait", "time.sleep", "sleep (")


def classify(stack: list[str]) -> str:
    """The stage of one sample (frames root first), or 'waiting'."""
    if any(w in frame for frame in stack[-3:] for w in WAITING):
        return "waiting"
    for frame in reversed(stack):
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other (start-up, unknown thread)"


def read_raw(path: Path) -> dict[int, tuple[str, Counter]]:
    """py-spy's raw format, 'thread (tid): name;frame;frame... count' per
    line: {thread id: (thread name, samples per stage)}."""
    threads: dict[int, tuple[str, Counter]] = {}
    for line in path.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        frames = stack_text.split(";")
        head, _, name = frames[0].partition(": ")
        tid = int(head.split("(", 1)[1].rstrip(")"), 0)
        threads.setdefault(tid, (name, Counter()))[1][classify(frames[1:])] += int(count)
    return threads


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user+system) of each of a process's threads, from /proc."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def attribute(threads: dict[int, tuple[str, Counter]], cpu: dict[int, float]) -> tuple[Counter, dict[str, float]]:
    """CPU seconds per stage: each thread's own CPU (from /proc) shared out
    by its samples' stages (py-spy cannot tell a running thread from one
    waiting for a core, so samples are compared only within a thread).
    Also: CPU seconds per thread name."""
    stages: Counter = Counter()
    per_thread: dict[str, float] = {}
    for tid, (name, samples) in threads.items():
        seconds = cpu.get(tid, 0.0)
        per_thread[name] = per_thread.get(name, 0.0) + seconds
        busy = sum(v for k, v in samples.items() if k != "waiting")
        for stage, n in samples.items():
            if stage != "waiting" and busy:
                stages[stage] += seconds * n / busy
    return stages, per_thread


def program_time_ns(pid: int) -> tuple[int, int]:
    from common import prog_stats_of_pid
    return prog_stats_of_pid(pid, BPF_PROG_TYPE_NETFILTER)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rate", type=float, default=10000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--kinds", nargs="+", choices=("new", "update", "destroy"))
    parser.add_argument("--keep-raw", metavar="PATH", help="keep py-spy's raw stacks there")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"))
    args = parser.parse_args()
    need_root("P6 profile")
    if args.smoke:
        args.rate, args.seconds = 1000, 6
    if not Path(args.py_spy).exists():
        sys.exit("py-spy not found: pip install py-spy (or --py-spy PATH)")
    from tests.integration.running_agent import RunningAgent
    from tests.netns import Topology

    report = Report("P6", "profile: the agent's CPU per finished flow by stage", __doc__, smoke=args.smoke)
    config = agent_config()
    if args.kinds:
        config["sinks"][0]["kinds"] = args.kinds
    window = max(args.seconds - 6, 2)
    with Topology(acct=True, timestamp=True) as topo, bpf_run_stats():
        agent = RunningAgent(topo, config=config)
        try:
            done: dict = {}
            churn = threading.Thread(target=lambda: done.update(r=topo.churn(duration=args.seconds, rate=args.rate)))
            churn.start()
            time.sleep(3)
            meter = ProcessMeter(agent.proc.pid)
            runs0, ns0 = program_time_ns(agent.proc.pid)
            out = Path(agent.stdout_path.parent / "pyspy.txt")
            started = time.monotonic()
            deleted0 = _destroys_written(agent.stdout_path)
            threads0 = thread_cpu(agent.proc.pid)
            spy = subprocess.run([args.py_spy, "record", "--native", "--threads", "-r", "100", "-d", str(int(window)),
                                  "-p", str(agent.proc.pid), "--format", "raw", "-o", str(out)],
                                 capture_output=True, text=True, timeout=window + 60)
            cpu, wall = meter.used(), time.monotonic() - started
            threads1 = thread_cpu(agent.proc.pid)
            finished = _destroys_written(agent.stdout_path) - deleted0
            runs1, ns1 = program_time_ns(agent.proc.pid)
            churn.join()
            threads = read_raw(out) if out.exists() else {}
            if args.keep_raw and out.exists():
                shutil.copy(out, args.keep_raw)
            if not threads:
                sys.exit(f"py-spy recorded nothing: {spy.stderr[-2000:]}")
        finally:
            agent.stop(timeout=120)
            shutil.rmtree(agent.stdout_path.parent, ignore_errors=True)
    used = {tid: threads1[tid] - threads0.get(tid, 0.0) for tid in threads1}
    stages, per_thread = attribute(threads, used)
    flows = max(finished, 1)
    per_flow_us = cpu / flows * 1e6
    samples = Counter()
    for _, counts in threads.values():
        samples.update(counts)
    report.details = {"stages_cpu_s": dict(stages), "threads_cpu_s": per_thread, "samples": dict(samples),
                      "cpu_s": cpu, "wall_s": wall, "finished": finished, "probe_runs": runs1 - runs0,
                      "probe_ns": ns1 - ns0, "rate": args.rate, "kinds": args.kinds}
    report.row(f"agent CPU per finished flow, {args.rate:,.0f} conn/s asked, kinds {args.kinds or 'default'}",
               f"{per_flow_us:.1f} µs",
               note=f"{cpu:.2f} CPU-s over {wall:.1f} s for {finished:,} finished flows, py-spy attached; "
                    + ", ".join(f"thread {name} {sec / flows * 1e6:.1f} µs" for name, sec in
                                sorted(per_thread.items(), key=lambda kv: -kv[1]) if sec))
    for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        report.row(f"  {stage}", f"{seconds / flows * 1e6:.1f} µs",
                   note=f"{seconds / max(cpu, 1e-9):.0%} of the agent's CPU")
    report.row("  (samples waiting: GIL, queue, epoll, sleep; not counted)", f"{samples['waiting']:,}")
    if runs1 > runs0:
        report.row("probe in the kernel's packet path, per finished flow (BPF run time)",
                   f"{(ns1 - ns0) / max(finished, 1) / 1000:.2f} µs",
                   note=f"{(runs1 - runs0) / max(finished, 1):.1f} packets per flow at "
                        f"{(ns1 - ns0) / (runs1 - runs0):.0f} ns")
    report.save(args.json)
    print(done.get("r").summary() if done.get("r") else "")


def _destroys_written(path: Path) -> int:
    """DESTROY records the agent has written so far (its sink flushes every 200 ms)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.startswith(b'{"kind":"destroy"'))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
