"""Flow ends the probe does not see itself (netfilter mode): ctnetlink
DESTROY events, the recovery after the event socket overran (ENOBUFS), and
the sweep for flows conntrack sends no end event for.

Each end becomes a probe record (record.pack_record, by field name) decoded
like any other, so a DESTROY is the same FlowEvent whichever way it came.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable

from .. import netns
from ..flow import DESTROY, FLAG_END_UNSEEN, FLAG_NO_TSTAMP, UPDATE, FlowEvent
from . import ctnetlink
from ._ctends import with_state
from .layout import KEY_LAYOUT
from .loader import Probe
from .record import (
    AF_NUMBER,
    FLOW_KEY,
    TUPLE,
    decode,
    flow_key,
    mirror_tuple,
    pack_record,
    pack_tuple,
    record_key,
    reply_raw,
    swap16,
)

log = logging.getLogger(__name__)

# The sweep asks ctnetlink which flows without end events still exist: one
# GET per flow (~15 µs) or one table dump (~1.7 µs per entry, whatever it
# holds; bench/sweep_cost.py).  A dump wins once the swept flows are more
# than a ninth of the table, and from a few hundred of them on.
SWEEP_GET_PER_DUMP_ENTRY = 9
SWEEP_DUMP_MIN_FLOWS = 256

# Parts of a struct flow_key (bpf/record.h) the dump matching reads.
_KEY_FAMILY = KEY_LAYOUT.offset("orig.family")
_KEY_PROTO = KEY_LAYOUT.offset("orig.proto")
_KEY_SRC = KEY_LAYOUT.offset("orig.src")
_KEY_DST = KEY_LAYOUT.offset("orig.dst")
_KEY_SRC_U = KEY_LAYOUT.span("orig.src_u")
_KEY_DST_U = KEY_LAYOUT.span("orig.dst_u")
_KEY_ZONE = KEY_LAYOUT.span("zone")
_ZONE_0 = bytes(_KEY_ZONE.stop - _KEY_ZONE.start)


class FlowEnds:
    """The end of every flow the probe tracks, in netfilter mode.  Opened
    before the probe attaches (a flow ending in between would leak its
    state), then start()ed with it."""

    def __init__(self, netlink_rcvbuf: int, counts: Counter, deliver: Callable[[FlowEvent], None],
                 netns_path: str | None):
        self._events = ctnetlink.DestroyEvents(netlink_rcvbuf)
        self._counts, self._deliver, self._netns_path = counts, deliver, netns_path
        self._netns = netns.inode()
        self._overruns_seen = 0
        # Flows conntrack will send no DESTROY event for (created before any
        # listener existed): key -> reply tuple.  Swept for their end.
        # The reply tuple is kept as the record's 40 bytes (a third of a
        # FlowTuple's memory) and decoded for the DESTROY only.
        self._unevented: dict[bytes, bytes] = {}
        # A flow's first record (TRACK, or NEW) makes it known; its UPDATEs are
        # looked at too once the ring has lost records (the first may be lost).
        self._unevented_from_updates = False
        self._probe: Probe | None = None

    def start(self, probe: Probe) -> None:
        self._probe = probe
        self._lookup = ctnetlink.Lookup()
        self._table = ctnetlink.Table()

    def fileno(self) -> int:
        return self._events.fileno()

    @property
    def unevented(self) -> int:
        """Flows without end events, waiting for the sweep."""
        return len(self._unevented)

    def note(self, raw: bytes, event: FlowEvent) -> None:
        """A probe record of a flow conntrack sends no end event for: sweep for its end."""
        if event.kind != DESTROY and (event.kind != UPDATE or self._unevented_from_updates):
            self._unevented[record_key(raw)] = reply_raw(raw)

    def _event(self, ts_ns: int, **fields) -> FlowEvent:
        """The DESTROY of a flow, from its fields by name; ts_ns: wall clock."""
        offset = self._probe.wall_offset_ns
        # The record holds the probe's clock; never below 0 (a wall clock set back).
        return decode(pack_record(kind=DESTROY, ts=max(0, ts_ns - offset), **fields), offset)

    # -- DESTROY events from ctnetlink ---------------------------------------------
    def on_events(self) -> None:
        offset = self._probe.wall_offset_ns
        ends = self._events.read(self._netns, offset)
        # Records already in the ring (e.g. a flow's NEW) go out before its DESTROY.
        self._probe.consume()
        # The flows' states all at once: a syscall per batch, not per flow.
        states = self._probe.take_raw_states([key for key, _ in ends])
        for (key, record), state in zip(ends, states, strict=True):
            self._unevented.pop(key, None)
            if state is not None:
                self._counts["state_deletes"] += 1
                record = with_state(record, state)
            self._deliver(decode(record, offset))
        if self._events.overruns != self._overruns_seen:
            self._counts["ctnetlink_overruns"] += self._events.overruns - self._overruns_seen
            self._overruns_seen = self._events.overruns
            log.warning("ctnetlink receive buffer overrun (ENOBUFS): DESTROY events were lost; "
                        "reconciling with the conntrack table (raise probe.netlink_rcvbuf)")
            self._recover_lost_ends()

    def _recover_lost_ends(self) -> None:
        """After ENOBUFS some DESTROY events are gone: flows the probe tracks
        that the table no longer holds ended unseen."""
        live = set()
        with netns.entered(self._netns_path):
            table = ctnetlink.dump()
        for e in table:
            o = e.orig
            live.add(flow_key(pack_tuple(e.family, o.proto, o.src, o.dst, o.src_u, o.dst_u),
                              self._netns, e.zone, e.start_ns))
        for key in self._probe.flow_keys():
            if key not in live:
                self._end_unseen(key)

    # -- the sweep -----------------------------------------------------------------
    def sweep_due(self) -> None:
        """The sweep's turn (every probe.sweep_interval)."""
        if not self._unevented_from_updates and self._probe.stats()["records_lost"]:
            self._unevented_from_updates = True
        if self._unevented:
            self.sweep()

    def sweep(self) -> None:
        """Report the end of flows conntrack sends no event for, once they are gone."""
        swept = len(self._unevented)
        if not swept:
            return
        table = self._table.count()
        if swept >= SWEEP_DUMP_MIN_FLOWS and (table is None or swept * SWEEP_GET_PER_DUMP_ENTRY >= table):
            self._counts["sweeps_by_dump"] += 1
            candidates = self._absent_from_dump()
        else:
            self._counts["sweeps_by_lookup"] += 1
            candidates = list(self._unevented)
        # A flow is declared gone only after its own GET says so: a dump can
        # miss an entry moved while it ran (table resize), and a tuple the
        # dump matching does not cover is asked here.
        for key in candidates:
            if not self._exists(key):
                self._end_unseen(key)

    def _exists(self, key: bytes) -> bool:
        orig_raw, _, zone, _ = FLOW_KEY.unpack(key)
        src, dst, src_u, dst_u, family, proto = TUPLE.unpack(orig_raw)
        width = 4 if family == socket.AF_INET else 16
        orig = ctnetlink.CtTuple(src[:width], dst[:width], proto, swap16(src_u), swap16(dst_u))
        return self._lookup.exists(family, orig, zone)

    def _absent_from_dump(self) -> list[bytes]:
        """Swept flows one table dump does not show (or cannot: other zones
        and protocols), to be confirmed one by one.  One dump per address
        family, so what is built for the matching (~100 bytes per flow)
        exists for one family at a time."""
        unmatched: list[bytes] = []
        encode, matched = ctnetlink.orig_tuple_attr, ctnetlink.DUMP_MATCHED_PROTOS
        for family, width in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
            # Keyed by the hash of the encoded tuple, not the bytes themselves
            # (less memory while the dump runs); two tuples with the same
            # 64-bit hash would only delay the end of one.
            by_attr: dict[int, bytes] = {}
            for key in self._unevented:
                if key[_KEY_FAMILY] != family:
                    continue
                proto = key[_KEY_PROTO]
                if proto not in matched or key[_KEY_ZONE] != _ZONE_0:
                    unmatched.append(key)
                    continue
                by_attr[hash(encode(family, proto, key[_KEY_SRC:_KEY_SRC + width], key[_KEY_DST:_KEY_DST + width],
                                    key[_KEY_SRC_U], key[_KEY_DST_U]))] = key
            if by_attr:
                self._table.discard_present(by_attr, hashed=True, family=family)
                unmatched.extend(by_attr.values())
            del by_attr
        unmatched.extend(key for key in self._unevented if key[_KEY_FAMILY] not in AF_NUMBER)
        return unmatched

    def _end_unseen(self, key: bytes) -> None:
        """A DESTROY for a tracked flow whose end event never came: the last
        totals the probe saw, flagged end_unseen; its kernel state is freed."""
        reply = self._unevented.pop(key, None)
        state = self._probe.take_flow_state(key)
        if state is None:
            return
        orig_raw, netns_inode, zone, start_ns = FLOW_KEY.unpack(key)
        self._counts["ends_unseen"] += 1
        self._deliver(self._event(
            orig=orig_raw, reply=reply or mirror_tuple(orig_raw), netns=netns_inode, zone=zone,
            start_ns=start_ns, first_seen=state.first_seen, ts_ns=time.time_ns(),
            packets=state.packets, bytes=state.bytes,
            flags=FLAG_END_UNSEEN | state.flags | (0 if start_ns else FLAG_NO_TSTAMP)))

    def close(self) -> None:
        self._events.close()
        if self._probe is not None:
            self._lookup.close()
            self._table.close()
