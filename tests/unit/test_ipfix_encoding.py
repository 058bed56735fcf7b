"""conntracct.ipfix_encoding checked against the `ipfix` library's decoder
(python3-ipfix, tests/servers/ipfix.decode): every field of every template
reads back as the FlowEvent had it, messages respect the size bound with no
record split, and sequence numbers count data records as RFC 7011 says."""

from __future__ import annotations

import ipaddress
import re
import struct
from pathlib import Path

import pytest

from conntracct.ipfix_encoding import (
    DEFAULT_PEN,
    IES,
    MESSAGE_HEADER,
    TEMPLATES,
    ZERO,
    RecordEncoder,
    Session,
    TemplateKey,
    pack_records,
    template_bodies,
)
from tests.unit.sample_flows import T0, flow

pytest.importorskip("ipfix", reason="python3-ipfix (./tasks.py test installs it)")
from tests.servers.ipfix import decode  # noqa: E402

NAT_V4 = dict(orig=("192.0.2.2", "198.51.100.2", 40000, 80), reply=("198.51.100.2", "198.51.100.1", 80, 61000))
NAT_V6 = dict(orig=("2001:db8:1::2", "2001:db8:2::2", 40000, 443),
              reply=("2001:db8:2::2", "2001:db8:2::1", 443, 40000))


def _events():
    stop = T0 + 500_000_000
    return [
        flow("update", **NAT_V4, labels={"direction": "outbound"}, zone=7, mark=0xBEEF),
        flow("destroy", **NAT_V4, stop_ns=stop, tcp_state=7, labels={"direction": "outbound"}, zone=7, mark=0xBEEF),
        flow("destroy", flow_id=2, orig=("2001:db8:1::2", "2001:db8:2::2", 5000, 53), proto=17, tcp_state=0,
             stop_ns=stop, labels={"direction": "forward"}),
        flow("destroy", flow_id=3, **NAT_V6, stop_ns=stop, labels={"direction": "inbound"}),
        flow("destroy", flow_id=4, proto=1, orig=("192.0.2.2", "198.51.100.2", 0, 0),
             reply=("198.51.100.2", "198.51.100.1", 0, 0), icmp=(8, 0, 99), tcp_state=0, stop_ns=stop),
        flow("update", flow_id=5, proto=58, orig=("2001:db8:1::2", "2001:db8:2::2", 0, 0),
             icmp=(128, 0, 7), tcp_state=0),
    ]


