"""IPFIX encoding of flow records: RFC 7011 messages, one biflow record
(RFC 5103) per FlowEvent, post-NAT fields where a translation happened.

No sockets and no configuration here: conntracct/sinks/ipfix.py sends what
this module makes.  Written by hand with `struct` rather than with the `ipfix`
package (python3-ipfix): bench/ipfix_encode.py measures both, and the library
misses the 100k records/s target once FlowEvents are turned into its value
objects (ip_address, datetime).

Information elements: IES below is the one list of them, with the FlowEvent
field each comes from; docs/ipfix.md describes the same list for operators
(a unit test checks that it names every element).

Templates: one per (address family, ICMP or not, NAT or not, direction
known or not), 16 in all, so a record never carries empty NAT or direction
fields.  A record is laid out as

    keys [+ NAT]              the flow's identity: made once per flow
    times, counters, reason   made for every record (_MIDDLE)
    [direction] zone mark     the flow's identity again: made once per flow

so per record only the middle part is packed; the rest is kept in the flow's
FlowEvent.memo (shared by the records of one flow identity).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .flow import ICMP_PROTOS, FlowEvent

IPFIX_VERSION = 10
TEMPLATE_SET_ID = 2
FIRST_TEMPLATE_ID = 256
REVERSE_PEN = 29305     # RFC 5103: reverse information elements
# RFC 5612's enterprise number for documentation use: no vendor owns it, so
# the zone and mark elements cannot clash with a real vendor's.  Operators who
# want globally unique numbers set their own IANA-assigned PEN (`pen:`).
DEFAULT_PEN = 32473
ENTERPRISE = -1         # IE.pen placeholder: the configured PEN

MESSAGE_HEADER = struct.Struct("!HHIII")   # version, length, export time, sequence, domain
SET_HEADER = struct.Struct("!HH")          # set id, length

# flowDirection values (IANA IE 61), from the enricher's `direction` label;
# `local` and `forward` flows are both ingress and egress here: no direction.
FLOW_DIRECTIONS = {"inbound": 0, "outbound": 1}


# Lengths of the abstract data types (RFC 7011 §6.1) the elements use.
TYPE_LENGTHS = {"unsigned8": 1, "unsigned16": 2, "unsigned32": 4, "unsigned64": 8,
                "ipv4Address": 4, "ipv6Address": 16, "dateTimeMilliseconds": 8}


@dataclass(frozen=True)
class IE:
    """One information element: name, number, abstract data type, the
    FlowEvent field it is taken from (for docs/ipfix.md), enterprise."""

    name: str
    number: int
    type: str
    source: str
    pen: int = 0

    @property
    def length(self) -> int:
        return TYPE_LENGTHS[self.type]

    def spec(self, pen: int) -> bytes:
        """The template field specifier (RFC 7011 §3.2)."""
        enterprise = pen if self.pen == ENTERPRISE else self.pen
        if enterprise:
            return struct.pack("!HHI", self.number | 0x8000, self.length, enterprise)
        return struct.pack("!HH", self.number, self.length)


def _reverse(ie: IE) -> IE:
    name = "reverse" + ie.name[0].upper() + ie.name[1:]
    return IE(name, ie.number, ie.type, ie.source.replace("_orig", "_reply"), REVERSE_PEN)


# -- the information elements ----------------------------------------------------

SRC4 = IE("sourceIPv4Address", 8, "ipv4Address", "orig.src")
DST4 = IE("destinationIPv4Address", 12, "ipv4Address", "orig.dst")
SRC6 = IE("sourceIPv6Address", 27, "ipv6Address", "orig.src")
DST6 = IE("destinationIPv6Address", 28, "ipv6Address", "orig.dst")
SPORT = IE("sourceTransportPort", 7, "unsigned16", "orig.sport")
DPORT = IE("destinationTransportPort", 11, "unsigned16", "orig.dport")
PROTO = IE("protocolIdentifier", 4, "unsigned8", "proto")
ICMP4 = IE("icmpTypeCodeIPv4", 32, "unsigned16", "icmp type * 256 + code")
ICMP6 = IE("icmpTypeCodeIPv6", 139, "unsigned16", "icmp type * 256 + code")
NAT_SRC4 = IE("postNATSourceIPv4Address", 225, "ipv4Address", "reply.dst")
NAT_DST4 = IE("postNATDestinationIPv4Address", 226, "ipv4Address", "reply.src")
NAT_SRC6 = IE("postNATSourceIPv6Address", 281, "ipv6Address", "reply.dst")
NAT_DST6 = IE("postNATDestinationIPv6Address", 282, "ipv6Address", "reply.src")
NAT_SPORT = IE("postNAPTSourceTransportPort", 227, "unsigned16", "reply.dport")
NAT_DPORT = IE("postNAPTDestinationTransportPort", 228, "unsigned16", "reply.sport")
START = IE("flowStartMilliseconds", 152, "dateTimeMilliseconds", "start_ns (the record's time if unknown)")
END = IE("flowEndMilliseconds", 153, "dateTimeMilliseconds", "stop_ns on DESTROY, else the record's time (ts_ns)")
OCTETS_TOTAL = IE("octetTotalCount", 85, "unsigned64", "bytes_orig")
PACKETS_TOTAL = IE("packetTotalCount", 86, "unsigned64", "packets_orig")
OCTETS_DELTA = IE("octetDeltaCount", 1, "unsigned64", "bytes_orig since the flow's previous exported record")
PACKETS_DELTA = IE("packetDeltaCount", 2, "unsigned64", "packets_orig since the flow's previous exported record")
COUNTERS = (OCTETS_TOTAL, PACKETS_TOTAL, OCTETS_DELTA, PACKETS_DELTA)
REVERSE_COUNTERS = tuple(map(_reverse, COUNTERS))
END_REASON = IE("flowEndReason", 136, "unsigned8", "end_reason (flow.flow_end_reason)")
DIRECTION = IE("flowDirection", 61, "unsigned8", "labels.direction: inbound 0, outbound 1")
ZONE = IE("conntrackZone", 1, "unsigned16", "zone", ENTERPRISE)
MARK = IE("conntrackMark", 2, "unsigned32", "mark", ENTERPRISE)

# Every element, in the order docs/ipfix.md lists them.
IES = (SRC4, DST4, SRC6, DST6, SPORT, DPORT, PROTO, ICMP4, ICMP6, NAT_SRC4, NAT_DST4, NAT_SRC6,
       NAT_DST6, NAT_SPORT, NAT_DPORT, START, END, *COUNTERS, *REVERSE_COUNTERS, END_REASON,
       DIRECTION, ZONE, MARK)

_STRUCT_CODES = {"unsigned8": "B", "unsigned16": "H", "unsigned32": "I", "unsigned64": "Q",
                 "ipv4Address": "4s", "ipv6Address": "16s", "dateTimeMilliseconds": "Q"}


def _struct(ies: tuple[IE, ...]) -> struct.Struct:
    """The packer of these elements, in order, in network byte order."""
    return struct.Struct("!" + "".join(_STRUCT_CODES[ie.type] for ie in ies))


# The per-record part, the same in every template: start, end, forward
# total/delta octets/packets, reverse ones, end reason.
_MIDDLE_IES = (START, END, *COUNTERS, *REVERSE_COUNTERS, END_REASON)
_MIDDLE = _struct(_MIDDLE_IES)


class TemplateKey(NamedTuple):
    family: int        # 4 or 6
    icmp: bool
    nat: bool
    direction: bool    # flowDirection present


@dataclass(frozen=True)
class Template:
    id: int
    key: TemplateKey
    ies: tuple[IE, ...]
    record_length: int

    @property
    def head(self) -> struct.Struct:
        """The fields before the per-record part (keys, NAT)."""
        return _struct(self.ies[:self.ies.index(START)])

    @property
    def tail(self) -> struct.Struct:
        """The fields after it ([direction], zone, mark)."""
        return _struct(self.ies[self.ies.index(END_REASON) + 1:])

    def record_spec(self, pen: int) -> bytes:
        """The template record: id, field count, field specifiers."""
        return struct.pack("!HH", self.id, len(self.ies)) + b"".join(ie.spec(pen) for ie in self.ies)


def _template_ies(key: TemplateKey) -> tuple[IE, ...]:
    v4 = key.family == 4
    ies = [SRC4, DST4] if v4 else [SRC6, DST6]
    ies += [ICMP4 if v4 else ICMP6] if key.icmp else [SPORT, DPORT]
    ies.append(PROTO)
    if key.nat:
        ies += [NAT_SRC4, NAT_DST4] if v4 else [NAT_SRC6, NAT_DST6]
        if not key.icmp:
            ies += [NAT_SPORT, NAT_DPORT]
    ies += _MIDDLE_IES
    if key.direction:
        ies.append(DIRECTION)
    return (*ies, ZONE, MARK)


def _templates() -> dict[TemplateKey, Template]:
    out = {}
    keys = [TemplateKey(family, icmp, nat, direction) for family in (4, 6) for icmp in (False, True)
            for nat in (False, True) for direction in (False, True)]
    for number, key in enumerate(keys):
        ies = _template_ies(key)
        out[key] = Template(FIRST_TEMPLATE_ID + number, key, ies, sum(ie.length for ie in ies))
    return out


TEMPLATES = _templates()


# -- records ---------------------------------------------------------------------

# Counters are plain tuples, in this order: (octets, packets, reverse octets,
# reverse packets) -- forward is the ORIGINAL direction, reverse the REPLY one.
Counters = tuple[int, int, int, int]
ZERO: Counters = (0, 0, 0, 0)


def totals(e: FlowEvent) -> Counters:
    return (e.bytes_orig, e.packets_orig, e.bytes_reply, e.packets_reply)


_ADDRESS_CACHE_LIMIT = 65536
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
# (family, icmp, nat, direction) -> (template, head packer, tail packer):
# plain tuples, made once (a NamedTuple key costs a constructor call per flow).
_PACKERS = {tuple(key): (t, t.head.pack, t.tail.pack) for key, t in TEMPLATES.items()}


class RecordEncoder:
    """FlowEvent -> (template, record bytes).  The flow's fixed parts are made
    once per flow identity (FlowEvent.memo) or, without a memo, per record."""

    def __init__(self, pen: int = DEFAULT_PEN):
        self.pen = pen
        self._addresses: dict[str, bytes] = {}
        # Keyed by this encoder in the memo: two sinks with different PENs
        # share records but not their parts.
        self._memo_key = object()

    def _packed(self, address: str, family: int) -> bytes:
        packed = self._addresses.get(address)
        if packed is None:
            packed = socket.inet_pton(_AF[family], address)
            if len(self._addresses) >= _ADDRESS_CACHE_LIMIT:
                self._addresses.clear()
            self._addresses[address] = packed
        return packed

    def flow_parts(self, e: FlowEvent, direction: str | None) -> tuple[Template, bytes, bytes]:
        """(template, bytes before the per-record part, bytes after it)."""
        o, r, family = e.orig, e.reply, e.family
        icmp = e.icmp is not None and e.proto in ICMP_PROTOS
        nat = o.src != r.dst or o.dst != r.src or o.sport != r.dport or o.dport != r.sport
        flow_direction = FLOW_DIRECTIONS.get(direction) if direction else None
        template, head, tail = _PACKERS[family, icmp, nat, flow_direction is not None]
        addresses = self._addresses
        src = addresses.get(o.src) or self._packed(o.src, family)
        dst = addresses.get(o.dst) or self._packed(o.dst, family)
        if icmp:
            icmp_type, code, _ = e.icmp
            keys = (src, dst, (icmp_type & 0xFF) << 8 | (code & 0xFF), e.proto)
        else:
            keys = (src, dst, o.sport, o.dport, e.proto)
        if nat:
            keys += (addresses.get(r.dst) or self._packed(r.dst, family),
                     addresses.get(r.src) or self._packed(r.src, family))
            if not icmp:
                keys += (r.dport, r.sport)
        if flow_direction is None:
            return template, head(*keys), tail(e.zone, e.mark)
        return template, head(*keys), tail(flow_direction, e.zone, e.mark)

    def encode(self, e: FlowEvent, base: Counters, reason: int) -> tuple[Template, bytes]:
        """One data record: the event's totals, deltas since `base` (the
        totals of the flow's previous exported record), and the
        flowEndReason `reason`."""
        labels = e.labels
        direction = labels.get("direction") if labels else None
        memo = e.memo
        if memo is None:
            template, head, tail = self.flow_parts(e, direction)
        else:
            known = memo.get(self._memo_key)
            if known is None or known[0] != direction:
                known = memo[self._memo_key] = (direction, *self.flow_parts(e, direction))
            _, template, head, tail = known
        octets, packets, reverse_octets, reverse_packets = \
            e.bytes_orig, e.packets_orig, e.bytes_reply, e.packets_reply
        d_octets, d_packets = octets - base[0], packets - base[1]
        d_reverse_octets, d_reverse_packets = reverse_octets - base[2], reverse_packets - base[3]
        if d_octets < 0 or d_packets < 0 or d_reverse_octets < 0 or d_reverse_packets < 0:
            # Totals never go back; a base from another flow (an id collision) must
            # still not wrap around the unsigned fields.
            d_octets, d_packets = max(d_octets, 0), max(d_packets, 0)
            d_reverse_octets, d_reverse_packets = max(d_reverse_octets, 0), max(d_reverse_packets, 0)
        # Counters are the kernel's u64 values: no masking needed.
        return template, head + _MIDDLE.pack(
            (e.start_ns or e.ts_ns) // 1_000_000, (e.stop_ns or e.ts_ns) // 1_000_000,
            octets, packets, d_octets, d_packets,
            reverse_octets, reverse_packets, d_reverse_octets, d_reverse_packets, reason) + tail


# -- messages --------------------------------------------------------------------

class Body(NamedTuple):
    """A message without its header: its sets, and how many data records
    (the first `records` of the run it was made from) it holds."""
    sets: bytes
    records: int


def _sets(groups: dict[int, list[bytes]]) -> bytes:
    parts = []
    for set_id, records in groups.items():
        content = b"".join(records)
        parts.append(SET_HEADER.pack(set_id, SET_HEADER.size + len(content)))
        parts.append(content)
    return b"".join(parts)


def pack_records(records: Iterable[tuple[int, bytes]], max_size: int) -> Iterator[Body]:
    """(set id, record) in order -> message bodies of at most `max_size`
    bytes with their headers, each holding a contiguous run of the records
    (grouped into one set per template); a record never straddles two."""
    room = max_size - MESSAGE_HEADER.size
    groups: dict[int, list[bytes]] = {}
    used = count = 0
    for set_id, record in records:
        group = groups.get(set_id)
        need = len(record) + (0 if group is not None else SET_HEADER.size)
        if used + need > room and count:
            yield Body(_sets(groups), count)
            groups, used, count = {}, 0, 0
            group, need = None, len(record) + SET_HEADER.size
        if need > room:
            raise ValueError(f"a {len(record)}-byte record does not fit a {max_size}-byte message")
        if group is None:
            group = groups[set_id] = []
        group.append(record)
        used += need
        count += 1
    if count:
        yield Body(_sets(groups), count)


def template_bodies(max_size: int, pen: int) -> list[Body]:
    """Every template in template sets, as few message bodies as `max_size`
    allows."""
    specs = [(TEMPLATE_SET_ID, t.record_spec(pen)) for t in TEMPLATES.values()]
    # Template records are not data records: they do not count in sequence numbers.
    return [Body(body.sets, 0) for body in pack_records(specs, max_size)]


class Session:
    """Message headers for one transport session and observation domain:
    the sequence number is the count of data records sent before the
    message (RFC 7011 §3.1), modulo 2^32."""

    def __init__(self, domain_id: int):
        self.domain_id = domain_id
        self.sequence = 0

    def seal(self, body: Body, export_time: int) -> bytes:
        """The whole message: header with the current sequence number, body."""
        length = MESSAGE_HEADER.size + len(body.sets)
        return MESSAGE_HEADER.pack(IPFIX_VERSION, length, export_time & 0xFFFFFFFF,
                                   self.sequence, self.domain_id) + body.sets

    def sent(self, body: Body) -> None:
        """Count a message's data records once it is on its way."""
        self.sequence = (self.sequence + body.records) & 0xFFFFFFFF
