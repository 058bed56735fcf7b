#!/usr/bin/env python3
"""P6 head to head: conntracct against the tools a router operator would
otherwise run, each attached to the same NAT router in turn, under the same
connection churn; then each one's effect on forwarding a UDP flood.

    .venv/bin/python bench/p6_vs_peers.py [--smoke] [--rates 10000 20000 30000] [--seconds 15]
                                          [--tools conntracct ulogd2 ...] [--repeat 3] [--json PATH]

Churn (per rate, per tool; a fresh client -- router (NAT) -- server
topology each time, conntrack accounting and timestamps on):
tests/netns/churn.c makes short TCP connections at the rate for the duration
(connect, 16 bytes, server closes) while one tool runs in the router's
namespace:

- `conntracct`: the agent, netfilter mode, one JSON stdout sink with its
  default kinds (new, update, destroy), stdout into a file (as P3: queue
  200,000, batches of 5,000 every 200 ms);
- `conntracct-destroy`: the same with `kinds: [destroy]`;
- `conntracct-defaults`: the stdout JSON sink with its own defaults (queue
  10,000, batches of 500 every second): the default configuration, whose
  RSS is held against 64 MB;
- `ulogd2`: Debian's ulogd 2 (bench/peers/ulogd.conf): NFCT input in event
  mode, DESTROY events only, no hash, netlink buffer 64 MiB (it may double it
  once on ENOBUFS), IP2STR, JSON lines into a file;
- `conntrack-E`: `conntrack -E -e DESTROY -o extended,timestamp` into a file,
  64 MiB receive buffer (the LD_PRELOAD shim P3 uses);
- `pmacctd`: libpcap on the router's client-side interface, 5-tuple
  aggregates printed as JSON every 60 s (bench/peers/pmacctd.conf): the
  per-packet approach; it reports aggregates, not finished flows: CPU only;
- `poller`: bench/poller.py, `conntrack -L -o extended` every 5 s (P4's);
  short flows mostly escape it: CPU only;
- `none`: nothing attached (what the generator makes on its own).

Beside it, `conntrack -E` (DESTROY, 64 MiB buffer) writes the kernel's own
view into a file (as P3), so every tool's report is checked against it:
finished flows reported, and for conntracct, ulogd2 and conntrack -E whether
their DESTROY totals (packets and bytes, both directions, per source port)
equal the kernel's exactly.  CPU: user+system seconds of the tool's whole
process tree (threads, children) from /proc, from just before the churn
until the tool is idle again after the last flow ended (start-up excluded).
RSS: the tree's resident memory sampled every 0.25 s over the same window
(peak), and the tree's VmHWM (which includes start-up: the kernel BTF,
parsed and then dropped; BCC compiles in a child process).

Forwarding: per tool (and none), a fresh topology, the tool attached, then
`iperf3 -u -b 0 -l 64` from client to server through the router for a few
seconds: datagrams/s that reached the server.  Best of --repeat runs, tools
interleaved, because the two cores are shared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH,
    CLK_TCK,
    Report,
    agent_config,
    arguments,
    bpf_run_stats,
    need_root,
    prog_stats_of_pid,
)
from p3_churn import EventFile, agent_stats  # noqa: E402

PEERS = BENCH / "peers"
BPF_PROG_TYPE_NETFILTER = 32
TOOLS = ("none", "conntracct", "conntracct-destroy", "conntracct-defaults", "ulogd2", "conntrack-E", "pmacctd",
         "poller")
NETLINK_RCVBUF = 64 << 20
RSS_TARGET_MB = 64
ULOGD_PLUGINS = ("/usr/lib/x86_64-linux-gnu/ulogd", "/usr/lib/aarch64-linux-gnu/ulogd", "/usr/lib/ulogd")


# -- measuring a process tree ----------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """root and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMeter:
    """CPU seconds and RSS of a process tree: user+system of every live member
    plus what it reaped of its children (cutime, cstime); RSS sampled by a
    thread every 0.25 s."""

    def __init__(self, root: int):
        self.root = root
        self.rss_peak_kb = 0
        self.pss_peak_kb = 0     # proportional: memory shared between the tree's processes counted once
        self.hwm_kb = 0
        self.processes = 1
        self._stop = threading.Event()
        self._start = self.cpu_seconds()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def cpu_seconds(self) -> float:
        total = 0
        for pid in process_tree(self.root):
            fields = _stat_fields(pid)
            if fields:
                total += sum(int(fields[i]) for i in (11, 12, 13, 14))
        return total / CLK_TCK

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            pids = process_tree(self.root)
            self.rss_peak_kb = max(self.rss_peak_kb, sum(_status_kb(p, "VmRSS") for p in pids))
            self.hwm_kb = max(self.hwm_kb, sum(_status_kb(p, "VmHWM") for p in pids))
            self.pss_peak_kb = max(self.pss_peak_kb, sum(_pss_kb(p) for p in pids))
            self.processes = max(self.processes, len(pids))

    def used(self) -> float:
        return self.cpu_seconds() - self._start

    def settle(self, idle_s: float = 1.0, timeout: float = 60) -> float:
        """Wait until the tree used < 2% of a core for idle_s; CPU seconds used so far."""
        deadline = time.monotonic() + timeout
        last = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(idle_s)
            now = self.cpu_seconds()
            if now - last < 0.02 * idle_s:
                break
            last = now
        return self.used()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


