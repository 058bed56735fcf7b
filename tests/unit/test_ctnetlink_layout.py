"""ctnetlink messages read by their learnt layout (ctnetlink.parse_entry)
give what the attribute walk gives (ctnetlink.walk_entry), whatever the
attributes; a message whose layout differs from the learnt one of its
length is walked.  Real DESTROY events of every protocol are compared in
tests/integration/test_ctnetlink_events.py."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from conntracct.probe import ctnetlink as ct

N = ct.NLA_F_NESTED


def nla(kind: int, payload: bytes) -> bytes:
    return ct._nla(kind, payload)


def counters(kind: int, packets: int, nbytes: int) -> bytes:
    return nla(kind | N, nla(ct.CTA_COUNTERS_PACKETS, struct.pack(">Q", packets))
               + nla(ct.CTA_COUNTERS_BYTES, struct.pack(">Q", nbytes)))


def message(family: int, attrs: list[bytes]) -> memoryview:
    body = b"".join(attrs)
    hdr = (struct.pack("=IHHII", 20 + len(body), (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_DELETE, 0, 0, 0)
           + struct.pack("=BBH", family, 0, 0))
    return memoryview(hdr + body)


def random_entry(rnd: random.Random, family: int, proto: int, parts: set[str]) -> list[bytes]:
    width = 4 if family == socket.AF_INET else 16
    icmp = proto in (1, 58)
    orig = ct.CtTuple(rnd.randbytes(width), rnd.randbytes(width), proto, rnd.randrange(65536),
                      rnd.randrange(65536) if not icmp else (8 << 8) | rnd.randrange(3))
    reply = ct.CtTuple(orig.dst, rnd.randbytes(width), proto, orig.dst_u if not icmp else orig.src_u,
                       orig.src_u if not icmp else (0 << 8) | orig.dst_u & 0xFF)
    attrs = [nla(ct.CTA_TUPLE_ORIG | N, ct._tuple_attrs(family, orig)),
             nla(ct.CTA_TUPLE_REPLY | N, ct._tuple_attrs(family, reply))]
    if "zone" in parts:
        attrs.append(nla(ct.CTA_ZONE, struct.pack(">H", rnd.randrange(1, 65536))))
    if "counters" in parts:
        attrs += [counters(ct.CTA_COUNTERS_ORIG, rnd.randrange(1 << 40), rnd.randrange(1 << 50)),
                  counters(ct.CTA_COUNTERS_REPLY, rnd.randrange(1 << 40), rnd.randrange(1 << 50))]
    if "orig_counters_only" in parts:
        attrs.append(counters(ct.CTA_COUNTERS_ORIG, 3, 300))
    if "timestamp" in parts:
        attrs.append(nla(ct.CTA_TIMESTAMP | N, nla(ct.CTA_TIMESTAMP_START, struct.pack(">Q", rnd.randrange(1 << 62)))
                         + nla(ct.CTA_TIMESTAMP_STOP, struct.pack(">Q", rnd.randrange(1 << 62)))))
    attrs.append(nla(ct.CTA_ID, struct.pack(">I", rnd.randrange(1 << 32))))
    attrs.append(nla(ct.CTA_STATUS, struct.pack(">I", rnd.randrange(1 << 32))))
    if "mark" in parts:
        attrs.append(nla(ct.CTA_MARK, struct.pack(">I", rnd.randrange(1 << 32))))
    if "protoinfo" in parts and proto == 6:
        attrs.append(nla(ct.CTA_PROTOINFO | N, nla(ct.CTA_PROTOINFO_TCP | N,
                                                   nla(ct.CTA_PROTOINFO_TCP_STATE, bytes([rnd.randrange(10)])))))
    if "unknown" in parts:
        attrs.append(nla(30, rnd.randbytes(rnd.choice((3, 8, 13)))))   # an attribute neither reader knows
    return attrs


PARTS = [set(), {"counters"}, {"counters", "timestamp", "protoinfo", "mark"}, {"zone", "counters", "timestamp"},
         {"orig_counters_only"}, {"unknown", "counters", "protoinfo"}, {"zone", "mark", "unknown"}]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("proto", [6, 17, 1, 58, 132])
@pytest.mark.parametrize("parts", PARTS, ids=lambda p: "+".join(sorted(p)) or "bare")
def test_read_by_layout_is_the_walk(family, proto, parts):
    rnd = random.Random(hash((family, proto, tuple(sorted(parts)))))
    ct._layouts.clear()
    for _ in range(50):
        msg = message(family, random_entry(rnd, family, proto, parts))
        assert ct.parse_entry(msg, 20, len(msg), family) == ct.walk_entry(msg, 20, len(msg), family)
    learnt = ct._layouts.get((len(msg) - 20, family))
    # ICMP's type and code are composed by the walk: those are always walked.
    assert (learnt is None) == (proto in (1, 58)), learnt


def test_a_different_layout_of_the_same_length_is_walked():
    """Status and id (both 4-byte values) swapped: same length, other layout."""
    rnd = random.Random(1)
    ct._layouts.clear()
    attrs = random_entry(rnd, socket.AF_INET, 6, {"counters", "timestamp"})
    first = message(socket.AF_INET, attrs)
    assert ct.parse_entry(first, 20, len(first), socket.AF_INET) == ct.walk_entry(first, 20, len(first), socket.AF_INET)
    swapped = attrs[:-2] + [attrs[-1], attrs[-2]]
    attrs2 = [nla(ct.CTA_STATUS, struct.pack(">I", 7)), nla(ct.CTA_ID, struct.pack(">I", 9))]
    for variant in (swapped, attrs[:-2] + attrs2[::-1]):
        msg = message(socket.AF_INET, variant)
        assert len(msg) == len(first)
        entry = ct.parse_entry(msg, 20, len(msg), socket.AF_INET)
        assert entry == ct.walk_entry(msg, 20, len(msg), socket.AF_INET)
    assert entry.status == 7 and entry.ct_id == 9


def test_learnt_layouts_are_bounded():
    rnd = random.Random(2)
    ct._layouts.clear()
    for size in range(ct.LAYOUTS_MAX + 10):
        attrs = random_entry(rnd, socket.AF_INET, 6, set()) + [nla(30, bytes(4 * size))]
        msg = message(socket.AF_INET, attrs)
        ct.parse_entry(msg, 20, len(msg), socket.AF_INET)
    assert len(ct._layouts) <= ct.LAYOUTS_MAX
