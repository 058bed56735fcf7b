"""The ipfix sink against the collectors operators run, read back by them.

The real agent accounts the NAT lab's router (probe.netns) and exports to
nfdump's nfcapd and pmacct's nfacctd on loopback, while tshark captures what
goes to nfcapd.  For every test flow -- IPv4 and IPv6; TCP, UDP and ICMP --
the collectors must show its keys, the masquerade as its post-NAT address and
port, per-direction counters adding up to the kernel's final totals (from
`conntrack -E`), and times within the flow's life.  Then robustness: a UDP
collector restarting mid-stream, a TCP collector going away, and a bad
collector in the configuration.

Collector limits met here (docs/ipfix.md says the same): nfdump 1.7.1 and
pmacct 1.7.7 read no post-NAT IPv6 addresses (elements 281/282), so those are
checked with tshark and the ipfix library; nfdump keeps one counter per
direction and stores the delta (the element that comes last); pmacct reads
forward counters only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from tests.integration.running_agent import FAST_CURVE, RunningAgent, by_flow, exit_summary, find
from tests.netns import Topology, find_flows

pytest.importorskip("ipfix", reason="python3-ipfix (./tasks.py test installs it)")
from tests.servers.ipfix import Nfacctd, Nfcapd, TcpCollector, Tshark, decode, free_udp_port  # noqa: E402

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]


def _agent(topo, sinks: list[dict]) -> RunningAgent:
    return RunningAgent(topo, ns=None, config={
        "probe": {"mode": "netfilter", "netns": topo.ns_path("router"), "rate_curve": FAST_CURVE},
        "sinks": [{"type": "stdout", "format": "json", "flush_interval": "100ms"}, *sinks],
        "shutdown": {"drain_timeout": "3s"}})


def _ms(text: str) -> int:
    """nfdump's 'YYYY-MM-DDTHH:MM:SS.mmm' (UTC here: TZ=UTC) -> ms since the epoch."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def _pmacct_ms(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp() * 1000)


class Case:
    """One test flow: how the agent, the kernel and each collector name it."""

    def __init__(self, name, family, proto, agent_want, kernel_want, sport=None):
        self.name, self.family, self.proto, self.sport = name, family, proto, sport
        self.agent_want, self.kernel_want = agent_want, kernel_want

    def nfdump(self, records):
        src = "src4_addr" if self.family == 4 else "src6_addr"
        return [r for r in records if r["proto"] == self.proto and src in r
                and (self.sport is None or r.get("src_port") == self.sport)]

    def pmacct(self, records, client):
        names = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp"}
        return [r for r in records if r["ip_proto"] == names[self.proto] and r["ip_src"] == client
                and (self.sport is None or r["port_src"] == self.sport)]


