"""Decoding probe records and ctnetlink messages into flows."""

import random
import socket
import struct
import subprocess

import pytest

from conntracct.flow import DESTROY, FLAG_FIRST_SIGHT, NEW, flow_id
from conntracct.probe import ctnetlink
from conntracct.probe.loader import rate_curve_macro
from conntracct.probe.record import RECORD, decode, first_sight_new, mirror_tuple, pack_tuple, record_key
from tests.reference.record import reference_decode

V4_A, V4_B, V4_NAT = (socket.inet_pton(socket.AF_INET, a) for a in ("192.0.2.2", "198.51.100.2", "198.51.100.1"))
V6_A, V6_B = (socket.inet_pton(socket.AF_INET6, a) for a in ("2001:db8:1::2", "2001:db8:2::2"))


def raw_record(orig, reply, kind=1, flags=0, start=1_700_000_000_000_000_000, zone=0, netns=4026531840):
    return RECORD.pack(5_000, start, 0, 4_000, 3, 2, 180, 120, 3, 2, 180, 120, 0x18e,
                       orig, reply, netns, 7, zone, kind, 3, flags)


def test_ipv4_tcp_record_with_nat():
    orig = pack_tuple(socket.AF_INET, 6, V4_A, V4_B, 40000, 80)
    reply = pack_tuple(socket.AF_INET, 6, V4_B, V4_NAT, 80, 40000)
    e = decode(raw_record(orig, reply), 1_000)
    assert (e.kind, e.family, e.proto, e.proto_name) == (NEW, 4, 6, "tcp")
    assert e.orig == ("192.0.2.2", "198.51.100.2", 40000, 80)
    assert e.reply == ("198.51.100.2", "198.51.100.1", 80, 40000)
    assert e.nat
    assert (e.packets_orig, e.packets_reply, e.bytes_orig, e.bytes_reply) == (3, 2, 180, 120)
    assert (e.mark, e.tcp_state_name, e.ts_ns) == (7, "established", 6_000)
    assert e.icmp is None


def test_ipv6_record_is_family_aware():
    orig = pack_tuple(socket.AF_INET6, 17, V6_A, V6_B, 5353, 53)
    reply = pack_tuple(socket.AF_INET6, 17, V6_B, V6_A, 53, 5353)
    e = decode(raw_record(orig, reply), 0)
    assert (e.family, e.proto_name) == (6, "udp")
    assert e.orig == ("2001:db8:1::2", "2001:db8:2::2", 5353, 53)
    assert not e.nat
    assert e.tcp_state_name == ""


def test_icmp_tuple_carries_type_code_id():
    orig = pack_tuple(socket.AF_INET, 1, V4_A, V4_B, 0x1234, (8 << 8) | 0)
    e = decode(raw_record(orig, orig), 0)
    tup, family, proto, icmp = e.orig, e.family, e.proto, e.icmp
    assert (family, proto, icmp) == (4, 1, (8, 0, 0x1234))
    assert tup.sport == tup.dport == 0
    # The kernel's layout: id in network order, then type and code bytes.
    assert orig[32:36] == b"\x12\x34\x08\x00"


def test_unknown_family_is_an_error():
    bad = bytearray(pack_tuple(socket.AF_INET, 6, V4_A, V4_B, 1, 2))
    bad[36] = 99
    with pytest.raises(ValueError, match="family 99"):
        decode(raw_record(bytes(bad), bytes(bad)), 0)


def test_flow_id_is_stable_and_distinguishes_flows():
    orig = pack_tuple(socket.AF_INET, 6, V4_A, V4_B, 40000, 80)
    a = decode(raw_record(orig, orig), 0).flow_id
    assert a == flow_id(orig, 0, 4026531840, 1_700_000_000_000_000_000)
    assert a == decode(raw_record(orig, orig, kind=3), 0).flow_id   # same flow, later record
    assert a != decode(raw_record(orig, orig, zone=1), 0).flow_id
    assert a != decode(raw_record(orig, orig, start=1_700_000_000_000_000_001), 0).flow_id
    assert 0 <= a < 2**63


def test_record_key_is_tuple_netns_zone_start():
    orig = pack_tuple(socket.AF_INET, 6, V4_A, V4_B, 40000, 80)
    key = record_key(raw_record(orig, orig, zone=3))
    assert key == orig + struct.pack("<IH2xQ", 4026531840, 3, 1_700_000_000_000_000_000)


