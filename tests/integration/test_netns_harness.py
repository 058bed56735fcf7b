"""Proves the network-namespace harness in tests/netns works on this kernel.

Root only (creates namespaces, nft rules, raw sockets).  Set
CONNTRACCT_CHURN_STRICT=1 to make the churn tests fail below 5,000 flows/s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.netns import Topology, cleanup_stale, find_flows, list_namespaces, parse_flow_line, parse_stats

_MISSING = [tool for tool in ("ip", "nft", "conntrack") if shutil.which(tool) is None]
_skip_unless_root = pytest.mark.skipif(
    os.geteuid() != 0 or bool(_MISSING),
    reason="needs root (network namespaces, nftables, raw sockets)"
    if os.geteuid() != 0
    else f"missing tools: {', '.join(_MISSING)}",
)


def needs_root(fn):
    """Marks a test ``root`` and skips it, with the reason, when not root."""
    return pytest.mark.root(_skip_unless_root(fn))

CHURN_RATE = 5000               # flows/s the harness must sustain
CHURN_ASK = CHURN_RATE * 1.1    # asked of the generator, so pacing jitter cannot miss
CHURN_STRICT = bool(os.environ.get("CONNTRACCT_CHURN_STRICT"))


def _ours() -> list[str]:
    return [n for n in list_namespaces() if n.startswith(f"cta-{os.getpid()}-")]


@pytest.fixture
def topo_factory():
    """Build Topology objects; every one is closed, and none may leak."""
    made: list[Topology] = []

    def make(**kw) -> Topology:
        topo = Topology(**kw)
        made.append(topo)
        return topo.start()

    yield make
    for topo in made:
        topo.close()
    assert _ours() == [], "namespaces left behind"


# Long enough that flows are still listed when a test looks (defaults are 1-2 s).
LONG = {"tcp_timeout_time_wait": 30, "tcp_timeout_close": 30, "udp_timeout": 30,
        "udp_timeout_stream": 30, "icmp_timeout": 30, "icmpv6_timeout": 30}


@pytest.fixture
def topo(topo_factory) -> Topology:
    return topo_factory(timeouts=LONG)


@pytest.fixture
def acct_topo(topo_factory) -> Topology:
    return topo_factory(acct=True, timestamp=True, timeouts=LONG)


@pytest.fixture
def short_acct_topo(topo_factory) -> Topology:
    """Default (short) timeouts: flows end within seconds."""
    return topo_factory(acct=True, timestamp=True)


# ---------------------------------------------------------------- parsing
# (no root needed: these pin the conntrack-tools text format we rely on)

def test_parse_list_line_icmp_with_ids():
    line = ("ipv4     2 icmp     1 29 src=192.0.2.2 dst=198.51.100.2 type=8 code=0 id=77 "
            "packets=3 bytes=252 src=198.51.100.2 dst=198.51.100.1 type=0 code=0 id=77 "
            "packets=3 bytes=252 mark=5 zone=3 delta-time=4 "
            "[start=Tue Nov 24 22:24:45 2026] use=1 id=1894773258")
    f = parse_flow_line(line)
    assert f["family"] == "ipv4" and f["proto"] == "icmp" and f["timeout"] == 29
    assert f["orig"] == {"src": "192.0.2.2", "dst": "198.51.100.2", "type": 8, "code": 0,
                         "id": 77, "packets": 3, "bytes": 252}
    assert f["reply"]["dst"] == "198.51.100.1" and f["reply"]["type"] == 0
    assert (f["mark"], f["zone"], f["delta_time"], f["use"], f["id"]) == (5, 3, 4, 1, 1894773258)
    assert f["start"] is not None and f["state"] is None


def test_parse_destroy_event_without_timeout():
    line = ("[DESTROY] ipv6     10 tcp      6 TIME_WAIT src=2001:db8:1::2 dst=2001:db8:2::2 "
            "sport=33390 dport=20001 packets=9 bytes=5656 src=2001:db8:2::2 dst=2001:db8:2::1 "
            "sport=20001 dport=33390 packets=7 bytes=612 [ASSURED] delta-time=0 "
            "[start=Tue Nov 24 22:31:08 2026] [stop=Tue Nov 24 22:31:08 2026] id=2092655098 "
            "[USERSPACE] portid=6062")
    f = parse_flow_line(line)
    assert f["event"] == "DESTROY" and f["timeout"] is None and f["state"] == "TIME_WAIT"
    assert f["orig"]["sport"] == 33390 and f["reply"]["packets"] == 7
    assert f["assured"] and f["id"] == 2092655098 and f["stop"] is not None


def test_parse_default_format_and_stats():
    f = parse_flow_line("udp      17 29 src=2001:db8:1::2 dst=2001:db8:2::2 sport=5 dport=6 "
                        "[UNREPLIED] src=2001:db8:2::2 dst=2001:db8:1::2 sport=6 dport=5 mark=0 use=1")
    assert f["family"] == "ipv6" and f["unreplied"] and f["reply"]["sport"] == 6
    assert parse_flow_line("conntrack v1.4.7 (conntrack-tools): 2 flow entries") is None
    stats = parse_stats("cpu=0 found=0 invalid=2 drop=1\ncpu=1 found=3 invalid=1 drop=0\n")
    assert stats == {"found": 3, "invalid": 3, "drop": 1}


# ----------------------------------------------------------- connectivity

@needs_root
@pytest.mark.parametrize("family", [4, 6])
def test_tcp_through_nat(topo, family):
    nat = topo.addr("nat", family)
    t = topo.tcp_transfer(3000, reply_bytes=500, family=family)
    assert (t.sent, t.received, t.server_received, t.server_sent) == (3000, 500, 3000, 500)
    assert t.peer[0] == nat  # the server saw the masquerade address
    [flow] = find_flows(topo.conntrack_list(), proto="tcp", orig_sport=t.sport)
    assert flow["family"] == f"ipv{family}"
    assert flow["orig"]["src"] == topo.addr("client", family)
    assert flow["orig"]["dst"] == topo.addr("server", family)
    assert flow["reply"]["src"] == topo.addr("server", family)
    assert flow["reply"]["dst"] == nat
    assert flow["assured"]
    assert "packets" not in flow["orig"]  # accounting is off by default


@needs_root
@pytest.mark.parametrize("family", [4, 6])
def test_udp_and_icmp_through_nat(topo, family):
    nat = topo.addr("nat", family)
    u = topo.udp_exchange(3, 100, family=family, sport=40000 + family)
    assert (u.sport, u.sent, u.received, u.server_received) == (40000 + family, 3, 3, 3)
    assert u.peer == (nat, 40000 + family)
    p = topo.ping(2, family=family, ident=700 + family)
    assert p.received == 2
    flows = topo.conntrack_list()
    [uf] = find_flows(flows, proto="udp", orig_sport=u.sport)
    assert uf["reply"]["dst"] == nat
    icmp = "icmp" if family == 4 else "icmpv6"
    [pf] = find_flows(flows, proto=icmp, orig_id=p.ident)
    assert pf["orig"]["type"] == (8 if family == 4 else 128)
    assert pf["reply"]["dst"] == nat


# --------------------------------------------------------------- counters

@needs_root
def test_counters_when_acct_on(acct_topo):
    topo = acct_topo
    assert topo.sysctl("router", "net.netfilter.nf_conntrack_acct") == "1"
    t = topo.tcp_transfer(100_000, reply_bytes=20_000)
    u4 = topo.udp_exchange(4, 100)
    u6 = topo.udp_exchange(2, 60, reply_size=500, family=6)
    p = topo.ping(3, size=56)
    flows = topo.conntrack_list()
    [tf] = find_flows(flows, proto="tcp", orig_sport=t.sport)
    assert tf["orig"]["bytes"] > 100_000 and tf["reply"]["bytes"] > 20_000
    assert tf["start"] is not None  # timestamp extension on
    [uf] = find_flows(flows, proto="udp", orig_sport=u4.sport, orig_dport=u4.dport)
    # IPv4 UDP: 20 + 8 header bytes per datagram, counted at layer 3.
    assert (uf["orig"]["packets"], uf["orig"]["bytes"]) == (4, 4 * 128)
    assert (uf["reply"]["packets"], uf["reply"]["bytes"]) == (4, 4 * 128)
    [uf6] = find_flows(flows, proto="udp", orig_sport=u6.sport, orig_dport=u6.dport)
    assert (uf6["orig"]["bytes"], uf6["reply"]["bytes"]) == (2 * 108, 2 * 548)
    [pf] = find_flows(flows, proto="icmp", orig_id=p.ident)
    assert (pf["orig"]["packets"], pf["orig"]["bytes"]) == (3, 3 * 84)


@needs_root
def test_no_counters_for_entries_created_before_acct(topo):
    assert topo.sysctl("router", "net.netfilter.nf_conntrack_acct") == "0"
    port = topo.next_port()
    first = topo.udp_exchange(1, 64, sport=41000, port=port)
    topo.set_sysctls("router", {"net.netfilter.nf_conntrack_acct": 1})
    topo.udp_exchange(1, 64, sport=41000, port=port)  # same entry (udp timeout 2 s)
    second = topo.udp_exchange(1, 64, sport=41001)
    flows = topo.conntrack_list()
    [old] = find_flows(flows, proto="udp", orig_sport=first.sport)
    [new] = find_flows(flows, proto="udp", orig_sport=second.sport)
    assert "packets" not in old["orig"]
    assert new["orig"]["packets"] == 1


# ----------------------------------------------------------------- events

@needs_root
def test_destroy_events_on_flush(acct_topo):
    topo = acct_topo
    with topo.conntrack_events() as cap:
        t4 = topo.tcp_transfer(5000, reply_bytes=1000, family=4)
        t6 = topo.tcp_transfer(5000, reply_bytes=1000, family=6)
        u = topo.udp_exchange(2, 80, family=6)
        p = topo.ping(2, family=6)
        topo.flush()
    events = cap.events
    assert not cap.lost_events
    assert all(e["event"] == "DESTROY" for e in events)
    for t, family in ((t4, 4), (t6, 6)):
        [e] = find_flows(events, proto="tcp", orig_sport=t.sport, orig_dport=t.dport)
        assert e["family"] == f"ipv{family}"
        assert e["reply"]["dst"] == topo.addr("nat", family)
        assert e["orig"]["bytes"] > 5000 and e["reply"]["bytes"] > 1000
        assert e["start"] is not None and e["stop"] is not None
    [ue] = find_flows(events, proto="udp", orig_sport=u.sport)
    assert ue["orig"]["packets"] == 2 and ue["reply"]["dst"] == topo.nat_v6
    [pe] = find_flows(events, proto="icmpv6", orig_id=p.ident)
    assert pe["reply"]["packets"] == 2


@needs_root
def test_destroy_events_on_timeout(short_acct_topo):
    topo = short_acct_topo
    with topo.conntrack_events() as cap:
        u = topo.udp_exchange(2, 64)
        t = topo.tcp_transfer(1000, family=6)
        started = time.monotonic()
        [ue] = cap.wait_for(proto="udp", orig_sport=u.sport, timeout=20)
        [te] = cap.wait_for(proto="tcp", orig_sport=t.sport, timeout=20)
        waited = time.monotonic() - started
    print(f"\ntimeout DESTROY events arrived after {waited:.1f}s")
    assert "[USERSPACE]" not in ue["line"]  # reaped by the kernel, not by us
    assert ue["orig"]["packets"] == 2 and ue["reply"]["packets"] == 2
    assert te["state"] == "TIME_WAIT" and te["orig"]["bytes"] > 1000
    assert topo.wait_conntrack_empty(timeout=15) == 0


# ------------------------------------------------------------------ churn

def _report(record_property, result) -> None:
    print("\n" + result.summary())
    record_property("churn_rate", round(result.rate))
    record_property("churn_completed", result.completed)
    record_property("churn_failed", result.failed)


def _check(result, target=CHURN_RATE) -> None:
    assert result.completed > 0, result.summary()
    if CHURN_STRICT:
        assert result.rate >= target, result.summary()
        assert result.failed <= result.attempted * 0.001, result.summary()
        assert result.table_full_drops == 0, result.summary()


@needs_root
@pytest.mark.slow
def test_tcp_churn_rate(topo_factory, record_property):
    topo = topo_factory()
    result = topo.churn(duration=10, rate=CHURN_ASK)
    _report(record_property, result)
    _check(result)


@needs_root
@pytest.mark.slow
def test_tcp_churn_rate_with_cpu_hog(topo_factory, record_property):
    """The agent under test will compete for CPU: one core is kept busy."""
    hog = subprocess.Popen([sys.executable, "-c",
                            "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass"])
    try:
        topo = topo_factory()
        result = topo.churn(duration=10, rate=CHURN_ASK)
    finally:
        hog.kill()
        hog.wait()
    _report(record_property, result)
    _check(result)


@needs_root
@pytest.mark.slow
def test_udp_churn(topo_factory, record_property):
    topo = topo_factory()
    result = topo.churn(duration=3, rate=CHURN_ASK, proto="udp", family=6)
    _report(record_property, result)
    _check(result)


@needs_root
@pytest.mark.slow
def test_churn_flows_all_end_in_destroy_events(topo_factory):
    """Every churn flow is seen ending: what an agent's DESTROY count must match."""
    topo = topo_factory(acct=True)
    with topo.conntrack_events() as cap:
        result = topo.churn(duration=2, rate=CHURN_RATE)
        assert topo.wait_conntrack_empty(timeout=20) == 0
    assert not cap.lost_events, cap.stderr
    ends = find_flows(cap.events, proto="tcp", orig_dport=result.port)
    print(f"\n{result.summary()}; DESTROY events: {len(ends)}")
    assert result.failed == 0
    assert len(ends) == result.completed
    assert all(e["orig"]["packets"] >= 4 and e["reply"]["packets"] >= 3 for e in ends)
    # Server closes first, so nearly all end in TIME_WAIT; the odd reused
    # client port meets the server's TIME_WAIT socket and ends in CLOSE (RST).
    clean = sum(e["state"] == "TIME_WAIT" for e in ends)
    assert clean >= 0.99 * len(ends), f"{clean}/{len(ends)} ended in TIME_WAIT"


@needs_root
@pytest.mark.slow
def test_python_churn_fallback(topo_factory, record_property):
    """The pure-Python generator (used when gcc is missing) still works."""
    topo = topo_factory()
    result = topo.churn(duration=2, rate=CHURN_ASK, engine="python")
    _report(record_property, result)
    assert result.engine == "python" and result.completed > 0 and result.failed == 0


# ---------------------------------------------------------------- cleanup

@needs_root
def test_stale_namespaces_are_removed():
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid  # a pid that no longer runs
    name = f"cta-{dead}-1-router"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in cleanup_stale()
        assert name not in list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@needs_root
def test_close_removes_everything():
    with Topology() as topo:
        names = list(topo.names.values())
        assert set(names) <= set(list_namespaces())
        topo.popen("server", "sleep", "300")
    assert not set(names) & set(list_namespaces())
