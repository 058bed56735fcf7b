"""Probe records: raw struct flow_record bytes <-> FlowEvent.

decode() is the one place a FlowEvent is built from the probe's data: flow
ends the agent learns of elsewhere (ctnetlink DESTROY events, the sweep) are
packed into a record by field name (pack_record) and decoded the same way.
Formats and offsets come from bpf/record.h (layout.py), never from numbers
written here; the slow, obvious decoder tests compare decode() against is
tests/reference/record.py.
"""

from __future__ import annotations

import collections
import socket
import struct
from collections.abc import Callable
from dataclasses import replace

from ..flow import DESTROY, FLAG_FIRST_SIGHT, ICMP_PROTOS, NEW, FlowEvent, FlowTuple, flow_id
from . import _decode
from .layout import KEY_LAYOUT, RECORD_LAYOUT, STATE_LAYOUT, TUPLE_LAYOUT, prefixed

TUPLE = TUPLE_LAYOUT.struct
RECORD = RECORD_LAYOUT.struct
FLOW_KEY = KEY_LAYOUT.struct
FLOW_STATE = STATE_LAYOUT.struct

# "track" is agent-internal: a back-dated flow whose end must be swept for.
KIND_CODES = {code: name[len("KIND_"):].lower() for name, code in prefixed("KIND_").items()}
KIND_NUMBERS = {name: code for code, name in KIND_CODES.items()}
TRACK = KIND_CODES[prefixed("KIND_")["KIND_TRACK"]]

# Names of the probe's per-CPU `stats` array entries, by index.
STAT_NAMES = tuple(name[len("STAT_"):].lower() for name, _ in sorted(
    ((n, i) for n, i in prefixed("STAT_").items() if n != "STAT_COUNT"), key=lambda item: item[1]))


class FlowState(collections.namedtuple("FlowState", STATE_LAYOUT.names())):
    """The kernel's per-flow state (struct flow_state), fields by name;
    packets and bytes are (original, reply) pairs."""
    __slots__ = ()

    @classmethod
    def unpack(cls, raw: bytes) -> FlowState:
        first_seen, next_emit, po, pr, bo, br, flags = FLOW_STATE.unpack(raw)
        return cls(first_seen, next_emit, (po, pr), (bo, br), flags)


AF_NUMBER = {socket.AF_INET: 4, socket.AF_INET6: 6}


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


def swap16(value: int) -> int:
    """A u16 the kernel holds in network order, as the little-endian layouts read it (and back)."""
    return ((value & 0xFF) << 8) | (value >> 8)


def pack_tuple(family: int, proto: int, src: bytes, dst: bytes, src_u: int, dst_u: int) -> bytes:
    """A struct ct_tuple from parts: family AF_*, addresses packed, src_u/dst_u as
    the 16-bit values the kernel holds in network order (ICMP: id; type<<8|code)."""
    return TUPLE.pack(src.ljust(16, b"\0"), dst.ljust(16, b"\0"), swap16(src_u), swap16(dst_u), family, proto)


def mirror_tuple(raw: bytes) -> bytes:
    """The reply tuple of an un-NATed flow: the original one reversed."""
    src, dst, src_u, dst_u, family, proto = TUPLE.unpack(raw)
    return TUPLE.pack(dst, src, dst_u, src_u, family, proto)


# decode(raw, wall_offset_ns) -> FlowEvent: one probe record (any buffer of
# at least a struct flow_record); wall_offset_ns converts kernel monotonic
# time.  Compiled (conntracct/probe/_decode.c, which includes bpf/record.h): it
# runs for every record on the reader thread and for every flow end.  What a
# value means stays defined here and is handed in.  A flow's records repeat
# its identity (tuples, netns, zone, mark, start), so what derives from it alone
# -- the tuples as text, the flow id, and the FlowEvent.memo the sinks share
# for it -- is worked out once per flow and memoised in _flows, bounded.  The
# same event as the reference decoder gives (tests/reference/record.py,
# compared in tests/unit/test_decode.py); ValueError for an unknown address
# family or a short record, KeyError for an unknown kind.
_TAIL_AT = RECORD_LAYOUT.offset("netns")
_ORIG = RECORD_LAYOUT.span("orig")
# Live flows: a DESTROY takes its flow out.  Past the limit the memo starts
# over, which bounds it to ~4 MB: under churn, flows outlive 16,384 others
# between NEW and DESTROY (P6: ~35,000 at 10,000/s), so a larger memo only
# held 16 MB of flows it would not see again before it started over.
FLOW_MEMO_LIMIT = 4096
_flows: dict[bytes, tuple] = {}
_decode.configure(FlowEvent, FlowTuple, KIND_CODES, _ADDR[socket.AF_INET], _ADDR[socket.AF_INET6], ICMP_PROTOS,
                  AF_NUMBER, flow_id, _flows, FLOW_MEMO_LIMIT)