def test_first_sight_destroy_gets_a_new_first():
    orig = pack_tuple(socket.AF_INET, 17, V4_A, V4_B, 1, 2)
    e = decode(raw_record(orig, orig, kind=3, flags=FLAG_FIRST_SIGHT), 0)
    new = first_sight_new(e)
    assert new.kind == NEW and e.kind == DESTROY and new.flow_id == e.flow_id
    # the flow's traffic is counted once, by the DESTROY's deltas
    assert (new.delta_packets_orig, new.delta_bytes_orig, new.delta_packets_reply, new.delta_bytes_reply) == (0,) * 4
    assert (new.bytes_orig, new.bytes_reply) == (e.bytes_orig, e.bytes_reply)
    assert first_sight_new(decode(raw_record(orig, orig, kind=3), 0)) is None


def test_decode_equals_its_reference_on_random_records():
    rng = random.Random(5)
    for _ in range(3000):
        family = rng.choice((socket.AF_INET, socket.AF_INET6))
        width = 4 if family == socket.AF_INET else 16
        proto = rng.choice((6, 17, 1, 58, 132))
        tuples = [pack_tuple(family, proto, rng.randbytes(width), rng.randbytes(width),
                             rng.randrange(65536), rng.randrange(65536)) for _ in range(2)]
        values = [rng.randrange(2**64) for _ in range(13)]
        values[1] = rng.choice((0, values[1]))           # start unknown: the id uses first_seen
        raw = RECORD.pack(*values, *tuples, rng.randrange(2**32), rng.randrange(2**32), rng.randrange(2**16),
                          rng.randrange(1, 5), rng.randrange(256), rng.randrange(256))
        offset = rng.randrange(2**40)
        assert decode(raw, offset) == reference_decode(raw, offset)
        assert decode(bytearray(raw) + b"tail", offset) == reference_decode(raw, offset)


def test_decode_memo_keeps_each_record_its_own_identity():
    """Records of one flow share the memoised identity; a record whose start
    (or, without one, first sight) differs is another flow; the memo is bounded."""
    from conntracct.probe import record

    orig = pack_tuple(socket.AF_INET, 6, V4_A, V4_B, 40000, 80)
    reply = pack_tuple(socket.AF_INET, 6, V4_B, V4_NAT, 80, 40000)
    variants = [RECORD.pack(ts, start, 0, first_seen, ts, 2, 180, 120, 3, 2, 180, 120, 0x18e,
                            orig, reply, 4026531840, mark, 0, kind, 3, 0)
                for ts, start, first_seen, mark, kind in [
                    (5, 1_000, 4, 0, 1), (6, 1_000, 4, 0, 2), (7, 1_000, 9, 0, 3), (8, 2_000, 4, 0, 1),
                    (9, 0, 4, 0, 1), (10, 0, 1_000, 0, 2), (11, 0, 4, 7, 2), (12, 1_000, 4, 7, 3)]]
    record._decode.set_memo_limit(3)
    try:
        for _ in range(2):
            for raw in variants:
                assert decode(raw, 1) == reference_decode(raw, 1)
        assert 0 < len(record._flows) <= 3
    finally:
        record._decode.set_memo_limit(record.FLOW_MEMO_LIMIT)


def test_a_destroy_takes_its_flow_out_of_the_memo():
    """The memo holds live flows: a flow's NEW and UPDATEs share one identity, its DESTROY
    gets the same and removes it (the DESTROY's events are still the reference's)."""
    from conntracct.probe import record

    orig = pack_tuple(socket.AF_INET, 17, V4_A, V4_B, 40001, 53)
    new, update, destroy = (raw_record(orig, mirror_tuple(orig), kind=kind) for kind in (1, 2, 3))
    record._flows.clear()
    first = decode(new, 0)
    assert len(record._flows) == 1
    assert decode(update, 0).memo is first.memo
    last = decode(destroy, 0)
    assert last.memo is first.memo and last == reference_decode(destroy, 0)
    assert len(record._flows) == 0
    assert decode(destroy, 0) == reference_decode(destroy, 0)       # a DESTROY seen first is not memoised
    assert len(record._flows) == 0


def test_decode_errors_are_the_reference_errors():
    orig = pack_tuple(socket.AF_INET, 6, V4_A, V4_B, 40000, 80)
    bad = bytearray(orig)
    bad[36] = 99
    for raw in (raw_record(bytes(bad), orig), raw_record(orig, bytes(bad))):
        with pytest.raises(ValueError, match="family 99"):
            decode(raw, 0)
    with pytest.raises(KeyError):
        decode(raw_record(orig, orig, kind=9), 0)


