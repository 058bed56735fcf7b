#!/usr/bin/env python3
"""P3 churn: new connections/s through the router for 30 s at rising rates;
the highest rate with zero lost records and exact DESTROY totals.

    .venv/bin/python bench/p3_churn.py [--smoke] [--rates 5000 10000 ...] [--seconds 30] [--json PATH]

Per rate, a fresh client -- router (NAT) -- server topology (tests/netns),
the real agent in the router (`conntracct run`, netfilter mode, one JSON
stdout sink writing to a file: queue 200,000, batches of 5,000, flushed every
200 ms), and tests/netns/churn.c making short TCP connections (connect, 16
bytes, server closes) at the rate for the duration.  `conntrack -E` (DESTROY
events, 64 MiB socket buffer) writes the kernel's own view to a file, parsed
afterwards so the bench adds no Python work while the agent runs.

A rate passes when the generator made >= 95% of it, the agent lost nothing
(probe records_lost, state_full, ctnetlink_overruns, sink drops all 0), every
churn flow the kernel destroyed has exactly one NEW first and one DESTROY
from the agent, and the agent's DESTROY totals (packets and bytes, both
directions) equal the kernel's, compared as multisets per source port.  The
run stops at the first rate that fails, and tries the rates from there again
with a ring four times the default (64 MiB: probe.ringbuf_pages 16384) to
show what the ring size does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ProcessMeter, Report, agent_config, arguments, need_root  # noqa: E402

from conntracct.config import ProbeConfig  # noqa: E402

DEFAULT_PAGES = ProbeConfig.model_fields["ringbuf_pages"].default

TARGET = 10_000
SENTINEL = ("-p", "udp", "-s", "203.0.113.254", "-d", "203.0.113.253", "--dport", "9")


class EventFile:
    """`conntrack -E -e DESTROY` into a file, synchronised with a sentinel entry
    at start and stop (the tests' EventCapture, without parsing while it runs)."""

    def __init__(self, topo, path: Path):
        from tests.netns.build import compile_c

        self.topo, self.path = topo, path
        env = dict(os.environ)
        shim = compile_c("rcvbuf.c", shared=True, libs=("-ldl",))
        if shim is not None:
            env.update(LD_PRELOAD=str(shim), CTA_NETLINK_RCVBUF=str(64 << 20))
        self._out = open(path, "w")
        self._err = open(path.with_suffix(".err"), "w")
        self.proc = topo.popen("router", "conntrack", "-E", "-e", "DESTROY", "-o", "extended,id,ktimestamp",
                               stdout=self._out, stderr=self._err, env=env)
        self._port = 40000
        self._sync()

    def _sync(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._port += 1
            tup = (*SENTINEL, "--sport", str(self._port))
            self.topo.run("router", "conntrack", "-I", *tup, "-t", "60", check=False)
            self.topo.run("router", "conntrack", "-D", *tup, check=False)
            wait_until = time.monotonic() + 2
            while time.monotonic() < wait_until:
                self._out.flush()
                if f"sport={self._port} " in self.path.read_text():
                    return
                time.sleep(0.1)
        raise RuntimeError("conntrack -E: sentinel never seen")

    def stop(self) -> tuple[list[dict], bool]:
        """(parsed DESTROY events, whether conntrack reported ENOBUFS)."""
        from tests.netns.conntrack import parse_flow_line

        self._sync(60)
        self.proc.terminate()
        self.proc.wait(10)
        self.topo._forget(self.proc)
        self._out.close()
        self._err.close()
        lost = "ENOBUFS" in self.path.with_suffix(".err").read_text()
        events = []
        with open(self.path) as f:
            for line in f:
                if "dport=9 " in line and "203.0.113.254" in line:
                    continue
                flow = parse_flow_line(line)
                if flow is not None and flow["event"] == "DESTROY":
                    events.append(flow)
        return events, lost


def agent_stats(stderr: str) -> tuple[dict, dict]:
    """(probe counters, stdout sink counters) the agent logs when it stops."""
    from tests.integration.running_agent import exit_summary

    if "conntracct stopped" not in stderr:
        return {}, {}
    return exit_summary(stderr, "probe"), exit_summary(stderr, "sink stdout")


def mib(pages: int) -> str:
    return f"{pages * 4096 // 2**20} MiB"


def one_rate(rate: float, seconds: float, ringbuf_pages: int | None = None) -> dict:
    from tests.integration.running_agent import RunningAgent
    from tests.netns import Topology

    out: dict = {"rate_asked": rate, "ringbuf_pages": ringbuf_pages or DEFAULT_PAGES}
    with Topology(acct=True, timestamp=True) as topo:
        probe = {"ringbuf_pages": ringbuf_pages} if ringbuf_pages else {}
        agent = RunningAgent(topo, config=agent_config(**probe))
        workdir = agent.stdout_path.parent
        try:
            meter = ProcessMeter(agent.proc.pid)
            events = EventFile(topo, workdir / "events")
            started = time.monotonic()
            result = topo.churn(duration=seconds, rate=rate)
            topo.wait_conntrack_empty(timeout=60)
            kernel_events, capture_lost = events.stop()
            kernel = Counter((e["orig"]["sport"], e["orig"]["packets"], e["orig"]["bytes"],
                              e["reply"]["packets"], e["reply"]["bytes"]) for e in kernel_events
                             if e["proto"] == "tcp" and e["orig"].get("dport") == result.port)
            expected = sum(kernel.values())
            marker = f'"dport":{result.port}'
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:   # the agent's last DESTROYs may still be in its queue
                seen = sum(1 for line in open(agent.stdout_path)
                           if line.startswith('{"kind":"destroy"') and marker in line)
                if seen >= expected:
                    break
                time.sleep(1)
            cpu, wall = meter.used(), time.monotonic() - started
            agent.stop(timeout=120)
            probe, sink = agent_stats(agent.stderr)
            flows: dict[str, list] = {}
            with open(agent.stdout_path) as f:
                for line in f:
                    if marker not in line:
                        continue
                    r = json.loads(line)
                    if r["orig"]["dport"] == result.port:
                        flows.setdefault(r["flow_id"], []).append(r)
            lifecycle_ok = all(recs[0]["kind"] == "new" and recs[-1]["kind"] == "destroy"
                               and sum(r["kind"] == "destroy" for r in recs) == 1 for recs in flows.values())
            agent_destroys = Counter((r["orig"]["sport"], r["packets_orig"], r["bytes_orig"], r["packets_reply"],
                                      r["bytes_reply"]) for recs in flows.values() for r in recs
                                     if r["kind"] == "destroy")
            lost = {"records_lost": probe.get("probe_records_lost", -1),
                    "state_full": probe.get("probe_state_full", -1),
                    "ctnetlink_overruns": probe.get("ctnetlink_overruns", -1),
                    "sink_dropped": sink.get("dropped", -1)}
            out.update(
                rate=result.rate, completed=result.completed, failed=result.failed, summary=result.summary(),
                kernel_destroys=expected, agent_flows=len(flows), agent_destroys=sum(agent_destroys.values()),
                exact=agent_destroys == kernel and len(flows) == expected, lifecycle_ok=lifecycle_ok,
                lost=lost, capture_lost=capture_lost, agent_cpu_s=cpu, agent_cpu_share=cpu / wall,
                table_full_drops=result.table_full_drops)
            out["ok"] = (result.rate >= 0.95 * rate and not any(lost.values()) and out["exact"] and lifecycle_ok
                         and not capture_lost)
        finally:
            if agent.proc.poll() is None:
                agent.stop(timeout=120)
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def series(rates: list[float], seconds: float, ringbuf_pages: int | None) -> tuple[list[dict], float]:
    """Rising rates until one fails: (steps, highest passing rate)."""
    steps, best = [], 0.0
    for rate in rates:
        step = one_rate(rate, seconds, ringbuf_pages)
        steps.append(step)
        print(f"  ring {step['ringbuf_pages']} pages, {rate:>7,.0f}/s asked: {step['rate']:,.0f}/s made, "
              f"{step['kernel_destroys']:,} destroyed, exact={step['exact']} lifecycle={step['lifecycle_ok']} "
              f"lost={step['lost']} capture_lost={step['capture_lost']} "
              f"agent CPU {step['agent_cpu_share']:.0%} -> {'ok' if step['ok'] else 'FAIL'}", flush=True)
        if not step["ok"]:
            break
        best = step["rate_asked"]     # a passing step made >= 95% of it
    return steps, best


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rates", type=float, nargs="+",
                        default=[5000, 7500, 10000, 12500, 15000, 17500, 20000, 25000, 30000])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--big-ring", type=int, default=4 * DEFAULT_PAGES, metavar="PAGES",
                        help="from the first failing rate on, try again with probe.ringbuf_pages PAGES (0: don't)")
    args = parser.parse_args()
    need_root("P3")
    if args.smoke:
        args.rates, args.seconds, args.big_ring = [1000], 3, 0
    report = Report("P3", "churn: new connections/s without loss (netfilter mode)", __doc__, smoke=args.smoke)
    steps, best = series(args.rates, args.seconds, None)
    report.details = {"steps": steps, "seconds": args.seconds}
    for step in steps:
        asked = f"{step['rate_asked']:,.0f} conn/s asked for {args.seconds:g} s"
        report.row(f"{asked} (ring {mib(DEFAULT_PAGES)}, default)",
                   f"{step['rate']:,.0f}/s {'ok' if step['ok'] else 'FAIL'}",
                   note=f"lost {sum(max(v, 0) for v in step['lost'].values()):,}, exact={step['exact']}, "
                        f"agent CPU {step['agent_cpu_share']:.0%} of a core")
    made = next((s["rate"] for s in steps if s["ok"] and s["rate_asked"] == best), 0)
    report.row("highest rate with zero loss and exact DESTROY totals", f"{best:,.0f} conn/s",
               f">= {TARGET:,}/s", best >= TARGET,
               f"{made:,.0f}/s made by the generator; probe.ringbuf_pages {DEFAULT_PAGES} (the default)")
    failed = [s["rate_asked"] for s in steps if not s["ok"]]
    if failed and args.big_ring:
        big_steps, big_best = series([r for r in args.rates if r >= failed[0]], args.seconds, args.big_ring)
        report.details["big_ring_steps"] = big_steps
        for step in big_steps:
            report.row(f"{step['rate_asked']:,.0f} conn/s asked (ring {mib(args.big_ring)})",
                       f"{step['rate']:,.0f}/s {'ok' if step['ok'] else 'FAIL'}",
                       note=f"lost {sum(max(v, 0) for v in step['lost'].values()):,}, exact={step['exact']}, "
                            f"agent CPU {step['agent_cpu_share']:.0%} of a core")
        report.row(f"  same with probe.ringbuf_pages {args.big_ring}", f"{max(best, big_best):,.0f} conn/s",
                   note="informational: a larger ring absorbs the reader's scheduling gaps")
    report.save(args.json)


if __name__ == "__main__":
    main()