def test_nat_lab_flows_in_nfdump_nfacctd_and_tshark():
    nfcapd, nfacctd = Nfcapd().start(), Nfacctd().start()
    tshark = Tshark(nfcapd.port).start()
    try:
        with Topology() as topo:
            agent = _agent(topo, [
                {"type": "ipfix", "name": "nfcapd", "collector": f"127.0.0.1:{nfcapd.port}",
                 "flush_interval": "200ms", "observation_domain_id": 7},
                {"type": "ipfix", "name": "nfacctd", "collector": f"127.0.0.1:{nfacctd.port}",
                 "flush_interval": "200ms"}])
            try:
                with topo.conntrack_events() as cap:
                    tcp = topo.tcp_transfer(100_000, reply_bytes=5_000)
                    tcp6 = topo.tcp_transfer(50_000, reply_bytes=1_000, family=6)
                    udp = topo.udp_exchange(5, 200, reply_size=100)
                    udp6 = topo.udp_exchange(3, 64, family=6)
                    ping = topo.ping(14, interval=0.25)     # lives ~3.5 s: UPDATEs as well
                    ping6 = topo.ping(3, family=6)
                    time.sleep(0.5)
                    topo.flush()
                agent.wait_for_records(lambda rs: sum(r["kind"] == "destroy" for r in rs) >= 6)
                time.sleep(1.5)   # the ipfix sinks flush every 200 ms
            finally:
                assert agent.stop() == 0
            assert "Traceback" not in agent.stderr
            nat = {4: topo.nat_v4, 6: topo.nat_v6}
            client = {4: topo.client_v4, 6: topo.client_v6}
        cases = [
            Case("tcp", 4, 6, dict(proto="tcp", sport=tcp.sport, family=4), dict(proto="tcp", orig_sport=tcp.sport),
                 tcp.sport),
            Case("tcp6", 6, 6, dict(proto="tcp", sport=tcp6.sport, family=6),
                 dict(proto="tcp", orig_sport=tcp6.sport), tcp6.sport),
            Case("udp", 4, 17, dict(proto="udp", sport=udp.sport, family=4), dict(proto="udp", orig_sport=udp.sport),
                 udp.sport),
            Case("udp6", 6, 17, dict(proto="udp", sport=udp6.sport, family=6),
                 dict(proto="udp", orig_sport=udp6.sport), udp6.sport),
            Case("icmp", 4, 1, dict(proto="icmp", icmp_id=ping.ident), dict(proto="icmp", orig_id=ping.ident)),
            Case("icmp6", 6, 58, dict(proto="icmpv6", icmp_id=ping6.ident), dict(proto="icmpv6", orig_id=ping6.ident)),
        ]
        flows = by_flow(agent.records())
        nfacctd_records = nfacctd.wait_for(lambda rs: all(c.pmacct(rs, client[c.family]) for c in cases))
    finally:
        tshark.stop()
        nfcapd.stop()
        nfacctd.stop()
    try:
        # nfcapd's own sequence check, on top of tshark's below.
        assert "Sequence Errors: 0, Bad Packets: 0" in nfcapd.log_text(), nfcapd.log_text()
        nfdump_records = nfcapd.flows()
        for case in cases:
            [recs] = find(flows, **case.agent_want)
            [kernel] = find_flows(cap.events, **case.kernel_want)
            destroy = recs[-1]
            assert destroy["kind"] == "destroy"
            got = case.nfdump(nfdump_records)
            # One record per exported agent record (UPDATEs and the DESTROY), none lost.
            assert len(got) == sum(r["kind"] in ("update", "destroy") for r in recs), (case.name, got)
            _check_nfdump(case, got, kernel, destroy, nat[case.family])
            _check_pmacct(case, case.pmacct(nfacctd_records, client[case.family]), kernel, nat[case.family])
        ping_records = cases[4].nfdump(nfdump_records)
        assert len(ping_records) >= 2, "the 3.5 s ping gets active-timeout records before its end"
        _check_tshark(tshark, nat, tcp6.sport)
    finally:
        for server in (nfcapd, nfacctd, tshark):
            server.cleanup()


def _check_nfdump(case, got, kernel, destroy, nat_address):
    # Keys.
    for r in got:
        src, dst = ("src4_addr", "dst4_addr") if case.family == 4 else ("src6_addr", "dst6_addr")
        assert (r[src], r[dst]) == (kernel["orig"]["src"], kernel["orig"]["dst"]), case.name
        if case.proto in (6, 17):
            assert (r["src_port"], r["dst_port"]) == (kernel["orig"]["sport"], kernel["orig"]["dport"])
            # Post-NAT port: the masquerade's, the REPLY tuple's destination port.
            assert (int(r["src_xlt_port"]), int(r["dst_xlt_port"])) == \
                (kernel["reply"]["dport"], kernel["reply"]["sport"]), case.name
        else:
            assert (r["icmp_type"], r["icmp_code"]) == (kernel["orig"]["type"], kernel["orig"]["code"])
        if case.family == 4:   # nfdump 1.7.1 maps no post-NAT IPv6 address (281/282)
            assert (r["src4_xlt_ip"], r["dst4_xlt_ip"]) == (nat_address, kernel["reply"]["src"]), case.name
        assert r["ip4_router"] == "127.0.0.1"
    # Counters per direction: the deltas of the flow's records add up to the kernel's final totals.
    assert sum(r["in_packets"] for r in got) == kernel["orig"]["packets"], case.name
    assert sum(r["in_bytes"] for r in got) == kernel["orig"]["bytes"], case.name
    assert sum(r["out_packets"] for r in got) == kernel["reply"]["packets"], case.name
    assert sum(r["out_bytes"] for r in got) == kernel["reply"]["bytes"], case.name
    # Times: conntrack's own (to the millisecond), within the flow's life as
    # `conntrack -E` prints it (whole seconds, converted to wall clock apart
    # from the agent's conversion: one second of slack each way).
    start_ms, stop_ms = destroy["start_ns"] // 10**6, destroy["stop_ns"] // 10**6
    for r in got:
        first, last = _ms(r["first"]), _ms(r["last"])
        assert first == start_ms, case.name
        assert (int(kernel["start"]) - 1) * 1000 <= first <= last <= (int(kernel["stop"]) + 1) * 1000, case.name
    assert max(_ms(r["last"]) for r in got) == stop_ms


