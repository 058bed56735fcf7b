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

and finer ones, to say where the rest goes: nf_nfct / nf_nfct_direct
(skb->_nfct through bpf_probe_read_kernel / as a direct load), and on top of
nf_read_ext: nf_ktime, nf_jiffies (a clock read), nf_pcpu (a per-CPU and a
plain array lookup), nf_key (the 56-byte flow key built), nf_hash_big /
nf_hash_small (+ that key looked up, inserted on a miss, in a preallocated
hash map of the flow map's size / of 1,024), nf_hash_ptr (an 8-byte key, the
nf_conn pointer, in one of the flow map's size); nf_fast is the probe's fast
path alone (bpf/conntracct.c nothing_due, with its own hint table: 8-way,
16 KB), nf_fast_a128k the same with 128 KB, nf_fast_1way with 16,384
direct-mapped words (128 KB).

Each traffic shape is measured twice: first the probe alone on its hooks,
as it runs on a user's host (the number judged against the target), then
with the baselines linked beside it (the attribution: 15 more programs per
packet share the CPU's caches, so there every figure is higher).

The full probe minus nf_read_ext is the accounting logic (flow key, hash
lookup, rate-curve check, and the records it emits); the probe minus nf_fast
is what its slow path adds on average.  Run statistics are on
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
MAX_FLOWS_NOTE = "262,144"   # ProbeSettings.from_config().max_flows, as the agent runs
BPF_PROG_TYPE_NETFILTER = 32

BASELINES = r"""
#include "fastpath.h"   // the probe's own fast-path pieces (bpf/, on the probe's -I)

struct nf_prog_ctx { void *state; void *skb; };

// The same 56-byte key as the probe's struct flow_key.
struct key56 { u8 tuple[40]; u32 netns; u16 zone; u8 _pad[2]; u64 start_ns; };
struct state56 { u64 w[7]; };
BPF_HASH(big56, struct key56, struct state56, MAX_FLOWS);   // the probe's flows map's size and flags
BPF_HASH(small56, struct key56, struct state56, 1024);
BPF_HASH(big8, u64, struct state56, MAX_FLOWS);              // keyed by the nf_conn pointer
BPF_PERCPU_ARRAY(pcpu, u64, 1);
BPF_ARRAY(arr, u64, 1);

#define KEEP(x) asm volatile("" : : "r"(x) : "memory")

static __always_inline void *conn_of(struct nf_prog_ctx *ctx) {
    u64 nfct = 0;
    bpf_probe_read_kernel(&nfct, sizeof(nfct), ctx->skb + SKB_NFCT);
    return (void *)(nfct & ~7UL);
}

// nf_conn read, extension offsets and timestamp: what nf_read_ext does.
static __always_inline int read_ext(struct nf_prog_ctx *ctx, u8 *c, void **ct, u64 *start) {
    *ct = conn_of(ctx);
    if (!*ct)
        return 0;
    if (bpf_probe_read_kernel(c, ((CT_READ_LEN + 7) / 8) * 8, *ct))
        return 0;
    u64 ext = *(u64 *)(c + CT_EXT);
    u8 ext_off[EXT_NUM] = {};
    u64 tstamp[2] = {};
    if (ext)
        bpf_probe_read_kernel(ext_off, sizeof(ext_off), (void *)(ext + EXT_OFFSET));
    if (ext_off[EXT_TSTAMP_ID])
        bpf_probe_read_kernel(tstamp, sizeof(tstamp), (void *)(ext + ext_off[EXT_TSTAMP_ID] + TSTAMP_START));
    *start = tstamp[0];
    return 1;
}

// The probe's fast path up to its hint table (bpf/conntracct.c nothing_due):
// the nf_conn pointer and its timestamp start (0: none).
static __always_inline u64 fast_start(struct nf_prog_ctx *ctx, u64 *ct) {
    *ct = *(u64 *)((u8 *)ctx->skb + SKB_NFCT) & ~7UL;
    return *ct ? fast_start_ns((void *)*ct) : 0;
}

static __always_inline void build_key(struct key56 *k, u8 *c, u64 start) {
    const u8 *kt = c + CT_TUPLE_ORIG;
    __builtin_memcpy(k->tuple, kt + TUPLE_SRC_U3, 16);
    __builtin_memcpy(k->tuple + 16, kt + TUPLE_DST_U3, 16);
    __builtin_memcpy(k->tuple + 32, kt + TUPLE_SRC_U, 2);
    __builtin_memcpy(k->tuple + 34, kt + TUPLE_DST_U, 2);
    k->tuple[36] = kt[TUPLE_L3NUM];
    k->tuple[37] = kt[TUPLE_PROTONUM];
    k->zone = *(u16 *)(c + CT_ZONE_ID);
    k->netns = *(u32 *)(c + CT_NET);    // stand-in: same work as a cached inum
    k->start_ns = start;
}

int nf_return(struct nf_prog_ctx *ctx) {
    return 1;
}

int nf_nfct(struct nf_prog_ctx *ctx) {
    KEEP(conn_of(ctx));
    return 1;
}

int nf_nfct_direct(struct nf_prog_ctx *ctx) {
    KEEP(*(volatile u64 *)((u8 *)ctx->skb + SKB_NFCT));
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
    u64 words[(CT_READ_LEN + 7) / 8];
    void *ct;
    u64 start;
    read_ext(ctx, (u8 *)words, &ct, &start);
    return 1;
}

int nf_ktime(struct nf_prog_ctx *ctx) {
    u64 words[(CT_READ_LEN + 7) / 8];
    void *ct;
    u64 start;
    if (read_ext(ctx, (u8 *)words, &ct, &start))
        KEEP(bpf_ktime_get_ns());
    return 1;
}

int nf_jiffies(struct nf_prog_ctx *ctx) {
    u64 words[(CT_READ_LEN + 7) / 8];
    void *ct;
    u64 start;
    if (read_ext(ctx, (u8 *)words, &ct, &start))
        KEEP(bpf_jiffies64());
    return 1;
}

int nf_pcpu(struct nf_prog_ctx *ctx) {
    u64 words[(CT_READ_LEN + 7) / 8];
    void *ct;
    u64 start;
    if (read_ext(ctx, (u8 *)words, &ct, &start)) {
        int zero = 0;
        u64 *v = pcpu.lookup(&zero);
        if (v) KEEP(*v);
        u64 *a = arr.lookup(&zero);
        if (a) KEEP(*a);
    }
    return 1;
}

int nf_key(struct nf_prog_ctx *ctx) {
    u64 words[(CT_READ_LEN + 7) / 8];
    void *ct;
    u64 start;
    if (read_ext(ctx, (u8 *)words, &ct, &start)) {
        struct key56 k = {};
        build_key(&k, (u8 *)words, start);
        KEEP(&k);
    }
    return 1;
}

@HASH56@
// The fast path with a direct-mapped hint table of 16,384 words (128 KB,
// vmalloc'd): the probe's first version; a miss stores a hint 100 jiffies
// ahead.
BPF_ARRAY(fast_hints, u64, 1 << 14);

int nf_fast_1way(struct nf_prog_ctx *ctx) {
    u64 ct;
    u64 start = fast_start(ctx, &ct);
    if (!start)
        return 1;
    u32 index = hint_index(ct, 14);
    u64 *slot = fast_hints.lookup(&index);
    if (!slot)
        return 1;
    u64 tag = hint_tag(ct, start);
    u64 hint = *(volatile u64 *)slot;
    if ((hint & HINT_TAG_MASK) == tag && (s32)((u32)hint - (u32)bpf_jiffies64()) > 0)
        return 1;
    *(volatile u64 *)slot = tag | (u32)(bpf_jiffies64() + 100);
    return 1;
}

@FASTWAYS@
int nf_hash_ptr(struct nf_prog_ctx *ctx) {
    u64 words[(CT_READ_LEN + 7) / 8];
    void *ct;
    u64 start;
    if (!read_ext(ctx, (u8 *)words, &ct, &start))
        return 1;
    u64 k = (u64)ct;
    struct state56 *st = big8.lookup(&k);
    if (st) {
        KEEP(st->w[1]);
    } else {
        struct state56 fresh = {};
        big8.update(&k, &fresh);
    }
    return 1;
}
"""
# A 56-byte-key lookup (insert on a miss), once per map: BCC rewrites map
# accesses by the map's name, so the function is written out for each.
HASH56 = r"""
int nf_hash_NAME(struct nf_prog_ctx *ctx) {
    u64 words[(CT_READ_LEN + 7) / 8];
    void *ct;
    u64 start;
    if (!read_ext(ctx, (u8 *)words, &ct, &start))
        return 1;
    struct key56 k = {};
    build_key(&k, (u8 *)words, start);
    struct state56 *st = NAME56.lookup(&k);
    if (st) {
        KEEP(st->w[1]);
    } else {
        struct state56 fresh = {};
        NAME56.insert(&k, &fresh);
    }
    return 1;
}
"""
BASELINES = BASELINES.replace("@HASH56@", "".join(HASH56.replace("NAME", n) for n in ("big", "small")))
# The fast path with a set-associative hint table: BUCKETS buckets of 8
# 64-bit words (one cache line each).  nf_fast is the probe's own
# (bpf/conntracct.c nothing_due: 256 buckets, 16 KB), with its own table; a
# miss stores a hint 100 jiffies ahead.
FASTWAYS = r"""
BPF_ARRAY(fwNAME, struct bucket8, BUCKETS);

int nf_fastNAME(struct nf_prog_ctx *ctx) {
    u64 ct;
    u64 start = fast_start(ctx, &ct);
    if (!start)
        return 1;
    u32 index = hint_index(ct, BITS);
    struct bucket8 *b = fwNAME.lookup(&index);
    if (!b)
        return 1;
    u64 tag = hint_tag(ct, start);
    u32 now = bpf_jiffies64();
    int free = -1;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        u64 hint = *(volatile u64 *)&b->w[i];
        if ((hint & HINT_TAG_MASK) == tag) {
            if ((s32)((u32)hint - now) > 0)
                return 1;
            free = i;
        } else if (free < 0 && (s32)((u32)hint - now) <= 0) {
            free = i;
        }
    }
    if (free < 0)
        free = (tag >> 33) & 7;
    if (free >= 0 && free < 8)
        b->w[free] = tag | (u32)(now + 100);
    return 1;
}
"""
BASELINES = BASELINES.replace("@FASTWAYS@", "struct bucket8 { u64 w[8]; };\n" + "".join(
    FASTWAYS.replace("NAME", name).replace("BUCKETS", str(1 << bits)).replace("BITS", str(bits))
    for name, bits in (("", 8), ("_a128k", 11))))
# In hook order after the probe (each program its own priority).
BASELINE_NAMES = ("nf_return", "nf_nfct", "nf_nfct_direct", "nf_read_ct", "nf_read_ext", "nf_ktime", "nf_jiffies",
                  "nf_pcpu", "nf_key", "nf_hash_big", "nf_hash_small", "nf_hash_ptr",
                  "nf_fast_1way", "nf_fast_a128k", "nf_fast")


class Baselines:
    """The baseline programs, linked in the router namespace after the probe."""

    def __init__(self, ns_path: str):
        from bcc import BPF

        from conntracct.probe import bpfsys
        from conntracct.probe.loader import ProbeSettings, cflags

        self.ns_path = ns_path
        self.bpf = BPF(text=BASELINES.encode(), cflags=cflags("netfilter", ProbeSettings.from_config()))
        self.fds = {name: self.bpf.load_func(name.encode(), bpfsys.BPF_PROG_TYPE_NETFILTER,
                                             attach_type=bpfsys.BPF_NETFILTER).fd
                    for name in BASELINE_NAMES}
        self.links: list[int] = []

    def link(self) -> None:
        from conntracct import netns
        from conntracct.probe import bpfsys

        with netns.entered(self.ns_path):
            # Two BPF programs may not share a hook priority (EBUSY): one each.
            for n, name in enumerate(BASELINE_NAMES, 1):
                for family, hook in bpfsys.PROBE_HOOKS:
                    self.links.append(bpfsys.link_netfilter(self.fds[name], family, hook,
                                                            bpfsys.PRIORITY_AFTER_CONNTRACK + n))

    def unlink(self) -> None:
        for fd in self.links:
            os.close(fd)
        self.links = []

    def stats(self) -> dict[str, tuple[int, int]]:
        from conntracct.probe import bpfsys
        return {name: bpfsys.prog_run_stats(fd) for name, fd in self.fds.items()}

    def close(self) -> None:
        self.unlink()
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
        probe = lambda: prog_stats_of_pid(agent.proc.pid, BPF_PROG_TYPE_NETFILTER)  # noqa: E731
        with bpf_run_stats() as how:
            # The probe alone, as it runs on a user's host: the number judged.
            alone = probe()
            time.sleep(seconds)
            alone_after = probe()
            # Then beside the baselines, for the attribution: 15 more programs
            # per packet share the caches, so every figure here is higher.
            baselines.link()
            try:
                time.sleep(warmup)
                before = {"probe": probe(), **baselines.stats()}
                time.sleep(seconds)
                after = {"probe": probe(), **baselines.stats()}
            finally:
                baselines.unlink()
    finally:
        result = traffic.stop()
    before["probe alone"], after["probe alone"] = alone, alone_after
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
        runs, alone = cost["probe alone"]["run_cnt"], cost["probe alone"]["ns_per_run"]
        full, empty = cost["probe"]["ns_per_run"], cost["nf_return"]["ns_per_run"]
        read_ct, read_ext = cost["nf_read_ct"]["ns_per_run"], cost["nf_read_ext"]["ns_per_run"]
        report.row(f"netfilter probe, {label}: ns/packet (run_time_ns/run_cnt)", f"{alone:.0f} ns",
                   f"<= {TARGET_NS} ns", alone <= TARGET_NS,
                   f"{runs / args.seconds:,.0f} packets/s; the probe alone on its hooks"
                   + (f"; stats via {how.split()[0]}" if n == 0 else ""))
        report.row("  the same probe beside the 15 baselines below (shared caches)", f"{full:.0f} ns")
        report.row("  empty program on the same hooks (invocation + statistics)", f"{empty:.0f} ns")
        report.row("  probe minus empty program", f"{full - empty:.0f} ns")
        report.row("    read skb->_nfct and nf_conn (nf_read_ct - empty)", f"{read_ct - empty:.0f} ns")
        report.row("    extension offsets + timestamp (nf_read_ext - nf_read_ct)", f"{read_ext - read_ct:.0f} ns")
        report.row("    key, clock, hash lookup, rate check, records (probe - nf_read_ext)",
                   f"{full - read_ext:.0f} ns")
        finer = [("skb->_nfct, bpf_probe_read_kernel", "nf_nfct", "nf_return"),
                 ("skb->_nfct, direct load (BTF pointer)", "nf_nfct_direct", "nf_return"),
                 ("bpf_ktime_get_ns", "nf_ktime", "nf_read_ext"),
                 ("bpf_jiffies64", "nf_jiffies", "nf_read_ext"),
                 ("per-CPU array + array lookup", "nf_pcpu", "nf_read_ext"),
                 ("build the 56-byte key", "nf_key", "nf_read_ext"),
                 (f"56-byte key, hash map of {MAX_FLOWS_NOTE} (hit)", "nf_hash_big", "nf_key"),
                 ("56-byte key, hash map of 1,024 (hit)", "nf_hash_small", "nf_key"),
                 (f"8-byte key (nf_conn pointer), hash map of {MAX_FLOWS_NOTE}", "nf_hash_ptr", "nf_read_ext")]
        finer.append(("the probe's fast path alone", "nf_fast", "nf_return"))
        finer.append(("the probe's slow path, on average per packet", "probe", "nf_fast"))
        finer.append(("fast path, 8-way hint table of 128 KB instead", "nf_fast_a128k", "nf_return"))
        finer.append(("fast path, direct-mapped hint table of 128 KB instead", "nf_fast_1way", "nf_return"))
        for what, prog, base in finer:
            if prog in cost and base in cost:
                report.row(f"      baseline: {what} ({prog} - {base})",
                           f"{cost[prog]['ns_per_run'] - cost[base]['ns_per_run']:.0f} ns")
    report.row("kprobe / fentry: ns/packet", "VM: ./tasks.py vm-test", f"<= {TARGET_NS} ns", None,
               "kprobes and fentry cannot attach on this host")
    report.save(args.json)


if __name__ == "__main__":
    main()