# -- the tools -------------------------------------------------------------------------

class Tool:
    """One tool attached to the router: start(), pid, stop(), then report(port)."""
    name = "none"
    exact_capable = False
    pid: int | None = None

    def __init__(self, topo: Any, workdir: Path):
        self.topo, self.workdir = topo, workdir

    def stop(self) -> None:
        pass

    def report(self, port: int) -> dict:
        """{"reported": finished flows it reported for this port or None, "destroys": Counter or None, ...}"""
        return {"reported": None, "destroys": None}


class Process(Tool):
    proc: subprocess.Popen

    def _popen(self, *cmd: Any, env: dict | None = None) -> None:
        self._out = open(self.workdir / f"{self.name}.out", "w")
        self._err = open(self.workdir / f"{self.name}.err", "w")
        self.proc = self.topo.popen("router", *cmd, stdout=self._out, stderr=self._err, env=env)
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.topo._forget(self.proc)
        self._out.close()
        self._err.close()

    def _check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{what} exited {self.proc.returncode}: "
                               f"{(self.workdir / f'{self.name}.err').read_text()[-1500:]}")


def _destroy_key(sport, po, bo, pr, br) -> tuple:
    return (int(sport), int(po), int(bo), int(pr), int(br))


class Conntracct(Tool):
    name = "conntracct"
    exact_capable = True
    kinds: list[str] | None = None
    defaults = False       # the stdout sink with its own defaults, not P3's queue and batches

    def __init__(self, topo, workdir):
        super().__init__(topo, workdir)
        from tests.integration.running_agent import RunningAgent
        config = agent_config()
        if self.defaults:
            config["sinks"] = [{"type": "stdout", "format": "json"}]
        if self.kinds:
            config["sinks"][0]["kinds"] = self.kinds
        self.agent = RunningAgent(topo, config=config)
        self.pid = self.agent.proc.pid

    def stop(self) -> None:
        self.agent.stop(timeout=120)

    def report(self, port: int) -> dict:
        probe, sink = agent_stats(self.agent.stderr)
        marker = f'"dport":{port}'
        destroys: Counter = Counter()
        lines = 0
        with open(self.agent.stdout_path) as f:
            for line in f:
                lines += 1
                if line.startswith('{"kind":"destroy"') and marker in line:
                    r = json.loads(line)
                    if r["orig"]["dport"] == port:
                        destroys[_destroy_key(r["orig"]["sport"], r["packets_orig"], r["bytes_orig"],
                                              r["packets_reply"], r["bytes_reply"])] += 1
        lost = {"records_lost": probe.get("probe_records_lost", -1), "state_full": probe.get("probe_state_full", -1),
                "ctnetlink_overruns": probe.get("ctnetlink_overruns", -1), "sink_dropped": sink.get("dropped", -1)}
        out = {"reported": sum(destroys.values()), "destroys": destroys, "lines": lines, "lost": lost,
               "output_bytes": self.agent.stdout_path.stat().st_size}
        shutil.rmtree(self.agent.stdout_path.parent, ignore_errors=True)
        return out