@pytest.mark.parametrize("family,src,dst,proto,src_u,dst_u", [
    (socket.AF_INET, V4_A, V4_B, 6, 40000, 443),
    (socket.AF_INET6, V6_A, V6_B, 58, 77, (128 << 8) | 0),
    (socket.AF_INET, V4_A, V4_B, 1, 4242, (8 << 8) | 0),
])
def test_ctnetlink_tuple_roundtrip(family, src, dst, proto, src_u, dst_u):
    """A tuple encoded as ctnetlink attributes parses back to the same tuple."""
    t = ctnetlink.CtTuple(src, dst, proto, src_u, dst_u)
    body = ctnetlink._nla(ctnetlink.CTA_TUPLE_ORIG | ctnetlink.NLA_F_NESTED, ctnetlink._tuple_attrs(family, t))
    body += ctnetlink._nla(ctnetlink.CTA_COUNTERS_ORIG | ctnetlink.NLA_F_NESTED,
                           ctnetlink._nla(1, struct.pack(">Q", 5)) + ctnetlink._nla(2, struct.pack(">Q", 900)))
    body += ctnetlink._nla(ctnetlink.CTA_COUNTERS_REPLY | ctnetlink.NLA_F_NESTED,
                           ctnetlink._nla(1, struct.pack(">Q", 4)) + ctnetlink._nla(2, struct.pack(">Q", 300)))
    body += ctnetlink._nla(ctnetlink.CTA_ZONE, struct.pack(">H", 9))
    hdr = struct.pack("=IHHII", 16 + 4 + len(body), (1 << 8) | 2, 0, 0, 0) + struct.pack("=BBH", family, 0, 0)
    msg = hdr + body
    [entry] = list(ctnetlink.parse_messages(memoryview(msg), len(msg), ctnetlink.IPCTNL_MSG_CT_DELETE))
    assert entry.orig == t
    assert (entry.family, entry.zone, entry.counters) == (family, 9, (5, 900, 4, 300))
    # ...and packs to the same probe tuple bytes the kernel side would produce.
    assert pack_tuple(family, entry.orig.proto, entry.orig.src, entry.orig.dst, entry.orig.src_u,
                      entry.orig.dst_u) == pack_tuple(family, proto, src, dst, src_u, dst_u)


def test_netlink_error_message_raises():
    msg = struct.pack("=IHHII", 36, 2, 0, 0, 0) + struct.pack("=i", -2) + b"\0" * 16
    with pytest.raises(ctnetlink.CtnetlinkError) as err:
        list(ctnetlink.parse_messages(memoryview(msg), len(msg), 0))
    assert err.value.errno == 2


