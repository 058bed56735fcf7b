"""The self-test's verdicts (conntracct/selftest.py): which reports of a known
flow pass, which fail, and why; no root, no kernel."""

import socket

from conntracct import selftest
from conntracct.flow import DESTROY, FLAG_FIRST_SIGHT, NEW, UPDATE, FlowEvent, FlowTuple
from conntracct.lab import icmp
from conntracct.probe.ctnetlink import CtEntry, CtTuple
from conntracct.probe.modes import Check

ROUTER_NETNS = 4026532000


def tcp_flow(**kw):
    return selftest.KnownFlow(4, 6, "192.0.2.2", "198.51.100.2", sport=40000, dport=5000,
                              payload=(1000, 100), **kw)


def udp_flow():
    return selftest.KnownFlow(6, 17, "2001:db8:1::2", "2001:db8:2::2", sport=40001, dport=5001,
                              payload=(300, 150), packets=(3, 3))


def ping_flow():
    return selftest.KnownFlow(4, 1, "192.0.2.2", "198.51.100.2", icmp_id=77, payload=(168, 168), packets=(3, 3))


def nat_reply(flow):
    return FlowTuple(flow.dst, selftest.ROUTER_SERVER_SIDE[flow.family], flow.dport, flow.sport)


def event(flow, kind, totals, deltas=None, reply=None, flags=0, flow_id=1):
    po, bo, pr, br = totals
    dpo, dbo, dpr, dbr = deltas if deltas is not None else totals
    icmp = (8, 0, flow.icmp_id) if flow.icmp_id is not None else None
    return FlowEvent(kind=kind, flow_id=flow_id, family=flow.family, proto=flow.proto,
                     orig=FlowTuple(flow.src, flow.dst, flow.sport, flow.dport), reply=reply or nat_reply(flow),
                     packets_orig=po, bytes_orig=bo, packets_reply=pr, bytes_reply=br,
                     delta_packets_orig=dpo, delta_bytes_orig=dbo, delta_packets_reply=dpr, delta_bytes_reply=dbr,
                     start_ns=1, stop_ns=2 if kind == DESTROY else 0, ts_ns=3, netns=ROUTER_NETNS,
                     flags=flags, icmp=icmp)


def kernel_entry(flow, counters):
    af = socket.AF_INET if flow.family == 4 else socket.AF_INET6
    ip = lambda a: socket.inet_pton(af, a)   # noqa: E731
    nat = selftest.ROUTER_SERVER_SIDE[flow.family]
    if flow.icmp_id is not None:
        orig = CtTuple(ip(flow.src), ip(flow.dst), flow.proto, flow.icmp_id, 8 << 8)
        reply = CtTuple(ip(flow.dst), ip(nat), flow.proto, flow.icmp_id, 0)
    else:
        orig = CtTuple(ip(flow.src), ip(flow.dst), flow.proto, flow.sport, flow.dport)
        reply = CtTuple(ip(flow.dst), ip(nat), flow.proto, flow.dport, flow.sport)
    return CtEntry(af, orig, reply, counters=counters)


