#!/usr/bin/env python3
"""P4 steady state: 100k established flows with light traffic; the agent's
CPU and memory over 60 s against conntrack-polling exporters on the same table.

    .venv/bin/python bench/p4_steady_state.py [--smoke] [--flows N] [--seconds 60] [--json PATH]

In the router of tests/netns's topology (nf_conntrack_events=2, the kernel's
default), bench/flows.c holds N TCP connections (IPv4 and IPv6) and sends 32
bytes plus their echo on each every 20 s.  Over the same window, side by side:

  agent      `conntracct run` in the router, netfilter mode, default rate
             curve and sweep interval, one JSON stdout sink into a file
  conntrack  bench/poller.py: `conntrack -L -o extended` every 5 s, its text
             parsed into per-remote-host gauges, as conntrack_exporter-style
             exporters do (the conntrack child's CPU included)
  ctnetlink  bench/poller.py: the agent's own table dump
             (conntracct.probe.ctnetlink.dump) every 5 s, same gauges

CPU is user+system seconds from /proc (threads and waited-for children); RSS
is sampled every second (peak).  Two cases, each in a fresh topology:

  after   the agent starts first, then the flows are opened: every flow is
          NEW to it and conntrack reports its end
  before  the flows exist before the agent starts: they are back-dated, and
          with nf_conntrack_events=2 they carry no event extension, so the
          agent sweeps for their end every probe.sweep_interval (30 s) with
          one ctnetlink GET per flow

and two windows per case:

  first   the 60 s right after the start (flows younger than a minute: the
          rate curve's first step, an UPDATE every 20 s per flow)
  steady  once every flow is 360 s old (the last step: an UPDATE every
          300 s).  All flows were opened within seconds, so their UPDATEs
          come in one wave per 300 s: the agent is measured over 300 s and its
          CPU given per 60 s; the pollers over 60 s (every poll costs the same)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Flows, ProcessMeter, Report, agent_config, arguments, need_root  # noqa: E402

CPU_RATIO = 5          # agent CPU <= poller CPU / 5
RSS_TARGET_MB = 150
POLL_INTERVAL = 5.0


class Poller:
    def __init__(self, topo, how: str, interval: float, duration: float):
        self.how = how
        self.proc = topo.popen("router", sys.executable, str(BENCH / "poller.py"), how, interval, duration,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "READY":
            raise RuntimeError(f"poller {how}: {line!r} {self.proc.stderr.read()}")

    def finish(self, timeout: float) -> dict:
        out, err = self.proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"poller {self.how} failed: {err}")
        return json.loads(lines[-1])


def sample_rss(meters: list[ProcessMeter], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for m in meters:
            try:
                m.sample()
            except OSError:
                pass


def lines_in(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def wakeups(pid: int) -> int:
    """Voluntary context switches of all of a process's threads (each one a
    sleep it woke from: the reader's epoll waits, the sinks' queue waits)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def window(topo, agent, seconds: float, poll_interval: float, period: float = 0.0) -> dict:
    """The agent and both pollers side by side for `seconds`.  With `period`
    (longer than `seconds`), the agent is measured over the whole period and
    its CPU reported per `seconds`: its work in steady state comes in waves one
    rate-curve interval long, while the pollers' is the same every poll."""
    meter = ProcessMeter(agent.proc.pid)
    pollers = [Poller(topo, how, poll_interval, seconds) for how in ("conntrack", "ctnetlink")]
    records_before = lines_in(agent.stdout_path)
    meter.restart()
    meter.sample()
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=([meter], stop), daemon=True)
    sampler.start()
    started = time.monotonic()
    wakeups_before = wakeups(agent.proc.pid)
    try:
        summaries = {p.how: p.finish(seconds + 120) for p in pollers}
        time.sleep(max(0.0, started + period - time.monotonic()))
    finally:
        stop.set()
    elapsed = time.monotonic() - started
    agent_wakeups = wakeups(agent.proc.pid) - wakeups_before
    agent_cpu = meter.used() * (seconds / elapsed if period else 1.0)
    sampler.join()
    # Each poller reports its own CPU and its children's (the conntrack runs).
    return {"seconds": min(elapsed, seconds) if not period else seconds, "agent_seconds": elapsed,
            "table": topo.conntrack_count(), "agent_cpu_s": agent_cpu,
            "agent_wakeups_per_s": agent_wakeups / elapsed,
            "agent_rss_peak_mb": meter.rss_peak_kb / 1024, "agent_vmhwm_mb": meter.status_kb("VmHWM") / 1024,
            "records": round((lines_in(agent.stdout_path) - records_before) * (seconds / elapsed if period else 1)),
            "poller_cpu_s": {how: s["cpu_s"] + s["children_cpu_s"] for how, s in summaries.items()},
            "pollers": summaries}


