"""The flow source: the ring reader.  One thread reads the probe's ring
buffer (and, in `netfilter` mode, the flow ends of ends.FlowEnds) and hands
one ordered stream of FlowEvents to the agent."""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import Counter
from collections.abc import Callable

from .. import netns
from ..flow import FLAG_NO_EVENTS, NEW, UPDATE, FlowEvent
from .ends import FlowEnds
from .layout import RECORD_LAYOUT
from .loader import Probe, ProbeSettings
from .record import KIND_CODES, KIND_NUMBERS, TRACK, decode, first_sight_new

log = logging.getLogger(__name__)

# What the source counts (FlowSource.stats()): records per kind, undecodable
# records, kernel flow state it removed, flows that ended without an end event.
COUNTERS = ("received_new", "received_update", "received_destroy", "decode_errors", "state_deletes",
            "ends_unseen", "ctnetlink_overruns", "sweeps_by_lookup", "sweeps_by_dump")

# The reader consumes the ring at most this often: once it has caught up, the
# kernel wakes it for every single record, and at thousands of records/s the
# wake-ups cost more than the records.  10 ms of records is ~100 kB at 50k/s.
READ_GAP_S = 0.010
_KIND_AT = RECORD_LAYOUT.offset("kind")
_FLAGS_AT = RECORD_LAYOUT.offset("flags")


def unwanted_kind_codes(kinds: frozenset[str] | None) -> bytes:
    """The record kind codes no sink wants (kinds: what the sinks want,
    None: all): the probe writes none (its state moves on as if it had),
    and any that come are counted and not decoded, unless the flow ends
    unseen by ctnetlink (its records tell the sweep about it).  DESTROYs are
    always read: one seen first at its end also makes the flow's NEW.
    With DESTROY-only sinks that skips the NEW of every flow, a seventh of
    the agent's CPU per finished flow (bench/p6_profile.py)."""
    return bytes(KIND_NUMBERS[k] for k in (NEW, UPDATE) if kinds is not None and k not in kinds)


class FlowSource:
    """Reads the probe (and its flow ends) on one thread, so a flow's NEW
    always precedes its DESTROY, and hands each FlowEvent to `emit`."""

    def __init__(self, mode: str, settings: ProbeSettings, emit: Callable[[FlowEvent], None],
                 stamped_since_start: bool, netlink_rcvbuf: int = 64 << 20,
                 sweep_interval_s: float = 30.0, netns_path: str | None = None,
                 kinds: frozenset[str] | None = None):
        self.mode = mode
        self._unwanted = unwanted_kind_codes(kinds)
        self.max_flows = settings.max_flows
        self.sweep_interval_s = sweep_interval_s
        self._emit = emit
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        # Create everything inside the namespace to account: links and
        # sockets stay bound to it.
        with netns.entered(netns_path):
            # ctnetlink first: a flow ending between attach and subscribe would leak state.
            self._ends = (FlowEnds(netlink_rcvbuf, self.counts, self._deliver, netns_path)
                          if mode == "netfilter" else None)
            try:
                self.probe = Probe(mode, settings, self._on_record, stamped_since_start, self._unwanted)
            except Exception:
                if self._ends:
                    self._ends.close()
                raise
            if self._ends:
                self._ends.start(self.probe)

    # -- records from the probe ---------------------------------------------
    def _on_record(self, raw: bytes) -> None:
        kind = raw[_KIND_AT]
        if kind in self._unwanted and not (self._ends and raw[_FLAGS_AT] & FLAG_NO_EVENTS):
            self.counts["received_" + KIND_CODES[kind]] += 1
            return
        try:
            event = decode(raw, self.probe.wall_offset_ns)
        except (ValueError, KeyError) as e:
            self.counts["decode_errors"] += 1
            log.debug("undecodable record: %s", e)
            return
        if event.flags & FLAG_NO_EVENTS and self._ends:
            self._ends.note(raw, event)
        if event.kind != TRACK:
            self._deliver(event)

    def _deliver(self, event: FlowEvent) -> None:
        new = first_sight_new(event)
        if new is not None:
            self.counts["received_new"] += 1
            self._emit(new)
        self.counts["received_" + event.kind] += 1
        self._emit(event)

    # -- the reader loop -----------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Read until `stop` is set; never blocks on sinks (emit must not block)."""
        poller = select.epoll()
        poller.register(self.probe.ring_fd, select.EPOLLIN)
        ends_fd = self._ends.fileno() if self._ends else -1
        if ends_fd >= 0:
            poller.register(ends_fd, select.EPOLLIN)
        next_sweep = time.monotonic() + self.sweep_interval_s
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
                if ends_fd >= 0 and any(fd == ends_fd for fd, _ in ready):
                    self._ends.on_events()
                if now >= next_sweep:
                    if self._ends:
                        self._ends.sweep_due()
                    next_sweep = time.monotonic() + self.sweep_interval_s
            self.drain()
        finally:
            poller.close()

    def drain(self) -> None:
        """Deliver whatever the kernel has queued now."""
        self.probe.consume()
        if self._ends:
            self._ends.on_events()

    def stats(self) -> dict:
        out: dict = dict(self.counts)
        out.update({"probe_" + k: v for k, v in self.probe.stats().items()})
        out["mode"] = self.mode
        out["max_flows"] = self.max_flows
        out["programs"] = self.probe.program_stats()
        if self._ends:
            out["flows_without_end_events"] = self._ends.unevented
        return out

    def close(self) -> None:
        self.probe.close()
        if self._ends:
            self._ends.close()