def _check_pmacct(case, got, kernel, nat_address):
    assert got, case.name
    for r in got:
        assert (r["ip_src"], r["ip_dst"]) == (kernel["orig"]["src"], kernel["orig"]["dst"])
        if case.proto in (6, 17):
            assert (r["port_src"], r["port_dst"]) == (kernel["orig"]["sport"], kernel["orig"]["dport"])
            assert (r["post_nat_port_src"], r["post_nat_port_dst"]) == \
                (kernel["reply"]["dport"], kernel["reply"]["sport"]), case.name
        if case.family == 4:   # pmacct 1.7.7 reads no post-NAT IPv6 address either
            assert (r["post_nat_ip_src"], r["post_nat_ip_dst"]) == (nat_address, kernel["reply"]["src"])
        first, last = _pmacct_ms(r["timestamp_start"]), _pmacct_ms(r["timestamp_end"])
        assert (int(kernel["start"]) - 1) * 1000 <= first <= last <= (int(kernel["stop"]) + 1) * 1000, case.name
    # pmacct counts the forward direction (octetDeltaCount/packetDeltaCount).
    assert sum(r["packets"] for r in got) == kernel["orig"]["packets"], case.name
    assert sum(r["bytes"] for r in got) == kernel["orig"]["bytes"], case.name


def _check_tshark(tshark, nat, tcp6_sport):
    assert tshark.problems() == []
    packets = tshark.packets()
    assert packets and all("cflow" in p and p["cflow"]["cflow.version"] == "10" for p in packets)
    # Sequence numbers as tshark reads them: each message's is the count of
    # data records the domain sent before it.
    messages = tshark.payloads()
    decoded = decode(messages)
    assert len(decoded) == len(packets)
    expected = 0
    for packet, (header, records) in zip(packets, decoded, strict=True):
        assert int(packet["cflow"]["cflow.sequence"]) == header["sequence"] == expected
        assert int(packet["cflow"]["cflow.od_id"]) == 7
        expected += len(records)
    # flowEndReason: active timeout on the UPDATEs (the long ping has some),
    # end of flow on the TCP DESTROYs (closed with FIN), idle timeout on the rest.
    reasons = [(r["protocolIdentifier"], r["flowEndReason"]) for _, rs in decoded for r in rs]
    assert (1, 2) in reasons and (6, 3) in reasons and (17, 1) in reasons, reasons
    assert {reason for _, reason in reasons} <= {1, 2, 3}
    # Post-NAT IPv6 addresses, which nfdump and pmacct do not read: tshark's
    # dissector and the ipfix library do.
    v6 = [r for _, rs in decoded for r in rs if r.get("sourceTransportPort") == tcp6_sport]
    assert v6 and all(str(r["postNATSourceIPv6Address"]) == nat[6] for r in v6)
    text = subprocess.run(["tshark", "-r", str(tshark.pcap), "-d", f"udp.port=={tshark.port},cflow", "-T", "fields",
                           "-e", "cflow.post_nat_source_ipv6_address"], capture_output=True, text=True).stdout
    assert {a for line in text.split() for a in line.split(",") if a} == {nat[6]}


def test_udp_collector_restart_mid_stream():
    """nfcapd stops and a new one, with no state, starts on the same port
    while the agent runs: the templates go out again (template_refresh), and
    the flows after the restart decode in the new collector."""
    first = Nfcapd().start()
    second = Nfcapd(first.port)
    try:
        with Topology() as topo:
            agent = _agent(topo, [{"type": "ipfix", "collector": f"127.0.0.1:{first.port}",
                                   "flush_interval": "200ms", "template_refresh": "1s"}])
            try:
                before = topo.udp_exchange(2, 100)
                topo.flush()
                agent.wait_for_records(lambda rs: any(r["kind"] == "destroy" for r in rs))
                time.sleep(1)
                first.stop()
                second.start()
                time.sleep(1.5)   # past template_refresh: the next message brings the templates
                after = topo.udp_exchange(2, 100)
                topo.flush()
                agent.wait_for_records(lambda rs: any(r["kind"] == "destroy" and r["orig"]["sport"] == after.sport
                                                      for r in rs))
                time.sleep(1)
            finally:
                assert agent.stop() == 0
        second.stop()
        assert "Traceback" not in agent.stderr
        assert [r["src_port"] for r in first.flows()] == [before.sport]
        assert [r["src_port"] for r in second.flows()] == [after.sport]
        assert "Sequence Errors: 0, Bad Packets: 0" in second.log_text(), second.log_text()
    finally:
        first.cleanup()
        second.cleanup()


