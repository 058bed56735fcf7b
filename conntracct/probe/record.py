"""The probe's record layout, mirrored once from bpf/conntracct.c, and its decoder.

tests/test_record_layout.py compiles the C program and fails if the two drift.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import replace

from ..flow import DESTROY, FLAG_FIRST_SIGHT, ICMP_PROTOS, NEW, FlowEvent, FlowTuple, flow_id

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


def decode(raw: bytes, wall_offset_ns: int) -> FlowEvent:
    """One probe record -> FlowEvent; wall_offset_ns converts kernel monotonic time."""
    (ts, start, stop, first_seen, po, pr, bo, br, dpo, dpr, dbo, dbr, status,
     orig_raw, reply_raw, netns, mark, zone, kind, tcp_state, flags) = RECORD.unpack_from(raw)
    orig, family, proto, icmp = decode_tuple(orig_raw)
    reply = decode_tuple(reply_raw)[0]
    return FlowEvent(
        kind=KIND_CODES[kind],
        flow_id=flow_id(orig_raw, zone, netns, start or first_seen),
        family=family, proto=proto, orig=orig, reply=reply,
        packets_orig=po, bytes_orig=bo, packets_reply=pr, bytes_reply=br,
        delta_packets_orig=dpo, delta_bytes_orig=dbo, delta_packets_reply=dpr, delta_bytes_reply=dbr,
        start_ns=start, stop_ns=stop, ts_ns=ts + wall_offset_ns,
        zone=zone, mark=mark, netns=netns, status=status, tcp_state=tcp_state,
        flags=flags, icmp=icmp)


def record_key(raw: bytes) -> bytes:
    """The probe's state-map key (struct flow_key) of the flow a raw record is about."""
    _, start, _, _, _, _, _, _, _, _, _, _, _, orig, _, netns, _, zone, *_ = RECORD.unpack_from(raw)
    return FLOW_KEY.pack(orig, netns, zone, start)


def first_sight_new(event: FlowEvent) -> FlowEvent | None:
    """A flow seen first at its end still gets its NEW, right before the DESTROY."""
    if event.kind != DESTROY or not event.flags & FLAG_FIRST_SIGHT:
        return None
    return replace(event, kind=NEW, stop_ns=0, labels=dict(event.labels))