class ConntracctDestroy(Conntracct):
    name = "conntracct-destroy"
    kinds = ["destroy"]


class ConntracctDefaults(Conntracct):
    name = "conntracct-defaults"
    defaults = True


def ulogd_plugin_dir() -> str:
    for d in ULOGD_PLUGINS:
        if Path(d, "ulogd_inpflow_NFCT.so").exists():
            return d
    raise RuntimeError("ulogd2's NFCT plugin not found (apt-get install ulogd2 ulogd2-json)")


class Ulogd(Process):
    name = "ulogd2"
    exact_capable = True

    def __init__(self, topo, workdir):
        super().__init__(topo, workdir)
        self.output, log = workdir / "ulogd.json", workdir / "ulogd.log"
        conf = (PEERS / "ulogd.conf").read_text()
        for key, value in {"@OUTPUT@": self.output, "@LOGFILE@": log, "@RCVBUF@": NETLINK_RCVBUF,
                           "@RCVBUF_MAX@": 2 * NETLINK_RCVBUF, "@PLUGINDIR@": ulogd_plugin_dir()}.items():
            conf = conf.replace(key, str(value))
        path = workdir / "ulogd.conf"
        path.write_text(conf)
        self._popen("ulogd", "-c", path)
        deadline = time.monotonic() + 15
        while "entering main loop" not in (log.read_text() if log.exists() else ""):
            self._check_alive("ulogd")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ulogd did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        self.log = log

    def report(self, port: int) -> dict:
        destroys: Counter = Counter()
        with open(self.output) as f:
            for line in f:
                r = json.loads(line)
                if r.get("orig.l4.dport") == port and r.get("orig.ip.protocol") == 6:
                    destroys[_destroy_key(r["orig.l4.sport"], r["orig.raw.pktcount"], r["orig.raw.pktlen"],
                                          r["reply.raw.pktcount"], r["reply.raw.pktlen"])] += 1
        log = self.log.read_text()
        return {"reported": sum(destroys.values()), "destroys": destroys,
                "enobufs_notices": log.count("ENOBUFS") + log.count("buffer size"),
                "output_bytes": self.output.stat().st_size}


def rcvbuf_env() -> dict:
    from tests.netns.build import compile_c
    env = dict(os.environ)
    shim = compile_c("rcvbuf.c", shared=True, libs=("-ldl",))
    if shim is not None:
        env.update(LD_PRELOAD=str(shim), CTA_NETLINK_RCVBUF=str(NETLINK_RCVBUF))
    return env


class ConntrackEvents(Process):
    name = "conntrack-E"
    exact_capable = True

    def __init__(self, topo, workdir):
        super().__init__(topo, workdir)
        self._popen("conntrack", "-E", "-e", "DESTROY", "-o", "extended,timestamp", env=rcvbuf_env())
        time.sleep(0.5)
        self._check_alive("conntrack -E")

    def report(self, port: int) -> dict:
        from tests.netns.conntrack import parse_flow_line
        destroys: Counter = Counter()
        with open(self.workdir / f"{self.name}.out") as f:
            for line in f:
                if f"dport={port} " not in line:
                    continue
                e = parse_flow_line(line)
                if e and e["event"] == "DESTROY" and e["proto"] == "tcp" and e["orig"].get("dport") == port:
                    destroys[_destroy_key(e["orig"]["sport"], e["orig"]["packets"], e["orig"]["bytes"],
                                          e["reply"]["packets"], e["reply"]["bytes"])] += 1
        err = (self.workdir / f"{self.name}.err").read_text()
        return {"reported": sum(destroys.values()), "destroys": destroys, "enobufs": "ENOBUFS" in err,
                "output_bytes": (self.workdir / f"{self.name}.out").stat().st_size}