def test_tcp_collector_going_away_retries_counts_drops_and_reconnects():
    collector = TcpCollector()
    port = collector.port
    with Topology() as topo:
        agent = _agent(topo, [{"type": "ipfix", "collector": f"127.0.0.1:{port}", "transport": "tcp",
                               "timeout": "1s", "flush_interval": "200ms",
                               "retry": {"max_attempts": 3, "backoff": "100ms", "max_backoff": "200ms"}}])
        try:
            before = topo.udp_exchange(2, 100)
            topo.flush()
            agent.wait_for_records(lambda rs: any(r["kind"] == "destroy" for r in rs))
            deadline = time.monotonic() + 10
            while not any(rs for _, rs in decode(collector.messages())) and time.monotonic() < deadline:
                time.sleep(0.1)
            collector.close()                      # the collector goes away
            during = topo.udp_exchange(2, 100)
            topo.flush()
            agent.wait_for_records(lambda rs: any(r["kind"] == "destroy" and r["orig"]["sport"] == during.sport
                                                  for r in rs))
            time.sleep(2)                          # three attempts, then the records are dropped
            collector = TcpCollector(port)         # back again
            after = topo.udp_exchange(2, 100)
            topo.flush()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                ports = [r.get("sourceTransportPort") for _, rs in decode(collector.messages()) for r in rs]
                if after.sport in ports:
                    break
                time.sleep(0.2)
        finally:
            assert agent.stop() == 0
            collector.close()
    assert "Traceback" not in agent.stderr
    summary = exit_summary(agent.stderr, "sink ipfix")   # "sink ipfix: received=3 emitted=2 dropped=1 ..."
    assert summary["dropped"] > 0 and summary["emitted"] >= 2, summary
    # The new connection: templates first, sequence numbers from 0, the later flow decoded.
    messages = collector.connections[0]
    decoded = decode(messages)
    assert decoded[0][1] == [] and messages[0][16:18] == b"\x00\x02"    # a template set first
    assert [h["sequence"] for h, rs in decoded if rs][0] == 0
    ports = [r["sourceTransportPort"] for _, rs in decoded for r in rs]
    assert after.sport in ports and before.sport not in ports


@pytest.mark.parametrize("collector,message", [
    ("300.1.2.3:4739", "expected an IPv4 address"),
    ("127.0.0.1:65536", "port from 1 to 65535"),
])
def test_bad_collector_exits_2_naming_the_key(tmp_path, collector, message):
    path = tmp_path / "bad.yml"
    path.write_text(f"sinks:\n  - type: ipfix\n    collector: '{collector}'\n")
    out = subprocess.run([sys.executable, "-m", "conntracct", "run", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "sinks[0].collector" in out.stderr and message in out.stderr
    assert "Traceback" not in out.stderr


def test_tshark_check_sees_a_malformed_message():
    """The NAT-lab test's 'tshark finds nothing wrong' check can fail: a
    template claiming more fields than it has, and a message cut short, are
    both reported (and a good message is not)."""
    import socket
    import struct

    from conntracct.ipfix_encoding import Session, template_bodies

    port = free_udp_port()
    tshark = Tshark(port).start()
    try:
        good = Session(1).seal(template_bodies(1400, 32473)[0], int(time.time()))
        too_many_fields = bytearray(good)
        struct.pack_into("!H", too_many_fields, 16 + 4 + 2, 200)   # first template's field count
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for message in (good, bytes(too_many_fields), good[:40]):
                s.sendto(message, ("127.0.0.1", port))
                time.sleep(0.1)
        tshark.stop()
        assert len(tshark.payloads()) == 3
        problems = tshark.problems()
        assert len(problems) == 2, problems
        assert "More entries (200)" in problems[0] and "partial flow (40/" in problems[1]
    finally:
        tshark.cleanup()