def exact_reports(flow, totals):
    """NEW then DESTROY whose deltas add up, and the kernel's matching entry."""
    first = (1, totals[1] // 2, 1, totals[3] // 2)
    rest = tuple(t - f for t, f in zip(totals, first, strict=True))
    return [event(flow, NEW, first), event(flow, DESTROY, totals, rest)], kernel_entry(flow, totals)


TCP_TOTALS = (10, 1000 + 10 * 40 + 12, 5, 100 + 5 * 40)
UDP_TOTALS = (3, 300 + 3 * 48, 3, 150 + 3 * 48)
PING_TOTALS = (3, 168 + 3 * 28, 3, 168 + 3 * 28)


def judge(flows_and_reports):
    flows = [f for f, _, _ in flows_and_reports]
    events = [e for _, evs, _ in flows_and_reports for e in evs]
    kernel = {f.key: k for f, _, k in flows_and_reports if k is not None}
    return {c.name: c for c in selftest.flow_checks(flows, events, kernel)}


def test_exact_reports_pass_every_check():
    cases = []
    for flow, totals in ((tcp_flow(), TCP_TOTALS), (udp_flow(), UDP_TOTALS), (ping_flow(), PING_TOTALS)):
        events, entry = exact_reports(flow, totals)
        cases.append((flow, events, entry))
    checks = judge(cases)
    assert set(checks) == {f"{p}/{v} {what}" for p, v in (("tcp", "ipv4"), ("udp", "ipv6"), ("icmp", "ipv4"))
                           for what in ("records", "totals", "bytes")} | {"nat"}
    assert all(c.ok for c in checks.values()), checks
    assert checks["udp/ipv6 bytes"].detail.endswith("exact")
    assert selftest.verdict(list(checks.values())) == ("self-test passed: 10 of 10 checks", True)


def test_updates_between_are_fine_when_deltas_add_up():
    flow = tcp_flow()
    events = [event(flow, NEW, (2, 200, 1, 50)), event(flow, UPDATE, (6, 700, 3, 200), (4, 500, 2, 150)),
              event(flow, DESTROY, TCP_TOTALS, (4, TCP_TOTALS[1] - 700, 2, TCP_TOTALS[3] - 200))]
    check = selftest.records_check(flow, events)
    assert check.ok and check.detail.startswith("1 new, 1 update, 1 destroy"), check


def test_missing_destroy_fails_records_totals_and_bytes():
    flow = tcp_flow()
    events, entry = exact_reports(flow, TCP_TOTALS)
    checks = judge([(flow, events[:1], entry)])
    assert not checks["tcp/ipv4 records"].ok and "0 destroy" in checks["tcp/ipv4 records"].detail
    assert not checks["tcp/ipv4 totals"].ok and "no destroy record" in checks["tcp/ipv4 totals"].detail
    assert not checks["tcp/ipv4 bytes"].ok and not checks["nat"].ok
    assert selftest.verdict(list(checks.values()))[1] is False


def test_two_news_or_wrong_order_fail():
    flow = tcp_flow()
    events, _ = exact_reports(flow, TCP_TOTALS)
    assert not selftest.records_check(flow, [events[0]] + events).ok
    check = selftest.records_check(flow, list(reversed(events)))
    assert not check.ok and "out of order: destroy new" in check.detail


def test_deltas_that_do_not_add_up_fail():
    flow = tcp_flow()
    events = [event(flow, NEW, (1, 100, 1, 60)), event(flow, DESTROY, TCP_TOTALS)]   # deltas = totals twice
    check = selftest.records_check(flow, events)
    assert not check.ok and "deltas add up to" in check.detail


def test_a_new_synthesized_at_the_end_is_a_failure():
    flow = udp_flow()
    events = [event(flow, NEW, UDP_TOTALS, flags=FLAG_FIRST_SIGHT),
              event(flow, DESTROY, UDP_TOTALS, (0, 0, 0, 0), flags=FLAG_FIRST_SIGHT)]
    check = selftest.records_check(flow, events)
    assert not check.ok and "first_sight" in check.detail


def test_destroy_totals_must_equal_the_kernels():
    flow = tcp_flow()
    events, entry = exact_reports(flow, TCP_TOTALS)
    entry.counters = (TCP_TOTALS[0] + 1,) + TCP_TOTALS[1:]
    check = selftest.totals_check(flow, events[-1], entry)
    assert not check.ok and "!= kernel 11 pkts" in check.detail
    assert "not in the router's conntrack table" in selftest.totals_check(flow, events[-1], None).detail
    entry.counters = None
    assert "accounting off" in selftest.totals_check(flow, events[-1], entry).detail


def test_tcp_bytes_must_hold_payload_and_headers():
    flow = tcp_flow()
    short = (10, 1000 + 10 * 40 - 1, 5, 100 + 5 * 40)
    assert not selftest.bytes_check(flow, event(flow, DESTROY, short)).ok
    assert selftest.bytes_check(flow, event(flow, DESTROY, (10, 1400, 5, 300))).ok


def test_datagram_counts_are_exact():
    flow = udp_flow()
    assert selftest.bytes_check(flow, event(flow, DESTROY, UDP_TOTALS)).ok
    for wrong in ((4,) + UDP_TOTALS[1:], UDP_TOTALS[:3] + (UDP_TOTALS[3] + 1,)):
        check = selftest.bytes_check(flow, event(flow, DESTROY, wrong))
        assert not check.ok and "expected 3 pkts" in check.detail


def test_nat_must_be_visible_and_match_the_kernel():
    flow = tcp_flow()
    events, entry = exact_reports(flow, TCP_TOTALS)
    mirror = FlowTuple(flow.dst, flow.src, flow.dport, flow.sport)
    events[-1] = event(flow, DESTROY, TCP_TOTALS, reply=mirror)
    check = selftest.nat_check([flow], {flow.key: events[-1]}, {flow.key: entry})
    assert not check.ok and "tcp/ipv4: reply 198.51.100.2 -> 192.0.2.2" in check.detail


def test_records_are_matched_by_original_tuple():
    flow, other = tcp_flow(), tcp_flow()
    other.sport += 1
    events, entry = exact_reports(flow, TCP_TOTALS)
    stray, _ = exact_reports(other, TCP_TOTALS)
    checks = judge([(flow, events + stray, entry)])
    assert all(c.ok for c in checks.values()), checks


def test_kernel_entries_and_records_share_keys():
    for flow in (tcp_flow(), udp_flow(), ping_flow()):
        events, entry = exact_reports(flow, (1, 1, 1, 1))
        assert selftest.entry_key(entry) == selftest.event_key(events[0]) == flow.key


def test_failed_traffic_is_one_failed_row():
    flow = tcp_flow(error="TCP to 198.51.100.2: timed out")
    checks = judge([(flow, [], None)])
    assert checks["tcp/ipv4 traffic"].detail == "TCP to 198.51.100.2: timed out"
    assert not checks["tcp/ipv4 traffic"].ok and "tcp/ipv4 records" not in checks
    assert not checks["nat"].ok   # nothing was sent


def test_losses():
    assert selftest.losses_check({"probe_records_lost": 0, "decode_errors": 0}).ok
    check = selftest.losses_check({"probe_records_lost": 3, "ctnetlink_overruns": 1})
    assert not check.ok and check.detail == "probe_records_lost 3, ctnetlink_overruns 1"


def test_verdict_counts_failures():
    checks = [Check("a", True, ""), Check("b", False, "x"), Check("c", False, "y")]
    assert selftest.verdict(checks) == ("self-test FAILED: 2 of 3 checks failed", False)


def test_icmp_echo_checksum_is_valid():
    packet = icmp.echo_request(4, 0x1234, 2, bytes(56))
    assert len(packet) == 64 and packet[:2] == b"\x08\x00"
    assert icmp.checksum(packet) == 0


class FakeNetwork:
    def path(self, role):
        return f"/run/netns/test-{role}"

    def inode(self, role):
        return ROUTER_NETNS


class FakeSource:
    """Stands in for FlowSource: reports one flow of the router and one of another namespace."""
    made = []

    def __init__(self, mode, settings, emit, stamped_since_start, netlink_rcvbuf, sweep_interval_s, netns_path):
        self.mode, self.netns_path, self.emit = mode, netns_path, emit
        FakeSource.made.append(self)

    def run(self, stop):
        flow = tcp_flow()
        mine = event(flow, NEW, TCP_TOTALS)
        other = event(flow, NEW, TCP_TOTALS)
        other.netns = ROUTER_NETNS + 1
        self.emit(other)
        self.emit(mine)
        stop.wait()

    def stats(self):
        return {"probe_records_lost": 0}

    def close(self):
        pass


def test_recorder_attaches_per_mode_and_keeps_the_routers_records(monkeypatch):
    from conntracct.config import default_config
    from conntracct.probe import source
    monkeypatch.setattr(source, "FlowSource", FakeSource)
    for mode, path in (("kprobe", None), ("fentry", None), ("netfilter", "/run/netns/test-router")):
        recorder = selftest.Recorder(mode, default_config(), FakeNetwork())
        assert recorder.wait_for(lambda events: len(events) == 1, 2.0)
        assert recorder.close() == {"probe_records_lost": 0}
        assert FakeSource.made[-1].netns_path == path
        assert [e.netns for e in recorder.events] == [ROUTER_NETNS] and recorder.elsewhere == 1
