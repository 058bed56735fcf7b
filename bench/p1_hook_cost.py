#!/usr/bin/env python3
"""P1 per-packet hook cost: run_time_ns / run_cnt of the attached probe under
steady traffic, beside baseline programs on the same hooks, to attribute it.

    .venv/bin/python bench/p1_hook_cost.py [--smoke] [--json PATH]

The real agent (`conntracct run`, netfilter mode, JSON stdout sink to a file)
accounts the router namespace of tests/netns's client -- router (NAT) --
server topology, while bench/flows.c keeps N TCP connections (IPv4 and IPv6)
busy with small requests and echoes through it.  In the same router namespace,
at the same four hooks (IPv4/IPv6 PRE_ROUTING and LOCAL_OUT, just after the
probe), three baseline programs run on every packet too:

  nf_return     returns NF_ACCEPT at once: the cost of running any program,
                including what the run statistics themselves add
  nf_read_ct    + reads skb->_nfct and the nf_conn the way account() starts
  nf_read_ext   + reads the extension offsets and the timestamp extension

The full probe minus nf_read_ext is the accounting logic (flow key, hash
lookup, rate-curve check, and the records it emits).  Run statistics are on
only for the measurement (BPF_ENABLE_STATS: see common.bpf_run_stats).
kprobe/fentry modes cannot attach on this host; their numbers come from the
VM (`./tasks.py vm-test`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Flows, Report, agent_config, arguments, bpf_run_stats, need_root, prog_stats_of_pid  # noqa: E402

TARGET_NS = 80
BPF_PROG_TYPE_NETFILTER = 32

BASELINES = r"""
struct nf_prog_ctx { void *state; void *skb; };

static __always_inline void *conn_of(struct nf_prog_ctx *ctx) {
    u64 nfct = 0;
    bpf_probe_read_kernel(&nfct, sizeof(nfct), ctx->skb + SKB_NFCT);
    return (void *)(nfct & ~7UL);
}

int nf_return(struct nf_prog_ctx *ctx) {
    return 1;
}

int nf_read_ct(struct nf_prog_ctx *ctx) {
    void *ct = conn_of(ctx);
    if (ct) {
        u64 words[(CT_READ_LEN + 7) / 8];
        bpf_probe_read_kernel(words, sizeof(words), ct);
    }
    return 1;
}