def test_rate_curve_macro_in_c(tmp_path):
    """The generated RATE_CURVE macro, compiled as C, gives the curve's intervals."""
    s = 1_000_000_000
    macro = rate_curve_macro([(60 * s, 20 * s), (300 * s, 60 * s)], 300 * s)
    name, expr = macro.split("=", 1)
    src = tmp_path / "curve.c"
    src.write_text("#include <stdio.h>\n#define %s %s\nint main(void){unsigned long long a[]={0,%dULL,%dULL,"
                   "%dULL,%dULL,%dULL};for(int i=0;i<6;i++)printf(\"%%llu\\n\",RATE_CURVE(a[i]));}\n"
                   % (name, expr, 59 * s, 60 * s, 299 * s, 300 * s, 3600 * s))
    subprocess.run(["gcc", "-o", str(tmp_path / "curve"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "curve")], capture_output=True, text=True).stdout.split()
    assert [int(v) // s for v in out] == [20, 20, 60, 60, 300, 300]


def test_records_of_one_flow_identity_share_one_memo():
    """FlowEvent.memo: the same dict for every record of one identity
    (tuples, netns, zone, mark, start); a new one when any of them changes
    (a CONNMARK mid-flow, a reused tuple with another start); never compared."""
    orig = pack_tuple(socket.AF_INET, 6, V4_A, V4_B, 40001, 80)
    reply = pack_tuple(socket.AF_INET, 6, V4_B, V4_NAT, 80, 40001)

    def record(mark=0, start=1_000, zone=0, kind=2, flags=0):
        return RECORD.pack(5, start, 0, 4, 1, 2, 3, 4, 1, 2, 3, 4, 0x18e, orig, reply, 4026531840, mark, zone,
                           kind, 3, flags)

    first, again = decode(record(kind=1), 0), decode(record(), 0)
    assert first.memo is again.memo and isinstance(first.memo, dict)
    assert first_sight_new(decode(record(kind=3, flags=FLAG_FIRST_SIGHT), 0)).memo is first.memo
    others = [decode(record(mark=7), 0), decode(record(start=2_000), 0), decode(record(zone=3), 0)]
    assert all(e.memo is not first.memo for e in others)
    assert len({id(e.memo) for e in others}) == 3
    first.memo["x"] = 1
    assert first == reference_decode(record(kind=1), 0)   # memo is not part of the record


def test_end_reason_is_the_ipfix_flow_end_reason():
    """NEW: none; UPDATE: active timeout; DESTROY: end of flow when TCP closed
    (FIN/RST states), forced end when its end went unseen, idle timeout else."""
    from conntracct.flow import END_REASONS, FLAG_END_UNSEEN, TCP_STATES
    from conntracct.probe.layout import RECORD_LAYOUT
    tcp = pack_tuple(socket.AF_INET, 6, V4_A, V4_B, 40000, 80)
    udp = pack_tuple(socket.AF_INET, 17, V4_A, V4_B, 40000, 53)

    def reason(orig, kind, tcp_state=3, flags=0):
        raw = bytearray(raw_record(orig, orig, kind=kind, flags=flags))
        raw[RECORD_LAYOUT.offset("tcp_state")] = tcp_state
        e = decode(bytes(raw), 0)
        assert e.tcp_state == tcp_state
        return END_REASONS.get(e.end_reason, e.end_reason)

    assert reason(tcp, 1) == 0
    assert reason(tcp, 2) == "active_timeout"
    assert [reason(tcp, 3, TCP_STATES.index(s)) for s in ("fin_wait", "close_wait", "last_ack", "time_wait",
                                                            "close")] == ["end_of_flow"] * 5
    assert reason(tcp, 3, TCP_STATES.index("established")) == "idle_timeout"
    assert reason(udp, 3, 0) == "idle_timeout"
    assert reason(udp, 3, 0, FLAG_END_UNSEEN) == "forced_end"
    e = decode(raw_record(udp, udp, kind=3, flags=FLAG_FIRST_SIGHT), 0)
    assert first_sight_new(e).end_reason == 0 and e.end_reason == 1


def test_pack_record_puts_each_field_where_decode_reads_it():
    """Flow ends are packed by field name (record.pack_record) and decoded like probe records."""
    from conntracct.flow import FLAG_END_UNSEEN
    from conntracct.probe.record import mirror_tuple, pack_record
    orig = pack_tuple(socket.AF_INET6, 17, V6_A, V6_B, 5353, 53)
    raw = pack_record(kind="destroy", orig=orig, reply=mirror_tuple(orig), netns=11, zone=12, start_ns=13,
                      stop_ns=14, first_seen=15, ts=16, packets=(17, 18), bytes=(19, 20), delta_packets=(21, -1),
                      delta_bytes=(23, 24), status=25, mark=26, tcp_state=0, flags=FLAG_END_UNSEEN)
    e = decode(raw, 1000)
    assert (e.kind, e.netns, e.zone, e.start_ns, e.stop_ns, e.ts_ns) == ("destroy", 11, 12, 13, 14, 1016)
    assert (e.packets_orig, e.packets_reply, e.bytes_orig, e.bytes_reply) == (17, 18, 19, 20)
    assert (e.delta_packets_orig, e.delta_packets_reply, e.delta_bytes_orig, e.delta_bytes_reply) == (
        21, 2**64 - 1, 23, 24)     # a u64 difference wraps, as in the probe
    assert (e.status, e.mark, e.flags, e.end_reason) == (25, 26, FLAG_END_UNSEEN, 4)
    assert e.orig == ("2001:db8:1::2", "2001:db8:2::2", 5353, 53)
    assert e.reply == ("2001:db8:2::2", "2001:db8:1::2", 53, 5353)
    assert e.flow_id == flow_id(orig, 12, 11, 13) and e == reference_decode(raw, 1000)
    bare = decode(pack_record(kind="new", orig=orig, reply=orig), 0)     # fields not given are 0
    assert (bare.packets_orig, bare.delta_bytes_reply, bare.start_ns, bare.ts_ns, bare.flags) == (0, 0, 0, 0, 0)
    with pytest.raises(TypeError, match="no field colour"):
        pack_record(kind="new", orig=orig, reply=orig, colour=1)
