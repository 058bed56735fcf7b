"""Queues, batching, retries and drop accounting: the one place for them.

Each sink gets a SinkWorker: a bounded queue and one thread.  The probe reader
thread calls Pipeline.offer(), which never blocks on a sink; a slow or dead
sink only fills its own queue.

Queue-full policy: DESTROY records (final totals, what users archive) are
dropped last.  A full queue refuses a NEW/UPDATE; a DESTROY arriving at a full
queue evicts the oldest queued NEW/UPDATE, and is refused only when the queue
holds nothing but DESTROYs.

Ordering: records reach the sink in exactly the order they were offered
(eviction only removes records, it never reorders), so a flow's NEW, UPDATEs
and DESTROY stay in order.  Two deques make eviction O(1); a sequence number
merges them back in order when a batch is taken.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, islice
from operator import attrgetter, itemgetter

from .flow import DESTROY, KINDS, FlowEvent
from .selfmetrics import (
    DISK_FULL,
    PERMANENT_ERROR,
    QUEUE_FULL,
    RETRIES_EXHAUSTED,
    SHUTDOWN,
    SPOOL_CORRUPT,
    SPOOL_ERROR,
    SPOOL_FULL,
    SinkStats,
    Stats,
)
from .sinks import Sink, SinkConfig, create_sink
from .sinks.base import ACCEPTED, SinkError, TransientSinkError, WriteResult
from .spool import DiskFull, Spool, SpoolError

log = logging.getLogger(__name__)

Clock = Callable[[], float]
_event_of = itemgetter(1)     # (seq, event) -> event
_kind_of = attrgetter("kind")


class ErrorLog:
    """Logs a sink's errors without storms: the first of each kind at once,
    then at most one line per `interval` seconds saying how many were held back."""

    def __init__(self, sink_name: str, interval: float = 60.0, clock: Clock = time.monotonic):
        self._sink_name, self._interval, self._clock = sink_name, interval, clock
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def error(self, what: str, exc: BaseException) -> None:
        self.report(what, type(exc).__name__, str(exc))

    def report(self, what: str, kind: str, text: str) -> None:
        key = f"{what}:{kind}"
        now = self._clock()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        more = f" ({held} more since the last report)" if held else ""
        log.warning("sink %s: %s: %s: %s%s", self._sink_name, what, kind, text, more)
        self._next[key] = now + self._interval


class SinkWorker:
    """One sink's bounded queue and the thread that writes its batches."""

    def __init__(self, name: str, sink: Sink, settings: SinkConfig, stats: SinkStats,
                 clock: Clock = time.monotonic):
        self.name, self.sink, self.kinds = name, sink, settings.kinds
        self._capacity = settings.queue_size
        self._batch_size = settings.batch_size
        self._flush_interval = settings.flush_interval
        self._retry = settings.retry
        self._stats, self._clock = stats, clock
        self._errors = ErrorLog(name, clock=clock)

        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)   # offer() -> worker: a batch may be due
        self._wake = threading.Event()                  # close() -> worker: stop backing off
        self._destroys: deque[tuple[int, FlowEvent]] = deque()
        self._others: deque[tuple[int, FlowEvent]] = deque()
        self._seq = 0                 # records offered so far (also their order)
        self._oldest = 0.0            # when the oldest queued record arrived (clock)
        self._inflight: list[FlowEvent] = []
        self._lost = False            # records of the batch being written were dropped
        self._accepting = True
        self._draining = False
        self._deadline = float("inf")
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)
        stats.queue_capacity = self._capacity
        stats.queue_depth = self.depth
        stats.received = lambda: self._seq

    # -- reader thread -----------------------------------------------------

    def offer(self, event: FlowEvent) -> bool:
        """Queue one record; never blocks.  False if it was dropped."""
        with self._lock:
            self._seq = seq = self._seq + 1
            if not self._accepting:
                self._stats.add_dropped(SHUTDOWN, event.kind)
                return False
            destroys, others = self._destroys, self._others
            is_destroy = event.kind == DESTROY
            size = len(destroys) + len(others)
            if size >= self._capacity:
                if not (is_destroy and others):
                    self._stats.add_dropped(QUEUE_FULL, event.kind)
                    return False
                self._stats.add_dropped(QUEUE_FULL, others.popleft()[1].kind)
                size -= 1
            if is_destroy:
                destroys.append((seq, event))
            else:
                others.append((seq, event))
            # Wake the worker only when it has something new to decide:
            # the first record (starts the flush timer) or a full batch.
            if size == 0:
                self._oldest = self._clock()
                self._ready.notify()
            elif size + 1 == self._batch_size:
                self._ready.notify()
        return True

    def depth(self) -> int:
        return len(self._destroys) + len(self._others)

    # -- control -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, deadline: float) -> None:
        """Stop accepting; the worker writes what is queued until `deadline`
        (a clock() time), then drops the rest and closes the sink."""
        with self._lock:
            self._accepting = False
            self._draining = True
            self._deadline = deadline
            self._ready.notify_all()
        self._wake.set()
        if self._thread.ident is None:   # never started: drain and close the sink all the same
            self._thread.start()

    def join(self, timeout: float) -> bool:
        """True if the worker finished (sink closed) within `timeout` seconds."""
        self._thread.join(max(timeout, 0.0))
        return not self._thread.is_alive()

    def abandon(self) -> int:
        """Give up on a worker stuck past the deadline (e.g. in a hung write):
        count what it holds as dropped, ignore whatever it reports later."""
        with self._lock:
            if self._abandoned:
                return 0
            self._abandoned = True
            held = self._inflight + [e for _, e in self._destroys] + [e for _, e in self._others]
            self._destroys.clear()
            self._others.clear()
            self._inflight = []
            self._stats.add_dropped_events(SHUTDOWN, held)
            return len(held)

    # -- worker thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._deliver(batch)
        except Exception:   # a bug here must not pass silently: the sink stops
            log.exception("sink %s: worker failed", self.name)
        finally:
            dropped = self.abandon()
            if dropped:
                log.warning("sink %s: %d records still queued at shutdown were dropped", self.name, dropped)
            try:
                self.sink.close()
            except Exception as exc:
                self._errors.error("close", exc)

    def _next_batch(self) -> list[FlowEvent] | None:
        """Wait until a batch is due (full, or the oldest record has waited
        flush_interval); while draining, take whatever is queued at once.
        None when the worker is done."""
        with self._lock:
            while True:
                size = len(self._destroys) + len(self._others)
                if self._draining:
                    if size == 0 or self._clock() >= self._deadline:
                        return None
                    return self._take()
                if size >= self._batch_size:
                    return self._take()
                if size == 0:
                    self._ready.wait()
                    continue
                wait = self._oldest + self._flush_interval - self._clock()
                if wait <= 0:
                    return self._take()
                self._ready.wait(wait)

    def _take(self) -> list[FlowEvent]:
        """Up to batch_size records in offer order (lock held)."""
        destroys, others = self._destroys, self._others
        n = min(self._batch_size, len(destroys) + len(others))
        if not destroys or not others:
            queue = destroys or others
            if n == len(queue):
                batch = list(map(_event_of, queue))
                queue.clear()
            else:
                pop = queue.popleft
                batch = [pop()[1] for _ in range(n)]
        else:
            # The n oldest of both, by sequence number: each deque is in
            # order, so they are among the first n of each.  Sequence
            # numbers are unique: sorting never compares two events.
            merged = sorted(chain(islice(destroys, n), islice(others, n)))
            del merged[n:]
            batch = list(map(_event_of, merged))
            taken_destroys = list(map(_kind_of, batch)).count(DESTROY)
            for queue, count in ((destroys, taken_destroys), (others, n - taken_destroys)):
                if count == len(queue):
                    queue.clear()
                else:
                    pop = queue.popleft
                    for _ in range(count):
                        pop()
        if destroys or others:
            self._oldest = self._clock()   # the rest waited at least since now
        self._inflight = batch
        return batch

    def _deliver(self, batch: list[FlowEvent]) -> None:
        """Write one batch; retry what the sink says may succeed later, with
        exponential back-off; drop and count what it rejected."""
        pending, attempt, delay = batch, 1, self._retry.backoff
        self._lost = False
        while True:
            result, kind, text = self._write(pending)
            retry, rejected = result.retry, result.rejected
            written = len(pending) - len(retry) - len(rejected)
            if not retry:
                if rejected:
                    self._errors.report("dropped", kind, text)
                self._account(written, [(PERMANENT_ERROR, rejected)], done=True)
                return
            if attempt >= self._retry.max_attempts:
                self._errors.report(f"gave up after {attempt} attempts", kind, text)
                self._account(written, [(PERMANENT_ERROR, rejected), (RETRIES_EXHAUSTED, retry)], done=True)
                return
            self._errors.report("will retry", kind, text)
            self._account(written, [(PERMANENT_ERROR, rejected)], retrying=retry)
            if not self._pause(delay):
                self._account(0, [(SHUTDOWN, retry)], done=True)
                return
            pending, attempt = list(retry), attempt + 1
            delay = min(delay * 2, self._retry.max_backoff)

    def _write(self, pending: list[FlowEvent]) -> tuple[WriteResult, str, str]:
        """The sink's result for one attempt, and the (kind, text) to log for
        what was not written.  An exception fails the whole attempt."""
        try:
            result = self.sink.write(pending)
        except TransientSinkError as exc:
            return WriteResult(retry=pending), type(exc).__name__, str(exc)
        except Exception as exc:   # PermanentSinkError, or a sink bug: retrying cannot help
            return WriteResult(rejected=pending), type(exc).__name__, str(exc)
        if result is None:
            return ACCEPTED, "", ""
        return result, "partial write", result.reason

    def _pause(self, delay: float) -> bool:
        """Back off `delay` seconds; False if the drain deadline comes first."""
        end = self._clock() + delay
        if not self._draining:
            self._wake.wait(delay)   # close() cuts it short to check the deadline
        if self._draining:
            if end > self._deadline:
                return False
            time.sleep(max(end - self._clock(), 0.0))
        return True

    def _account(self, written: int, dropped: list[tuple[str, Sequence[FlowEvent]]],
                 retrying: Sequence[FlowEvent] = (), done: bool = False) -> None:
        """Count one attempt: `written` records emitted, `dropped` lost for
        their reasons; then either the batch is `done` or `retrying` is what
        is left in flight."""
        with self._lock:
            if self._abandoned:     # already counted as dropped at shutdown
                return
            self._stats.add_emitted(written)
            for reason, events in dropped:
                if events:
                    self._stats.add_dropped_events(reason, events)
                    self._lost = True
            if done:
                self._stats.add_batch(ok=not self._lost)
                self._inflight = []
            else:
                self._stats.add_retry()
                self._inflight = list(retrying)