int nf_read_ext(struct nf_prog_ctx *ctx) {
    void *ct = conn_of(ctx);
    if (!ct)
        return 1;
    u64 words[(CT_READ_LEN + 7) / 8];
    u8 *c = (u8 *)words;
    if (bpf_probe_read_kernel(words, sizeof(words), ct))
        return 1;
    u64 ext = *(u64 *)(c + CT_EXT);
    u8 ext_off[EXT_NUM] = {};
    u64 tstamp[2] = {};
    if (ext)
        bpf_probe_read_kernel(ext_off, sizeof(ext_off), (void *)(ext + EXT_OFFSET));
    if (ext_off[EXT_TSTAMP_ID])
        bpf_probe_read_kernel(tstamp, sizeof(tstamp), (void *)(ext + ext_off[EXT_TSTAMP_ID] + TSTAMP_START));
    return 1;
}
"""
BASELINE_NAMES = ("nf_return", "nf_read_ct", "nf_read_ext")


class Baselines:
    """The baseline programs, linked in the router namespace after the probe."""

    def __init__(self, ns_path: str):
        from bcc import BPF

        from conntracct import netns
        from conntracct.probe import bpfsys
        from conntracct.probe.loader import ProbeSettings, cflags

        self.bpf = BPF(text=BASELINES.encode(), cflags=cflags("netfilter", ProbeSettings()))
        self.fds: dict[str, int] = {}
        self.links: list[int] = []
        with netns.entered(ns_path):
            # Two BPF programs may not share a hook priority (EBUSY): one each.
            for n, name in enumerate(BASELINE_NAMES, 1):
                fn = self.bpf.load_func(name.encode(), bpfsys.BPF_PROG_TYPE_NETFILTER,
                                        attach_type=bpfsys.BPF_NETFILTER)
                self.fds[name] = fn.fd
                for family, hook in bpfsys.PROBE_HOOKS:
                    self.links.append(bpfsys.link_netfilter(fn.fd, family, hook,
                                                            bpfsys.PRIORITY_AFTER_CONNTRACK + n))

    def stats(self) -> dict[str, tuple[int, int]]:
        from conntracct.probe import bpfsys
        return {name: bpfsys.prog_run_stats(fd) for name, fd in self.fds.items()}

    def close(self) -> None:
        for fd in self.links:
            os.close(fd)
        self.bpf.cleanup()


# Traffic shapes: (label, connections, each sends every ms).  Per-packet cost
# depends on how many flows share the caches: many light flows touch a cold
# hash-map entry per packet, a few busy ones keep theirs warm.
SHAPES = [("256 flows, light", 256, 20.0), ("8 busy flows", 8, 0.3)]


def measure(topo, agent, baselines: Baselines, flows: int, interval_ms: float, seconds: float,
            warmup: float) -> tuple[dict, dict, str]:
    """(cost per program, traffic counters, how the statistics were switched on) for one shape."""
    traffic = Flows(topo, flows, interval_ms, warmup + seconds + 30)
    try:
        traffic.wait_connected()
        time.sleep(warmup)
        with bpf_run_stats() as how:
            before = {"probe": prog_stats_of_pid(agent.proc.pid, BPF_PROG_TYPE_NETFILTER), **baselines.stats()}
            time.sleep(seconds)
            after = {"probe": prog_stats_of_pid(agent.proc.pid, BPF_PROG_TYPE_NETFILTER), **baselines.stats()}
    finally:
        result = traffic.stop()
    cost = {}
    for name in before:
        runs = after[name][0] - before[name][0]
        ns = after[name][1] - before[name][1]
        cost[name] = {"run_cnt": runs, "run_time_ns": ns, "ns_per_run": ns / runs if runs else float("nan")}
    return cost, result, how


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seconds", type=float, default=20, help="measurement window per traffic shape")
    args = parser.parse_args()
    need_root("P1")
    shapes = SHAPES
    if args.smoke:
        shapes, args.seconds = [("16 flows (smoke)", 16, 20.0)], 1.0
    from tests.integration.running_agent import RunningAgent
    from tests.netns import Topology

    report = Report("P1", "per-packet hook cost (netfilter mode)", __doc__, smoke=args.smoke)
    warmup = 1.0 if args.smoke else 3.0
    results = {}
    with Topology(acct=True, timestamp=True) as topo:
        agent = RunningAgent(topo, config=agent_config())
        baselines = Baselines(topo.ns_path("router"))
        try:
            for label, flows, interval_ms in shapes:
                results[label] = measure(topo, agent, baselines, flows, interval_ms, args.seconds, warmup)
        finally:
            baselines.close()
            agent.stop()
    report.details = {"seconds": args.seconds, "shapes": {
        label: {"cost": cost, "traffic": traffic, "stats_switch": how}
        for label, (cost, traffic, how) in results.items()}}
    for n, (label, (cost, _traffic, how)) in enumerate(results.items()):
        runs = cost["probe"]["run_cnt"]
        full, empty = cost["probe"]["ns_per_run"], cost["nf_return"]["ns_per_run"]
        read_ct, read_ext = cost["nf_read_ct"]["ns_per_run"], cost["nf_read_ext"]["ns_per_run"]
        report.row(f"netfilter probe, {label}: ns/packet (run_time_ns/run_cnt)", f"{full:.0f} ns",
                   f"<= {TARGET_NS} ns", full <= TARGET_NS,
                   f"{runs / args.seconds:,.0f} packets/s" + (f"; stats via {how.split()[0]}" if n == 0 else ""))
        report.row("  empty program on the same hooks (invocation + statistics)", f"{empty:.0f} ns")
        report.row("  probe minus empty program", f"{full - empty:.0f} ns")
        report.row("    read skb->_nfct and nf_conn (nf_read_ct - empty)", f"{read_ct - empty:.0f} ns")
        report.row("    extension offsets + timestamp (nf_read_ext - nf_read_ct)", f"{read_ext - read_ct:.0f} ns")
        report.row("    key, clock, hash lookup, rate check, records (probe - nf_read_ext)",
                   f"{full - read_ext:.0f} ns")
    report.row("kprobe / fentry: ns/packet", "VM: ./tasks.py vm-test", f"<= {TARGET_NS} ns", None,
               "kprobes and fentry cannot attach on this host")
    report.save(args.json)


if __name__ == "__main__":
    main()
