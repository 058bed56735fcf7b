"""The flow record every stage after the probe works with."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

NEW, UPDATE, DESTROY = "new", "update", "destroy"
KINDS = (NEW, UPDATE, DESTROY)

# Record flags, as set by the probe (bpf/conntracct.c FLAG_*) or the agent.
FLAG_BACKDATED = 1    # the flow existed before the agent started
FLAG_NO_ACCT = 2      # no accounting extension: counters are absent, not zero
FLAG_NO_TSTAMP = 4    # no timestamp extension: start/stop unknown
FLAG_FIRST_SIGHT = 8  # first seen at its end
FLAG_END_UNSEEN = 16  # no end event (predates the agent, or lost to ENOBUFS): totals are the last seen
FLAG_NO_EVENTS = 32   # conntrack will send no event at its end (netfilter mode sweeps for it)
FLAG_NAMES = {FLAG_BACKDATED: "backdated", FLAG_NO_ACCT: "no_acct", FLAG_NO_TSTAMP: "no_tstamp",
              FLAG_FIRST_SIGHT: "first_sight", FLAG_END_UNSEEN: "end_unseen",
              FLAG_NO_EVENTS: "no_events"}

IPPROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 58: "icmpv6",
                 132: "sctp", 136: "udplite"}
ICMP_PROTOS = (1, 58)

TCP_STATES = ("none", "syn_sent", "syn_recv", "established", "fin_wait", "close_wait",
              "last_ack", "time_wait", "close", "syn_sent2")

# IPFIX flowEndReason (RFC 7011, IANA IE 136): why a record was sent.  0: the
# flow has not ended (a NEW); UPDATEs are active-timeout reports.
IDLE_TIMEOUT, ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, LACK_OF_RESOURCES = 1, 2, 3, 4, 5
END_REASONS = {IDLE_TIMEOUT: "idle_timeout", ACTIVE_TIMEOUT: "active_timeout", END_OF_FLOW: "end_of_flow",
               FORCED_END: "forced_end", LACK_OF_RESOURCES: "lack_of_resources"}
# TCP states (TCP_STATES indexes) a connection is in once a FIN or RST ended it.
TCP_ENDED = frozenset(range(TCP_STATES.index("fin_wait"), TCP_STATES.index("close") + 1))


def flow_end_reason(kind: str, proto: int, tcp_state: int, flags: int) -> int:
    """The flowEndReason of a record: a DESTROY is the end of a TCP flow seen
    to close (FIN/RST), a forced end when the agent never saw its end event
    (end_unseen), an idle timeout otherwise; an UPDATE is an active timeout.
    conntracct/_jsonline.c keeps this and tcp_state_name's JSON per (kind,
    proto == 6, tcp_state, flags): they may read nothing else."""
    if kind == DESTROY:
        if flags & FLAG_END_UNSEEN:
            return FORCED_END
        return END_OF_FLOW if proto == 6 and tcp_state in TCP_ENDED else IDLE_TIMEOUT
    return ACTIVE_TIMEOUT if kind == UPDATE else 0


# IPS_* status bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
IPS_ASSURED = 1 << 2
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5


class FlowTuple(NamedTuple):
    """One direction of a conntrack entry; ports are 0 for portless protocols."""
    src: str
    dst: str
    sport: int
    dport: int


@dataclass(slots=True)
class FlowEvent:
    kind: str
    flow_id: int
    family: int            # 4 or 6
    proto: int             # IANA protocol number
    orig: FlowTuple
    reply: FlowTuple
    packets_orig: int
    bytes_orig: int
    packets_reply: int
    bytes_reply: int
    delta_packets_orig: int
    delta_bytes_orig: int
    delta_packets_reply: int
    delta_bytes_reply: int
    start_ns: int          # wall clock, 0 if unknown
    stop_ns: int           # wall clock, 0 while the flow lives
    ts_ns: int             # wall clock when the record was taken
    zone: int = 0
    mark: int = 0
    netns: int = 0
    status: int = 0
    tcp_state: int = 0
    flags: int = 0
    icmp: tuple[int, int, int] | None = None   # (type, code, id)
    labels: dict[str, str] = field(default_factory=dict)   # set by enrichment
    # Scratch space the sinks share for one flow: the probe decoder gives every
    # record of one flow identity (tuples, netns, zone, mark, start) the same
    # dict, so a sink keeps there what it made from those fields alone (a
    # line-protocol tag set) and makes it once per flow.  None on records made
    # elsewhere.  Not part of the record: left out of comparisons and repr.
    memo: dict | None = field(default=None, compare=False, repr=False)

    @property
    def end_reason(self) -> int:
        """IPFIX flowEndReason (END_REASONS) of this record; 0 on a NEW.
        Derived from the record's kind, protocol, TCP state and flags when
        read: nothing to store, no cost for the sinks that do not show it."""
        return flow_end_reason(self.kind, self.proto, self.tcp_state, self.flags)

    @property
    def end_reason_name(self) -> str:
        return END_REASONS.get(self.end_reason, "")

    @property
    def proto_name(self) -> str:
        return IPPROTO_NAMES.get(self.proto, str(self.proto))

    @property
    def tcp_state_name(self) -> str:
        if self.proto != 6:
            return ""
        return TCP_STATES[self.tcp_state] if self.tcp_state < len(TCP_STATES) else str(self.tcp_state)

    @property
    def nat(self) -> bool:
        """True when the reply tuple is not the mirror of the original one."""
        o, r = self.orig, self.reply
        return (o.src, o.dst, o.sport, o.dport) != (r.dst, r.src, r.dport, r.sport)

    @property
    def packets(self) -> int:
        return self.packets_orig + self.packets_reply

    @property
    def bytes(self) -> int:
        return self.bytes_orig + self.bytes_reply


_ID_SALT = struct.Struct("<IHQ")


def flow_id(orig_tuple_raw: bytes, zone: int, netns: int, start: int) -> int:
    """64-bit id of a flow: hash of its original tuple (as the probe lays it
    out), zone, network namespace and start time.  Both the probe records and
    ctnetlink events derive it from the same bytes, so they agree."""
    digest = hashlib.blake2b(orig_tuple_raw + _ID_SALT.pack(netns, zone, start),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
