"""The probe record decoded the plain, slow way: the reference
conntracct.probe.record.decode (memoised identity, event filled field by
field) is held to in tests/unit/test_decode.py.  One struct unpack of the
whole record, one tuple at a time, flow.flow_id() for the id, the dataclass
call by keyword."""

from __future__ import annotations

import socket

from conntracct.flow import ICMP_PROTOS, FlowEvent, FlowTuple, flow_id
from conntracct.probe.record import KIND_CODES, RECORD, TUPLE

_AF = {socket.AF_INET: 4, socket.AF_INET6: 6}


def _swap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def decode_tuple(raw: bytes) -> tuple[FlowTuple, int, int, tuple[int, int, int] | None]:
    """(tuple, family number 4/6, protocol, icmp (type, code, id) or None)."""
    src, dst, src_u, dst_u, family, proto = TUPLE.unpack(raw)
    if family not in _AF:
        raise ValueError(f"record with unknown address family {family}")
    width = 4 if family == socket.AF_INET else 16
    src_text, dst_text = socket.inet_ntop(family, src[:width]), socket.inet_ntop(family, dst[:width])
    if proto in ICMP_PROTOS:
        # dst_u holds type then code in memory order; src_u is the echo id.
        return FlowTuple(src_text, dst_text, 0, 0), _AF[family], proto, (dst_u & 0xFF, dst_u >> 8, _swap16(src_u))
    return FlowTuple(src_text, dst_text, _swap16(src_u), _swap16(dst_u)), _AF[family], proto, None


def reference_decode(raw: bytes, wall_offset_ns: int) -> FlowEvent:
    """decode() spelled out from its parts: decode_tuple() per tuple, flow.flow_id()."""
    (ts, start, stop, first_seen, po, pr, bo, br, dpo, dpr, dbo, dbr, status,
     orig_raw, reply_raw, netns, mark, zone, kind, tcp_state, flags) = RECORD.unpack_from(raw)
    orig, family, proto, icmp = decode_tuple(orig_raw)
    reply = decode_tuple(reply_raw)[0]
    return FlowEvent(
        kind=KIND_CODES[kind], flow_id=flow_id(orig_raw, zone, netns, start or first_seen),
        family=family, proto=proto, orig=orig, reply=reply,
        packets_orig=po, bytes_orig=bo, packets_reply=pr, bytes_reply=br,
        delta_packets_orig=dpo, delta_bytes_orig=dbo, delta_packets_reply=dpr, delta_bytes_reply=dbr,
        start_ns=start, stop_ns=stop, ts_ns=ts + wall_offset_ns, zone=zone, mark=mark, netns=netns,
        status=status, tcp_state=tcp_state, flags=flags, icmp=icmp)