def _encode(events, bases=None, pen=DEFAULT_PEN, max_size=1400):
    encoder = RecordEncoder(pen)
    records = []
    for i, e in enumerate(events):
        template, record = encoder.encode(e, bases[i] if bases else ZERO, 2 if e.kind == "update" else 3)
        assert len(record) == template.record_length
        records.append((template.id, record))
    session = Session(42)
    messages = [session.seal(b, T0 // 10**9) for b in template_bodies(max_size, pen)]
    for body in pack_records(records, max_size):
        messages.append(session.seal(body, T0 // 10**9))
        session.sent(body)
    return messages


def test_every_field_reads_back_through_the_ipfix_library():
    events = _events()
    decoded = decode(_encode(events))
    records = [r for _, rs in decoded for r in rs]
    assert len(records) == len(events)
    for e, r in zip(events, records, strict=True):
        address = ipaddress.ip_address
        v4 = e.family == 4
        assert r["sourceIPv4Address" if v4 else "sourceIPv6Address"] == address(e.orig.src)
        assert r["destinationIPv4Address" if v4 else "destinationIPv6Address"] == address(e.orig.dst)
        assert r["protocolIdentifier"] == e.proto
        if e.icmp:
            assert r["icmpTypeCodeIPv4" if v4 else "icmpTypeCodeIPv6"] == e.icmp[0] * 256 + e.icmp[1]
            assert "sourceTransportPort" not in r
        else:
            assert (r["sourceTransportPort"], r["destinationTransportPort"]) == (e.orig.sport, e.orig.dport)
        if e.nat:
            nat = "IPv4" if v4 else "IPv6"
            assert r[f"postNATSource{nat}Address"] == address(e.reply.dst)
            assert r[f"postNATDestination{nat}Address"] == address(e.reply.src)
            if not e.icmp:
                assert (r["postNAPTSourceTransportPort"], r["postNAPTDestinationTransportPort"]) == \
                    (e.reply.dport, e.reply.sport)
        else:   # no empty NAT fields: a template without them
            assert not any(name.startswith("postNA") for name in r)
        assert (r["octetTotalCount"], r["packetTotalCount"]) == (e.bytes_orig, e.packets_orig)
        assert (r["reverseOctetTotalCount"], r["reversePacketTotalCount"]) == (e.bytes_reply, e.packets_reply)
        assert (r["octetDeltaCount"], r["packetDeltaCount"]) == (e.bytes_orig, e.packets_orig)   # base ZERO
        assert (r["reverseOctetDeltaCount"], r["reversePacketDeltaCount"]) == (e.bytes_reply, e.packets_reply)
        assert r["flowStartMilliseconds"] <= r["flowEndMilliseconds"]
        assert r["flowEndReason"] == (2 if e.kind == "update" else 3)
        direction = {"inbound": 0, "outbound": 1}.get(e.labels.get("direction", ""))
        assert r.get("flowDirection") == direction
        assert (r["conntrackZone"], r["conntrackMark"]) == (e.zone, e.mark)


def test_times_are_conntracks_in_milliseconds():
    e = flow("destroy", stop_ns=T0 + 1_500_000_000)
    [record] = [r for _, rs in decode(_encode([e])) for r in rs]
    raw = _encode([e])[-1]
    start, end = struct.unpack_from("!QQ", raw, MESSAGE_HEADER.size + 4 + 4 + 4 + 5)
    assert (start, end) == (e.start_ns // 10**6, e.stop_ns // 10**6)
    assert record["flowEndMilliseconds"] > record["flowStartMilliseconds"]


def test_deltas_count_from_the_base():
    e = flow("update", packets_orig=10, bytes_orig=1000, packets_reply=4, bytes_reply=400)
    [record] = [r for _, rs in decode(_encode([e], bases=[(600, 6, 100, 1)])) for r in rs]
    assert (record["octetDeltaCount"], record["packetDeltaCount"]) == (400, 4)
    assert (record["reverseOctetDeltaCount"], record["reversePacketDeltaCount"]) == (300, 3)
    assert (record["octetTotalCount"], record["packetTotalCount"]) == (1000, 10)


def test_messages_fit_the_bound_and_no_record_straddles():
    events = [flow("destroy", flow_id=i, **(NAT_V6 if i % 2 else NAT_V4), stop_ns=T0) for i in range(200)]
    messages = _encode(events, max_size=512)
    assert all(len(m) <= 512 for m in messages)
    decoded = decode(messages)
    assert sum(len(rs) for _, rs in decoded) == 200
    for message, (header, _) in zip(messages, decoded, strict=True):
        assert header["length"] == len(message) and header["version"] == 10 and header["domain"] == 42


def test_sequence_numbers_count_the_data_records_sent_before():
    events = [flow("destroy", flow_id=i, stop_ns=T0) for i in range(100)]
    decoded = decode(_encode(events, max_size=600))
    sent = 0
    for header, records in decoded:
        assert header["sequence"] == sent
        sent += len(records)   # template sets count nothing
    assert sent == 100


def test_sixteen_templates_with_distinct_ids():
    assert len({t.id for t in TEMPLATES.values()}) == 16
    v4nat = TEMPLATES[TemplateKey(4, False, True, False)]
    assert [ie.number for ie in v4nat.ies][:9] == [8, 12, 7, 11, 4, 225, 226, 227, 228]
    v6icmp = TEMPLATES[TemplateKey(6, True, False, True)]
    assert [ie.number for ie in v6icmp.ies][:4] == [27, 28, 139, 4] and 61 in [ie.number for ie in v6icmp.ies]


def test_enterprise_elements_carry_the_configured_pen():
    messages = _encode([flow("destroy", zone=3, mark=9)], pen=4242)
    assert struct.pack("!HHI", 0x8001, 2, 4242) in messages[0]     # zone
    assert struct.pack("!HHI", 0x8055, 8, 29305) in messages[0]    # reverse octetTotalCount
    [record] = [r for _, rs in decode(messages, pen=4242) for r in rs]
    assert (record["conntrackZone"], record["conntrackMark"]) == (3, 9)


def test_a_record_too_big_for_the_message_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        list(pack_records([(256, b"x" * 100)], 100))


def test_docs_list_every_element():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ipfix.md").read_text()
    for ie in IES:
        assert re.search(rf"\b{ie.name}\b", doc), ie.name