def run_case(case: str, n: int, seconds: float, poll_interval: float, steady_at: float, period: float,
             probe: dict | None = None) -> dict:
    """Windows of one case: right after the start ("first") and, if steady_at,
    once the flows are steady_at seconds old, averaged over `period` ("steady")."""
    from tests.integration.running_agent import RunningAgent
    from tests.netns import Topology

    out: dict = {"case": case, "flows_asked": n}
    with Topology(acct=True, timestamp=True, conntrack_events=2) as topo:
        out["conntrack_max"] = int(topo.sysctl("router", "net.netfilter.nf_conntrack_max"))
        agent = flows = None
        try:
            if case == "after":
                agent = RunningAgent(topo, config=agent_config(**(probe or {})))
            # Traffic runs past the windows; the clients are stopped at the end.
            flows = Flows(topo, n, 20_000, steady_at + seconds + period + 600)
            out["connected"] = flows.wait_connected()
            opened = time.monotonic()
            if case == "before":
                agent = RunningAgent(topo, config=agent_config(**(probe or {})))
            else:
                time.sleep(2)     # past the burst of NEW records of the opening
            out["first"] = window(topo, agent, seconds, poll_interval)
            if steady_at:
                time.sleep(max(0.0, opened + steady_at - time.monotonic()))
                out["steady"] = window(topo, agent, seconds, poll_interval, period)
            agent.stop(timeout=120)
            from tests.integration.running_agent import exit_summary

            out["agent_probe"] = exit_summary(agent.stderr) if "conntracct stopped" in agent.stderr else {}
        finally:
            if flows is not None:
                flows.stop()
            if agent is not None:
                if agent.proc.poll() is None:
                    agent.stop(timeout=120)
                shutil.rmtree(agent.stdout_path.parent, ignore_errors=True)
    return out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--steady-at", type=float, default=360,
                        help="second window once the flows are this many seconds old (0: none); by 360 s every "
                             "flow is on the rate curve's last step (an UPDATE every 300 s)")
    parser.add_argument("--period", type=float, default=300,
                        help="the second window's agent CPU is averaged over this long (the last step's interval)")
    parser.add_argument("--case", choices=("after", "before", "both"), default="both",
                        help="flows opened after the agent, flows older than it (back-dated), or both")
    parser.add_argument("--probe", action="append", default=[], metavar="KEY=VALUE",
                        help="a probe.* setting for the agent instead of its default (e.g. ringbuf_pages=256); "
                             "may be repeated")
    args = parser.parse_args()
    probe = {}
    for item in args.probe:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--probe {item!r}: expected KEY=VALUE")
        probe[key] = int(value) if value.isdigit() else value
    need_root("P4")
    interval = POLL_INTERVAL
    if args.smoke:
        args.flows, args.seconds, args.steady_at, interval = 2000, 4, 0, 2.0
    report = Report("P4", "steady state: agent vs conntrack polling (netfilter mode)", __doc__, smoke=args.smoke)
    cases = {}
    for case in ("after", "before") if args.case == "both" else (args.case,):
        c = cases[case] = run_case(case, args.flows, args.seconds, interval, args.steady_at, args.period, probe)
        for name in ("first", "steady"):
            if name in c:
                w = c[name]
                print(f"  {case}/{name}: table {w['table']:,}; agent {w['agent_cpu_s']:.1f} CPU-s, RSS peak "
                      f"{w['agent_rss_peak_mb']:.0f} MB (HWM {w['agent_vmhwm_mb']:.0f}), {w['records']:,} records, "
                      f"{w['agent_wakeups_per_s']:,.0f} wake-ups/s; "
                      f"pollers { {k: round(v, 1) for k, v in w['poller_cpu_s'].items()} } CPU-s", flush=True)
        print(f"  {case}: connected {c.get('connected')}; probe {c['agent_probe']}", flush=True)
    report.details = {"cases": cases, "poll_interval_s": interval, "steady_at_s": args.steady_at,
                      "period_s": args.period, "probe": probe}
    labels = {("after", "first"): "flows opened after the agent, first minute",
              ("after", "steady"): f"same flows, {args.steady_at:g} s old (agent: per 60 s of {args.period:g} s)",
              ("before", "first"): "flows older than the agent (back-dated), agent's first minute",
              ("before", "steady"): f"same flows, {args.steady_at:g} s old (agent: per 60 s of {args.period:g} s)"}
    for (case, name), label in labels.items():
        if case not in cases or name not in cases[case]:
            continue
        w, probe = cases[case][name], cases[case]["agent_probe"]
        agent_cpu = w["agent_cpu_s"]
        conntrack_cpu, dump_cpu = w["poller_cpu_s"]["conntrack"], w["poller_cpu_s"]["ctnetlink"]
        lost = probe.get("probe_records_lost", 0)
        report.row(f"{label}: {w['table']:,} flows, {w['seconds']:.0f} s", f"agent {agent_cpu:.1f} CPU-s",
                   note=f"{w['records']:,} records written" + (f"; the run lost {lost:,} (ring full)" if lost else ""))
        report.row("  conntrack -L every 5 s, parsed", f"{conntrack_cpu:.1f} CPU-s",
                   f"agent <= 1/{CPU_RATIO}", agent_cpu * CPU_RATIO <= conntrack_cpu,
                   f"agent = 1/{conntrack_cpu / agent_cpu:.1f} of it" if agent_cpu else "")
        report.row("  ctnetlink dump every 5 s (conntracct.probe.ctnetlink.dump)", f"{dump_cpu:.1f} CPU-s",
                   note=f"agent = 1/{dump_cpu / agent_cpu:.1f} of it" if agent_cpu else "")
        report.row("  agent RSS, peak over the window", f"{w['agent_rss_peak_mb']:.0f} MB",
                   f"<= {RSS_TARGET_MB} MB", w["agent_rss_peak_mb"] <= RSS_TARGET_MB,
                   f"VmHWM {w['agent_vmhwm_mb']:.0f} MB: start-up (the kernel BTF parsed, then dropped)")
    report.save(args.json)


if __name__ == "__main__":
    main()