class Pmacctd(Process):
    name = "pmacctd"

    def __init__(self, topo, workdir):
        super().__init__(topo, workdir)
        conf = (PEERS / "pmacctd.conf").read_text()
        for key, value in {"@INTERFACE@": "c0", "@OUTPUT@": workdir / "pmacct.json", "@REFRESH@": 60}.items():
            conf = conf.replace(key, str(value))
        path = workdir / "pmacctd.conf"
        path.write_text(conf)
        self._popen("pmacctd", "-f", path)
        time.sleep(1.0)
        self._check_alive("pmacctd")


class Poller(Process):
    name = "poller"

    def __init__(self, topo, workdir, duration: float = 3600):
        super().__init__(topo, workdir)
        self._popen(sys.executable, BENCH / "poller.py", "conntrack", 5, duration)
        time.sleep(0.5)
        self._check_alive("poller")


TOOL_CLASSES = {"none": Tool, "conntracct": Conntracct, "conntracct-destroy": ConntracctDestroy,
                "conntracct-defaults": ConntracctDefaults,
                "ulogd2": Ulogd, "conntrack-E": ConntrackEvents, "pmacctd": Pmacctd, "poller": Poller}


# -- one churn run -------------------------------------------------------------------------

def churn_run(tool_name: str, rate: float, seconds: float) -> dict:
    from tests.netns import Topology

    workdir = Path(tempfile.mkdtemp(prefix=f"conntracct-p6-{tool_name}-"))
    out: dict = {"tool": tool_name, "rate_asked": rate, "seconds": seconds}
    try:
        with Topology(acct=True, timestamp=True) as topo:
            kernel_capture = EventFile(topo, workdir / "kernel-events")
            tool = TOOL_CLASSES[tool_name](topo, workdir)
            meter = TreeMeter(tool.pid) if tool.pid else None
            try:
                result = topo.churn(duration=seconds, rate=rate)
                topo.wait_conntrack_empty(timeout=60)
                cpu = meter.settle() if meter else 0.0
                if meter:
                    meter.stop()
            finally:
                tool.stop()
            kernel_events, capture_lost = kernel_capture.stop()
            kernel = Counter(_destroy_key(e["orig"]["sport"], e["orig"]["packets"], e["orig"]["bytes"],
                                          e["reply"]["packets"], e["reply"]["bytes"]) for e in kernel_events
                             if e["proto"] == "tcp" and e["orig"].get("dport") == result.port)
            rep = tool.report(result.port)
            destroys = rep.pop("destroys")
            expected = sum(kernel.values())
            out.update(rep, completed=result.completed, failed=result.failed, rate=result.rate,
                       kernel_destroys=expected, capture_lost=capture_lost, cpu_s=cpu,
                       rss_peak_kb=meter.rss_peak_kb if meter else 0, hwm_kb=meter.hwm_kb if meter else 0,
                       pss_peak_kb=meter.pss_peak_kb if meter else 0, processes=meter.processes if meter else 0,
                       summary=result.summary())
            if destroys is not None:
                out["exact"] = destroys == kernel and not capture_lost
                out["missing"] = sum((kernel - destroys).values())
                out["extra"] = sum((destroys - kernel).values())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    reported = out.get("reported")
    share = f"{reported / out['kernel_destroys']:.1%}" if reported is not None and out["kernel_destroys"] else "-"
    print(f"  {tool_name:<19} {rate:>7,.0f}/s asked: {out['rate']:>7,.0f}/s made, {out['kernel_destroys']:>7,} "
          f"destroyed, reported {reported if reported is not None else '-'} ({share}) exact={out.get('exact', '-')}"
          f"  CPU {out['cpu_s']:.2f} s, RSS peak {out['rss_peak_kb'] / 1024:.0f} MB "
          f"(HWM {out['hwm_kb'] / 1024:.0f})", flush=True)
    return out


# -- forwarding under a UDP flood ------------------------------------------------------------

