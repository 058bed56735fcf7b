"""The agent end to end on the real kernel: client -> router (forwarding,
masquerade NAT) -> server namespaces, the agent attached in the router.

For every flow: exactly one NEW first and one DESTROY last, UPDATEs no more
often than the rate curve allows, deltas that add up to the totals, DESTROY
totals equal to the kernel's final counters (independently captured with
`conntrack -E`), and NAT visible as a REPLY tuple that is not the mirror of
the ORIGINAL one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.integration.running_agent import IN_GUEST, TEST_MODE, RunningAgent, by_flow, curve_interval_ns, find
from tests.netns import Topology, find_flows

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

DELTAS = ("packets_orig", "bytes_orig", "packets_reply", "bytes_reply")


def assert_flow_lifecycle(recs: list[dict]) -> None:
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "new" and kinds.count("new") == 1, kinds
    assert kinds[-1] == "destroy" and kinds.count("destroy") == 1, kinds
    assert set(kinds[1:-1]) <= {"update"}, kinds
    for key in DELTAS:
        assert sum(r["delta_" + key] for r in recs) == recs[-1][key], (key, recs)
        totals = [r[key] for r in recs]
        assert totals == sorted(totals), (key, totals)   # counters never go back
    # Rate curve: an UPDATE comes no sooner than the interval for the flow's
    # age at the previous record (the kernel schedules it from there).
    start = recs[0]["start_ns"]
    assert start > 0
    for prev, cur in zip(recs, recs[1:], strict=False):
        if cur["kind"] == "update":
            gap = cur["timestamp_ns"] - prev["timestamp_ns"]
            allowed = curve_interval_ns(prev["timestamp_ns"] - start)
            assert gap >= allowed - 5_000_000, (gap, allowed, cur)   # 5 ms: clock conversion slack


def assert_matches_kernel(destroy: dict, event: dict) -> None:
    """DESTROY totals == the kernel's final counters from `conntrack -E`."""
    assert (destroy["packets_orig"], destroy["bytes_orig"]) == (event["orig"]["packets"], event["orig"]["bytes"])
    assert (destroy["packets_reply"], destroy["bytes_reply"]) == (event["reply"]["packets"], event["reply"]["bytes"])
    assert destroy["reply"]["src"] == event["reply"]["src"] and destroy["reply"]["dst"] == event["reply"]["dst"]


@pytest.fixture
def topo():
    with Topology() as t:   # acct/timestamp off: the agent must turn them on
        yield t


