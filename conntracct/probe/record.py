"""The probe's record layout, mirrored once from bpf/conntracct.c, and its decoder.

tests/test_record_layout.py compiles the C program and fails if the two drift.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from dataclasses import replace

from ..flow import DESTROY, FLAG_FIRST_SIGHT, ICMP_PROTOS, NEW, FlowEvent, FlowTuple, new_event

# struct ct_tuple: src[16], dst[16], src_u, dst_u (network order), family, proto, pad[2]
TUPLE = struct.Struct("<16s16sHHBB2x")
# struct flow_record, field by field in C order.
RECORD_FIELDS = [
    ("ts", "Q"), ("start_ns", "Q"), ("stop_ns", "Q"), ("first_seen", "Q"),
    ("packets", "2Q"), ("bytes", "2Q"), ("delta_packets", "2Q"), ("delta_bytes", "2Q"),
    ("status", "Q"), ("orig", "40s"), ("reply", "40s"),
    ("netns", "I"), ("mark", "I"), ("zone", "H"), ("kind", "B"), ("tcp_state", "B"),
    ("flags", "B"), ("_pad", "3x"),
]
RECORD = struct.Struct("<" + "".join(fmt for _, fmt in RECORD_FIELDS))
# struct flow_key: the original tuple, netns, zone, pad, start
FLOW_KEY = struct.Struct("<40sIH2xQ")
# struct flow_state: first_seen, next_emit, packets[2], bytes[2], flags
FLOW_STATE = struct.Struct("<QQ2Q2QQ")

# "track" is agent-internal: a back-dated flow whose end must be swept for.
TRACK = "track"
KIND_CODES = {1: "new", 2: "update", 3: "destroy", 4: TRACK}

# Indexes of the probe's per-CPU `stats` array.
STAT_NAMES = ("records_lost", "state_full", "state_inserts", "state_deletes")

_AF = {socket.AF_INET: 4, socket.AF_INET6: 6}


class _AddressText(dict):
    """Raw address bytes -> text, memoised: hosts repeat, inet_ntop is not free."""

    def __init__(self, family: int, width: int):
        super().__init__()
        self._family, self._width = family, width

    def __missing__(self, raw: bytes) -> str:
        if len(self) > 65536:
            self.clear()
        text = self[raw] = socket.inet_ntop(self._family, raw[:self._width])
        return text


_ADDR = {socket.AF_INET: _AddressText(socket.AF_INET, 4),
         socket.AF_INET6: _AddressText(socket.AF_INET6, 16)}


def _swap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def decode_tuple(raw: bytes) -> tuple[FlowTuple, int, int, tuple[int, int, int] | None]:
    """(tuple, family number 4/6, protocol, icmp (type, code, id) or None)."""
    src, dst, src_u, dst_u, family, proto = TUPLE.unpack(raw)
    addr = _ADDR.get(family)
    if addr is None:
        raise ValueError(f"record with unknown address family {family}")
    if proto in ICMP_PROTOS:
        # dst_u holds type then code in memory order; src_u is the echo id.
        return (FlowTuple(addr[src], addr[dst], 0, 0), _AF[family], proto,
                (dst_u & 0xFF, dst_u >> 8, _swap16(src_u)))
    return FlowTuple(addr[src], addr[dst], _swap16(src_u), _swap16(dst_u)), _AF[family], proto, None


def pack_tuple(family: int, proto: int, src: bytes, dst: bytes, src_u: int, dst_u: int) -> bytes:
    """A struct ct_tuple from parts: family AF_*, addresses packed, src_u/dst_u as
    the 16-bit values the kernel holds in network order (ICMP: id; type<<8|code)."""
    return TUPLE.pack(src.ljust(16, b"\0"), dst.ljust(16, b"\0"),
                      _swap16(src_u), _swap16(dst_u), family, proto)


# decode() runs for every record on the reader thread.  A flow's records
# repeat its identity (tuples, netns, zone, mark, start), so what derives from
# it alone -- the tuples as text, the flow id, and the FlowEvent.memo the sinks
# share for it -- is worked out once per flow and memoised, bounded; the rest
# comes from two small unpacks.
_COUNTERS = struct.Struct("<13Q")                  # ts ... status
_TAIL = struct.Struct("<IIHBBB3x")                 # netns mark zone kind tcp_state flags
_TAIL_AT = 184
_TUPLES = struct.Struct("<" + "16s16sHHBB2x" * 2)  # orig, reply; RECORD's bytes 104..184
_IDENTITY = slice(104, 194)                         # orig, reply, netns, mark, zone
assert _COUNTERS.size + _TUPLES.size == _TAIL_AT and _TAIL_AT + _TAIL.size == RECORD.size
_ORIG = slice(104, 144)
_NETNS = slice(184, 188)
_ZONE = slice(192, 194)
_START = slice(8, 16)
_FIRST_SEEN = slice(24, 32)
# Network-order u16 -> host value, by table lookup.
_SWAP16 = tuple(((v & 0xFF) << 8) | (v >> 8) for v in range(65536))
_new_tuple = tuple.__new__
_blake2b = hashlib.blake2b
FLOW_MEMO_LIMIT = 16384   # flows; past it the memo starts over (bounded memory)
_flows: dict[bytes, tuple] = {}


def _identity(raw: bytes, start: int, id_start: int) -> tuple:
    """(id_start, flow id, family 4/6, protocol, orig, reply, icmp, memo) of a record."""
    (osrc, odst, osrc_u, odst_u, ofamily, oproto,
     rsrc, rdst, rsrc_u, rdst_u, rfamily, rproto) = _TUPLES.unpack_from(raw, _COUNTERS.size)
    oaddr, raddr = _ADDR.get(ofamily), _ADDR.get(rfamily)
    if oaddr is None or raddr is None:
        raise ValueError(f"record with unknown address family {ofamily if oaddr is None else rfamily}")
    if oproto in ICMP_PROTOS:
        # dst_u holds type then code in memory order; src_u is the echo id.
        orig = _new_tuple(FlowTuple, (oaddr[osrc], oaddr[odst], 0, 0))
        icmp = (odst_u & 0xFF, odst_u >> 8, _SWAP16[osrc_u])
    else:
        orig = _new_tuple(FlowTuple, (oaddr[osrc], oaddr[odst], _SWAP16[osrc_u], _SWAP16[odst_u]))
        icmp = None
    if rproto in ICMP_PROTOS:
        reply = _new_tuple(FlowTuple, (raddr[rsrc], raddr[rdst], 0, 0))
    else:
        reply = _new_tuple(FlowTuple, (raddr[rsrc], raddr[rdst], _SWAP16[rsrc_u], _SWAP16[rdst_u]))
    # flow_id(orig, zone, netns, start or first_seen), from the record's own
    # little-endian bytes: the same bytes flow_id() packs.
    salted = raw[_ORIG] + raw[_NETNS] + raw[_ZONE] + raw[_START if start else _FIRST_SEEN]
    fid = int.from_bytes(_blake2b(salted, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF
    return id_start, fid, _AF[ofamily], oproto, orig, reply, icmp, {}


def decode(raw: bytes, wall_offset_ns: int) -> FlowEvent:
    """One probe record -> FlowEvent; wall_offset_ns converts kernel monotonic time.

    The same event as decode_tuple() on each tuple and flow.flow_id() give
    (tests/unit/test_decode.py compares them), in a fraction of the time."""
    if type(raw) is not bytes:
        raw = bytes(raw)
    (ts, start, stop, first_seen, po, pr, bo, br, dpo, dpr, dbo, dbr, status) = _COUNTERS.unpack_from(raw)
    netns, mark, zone, kind, tcp_state, flags = _TAIL.unpack_from(raw, _TAIL_AT)
    key = raw[_IDENTITY]
    id_start = start or first_seen
    known = _flows.get(key)
    if known is None or known[0] != id_start:
        known = _identity(raw, start, id_start)
        if len(_flows) >= FLOW_MEMO_LIMIT:
            _flows.clear()
        _flows[key] = known
    _, fid, family, proto, orig, reply, icmp, memo = known
    return new_event(KIND_CODES[kind], fid, family, proto, orig, reply,
                     po, bo, pr, br, dpo, dbo, dpr, dbr, start, stop, ts + wall_offset_ns,
                     zone, mark, netns, status, tcp_state, flags, icmp, {}, memo)


def record_key(raw: bytes) -> bytes:
    """The probe's state-map key (struct flow_key) of the flow a raw record is about."""
    _, start, _, _, _, _, _, _, _, _, _, _, _, orig, _, netns, _, zone, *_ = RECORD.unpack_from(raw)
    return FLOW_KEY.pack(orig, netns, zone, start)


def first_sight_new(event: FlowEvent) -> FlowEvent | None:
    """A flow seen first at its end still gets its NEW, right before the DESTROY."""
    if event.kind != DESTROY or not event.flags & FLAG_FIRST_SIGHT:
        return None
    return replace(event, kind=NEW, stop_ns=0, labels=dict(event.labels))
