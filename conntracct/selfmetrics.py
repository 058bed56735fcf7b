"""The agent's counters about itself, safe to update from any thread.

Stats.snapshot() returns plain dicts whose key names are a stable interface
(logs, the Prometheus sink):

  {"sinks":  {<sink name>: {"received", "emitted", "dropped", "batches_sent",
                            "batches_failed", "retries", "queue_depth",
                            "queue_capacity",
                            "dropped_by": {<reason>: {<kind>: count}}}},
   "stages": {<stage name>: {<counter>: count}}}

"received" counts events offered to a sink; every one of them ends up in
"emitted", in "dropped", or still queued or in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from .flow import KINDS, FlowEvent

QUEUE_FULL = "queue_full"                 # the sink's queue had no room
RETRIES_EXHAUSTED = "retries_exhausted"   # transient errors outlasted retry.max_attempts
PERMANENT_ERROR = "permanent_error"       # the sink rejected the records
SHUTDOWN = "shutdown"                     # still queued when the drain deadline passed
DROP_REASONS = (QUEUE_FULL, RETRIES_EXHAUSTED, PERMANENT_ERROR, SHUTDOWN)


class SinkStats:
    """Counters of one sink's queue and worker."""

    def __init__(self, name: str, queue_capacity: int = 0):
        self.name = name
        self.queue_capacity = queue_capacity
        # Read without a lock at snapshot time (len() of deques is atomic):
        # calling into the worker under our lock could deadlock with offer().
        self.queue_depth: Callable[[], int] = lambda: 0
        # Records offered to the queue, counted by the queue under its own
        # lock (one lock per record on the reader's hot path, not two).
        self.received: Callable[[], int] = lambda: 0
        self._lock = threading.Lock()
        self._emitted = 0
        self._batches_sent = self._batches_failed = self._retries = 0
        self._dropped = {reason: dict.fromkeys(KINDS, 0) for reason in DROP_REASONS}

    def add_emitted(self, n: int) -> None:
        with self._lock:
            self._emitted += n

    def add_dropped(self, reason: str, kind: str, n: int = 1) -> None:
        with self._lock:
            self._dropped[reason][kind] += n

    def add_dropped_events(self, reason: str, events: Iterable[FlowEvent]) -> None:
        with self._lock:
            by_kind = self._dropped[reason]
            for event in events:
                by_kind[event.kind] += 1

    def add_batch(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._batches_sent += 1
            else:
                self._batches_failed += 1

    def add_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def snapshot(self) -> dict[str, Any]:
        depth, received = self.queue_depth(), self.received()
        with self._lock:
            dropped_by = {reason: dict(kinds) for reason, kinds in self._dropped.items()}
            return {
                "received": received,
                "emitted": self._emitted,
                "dropped": sum(sum(kinds.values()) for kinds in dropped_by.values()),
                "batches_sent": self._batches_sent,
                "batches_failed": self._batches_failed,
                "retries": self._retries,
                "queue_depth": depth,
                "queue_capacity": self.queue_capacity,
                "dropped_by": dropped_by,
            }


class StageStats:
    """Named counters of one stage (probe, enrich, ...)."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self._counts[counter] = self._counts.get(counter, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Stats:
    """The registry of every stage's and sink's counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sinks: dict[str, SinkStats] = {}
        self._stages: dict[str, StageStats] = {}

    def sink(self, name: str, queue_capacity: int = 0) -> SinkStats:
        """The counters of sink `name`, created on first use."""
        with self._lock:
            stats = self._sinks.get(name)
            if stats is None:
                stats = self._sinks[name] = SinkStats(name, queue_capacity)
            return stats

    def stage(self, name: str) -> StageStats:
        with self._lock:
            stats = self._stages.get(name)
            if stats is None:
                stats = self._stages[name] = StageStats(name)
            return stats

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            sinks, stages = list(self._sinks.values()), list(self._stages.values())
        return {"sinks": {s.name: s.snapshot() for s in sinks},
                "stages": {s.name: s.snapshot() for s in stages}}