def test_flows_end_to_end_through_nat(topo):
    assert topo.sysctl("router", "net.netfilter.nf_conntrack_acct") == "0"
    agent = RunningAgent(topo)
    # sysctl.manage turned accounting and timestamps on in the router only.
    assert topo.sysctl("router", "net.netfilter.nf_conntrack_acct") == "1"
    assert topo.sysctl("router", "net.netfilter.nf_conntrack_timestamp") == "1"
    assert topo.sysctl("client", "net.netfilter.nf_conntrack_acct") == "0"
    with topo.conntrack_events() as cap:
        tcp = {size: topo.tcp_transfer(size, reply_bytes=size // 4) for size in (0, 1_000, 100_000, 3_000_000)}
        tcp6 = topo.tcp_transfer(200_000, reply_bytes=1_000, family=6)
        udp = topo.udp_exchange(5, 200, reply_size=100)
        udp6 = topo.udp_exchange(3, 64, family=6)
        pings = [topo.ping(24, interval=0.25), topo.ping(3, family=6)]   # the first lives ~6 s
        time.sleep(0.5)
        topo.flush()
    agent.wait_for_records(lambda rs: sum(r["kind"] == "destroy" for r in rs) >= 10)
    assert agent.stop() == 0
    assert "Traceback" not in agent.stderr
    # restore: true put the router's sysctls back.
    assert topo.sysctl("router", "net.netfilter.nf_conntrack_acct") == "0"

    flows = by_flow(agent.records())
    checked = 0
    # By both ports: flows to different ports may share a source port
    ports = lambda f: (dict(sport=f.sport, dport=f.dport), dict(orig_sport=f.sport, orig_dport=f.dport))  # noqa: E731
    cases = [(dict(proto="tcp", family=4, **ports(t)[0]), dict(proto="tcp", **ports(t)[1]), topo.nat_v4)
             for t in tcp.values()]
    cases += [(dict(proto="tcp", family=6, **ports(tcp6)[0]), dict(proto="tcp", **ports(tcp6)[1]), topo.nat_v6),
              (dict(proto="udp", family=4, **ports(udp)[0]), dict(proto="udp", **ports(udp)[1]), topo.nat_v4),
              (dict(proto="udp", family=6, **ports(udp6)[0]), dict(proto="udp", **ports(udp6)[1]), topo.nat_v6),
              (dict(proto="icmp", icmp_id=pings[0].ident), dict(proto="icmp", orig_id=pings[0].ident), topo.nat_v4),
              (dict(proto="icmpv6", icmp_id=pings[1].ident), dict(proto="icmpv6", orig_id=pings[1].ident),
               topo.nat_v6)]
    for want, kernel_want, nat_address in cases:
        matching = find(flows, **want)
        assert len(matching) == 1, (want, len(matching))
        recs = matching[0]
        assert_flow_lifecycle(recs)
        [event] = find_flows(cap.events, **kernel_want)
        assert_matches_kernel(recs[-1], event)
        assert recs[-1]["nat"] and recs[-1]["reply"]["dst"] == nat_address
        checked += 1
    assert checked == len(cases) == 9

    # Payload sizes are visible in the byte totals (plus headers, plus what
    # TCP sent again: a retransmission is a packet the router counts too).
    for size, t in tcp.items():
        [recs] = find(flows, proto="tcp", sport=t.sport, dport=t.dport, family=4)
        headers = recs[-1]["packets_orig"] * 80
        assert size <= recs[-1]["bytes_orig"] <= size + t.retransmitted + headers, t
    # The 6-second ping got UPDATEs, and no more than the curve allows.
    [ping_recs] = find(flows, proto="icmp", icmp_id=pings[0].ident)
    updates = [r for r in ping_recs if r["kind"] == "update"]
    assert 2 <= len(updates) <= 5, [r["kind"] for r in ping_recs]
    assert ping_recs[-1]["packets_orig"] == 24 and ping_recs[-1]["icmp"]["type"] == 8


def test_destroy_totals_equal_the_live_table_before_expiry(topo):
    """Counters read with `conntrack -L` while the flow is idle equal the DESTROY totals."""
    # The flush ends the flow: the lab's 2 s UDP timeout could end it first
    # while `conntrack -L` starts (seen in the vm-test guest on a loaded host).
    topo.set_sysctls("router", {"net.netfilter.nf_conntrack_udp_timeout": 300,
                                "net.netfilter.nf_conntrack_udp_timeout_stream": 300})
    agent = RunningAgent(topo)
    t = topo.udp_exchange(4, 300, reply_size=50)
    [live] = find_flows(topo.conntrack_list(), proto="udp", orig_sport=t.sport)
    topo.flush()
    agent.wait_for_records(lambda rs: any(r["kind"] == "destroy" for r in rs))
    assert agent.stop() == 0
    [recs] = find(by_flow(agent.records()), proto="udp", sport=t.sport)
    assert_flow_lifecycle(recs)
    assert_matches_kernel(recs[-1], live)


def test_flows_from_before_the_agent_are_backdated_and_still_end(topo):
    """A flow older than the agent gets no NEW storm; its first record is a
    back-dated UPDATE, and its end is reported.  In netfilter mode conntrack
    sends no DESTROY event for it (it predates any event listener), so the
    agent's sweep finds its end (end_unseen, last seen totals); in kprobe and
    fentry modes the destructor hook reports it with the final totals."""
    topo.set_sysctls("router", {"net.netfilter.nf_conntrack_acct": 1, "net.netfilter.nf_conntrack_timestamp": 1,
                                "net.netfilter.nf_conntrack_events": 2,
                                # outlive the agent's start-up (BCC compiles for ~10 s under emulation)
                                "net.netfilter.nf_conntrack_icmp_timeout": 300})
    first = topo.ping(2)   # a flow that exists before the agent starts
    agent = RunningAgent(topo, config={"probe": {"mode": TEST_MODE, "rate_curve": [{"then": "1s"}],
                                                 "sweep_interval": "1s"}})
    topo.ping(6, interval=0.5, ident=first.ident)   # same ICMP flow, now seen by the probe
    topo.flush()
    recs_all = agent.wait_for_records(lambda rs: any(r["kind"] == "destroy" for r in rs), timeout=45)
    assert agent.stop() == 0
    [recs] = find(by_flow(recs_all), proto="icmp", icmp_id=first.ident)
    kinds = [r["kind"] for r in recs]
    assert "new" not in kinds and kinds[-1] == "destroy", kinds
    assert all("backdated" in r["flags"] for r in recs), recs
    # nf_conntrack_events=2 gives a new flow an event extension whenever any
    # ctnetlink listener exists, in any namespace (global since Linux 6.3:
    # another agent on the host is enough); then ctnetlink reports its end.
    if TEST_MODE == "netfilter" and "no_events" in recs[0]["flags"]:
        assert "end_unseen" in recs[-1]["flags"]
        assert recs[-1]["packets_orig"] >= 2
    else:
        assert "end_unseen" not in recs[-1]["flags"]
        assert (recs[-1]["packets_orig"], recs[-1]["packets_reply"]) == (8, 8)


def _udp_burst(topo, dport: int, sports: range, per_flow: int = 1) -> None:
    """UDP datagrams from the client, one flow per source port, no server listening."""
    code = (f"import socket\nfor p in {list(sports)!r}:\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"    s.bind(({topo.client_v4!r}, p))\n"
            f"    for _ in range({per_flow}):\n"
            f"        s.sendto(b'x' * 32, ({topo.server_v4!r}, {dport}))\n"
            "    s.close()\n")
    topo.run("client", sys.executable, "-c", code)


def test_entries_never_confirmed_produce_no_records(topo):
    """A packet dropped before conntrack confirms its entry (here in the
    router's FORWARD chain) leaves an unconfirmed entry that is freed at once.
    The destructor runs for it (kprobe/fentry modes hook it), but it was never
    a flow: no NEW, no DESTROY, as the kernel reports none either."""
    topo.run("router", "nft", "insert rule inet conntracct_test forward udp dport 7 drop")
    agent = RunningAgent(topo)
    with topo.conntrack_events(("NEW", "DESTROY")) as cap:
        _udp_burst(topo, 7, range(41000, 41005), per_flow=2)
        control = topo.udp_exchange(2, 100)     # a confirmed flow alongside
        time.sleep(0.5)
        topo.flush()
    agent.wait_for_records(lambda rs: any(r["kind"] == "destroy" and r["orig"]["sport"] == control.sport
                                          for r in rs))
    assert agent.stop() == 0
    flows = by_flow(agent.records())
    assert find_flows(cap.events, proto="udp", orig_dport=7) == []
    assert find(flows, proto="udp", dport=7) == []
    [recs] = find(flows, proto="udp", sport=control.sport)
    assert_flow_lifecycle(recs)


CT_GLOBALS = Path("/proc/sys/net/netfilter")


@pytest.mark.skipif(not IN_GUEST, reason="needs a disposable kernel: the table size is a global setting "
                                          "(initial namespace); ./tasks.py vm-test runs this in its guest")
def test_early_dropped_flows_end_exactly_once(topo):
    """A full table evicts unreplied entries to make room (early_drop).  Every
    evicted flow ends exactly once: one NEW, one DESTROY with the kernel's
    final totals; flows the kernel never admitted leave no record."""
    saved = {name: (CT_GLOBALS / name).read_text() for name in ("nf_conntrack_max", "nf_conntrack_buckets")}
    agent = RunningAgent(topo)
    try:
        # 8 buckets: early_drop scans 8 of them, so it always finds a victim.
        (CT_GLOBALS / "nf_conntrack_buckets").write_text("8\n")
        (CT_GLOBALS / "nf_conntrack_max").write_text("32\n")
        with topo.conntrack_events(("DESTROY",)) as cap:
            _udp_burst(topo, 9999, range(42000, 42100), per_flow=2)
            stats = topo.conntrack_stats()
            time.sleep(0.5)
            topo.flush()
    finally:
        for name, value in saved.items():
            (CT_GLOBALS / name).write_text(value)
    kernel = {e["orig"]["sport"]: e for e in find_flows(cap.events, proto="udp", orig_dport=9999)}
    assert stats["early_drop"] > 0 and len(kernel) > 32, (stats, len(kernel))
    agent.wait_for_records(lambda rs: sum(r["kind"] == "destroy" and r["orig"]["dport"] == 9999
                                          for r in rs) >= len(kernel), timeout=60)
    assert agent.stop() == 0
    flows = find(by_flow(agent.records()), proto="udp", dport=9999)
    assert sorted(recs[0]["orig"]["sport"] for recs in flows) == sorted(kernel)
    for recs in flows:
        assert_flow_lifecycle(recs)
        assert_matches_kernel(recs[-1], kernel[recs[0]["orig"]["sport"]])


def test_agent_exits_0_on_sigint_and_leaves_no_programs(topo):
    agent = RunningAgent(topo)
    assert agent.stop(sig=2) == 0
    assert "conntracct stopped" in agent.stderr
    out = topo.run("router", "bpftool", "link", "show", check=False).stdout if os.path.exists(
        "/usr/sbin/bpftool") else ""
    assert "netfilter" not in out