decode: Callable[[bytes, int], FlowEvent] = _decode.decode


_U64 = (1 << 64) - 1
# struct flow_record's fields in order, with the length of those that are
# arrays of numbers (packets[2]...), 0 for the others.
_PACK_ORDER = [(f.name, f.count if f.ctype != "u8" and not f.ctype.startswith("struct") and f.count > 1 else 0)
               for f in RECORD_LAYOUT.fields if not f.padding]


def _packer_source() -> str:
    """pack_record's source, generated from the layout: each field a keyword
    parameter (0 or empty bytes when not given), each array element masked
    as the probe's u64 wrap, all handed to RECORD.pack in layout order."""
    params, args = [], []
    for name, length in _PACK_ORDER:
        if name == "kind":
            params.append("kind")
            args.append("_KIND_NUMBERS[kind]")
        elif length:
            params.append(f"{name}=({', '.join(['0'] * length)})")
            args += [f"{name}[{i}] & _U64" for i in range(length)]
        else:
            empty = 'b""' if RECORD_LAYOUT.format(name, name).endswith("s") else "0"
            params.append(f"{name}={empty}")
            args.append(name)
    return (f"def pack_record(*, {', '.join(params)}, **unknown):\n"
            f"    if unknown:\n"
            f"        raise TypeError('struct flow_record has no field ' + ', '.join(unknown))\n"
            f"    return _RECORD_PACK({', '.join(args)})\n")


# Generated rather than a loop over the given fields: a DESTROY of netfilter
# mode is packed here once per flow (3.4 -> 1 us per record).
_PACKER_SCOPE = {"_KIND_NUMBERS": KIND_NUMBERS, "_U64": _U64, "_RECORD_PACK": RECORD.pack}
exec(compile(_packer_source(), "<pack_record>", "exec"), _PACKER_SCOPE)
pack_record = _PACKER_SCOPE["pack_record"]
pack_record.__doc__ = """A struct flow_record from its fields by their names in bpf/record.h
    (kind by name; arrays as tuples; ts in the probe's clock).  Fields not
    given are 0; array values wrap as the probe's u64 do."""


def flow_key(orig: bytes, netns: int, zone: int, start_ns: int) -> bytes:
    """The probe's state-map key (struct flow_key) of a flow instance."""
    return FLOW_KEY.pack(orig, netns, zone, start_ns)


_START_NS = struct.Struct("<" + RECORD_LAYOUT.format("start_ns"))
_START_AT = RECORD_LAYOUT.offset("start_ns")
_NETNS_ZONE = struct.Struct("<" + RECORD_LAYOUT.format("netns", "zone"))
_REPLY = RECORD_LAYOUT.span("reply")


def record_key(raw: bytes) -> bytes:
    """The state-map key (struct flow_key) of the flow a raw record is about."""
    netns, _, zone = _NETNS_ZONE.unpack_from(raw, _TAIL_AT)
    return flow_key(raw[_ORIG], netns, zone, _START_NS.unpack_from(raw, _START_AT)[0])


def reply_raw(raw: bytes) -> bytes:
    """The reply tuple's bytes of a raw record."""
    return raw[_REPLY]


def first_sight_new(event: FlowEvent) -> FlowEvent | None:
    """A flow seen first at its end still gets its NEW, right before the
    DESTROY.  The DESTROY carries the flow's traffic as its deltas; the NEW
    carries none, or sums of deltas would count the flow twice."""
    if event.kind != DESTROY or not event.flags & FLAG_FIRST_SIGHT:
        return None
    return replace(event, kind=NEW, stop_ns=0, labels=dict(event.labels), delta_packets_orig=0,
                   delta_bytes_orig=0, delta_packets_reply=0, delta_bytes_reply=0)
