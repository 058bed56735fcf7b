"""The flow source: the attached probe, plus ctnetlink DESTROY events in
`netfilter` mode, turned into one ordered stream of FlowEvents."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from .. import netns
from ..flow import (
    DESTROY,
    FLAG_END_UNSEEN,
    FLAG_FIRST_SIGHT,
    FLAG_NO_ACCT,
    FLAG_NO_EVENTS,
    FLAG_NO_TSTAMP,
    UPDATE,
    FlowEvent,
    FlowTuple,
    flow_id,
)
from . import ctnetlink
from .loader import Probe, ProbeSettings
from .record import FLOW_KEY, TRACK, TUPLE, decode, decode_tuple, first_sight_new, pack_tuple, record_key

log = logging.getLogger(__name__)

_AF_NUMBER = {socket.AF_INET: 4, socket.AF_INET6: 6}
# What the source counts (FlowSource.stats()): records per kind, undecodable
# records, kernel flow state it removed, flows that ended without an end event.
COUNTERS = ("received_new", "received_update", "received_destroy", "decode_errors", "state_deletes",
            "ends_unseen", "ctnetlink_overruns", "sweeps_by_lookup", "sweeps_by_dump")

# The sweep asks ctnetlink which flows without end events still exist: one
# GET per flow (~15 µs) or one table dump (~1.7 µs per entry, whatever it
# holds; bench/sweep_cost.py).  A dump wins once the swept flows are more
# than a ninth of the table, and from a few hundred of them on.
SWEEP_GET_PER_DUMP_ENTRY = 9
SWEEP_DUMP_MIN_FLOWS = 256
# The reader consumes the ring at most this often: once it has caught up, the
# kernel wakes it for every single record, and at thousands of records/s the
# wake-ups cost more than the records.  10 ms of records is ~100 kB at 50k/s.
READ_GAP_S = 0.010
# The reply tuple's bytes in a raw record (record.RECORD: orig, then reply).
_REPLY_RAW = slice(144, 184)


class FlowSource:
    """Reads the probe (and ctnetlink) on one thread, so a flow's NEW always
    precedes its DESTROY, and hands each FlowEvent to `emit`."""

    def __init__(self, mode: str, settings: ProbeSettings, emit: Callable[[FlowEvent], None],
                 stamped_since_start: bool, netlink_rcvbuf: int = 64 << 20,
                 sweep_interval_s: float = 30.0, netns_path: str | None = None):
        self.mode = mode
        self.max_flows = settings.max_flows
        self.sweep_interval_s = sweep_interval_s
        # Flows conntrack will send no DESTROY event for (created before any
        # listener existed): key -> reply tuple.  Swept for their end.
        # The reply tuple is kept as the record's 40 bytes (a third of a
        # FlowTuple's memory) and decoded for the DESTROY only.
        self._unevented: dict[bytes, bytes] = {}
        # A flow's first record (TRACK, or NEW) makes it known; its UPDATEs are
        # looked at too once the ring has lost records (the first may be lost).
        self._unevented_from_updates = False
        self._emit = emit
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        # Create everything inside the namespace to account: links and
        # sockets stay bound to it.
        self._netns_path = netns_path
        with netns.entered(netns_path):
            self._open(mode, settings, stamped_since_start, netlink_rcvbuf)
        self._overruns_seen = 0

    def _open(self, mode: str, settings: ProbeSettings, stamped_since_start: bool, netlink_rcvbuf: int) -> None:
        self._netns = netns.inode()
        # ctnetlink first: a flow ending between attach and subscribe would leak state.
        self._destroys = ctnetlink.DestroyEvents(netlink_rcvbuf) if mode == "netfilter" else None
        try:
            self.probe = Probe(mode, settings, self._on_record, stamped_since_start)
        except Exception:
            if self._destroys:
                self._destroys.close()
            raise
        self._lookup = ctnetlink.Lookup() if self._destroys else None
        self._table = ctnetlink.Table() if self._destroys else None

    # -- records from the probe ---------------------------------------------
    def _on_record(self, raw: bytes) -> None:
        try:
            event = decode(raw, self.probe.wall_offset_ns)
        except (ValueError, KeyError) as e:
            self.counts["decode_errors"] += 1
            log.debug("undecodable record: %s", e)
            return
        if (event.flags & FLAG_NO_EVENTS and self._destroys and event.kind != DESTROY
                and (event.kind != UPDATE or self._unevented_from_updates)):
            self._unevented[record_key(raw)] = raw[_REPLY_RAW]
        if event.kind != TRACK:
            self._deliver(event)

    def _deliver(self, event: FlowEvent) -> None:
        new = first_sight_new(event)
        if new is not None:
            self.counts["received_new"] += 1
            self._emit(new)
        self.counts["received_" + event.kind] += 1
        self._emit(event)

    # -- DESTROY events from ctnetlink (netfilter mode) ---------------------------
    def _on_destroys(self) -> None:
        entries = self._destroys.read()
        # Records already in the ring (e.g. a flow's NEW) go out before its DESTROY.
        self.probe.consume()
        for entry in entries:
            event = self._destroy_event(entry)
            if event is not None:
                self._deliver(event)
        if self._destroys.overruns != self._overruns_seen:
            self.counts["ctnetlink_overruns"] += self._destroys.overruns - self._overruns_seen
            self._overruns_seen = self._destroys.overruns
            log.warning("ctnetlink receive buffer overrun (ENOBUFS): DESTROY events were lost; "
                        "reconciling with the conntrack table (raise probe.netlink_rcvbuf)")
            self._recover_lost_ends()

    def _destroy_event(self, e: ctnetlink.CtEntry) -> FlowEvent | None:
        if e.family not in _AF_NUMBER:
            return None
        o, r = e.orig, e.reply
        orig_raw = pack_tuple(e.family, o.proto, o.src, o.dst, o.src_u, o.dst_u)
        orig, family, proto, icmp = decode_tuple(orig_raw)
        reply = decode_tuple(pack_tuple(e.family, r.proto, r.src, r.dst, r.src_u, r.dst_u))[0]
        key = FLOW_KEY.pack(orig_raw, self._netns, e.zone, e.start_ns)
        self._unevented.pop(key, None)
        state = self.probe.take_flow_state(key)
        flags = 0 if e.counters else FLAG_NO_ACCT
        flags |= 0 if e.start_ns else FLAG_NO_TSTAMP
        if state is None:
            flags |= FLAG_FIRST_SIGHT
            first_seen, last = 0, (0, 0, 0, 0)
        else:
            self.counts["state_deletes"] += 1
            first_seen = state[0]
            last = (state[2], state[4], state[3], state[5])   # pkts_o, bytes_o, pkts_r, bytes_r
            flags |= state[6]
        po, bo, pr, br = e.counters or (0, 0, 0, 0)
        return FlowEvent(
            kind=DESTROY, flow_id=flow_id(orig_raw, e.zone, self._netns, e.start_ns or first_seen),
            family=family, proto=proto, orig=orig, reply=reply,
            packets_orig=po, bytes_orig=bo, packets_reply=pr, bytes_reply=br,
            delta_packets_orig=po - last[0], delta_bytes_orig=bo - last[1],
            delta_packets_reply=pr - last[2], delta_bytes_reply=br - last[3],
            start_ns=e.start_ns, stop_ns=e.stop_ns, ts_ns=e.stop_ns or time.time_ns(),
            zone=e.zone, mark=e.mark, netns=self._netns, status=e.status,
            tcp_state=e.tcp_state, flags=flags, icmp=icmp)

    def _recover_lost_ends(self) -> None:
        """After ENOBUFS some DESTROY events are gone: flows the probe tracks
        that the table no longer holds ended unseen."""
        live = set()
        with netns.entered(self._netns_path):
            table = ctnetlink.dump()
        for e in table:
            o = e.orig
            live.add(FLOW_KEY.pack(pack_tuple(e.family, o.proto, o.src, o.dst, o.src_u, o.dst_u),
                                   self._netns, e.zone, e.start_ns))
        for key in [bytes(k) for k in self.probe.bpf["flows"].keys()]:
            if key not in live:
                self._end_unseen(key)

    def sweep(self) -> None:
        """Report the end of flows conntrack sends no event for, once they are gone."""
        swept = len(self._unevented)
        if not swept:
            return
        table = self._table.count()
        if swept >= SWEEP_DUMP_MIN_FLOWS and (table is None or swept * SWEEP_GET_PER_DUMP_ENTRY >= table):
            self.counts["sweeps_by_dump"] += 1
            candidates = self._absent_from_dump()
        else:
            self.counts["sweeps_by_lookup"] += 1
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
        orig = ctnetlink.CtTuple(src[:width], dst[:width], proto,
                                 ((src_u & 0xFF) << 8) | (src_u >> 8), ((dst_u & 0xFF) << 8) | (dst_u >> 8))
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
                # FLOW_KEY: the 40-byte TUPLE (src 16, dst 16, ports as on the
                # wire, family, proto), netns 4, zone 2.
                if key[36] != family:
                    continue
                proto = key[37]
                if proto not in matched or key[44] or key[45]:
                    unmatched.append(key)
                    continue
                by_attr[hash(encode(family, proto, key[:width], key[16:16 + width], key[32:34], key[34:36]))] = key
            if by_attr:
                self._table.discard_present(by_attr, hashed=True, family=family)
                unmatched.extend(by_attr.values())
            del by_attr
        unmatched.extend(key for key in self._unevented if key[36] not in _AF_NUMBER)
        return unmatched

    def _end_unseen(self, key: bytes) -> None:
        """A DESTROY for a tracked flow whose end event never came: the last
        totals the probe saw, flagged end_unseen; its kernel state is freed."""
        reply_raw = self._unevented.pop(key, None)
        state = self.probe.take_flow_state(key)
        if state is None:
            return
        orig_raw, netns, zone, start_ns = FLOW_KEY.unpack(key)
        orig, family, proto, icmp = decode_tuple(orig_raw)
        reply = decode_tuple(reply_raw)[0] if reply_raw else None
        first_seen, _, po, pr, bo, br, state_flags = state
        self.counts["ends_unseen"] += 1
        self._deliver(FlowEvent(
            kind=DESTROY, flow_id=flow_id(orig_raw, zone, netns, start_ns or first_seen),
            family=family, proto=proto, orig=orig,
            reply=reply or FlowTuple(orig.dst, orig.src, orig.dport, orig.sport),
            packets_orig=po, bytes_orig=bo, packets_reply=pr, bytes_reply=br,
            delta_packets_orig=0, delta_bytes_orig=0, delta_packets_reply=0, delta_bytes_reply=0,
            start_ns=start_ns, stop_ns=0, ts_ns=time.time_ns(), zone=zone, netns=netns,
            flags=FLAG_END_UNSEEN | state_flags | (0 if start_ns else FLAG_NO_TSTAMP), icmp=icmp))

    # -- the reader loop -----------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Read until `stop` is set; never blocks on sinks (emit must not block)."""
        poller = select.epoll()
        poller.register(self.probe.ring_fd, select.EPOLLIN)
        if self._destroys:
            poller.register(self._destroys.fileno(), select.EPOLLIN)
        next_sweep = time.monotonic() + self.sweep_interval_s
        destroys_fd = self._destroys.fileno() if self._destroys else -1
        next_read = 0.0
        try:
            while not stop.is_set():
                ready = poller.poll(0.1)
                now = time.monotonic()
                if ready and now < next_read:
                    # Let records accumulate: one consume for many of them.
                    time.sleep(next_read - now)
                    now = next_read
                next_read = now + READ_GAP_S
                self.probe.consume()
                if destroys_fd >= 0 and any(fd == destroys_fd for fd, _ in ready):
                    self._on_destroys()
                if now >= next_sweep:
                    if self._destroys and not self._unevented_from_updates and self.probe.stats()["records_lost"]:
                        self._unevented_from_updates = True
                    if self._unevented:
                        self.sweep()
                    next_sweep = time.monotonic() + self.sweep_interval_s
            self.drain()
        finally:
            poller.close()

    def drain(self) -> None:
        """Deliver whatever the kernel has queued now."""
        self.probe.consume()
        if self._destroys:
            self._on_destroys()

    def stats(self) -> dict:
        out: dict = dict(self.counts)
        out.update({"probe_" + k: v for k, v in self.probe.stats().items()})
        out["mode"] = self.mode
        out["max_flows"] = self.max_flows
        out["programs"] = self.probe.program_stats()
        if self._destroys:
            out["flows_without_end_events"] = len(self._unevented)
        return out

    def close(self) -> None:
        self.probe.close()
        if self._destroys:
            self._destroys.close()
            self._lookup.close()
            self._table.close()



