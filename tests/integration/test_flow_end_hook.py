"""The flow-end hook the kprobe and fentry modes use (loader.DESTROY_FUNCS:
the conntrack destructor) runs exactly once for every entry, whatever ends
it, while the vmlinux wrapper nf_conntrack_destroy() misses the entries the
table itself frees.  Counted with plain kprobes on both, per kind of entry
(confirmed or not), in the router's namespace only.

Needs kprobes on conntrack functions: ./tasks.py vm-test runs it in a Debian
6.1 guest; on a kernel without kprobes it is skipped."""

from __future__ import annotations

import os
import time

import pytest

from conntracct.probe.btf import kernel_btf
from conntracct.probe.loader import destroy_func
from conntracct.probe.modes import try_kprobe
from conntracct.probe.offsets import kernel_offsets
from tests.integration.running_agent import IN_GUEST
from tests.integration.test_agent_netns import CT_GLOBALS, _udp_burst
from tests.netns import Topology, find_flows

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

WRAPPER = "nf_conntrack_destroy"   # vmlinux: nf_conntrack_put() -> nf_ct_hook->destroy

COUNTER = r"""
#include <uapi/linux/ptrace.h>
BPF_ARRAY(hits, u64, 4);    // [hook * 2 + confirmed], hook 0: destructor, 1: wrapper
static __always_inline int count(void *ct, int hook) {
    u64 status = 0, net = 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&status, sizeof(status), ct + CT_STATUS);
    bpf_probe_read_kernel(&net, sizeof(net), ct + CT_NET);
    bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + NET_INUM));
    if (inum != ROUTER_NETNS)
        return 0;
    hits.increment(hook * 2 + ((status >> IPS_CONFIRMED_BIT) & 1));
    return 0;
}
int on_destructor(struct pt_regs *ctx) { return count((void *)PT_REGS_PARM1(ctx), 0); }
int on_wrapper(struct pt_regs *ctx) { return count((void *)PT_REGS_PARM1(ctx), 1); }
"""


@pytest.fixture
def counters():
    if not try_kprobe().ok:
        pytest.skip(f"kprobes do not attach on this kernel: {try_kprobe().detail}")
    from bcc import BPF
    offsets = kernel_offsets(kernel_btf())
    with Topology(acct=True, timestamp=True) as topo:
        flags = [f"-D{k}={offsets[k]}" for k in ("CT_STATUS", "CT_NET", "NET_INUM", "IPS_CONFIRMED_BIT")]
        flags.append(f"-DROUTER_NETNS={topo.netns_inode('router')}")
        b = BPF(text=COUNTER.encode(), cflags=flags)
        try:
            b.attach_kprobe(event=destroy_func().encode(), fn_name=b"on_destructor")
            b.attach_kprobe(event=WRAPPER.encode(), fn_name=b"on_wrapper")

            def read() -> dict[str, int]:
                v = [b["hits"][i].value for i in range(4)]
                return {"destructor_unconfirmed": v[0], "destructor_confirmed": v[1],
                        "wrapper_unconfirmed": v[2], "wrapper_confirmed": v[3]}
            yield topo, read
        finally:
            b.cleanup()


def _since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def test_destructor_runs_once_per_confirmed_entry_and_the_wrapper_misses_them(counters):
    topo, read = counters
    with topo.conntrack_events(("DESTROY",)) as cap:
        before = read()
        topo.udp_exchange(2, 100)
        topo.tcp_transfer(10_000, reply_bytes=1_000)
        topo.ping(3)
        topo.ping(2, family=6)
        time.sleep(0.3)
        topo.flush()                                   # ended by conntrack -F
        topo.udp_exchange(1, 50)
        assert topo.wait_conntrack_empty(timeout=20) == 0   # ended by its timeout
        time.sleep(0.3)
        hits = _since(before, read())   # before the capture's closing sentinel entry
    assert len(cap.events) >= 5
    assert hits["destructor_confirmed"] == len(cap.events), hits
    assert hits["destructor_unconfirmed"] == 0, hits
    assert hits["wrapper_confirmed"] < len(cap.events), hits   # it cannot be the flow-end hook


def test_unconfirmed_entries_reach_both_and_are_not_flows(counters):
    """A packet dropped in FORWARD, before confirmation: its entry is freed
    with the skb, through the wrapper and the destructor, unconfirmed."""
    topo, read = counters
    topo.run("router", "nft", "insert rule inet conntracct_test forward udp dport 7 drop")
    with topo.conntrack_events(("NEW", "DESTROY")) as cap:
        before = read()
        _udp_burst(topo, 7, range(41000, 41005), per_flow=2)
        time.sleep(0.3)
        hits = _since(before, read())
    assert hits == {"destructor_unconfirmed": 10, "destructor_confirmed": 0,
                    "wrapper_unconfirmed": 10, "wrapper_confirmed": 0}, hits
    assert find_flows(cap.events, proto="udp") == []


@pytest.mark.skipif(not IN_GUEST, reason="needs a disposable kernel: the table size is a global setting "
                                          "(initial namespace); ./tasks.py vm-test runs this in its guest")
def test_early_dropped_entries_reach_the_destructor_once(counters):
    topo, read = counters
    saved = {name: (CT_GLOBALS / name).read_text() for name in ("nf_conntrack_max", "nf_conntrack_buckets")}
    try:
        (CT_GLOBALS / "nf_conntrack_buckets").write_text("8\n")
        (CT_GLOBALS / "nf_conntrack_max").write_text("32\n")
        with topo.conntrack_events(("DESTROY",)) as cap:
            before = read()
            _udp_burst(topo, 9999, range(42000, 42100), per_flow=2)
            early = topo.conntrack_stats()["early_drop"]
            topo.flush()
            time.sleep(0.3)
            hits = _since(before, read())
    finally:
        for name, value in saved.items():
            (CT_GLOBALS / name).write_text(value)
    assert early > 0
    assert hits["destructor_confirmed"] == len(cap.events) > 32, (hits, len(cap.events))