class SpoolingWorker(SinkWorker):
    """A sink worker with a disk spool (`spool:` in the sink's config).

    What the memory queue cannot hold goes to the spool instead of being
    dropped, and from then on every new record goes there too, behind it,
    until the spool is empty again: records older than the spool's are all in
    memory, newer ones all on disk, so the sink gets them in offer order
    (per flow, NEW, UPDATEs, DESTROY) even across a restart.  The worker
    writes what memory holds first, then reads the spool a batch at a time
    and deletes a batch only once the sink has answered for it: at least
    once.  Transient errors are retried without limit (retry.max_attempts
    does not apply: waiting is what the spool is for); what the sink rejects
    is dropped as usual.  At shutdown, what memory still holds when the drain
    deadline passes goes to the front of the spool instead of being dropped.

    The reader thread never touches the disk: offer() puts the overflow in a
    list that a second thread (spool writer) stores, one transaction a batch."""

    WRITE_INTERVAL = 0.05   # seconds the spool writer gathers overflow before a transaction
    # At least this many records wait for the spool writer: a checkpoint's
    # sync on a busy disk can stall it for a second or two (bench/spool_outage.py
    # at 6,000 records/s dropped 12,592 of 2M with 10,000).
    OVERFLOW_LIMIT = 50_000

    def __init__(self, name: str, sink: Sink, settings: SinkConfig, stats: SinkStats,
                 clock: Clock = time.monotonic):
        super().__init__(name, sink, settings, stats, clock)
        assert settings.spool is not None
        self.spool = Spool(settings.spool.path, settings.spool.max_size, name)
        try:
            self.spool.open()
        except (SpoolError, sqlite3.Error) as exc:
            raise SinkError(f"sink {name}: spool.path: {exc}") from None
        self._overflow: list[FlowEvent] = []   # offered while spilling, not yet on disk
        self._overflow_limit = max(self._capacity, self.OVERFLOW_LIMIT)
        self._storing = 0                        # records the spool writer is storing now
        self._spilling = self.spool.records > 0  # new records go to the spool (it is not empty)
        self._from_disk = False                  # the batch in flight was read from the spool
        self._writer_done = False
        self._out_of_time = False                # a retry would pass the drain deadline
        self._spool_errors = ErrorLog(name, clock=clock)
        self._writer = threading.Thread(target=self._store_overflow, name=f"spool-{name}", daemon=True)
        stats.spool = self._spool_figures
        if self.spool.records:
            oldest = self.spool.oldest_ts()
            log.info("sink %s: %d records spooled before this start (the oldest from %s) are delivered first",
                     name, self.spool.records, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((oldest or 0) / 1e9)))

    def _spool_figures(self) -> dict[str, int | float]:
        oldest = self.spool.oldest_ts()
        return {"records": self.spool.records, "bytes": self.spool.bytes,
                "oldest_age_seconds": max(time.time() - oldest / 1e9, 0.0) if oldest else 0.0,
                "pending": len(self._overflow) + self._storing}

    # -- reader thread -----------------------------------------------------

    def offer(self, event: FlowEvent) -> bool:
        with self._lock:
            self._seq = seq = self._seq + 1
            if not self._accepting:
                self._stats.add_dropped(SHUTDOWN, event.kind)
                return False
            if not self._spilling:
                size = len(self._destroys) + len(self._others)
                if size < self._capacity:
                    (self._destroys if event.kind == DESTROY else self._others).append((seq, event))
                    if size == 0:
                        self._oldest = self._clock()
                        self._ready.notify_all()
                    elif size + 1 == self._batch_size:
                        self._ready.notify_all()
                    return True
                self._spilling = True
            overflow = self._overflow
            if len(overflow) >= self._overflow_limit:   # the disk cannot keep up: as a full memory queue
                self._stats.add_dropped(QUEUE_FULL, event.kind)
                return False
            overflow.append(event)
            if len(overflow) == 1:
                self._ready.notify_all()
        return True

    # -- control -----------------------------------------------------------

    SPOOL_GRACE = 5.0   # seconds past the drain deadline to put memory's records in the spool

    def start(self) -> None:
        self._writer.start()
        super().start()

    def close(self, deadline: float) -> None:
        if self._writer.ident is None:   # never started: the writer stores what close() leaves
            self._writer.start()
        super().close(deadline)

    def join(self, timeout: float) -> bool:
        return super().join(timeout + self.SPOOL_GRACE)

    def abandon(self) -> int:
        """Put what memory still holds at the front of the spool (older than
        every spooled row), store the overflow behind it, close the spool.
        What cannot be stored counts as dropped (shutdown)."""
        with self._lock:
            if self._abandoned:
                return 0
            self._abandoned = True
            held = ([] if self._from_disk else self._inflight) + \
                [e for _, e in sorted(chain(self._destroys, self._others))]
            self._destroys.clear()
            self._others.clear()
            self._inflight = []
            self._writer_done = True
            self._ready.notify_all()
        if self._writer.ident is not None:
            self._writer.join(self.SPOOL_GRACE)
        lost = 0
        if held:
            reason = SPOOL_FULL
            try:
                dropped = self.spool.prepend(held)
                self._stats.add_spooled(len(held) - len(dropped))
            except (sqlite3.Error, SpoolError) as exc:
                self._spool_errors.error("could not spool the records held in memory", exc)
                dropped = held
                reason = DISK_FULL if isinstance(exc, DiskFull) else SPOOL_ERROR
            self._stats.add_dropped_events(reason, dropped)
            lost += len(dropped)
        self.spool.release()
        self.spool.close()
        if held and not lost:
            log.info("sink %s: %d records held in memory at shutdown were spooled", self.name, len(held))
        return lost

    # -- spool writer thread -------------------------------------------------

    def _store_overflow(self) -> None:
        try:
            while (events := self._next_overflow()) is not None:
                self._store(events)
        except Exception:
            log.exception("sink %s: spool writer failed", self.name)

    def _next_overflow(self) -> list[FlowEvent] | None:
        """The overflow gathered since the last transaction (waiting up to
        WRITE_INTERVAL for more, unless a batch is there); None once done."""
        with self._lock:
            while not self._overflow:
                if self._writer_done:
                    return None
                self._ready.wait(0.5)
            if len(self._overflow) < self._batch_size and not self._writer_done:
                self._ready.wait(self.WRITE_INTERVAL)
            events, self._overflow = self._overflow, []
            self._storing = len(events)
            return events

    def _store(self, events: list[FlowEvent]) -> None:
        try:
            dropped = self.spool.append(events)
            reason = SPOOL_FULL
            if dropped:
                self._spool_errors.report("spool full", "max_size",
                                          f"{len(dropped)} records dropped (NEW/UPDATE first)")
        except DiskFull as exc:
            dropped, reason = events, DISK_FULL
            self._spool_errors.report("spool write failed", "ENOSPC", f"{exc}: {len(events)} records dropped")
        except sqlite3.Error as exc:
            dropped, reason = events, SPOOL_ERROR
            self._spool_errors.report("spool write failed", type(exc).__name__,
                                      f"{self.spool.path}: {exc}: {len(events)} records dropped")
        except SpoolError:   # closed under us at shutdown
            dropped, reason = events, SHUTDOWN
        with self._lock:
            self._stats.add_spooled(len(events) - len(dropped))
            self._stats.add_dropped_events(reason, dropped)
            self._storing = 0
            self._ready.notify_all()

    # -- worker thread -----------------------------------------------------

    def _next_batch(self) -> list[FlowEvent] | None:
        """Memory first; once memory is empty and the spool is in use, the
        spool's oldest records; the spool drained (and nothing on its way
        there), back to memory only."""
        while True:
            with self._lock:
                size = len(self._destroys) + len(self._others)
                if self._out_of_time or (self._draining and self._clock() >= self._deadline):
                    return None
                if size and (self._spilling or self._draining or size >= self._batch_size):
                    self._from_disk = False
                    return self._take()
                if not self._spilling:
                    if self._draining:
                        return None
                    if size == 0:
                        self._ready.wait()
                        continue
                    wait = self._oldest + self._flush_interval - self._clock()
                    if wait <= 0:
                        self._from_disk = False
                        return self._take()
                    self._ready.wait(wait)
                    continue
                if not self.spool.records:
                    if self._overflow or self._storing:
                        if self._draining and not self._writer.is_alive():
                            return None
                        self._ready.wait(0.1)   # the spool writer is storing them
                        continue
                    self._spilling = False          # drained: back to memory
                    log.debug("sink %s: spool drained", self.name)
                    if self._draining:
                        return None
                    continue
            batch = self.spool.read(self._batch_size)
            with self._lock:
                self._from_disk = True
                self._inflight = batch
            self._count_undecodable()
            if batch:
                return batch
            self.spool.ack()   # rows that could not be decoded (counted): nothing to deliver

    def _count_undecodable(self) -> None:
        kinds, self.spool.undecodable = self.spool.undecodable, []
        for kind in kinds:
            self._stats.add_dropped(SPOOL_CORRUPT, kind)
        if kinds:
            self._spool_errors.report("spool", "corrupt rows", f"{len(kinds)} records could not be decoded")

    def _deliver(self, batch: list[FlowEvent]) -> None:
        """Write one batch; retry transient failures without limit (the
        spool holds what arrives meanwhile); at the drain deadline, a batch
        from memory goes back to the front of the spool, one from the spool
        stays there."""
        pending, delay = batch, self._retry.backoff
        self._lost = False
        from_disk, refused = self._from_disk, 0
        while True:
            result, kind, text = self._write(pending)
            retry, rejected = result.retry, result.rejected
            written = len(pending) - len(retry) - len(rejected)
            refused += len(rejected)
            if not retry:
                if rejected:
                    self._errors.report("dropped", kind, text)
                self._account(written, [(PERMANENT_ERROR, rejected)], done=True)
                if from_disk:
                    self.spool.ack()
                    self._stats.add_replayed(len(batch) - refused)
                return
            self._errors.report("will retry (spool on)", kind, text)
            self._account(written, [(PERMANENT_ERROR, rejected)], retrying=retry)
            if not self._pause(delay):
                # Drain deadline: abandon() spools what is in flight (from
                # memory); a batch read from the spool is still there.
                self._out_of_time = True
                return
            pending = list(retry)
            delay = min(delay * 2, self._retry.max_backoff)


