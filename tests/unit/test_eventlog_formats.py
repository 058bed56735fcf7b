"""stdout's netfilter and conntrack_exporter formats (sinks/eventlog.py).

The netfilter lines expected here were printed by `conntrack -E -o extended`
(conntrack-tools 1.4.7) in the test lab's NAT router for real flows (with
nf_conntrack_acct and nf_conntrack_timestamp on); the records are those
flows as the agent reports them.  tests/integration/test_dropin_netfilter.py
does the same live."""

from __future__ import annotations

import json

import pytest
from sample_flows import flow

from conntracct.flow import DESTROY, FLAG_NO_ACCT, NEW, UPDATE
from conntracct.sinks.eventlog import conntrack_exporter_line, netfilter_line

S = 1_000_000_000
SEEN_ASSURED = 0x18E     # seen_reply, assured, confirmed, src_nat, src_nat_done
NAT_V4 = ("198.51.100.2", "198.51.100.1")


@pytest.mark.parametrize(("record", "line"), [
    (flow(DESTROY, orig=("192.0.2.2", "198.51.100.2", 31082, 20000), reply=(*NAT_V4, 20000, 31082),
          packets_orig=6, bytes_orig=5320, packets_reply=4, bytes_reply=516, tcp_state=7, status=SEEN_ASSURED,
          start_ns=100 * S + 700_000_000, stop_ns=101 * S + 800_000_000),
     "[DESTROY] ipv4     2 tcp      6 TIME_WAIT src=192.0.2.2 dst=198.51.100.2 sport=31082 dport=20000 "
     "packets=6 bytes=5320 src=198.51.100.2 dst=198.51.100.1 sport=20000 dport=31082 packets=4 bytes=516 "
     "[ASSURED] delta-time=1"),
    (flow(DESTROY, proto=17, orig=("192.0.2.2", "198.51.100.2", 33789, 20001), reply=(*NAT_V4, 20001, 33789),
          packets_orig=3, bytes_orig=276, packets_reply=3, bytes_reply=276, status=0x18A,
          start_ns=100 * S, stop_ns=101 * S + 1),
     "[DESTROY] ipv4     2 udp      17 src=192.0.2.2 dst=198.51.100.2 sport=33789 dport=20001 packets=3 "
     "bytes=276 src=198.51.100.2 dst=198.51.100.1 sport=20001 dport=33789 packets=3 bytes=276 delta-time=1"),
    (flow(DESTROY, proto=58, orig=("2001:db8:1::2", "2001:db8:2::2", 0, 0),
          reply=("2001:db8:2::2", "2001:db8:2::1", 0, 0), icmp=(128, 0, 24344), packets_orig=2, bytes_orig=208,
          packets_reply=2, bytes_reply=208, status=0x18A, start_ns=100 * S, stop_ns=101 * S + 5),
     "[DESTROY] ipv6     10 icmpv6   58 src=2001:db8:1::2 dst=2001:db8:2::2 type=128 code=0 id=24344 packets=2 "
     "bytes=208 src=2001:db8:2::2 dst=2001:db8:2::1 type=129 code=0 id=24344 packets=2 bytes=208 delta-time=1"),
    # delta-time is whole seconds of stop minus whole seconds of start (libnetfilter_conntrack)
    (flow(DESTROY, proto=17, orig=("192.0.2.2", "198.51.100.2", 1, 2), reply=(*NAT_V4, 2, 1), status=0x18A,
          start_ns=100 * S + 900_000_000, stop_ns=101 * S + 100_000_000, flags=FLAG_NO_ACCT),
     "[DESTROY] ipv4     2 udp      17 src=192.0.2.2 dst=198.51.100.2 sport=1 dport=2 "
     "src=198.51.100.2 dst=198.51.100.1 sport=2 dport=1 delta-time=1"),
    (flow(NEW, proto=1, orig=("192.0.2.2", "198.51.100.2", 0, 0), reply=(*NAT_V4, 0, 0), icmp=(8, 0, 24343),
          status=0x188, flags=FLAG_NO_ACCT),
     "    [NEW] ipv4     2 icmp     1 src=192.0.2.2 dst=198.51.100.2 type=8 code=0 id=24343 [UNREPLIED] "
     "src=198.51.100.2 dst=198.51.100.1 type=0 code=0 id=24343"),
    (flow(UPDATE, orig=("192.0.2.2", "198.51.100.2", 31082, 20000), reply=(*NAT_V4, 20000, 31082),
          tcp_state=3, status=SEEN_ASSURED, flags=FLAG_NO_ACCT, mark=7, zone=3),
     " [UPDATE] ipv4     2 tcp      6 ESTABLISHED src=192.0.2.2 dst=198.51.100.2 sport=31082 dport=20000 "
     "src=198.51.100.2 dst=198.51.100.1 sport=20000 dport=31082 [ASSURED] mark=7 zone=3"),
])
def test_netfilter_lines_are_conntracks(record, line):
    assert netfilter_line(record) == line + "\n"


def test_conntrack_exporter_json_has_its_keys_and_states():
    outbound = flow(NEW, orig=("10.0.1.65", "151.101.2.49", 40806, 443), tcp_state=3,
                    labels={"direction": "outbound"})
    assert json.loads(conntrack_exporter_line(outbound)) == {
        "event_type": "new", "original_source_host": "10.0.1.65:40806",
        "original_destination_host": "151.101.2.49:443", "reply_source_host": "151.101.2.49:443",
        "reply_destination_host": "10.0.1.65:40806", "remote_host": "151.101.2.49:443", "state": "Open",
        "labels": {"direction": "outbound"}}
    assert list(json.loads(conntrack_exporter_line(outbound))) [:7] == [
        "event_type", "original_source_host", "original_destination_host", "reply_source_host",
        "reply_destination_host", "remote_host", "state"]
    inbound = flow(UPDATE, orig=("2001:db8::9", "2001:db8::2", 40000, 22), tcp_state=1,
                   labels={"direction": "inbound"})
    got = json.loads(conntrack_exporter_line(inbound))
    assert (got["remote_host"], got["state"]) == ("[2001:db8::9]:22", "Opening")
    states = {s: json.loads(conntrack_exporter_line(flow(UPDATE, tcp_state=s)))["state"] for s in range(1, 10)}
    assert states == {1: "Opening", 2: "Opening", 3: "Open", 4: "Closing", 5: "Closing", 6: "Closing",
                      7: "Closing", 8: "Closed", 9: "Opening"}
    assert json.loads(conntrack_exporter_line(flow(DESTROY, tcp_state=7)))["state"] == "Closed"
    icmp = json.loads(conntrack_exporter_line(flow(UPDATE, proto=1, orig=("192.0.2.2", "198.51.100.2", 0, 0))))
    assert (icmp["original_source_host"], icmp["state"]) == ("192.0.2.2", "Open")