def forwarding_run(tool_name: str, seconds: float, size: int = 64) -> dict:
    from tests.netns import Topology

    workdir = Path(tempfile.mkdtemp(prefix=f"conntracct-p6f-{tool_name}-"))
    try:
        with Topology(acct=True, timestamp=True) as topo, bpf_run_stats():
            tool = TOOL_CLASSES[tool_name](topo, workdir)
            try:
                port = topo.next_port()
                server = topo.popen("server", "iperf3", "-s", "-1", "-p", port, "-B", topo.addr("server"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
                meter = TreeMeter(tool.pid) if tool.pid else None
                probe0 = prog_stats_of_pid(tool.pid, BPF_PROG_TYPE_NETFILTER) if tool.pid else (0, 0)
                proc = topo.run("client", "iperf3", "-c", topo.addr("server"), "-p", port, "-u", "-b", "0",
                                "-l", size, "-t", seconds, "-J", timeout=seconds + 30)
                probe1 = prog_stats_of_pid(tool.pid, BPF_PROG_TYPE_NETFILTER) if tool.pid else (0, 0)
                cpu = meter.used() if meter else 0.0
                if meter:
                    meter.stop()
                server.wait(10)
                topo._forget(server)
            finally:
                tool.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    s = json.loads(proc.stdout)["end"]["sum"]
    received = s["packets"] - s["lost_packets"]
    runs, run_ns = probe1[0] - probe0[0], probe1[1] - probe0[1]
    out = {"tool": tool_name, "sent": s["packets"], "received": received, "seconds": s["seconds"],
           "pps": received / s["seconds"], "cpu_s": cpu, "size": size,
           "probe_ns_per_packet": run_ns / runs if runs else None}
    probe = f", probe {out['probe_ns_per_packet']:.0f} ns/packet" if runs else ""
    print(f"  {tool_name:<19} UDP {size} B: {out['pps']:>9,.0f} datagrams/s received "
          f"({s['packets']:,} sent), tool CPU {cpu:.2f} s{probe}", flush=True)
    return out


# -- the report --------------------------------------------------------------------------------

def us_per_flow(run: dict) -> float | None:
    return run["cpu_s"] / run["kernel_destroys"] * 1e6 if run["kernel_destroys"] and run["tool"] != "none" else None


def churn_rows(report: Report, runs: list[dict], seconds: float) -> None:
    by_rate: dict[float, dict[str, dict]] = {}
    for r in runs:
        by_rate.setdefault(r["rate_asked"], {})[r["tool"]] = r
    for rate, tools in by_rate.items():
        ref = tools.get("ulogd2")
        ref_us = us_per_flow(ref) if ref else None
        report.row(f"churn {rate:,.0f} conn/s asked, {seconds:g} s: tool: flows made, reported, exact",
                   "CPU per flow", note="CPU: process tree, churn start to idle; RSS: peak during the run")
        for name in TOOLS:
            r = tools.get(name)
            if r is None:
                continue
            us = us_per_flow(r)
            reported = r.get("reported")
            share = (f"{reported:,} ({reported / r['kernel_destroys']:.1%})"
                     if reported is not None and r["kernel_destroys"] else "CPU only")
            exact = f", exact={r['exact']}" if "exact" in r else ""
            ratio = f", {us / ref_us:.2f}x ulogd2" if us is not None and ref_us else ""
            rss = f"RSS {r['rss_peak_kb'] / 1024:.0f} MB" + (
                f" ({r['rss_peak_kb'] / ref['rss_peak_kb']:.0f}x ulogd2)" if ref and ref['rss_peak_kb'] and
                name != "ulogd2" else "")
            if r.get("processes", 1) > 1:
                rss += f", {r['processes']} processes, PSS {r['pss_peak_kb'] / 1024:.0f} MB"
            if name == "none":
                rss = "nothing attached"
            lost = f", lost {r['lost']}" if r.get("lost") and any(r["lost"].values()) else ""
            measured = f"{us:.1f} µs" if us is not None else f"{r['rate']:,.0f}/s"
            target, ok = "", None
            if name.startswith("conntracct") and ref_us:
                # The goal: no more CPU per finished flow than ulogd2, with zero loss.
                target = "<= ulogd2, lossless"
                ok = us <= ref_us and reported == r["kernel_destroys"] and r.get("exact", False)
            report.row(f"  {name}: {r['completed']:,} made ({r['rate']:,.0f}/s), {r['kernel_destroys']:,} "
                       f"destroyed; reported {share}{exact}", measured, target, ok,
                       note=f"{r['cpu_s']:.2f} CPU-s{ratio}; {rss}"
                            + (f", HWM {r['hwm_kb'] / 1024:.0f} MB" if name != "none" else "") + lost)
        ours = tools.get("conntracct-defaults")
        if ours:
            report.row("  conntracct, default configuration: RSS, peak during the run",
                       f"{ours['rss_peak_kb'] / 1024:.0f} MB", f"<= {RSS_TARGET_MB} MB",
                       ours["rss_peak_kb"] <= RSS_TARGET_MB * 1024,
                       note=f"VmHWM {ours['hwm_kb'] / 1024:.0f} MB (start-up: the kernel BTF parsed, then dropped)")


def runs_of(runs: list[dict], name: str) -> list[dict]:
    return [r for r in runs if r["tool"] == name]


def forwarding_rows(report: Report, runs: list[dict], seconds: float) -> None:
    best: dict[str, dict] = {}
    for r in runs:
        if r["tool"] not in best or r["pps"] > best[r["tool"]]["pps"]:
            best[r["tool"]] = r
    base = best.get("none")
    report.row(f"forwarding: UDP flood ({runs[0]['size']} B datagrams, iperf3 -b 0, {seconds:g} s), "
               "datagrams/s received, best of runs", "datagrams/s")
    all_runs = runs
    for name in TOOLS:
        r = best.get(name)
        if r is None:
            continue
        runs = runs_of(all_runs, name)
        notes = [f"{r['pps'] / base['pps']:.0%} of none"] if base and name != "none" else []
        if name != "none":
            cpu_us = sum(x["cpu_s"] for x in runs) / max(sum(x["received"] for x in runs), 1) * 1e6
            notes.append(f"tool CPU {cpu_us:.2f} µs per datagram")
        probe = [x["probe_ns_per_packet"] for x in runs if x.get("probe_ns_per_packet")]
        if probe:
            notes.append(f"probe {min(probe):.0f}-{max(probe):.0f} ns per packet in the forwarding path")
        report.row(f"  {name}", f"{r['pps']:,.0f}/s", note="; ".join(notes))


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rates", type=float, nargs="+", default=[10000, 20000, 30000])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--repeat", type=int, default=3, help="forwarding runs per tool (best kept)")
    parser.add_argument("--flood-seconds", type=float, default=5)
    parser.add_argument("--no-forwarding", action="store_true")
    args = parser.parse_args()
    need_root("P6")
    for binary, package in (("ulogd", "ulogd2"), ("pmacctd", "pmacct"), ("iperf3", "iperf3"),
                            ("conntrack", "conntrack")):
        if shutil.which(binary) is None:
            sys.exit(f"P6 needs {binary} (apt-get install {package}; ./tasks.py setup installs it)")
    if args.smoke:
        args.rates, args.seconds, args.repeat, args.flood_seconds = [500], 2, 1, 1
    report = Report("P6", "head to head: conntracct, ulogd2, conntrack -E, pmacctd on one NAT router",
                    __doc__, smoke=args.smoke)
    runs = [churn_run(tool, rate, args.seconds) for rate in args.rates for tool in args.tools]
    report.details = {"churn": runs, "seconds": args.seconds}
    churn_rows(report, runs, args.seconds)
    if not args.no_forwarding:
        flood = [forwarding_run(tool, args.flood_seconds) for _ in range(args.repeat) for tool in args.tools]
        report.details["forwarding"] = flood
        forwarding_rows(report, flood, args.flood_seconds)
    report.save(args.json)


if __name__ == "__main__":
    main()