class Pipeline:
    """Fans each record out to the sinks that want its kind."""

    def __init__(self, workers: Iterable[SinkWorker], clock: Clock = time.monotonic):
        self.workers = list(workers)
        self._clock = clock
        # kind -> the offer() of every worker that wants it: one dict lookup per record.
        self._routes = {kind: tuple(w.offer for w in self.workers if kind in w.kinds) for kind in KINDS}

    @classmethod
    def from_config(cls, sinks: Iterable[SinkConfig], stats: Stats) -> Pipeline:
        """Sinks created from their validated configs (conntracct.config.Config.sinks)."""
        workers: list[SinkWorker] = []
        try:
            for settings in sinks:
                name = settings.name or settings.type
                worker_class = SinkWorker if settings.spool is None else SpoolingWorker
                workers.append(worker_class(name, create_sink(settings), settings,
                                            stats.sink(name, settings.queue_size)))
        except Exception:
            # A later sink failed to start: release the ones already made.
            for worker in workers:
                worker.sink.close()
            raise
        return cls(workers)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def offer(self, event: FlowEvent) -> None:
        for offer in self._routes.get(event.kind, ()):
            offer(event)

    def close(self, deadline_s: float) -> None:
        """Stop accepting, let every sink drain and close within `deadline_s`
        seconds in all; what is still held then counts as dropped (shutdown)."""
        deadline = self._clock() + deadline_s
        for worker in self.workers:
            worker.close(deadline)
        for worker in self.workers:
            if not worker.join(deadline - self._clock()):
                dropped = worker.abandon()
                log.warning("sink %s: still busy %.1fs after shutdown began; %d records dropped",
                            worker.name, deadline_s, dropped)
