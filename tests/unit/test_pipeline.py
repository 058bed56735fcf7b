"""Sink queues, batching, retries, drop policy and shutdown (conntracct.pipeline)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sample_flows import flow

from conntracct.config import parse_config
from conntracct.flow import DESTROY, NEW, UPDATE, FlowEvent
from conntracct.pipeline import ErrorLog, Pipeline, SinkWorker
from conntracct.selfmetrics import Stats
from conntracct.sinks.base import PermanentSinkError, Sink, SinkConfig, TransientSinkError, WriteResult


class FakeSink(Sink):
    """Records what it is given; raises the scripted errors, or returns the
    scripted partial results, one per write()."""

    def __init__(self, errors: list[Exception | WriteResult | None] | None = None, delay: float = 0.0,
                 gate: threading.Event | None = None):
        super().__init__(SinkConfig(type="fake"))
        self.errors = list(errors or [])
        self.delay, self.gate = delay, gate
        self.calls: list[tuple[float, list[FlowEvent]]] = []   # every write() attempt
        self.written: list[list[FlowEvent]] = []               # successful ones
        self.closed = False

    def write(self, batch: list[FlowEvent]) -> None:
        self.calls.append((time.monotonic(), list(batch)))
        if self.gate is not None:
            self.gate.wait()
        time.sleep(self.delay)
        error = self.errors.pop(0) if self.errors else None
        if isinstance(error, WriteResult):
            self.written.append([e for e in batch if e not in error.retry and e not in error.rejected])
            return error
        if error is not None:
            raise error
        self.written.append(list(batch))
        return None

    def close(self) -> None:
        self.closed = True

    @property
    def events(self) -> list[FlowEvent]:
        return [e for batch in self.written for e in batch]


def make_worker(sink: Sink, stats: Stats | None = None, name: str = "fake", **settings) -> SinkWorker:
    config = SinkConfig(type="fake", name=name, **settings)
    return SinkWorker(name, sink, config, (stats or Stats()).sink(name))


def wait_for(predicate, timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def numbered(n: int, kind: str = UPDATE) -> list[FlowEvent]:
    return [flow(kind, flow_id=i) for i in range(n)]


def ids(events: list[FlowEvent]) -> list[int]:
    return [e.flow_id for e in events]


def test_batches_by_size_without_waiting_for_the_timer():
    sink = FakeSink()
    worker = make_worker(sink, batch_size=3, flush_interval=30)
    worker.start()
    for event in numbered(7):
        worker.offer(event)
    wait_for(lambda: len(sink.written) == 2)
    time.sleep(0.05)
    assert [ids(b) for b in sink.written] == [[0, 1, 2], [3, 4, 5]]   # the 7th waits for more
    worker.close(time.monotonic() + 1)
    assert worker.join(1)
    assert [ids(b) for b in sink.written][-1] == [6]   # flushed by the drain
    assert sink.closed


def test_batches_by_time_when_the_batch_does_not_fill():
    sink = FakeSink()
    worker = make_worker(sink, batch_size=100, flush_interval=0.1)
    worker.start()
    started = time.monotonic()
    worker.offer(flow(flow_id=1))
    worker.offer(flow(flow_id=2))
    wait_for(lambda: sink.written)
    waited = sink.calls[0][0] - started
    assert 0.09 <= waited < 1.0
    assert [ids(b) for b in sink.written] == [[1, 2]]
    worker.close(time.monotonic())
    assert worker.join(1)


def test_transient_errors_are_retried_with_growing_backoff_then_succeed():
    stats = Stats()
    sink = FakeSink(errors=[TransientSinkError("timeout"), TransientSinkError("timeout"), None])
    worker = make_worker(sink, stats, batch_size=2, retry={"backoff": 0.02, "max_backoff": 1})
    worker.start()
    worker.offer(flow(flow_id=1))
    worker.offer(flow(flow_id=2))
    wait_for(lambda: sink.written)
    times = [t for t, _ in sink.calls]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.02 and times[2] - times[1] >= 0.04   # doubled
    assert all(ids(batch) == [1, 2] for _, batch in sink.calls)
    snap = stats.snapshot()["sinks"]["fake"]
    assert (snap["retries"], snap["emitted"], snap["batches_sent"], snap["dropped"]) == (2, 2, 1, 0)


def test_backoff_is_capped_by_max_backoff():
    sink = FakeSink(errors=[TransientSinkError("x")] * 3)
    worker = make_worker(sink, batch_size=1, retry={"backoff": 0.02, "max_backoff": 0.02})
    pauses = []     # the back-offs asked for: exact, where measured gaps grow with the host's load
    pause = worker._pause
    worker._pause = lambda delay: pauses.append(delay) or pause(delay)
    worker.start()
    worker.offer(flow())
    wait_for(lambda: sink.written)
    gaps = [b[0] - a[0] for a, b in zip(sink.calls, sink.calls[1:], strict=False)]
    assert pauses == [0.02, 0.02, 0.02]                  # never 0.04 / 0.08
    assert len(gaps) == 3 and min(gaps) >= 0.02          # and each was waited


def test_retries_exhausted_drops_the_batch_and_counts_it_per_kind():
    stats = Stats()
    sink = FakeSink(errors=[TransientSinkError("down")] * 10)
    worker = make_worker(sink, stats, batch_size=3, retry={"max_attempts": 3, "backoff": 0.001})
    worker.start()
    for event in (flow(NEW), flow(UPDATE), flow(DESTROY)):
        worker.offer(event)
    wait_for(lambda: stats.snapshot()["sinks"]["fake"]["batches_failed"] == 1)
    snap = stats.snapshot()["sinks"]["fake"]
    assert len(sink.calls) == 3
    assert snap["dropped_by"]["retries_exhausted"] == {NEW: 1, UPDATE: 1, DESTROY: 1}
    assert (snap["dropped"], snap["emitted"], snap["retries"]) == (3, 0, 2)


def test_a_partial_write_retries_only_the_records_to_retry():
    stats = Stats()
    batch = numbered(3)
    sink = FakeSink(errors=[WriteResult(retry=[batch[1]], reason="429 for one"), None])
    worker = make_worker(sink, stats, batch_size=3, retry={"backoff": 0.001})
    worker.start()
    for event in batch:
        worker.offer(event)
    wait_for(lambda: len(sink.calls) == 2)
    worker.close(time.monotonic() + 1)
    assert worker.join(1)
    assert ids(sink.calls[1][1]) == [1]
    assert stats.snapshot()["sinks"]["fake"]["emitted"] == 3


def test_a_partial_write_drops_the_rejected_records_at_once_and_retries_the_rest(caplog):
    """Telegraf's PartialWriteError: accepted records are emitted, rejected
    ones dropped (permanent_error) on the attempt that reported them and never
    resent, records to retry retried until written."""
    stats = Stats()
    batch = [flow(NEW, flow_id=0), flow(UPDATE, flow_id=1), flow(DESTROY, flow_id=2), flow(DESTROY, flow_id=3)]
    sink = FakeSink(errors=[WriteResult(retry=[batch[2]], rejected=[batch[1], batch[3]], reason="mixed"),
                            WriteResult(retry=[batch[2]], reason="still throttled"), None])
    worker = make_worker(sink, stats, batch_size=4, retry={"backoff": 0.001})
    worker.start()
    with caplog.at_level("WARNING", logger="conntracct.pipeline"):
        for event in batch:
            worker.offer(event)
        wait_for(lambda: len(sink.calls) == 3)
        worker.close(time.monotonic() + 1)
        assert worker.join(1)
    assert [ids(b) for _, b in sink.calls] == [[0, 1, 2, 3], [2], [2]]
    snap = stats.snapshot()["sinks"]["fake"]
    assert snap["dropped_by"]["permanent_error"] == {NEW: 0, UPDATE: 1, DESTROY: 1}
    assert (snap["emitted"], snap["dropped"], snap["retries"]) == (2, 2, 2)
    assert (snap["batches_sent"], snap["batches_failed"]) == (0, 1)   # part of it was lost
    assert "sink fake: will retry: partial write: mixed" in [r.getMessage() for r in caplog.records]


def test_a_partial_write_whose_retries_run_out_counts_them_exhausted():
    stats = Stats()
    batch = numbered(3)
    sink = FakeSink(errors=[WriteResult(retry=[batch[0]], reason="throttled")] * 5)
    worker = make_worker(sink, stats, batch_size=3, retry={"max_attempts": 2, "backoff": 0.001})
    worker.start()
    for event in batch:
        worker.offer(event)
    wait_for(lambda: stats.snapshot()["sinks"]["fake"]["batches_failed"] == 1)
    snap = stats.snapshot()["sinks"]["fake"]
    assert snap["dropped_by"]["retries_exhausted"][UPDATE] == 1
    assert (snap["emitted"], snap["dropped"], snap["retries"]) == (2, 1, 1)


@pytest.mark.parametrize("error", [PermanentSinkError("400 bad record"), ValueError("sink bug")])
def test_permanent_errors_drop_without_retrying(error):
    stats = Stats()
    sink = FakeSink(errors=[error])
    worker = make_worker(sink, stats, batch_size=2)
    worker.start()
    worker.offer(flow(NEW))
    worker.offer(flow(DESTROY))
    wait_for(lambda: stats.snapshot()["sinks"]["fake"]["batches_failed"] == 1)
    snap = stats.snapshot()["sinks"]["fake"]
    assert len(sink.calls) == 1
    assert snap["dropped_by"]["permanent_error"] == {NEW: 1, UPDATE: 0, DESTROY: 1}
    assert snap["retries"] == 0


def test_full_queue_drops_new_and_update_first_and_destroy_last():
    stats = Stats()
    sink = FakeSink()
    worker = make_worker(sink, stats, queue_size=4, batch_size=4)   # not started: nothing drains
    offers = [flow(NEW, flow_id=1), flow(DESTROY, flow_id=2), flow(UPDATE, flow_id=3), flow(UPDATE, flow_id=4),
              flow(UPDATE, flow_id=5),    # full: refused
              flow(DESTROY, flow_id=6),   # evicts 1, the oldest non-DESTROY
              flow(DESTROY, flow_id=7),   # evicts 3
              flow(DESTROY, flow_id=8),   # evicts 4
              flow(DESTROY, flow_id=9)]   # only DESTROYs left: refused
    accepted = [worker.offer(e) for e in offers]
    assert accepted == [True] * 4 + [False, True, True, True, False]
    assert worker.depth() == 4
    worker.start()
    worker.close(time.monotonic() + 1)
    assert worker.join(1)
    assert ids(sink.events) == [2, 6, 7, 8]   # offer order kept
    snap = stats.snapshot()["sinks"]["fake"]
    assert snap["dropped_by"]["queue_full"] == {NEW: 1, UPDATE: 3, DESTROY: 1}
    assert (snap["received"], snap["emitted"], snap["dropped"]) == (9, 4, 5)


def test_batches_keep_offer_order_across_kinds():
    sink = FakeSink()
    worker = make_worker(sink, batch_size=6)
    kinds = [NEW, UPDATE, DESTROY, NEW, DESTROY, UPDATE]
    for i, kind in enumerate(kinds):
        worker.offer(flow(kind, flow_id=i))
    worker.start()
    wait_for(lambda: sink.written)
    assert ids(sink.written[0]) == list(range(6))


def test_pipeline_sends_each_sink_only_the_kinds_it_wants():
    archive, everything = FakeSink(), FakeSink()
    pipeline = Pipeline([make_worker(archive, name="archive", kinds=[DESTROY], batch_size=1),
                         make_worker(everything, name="all", batch_size=1)])
    pipeline.start()
    for kind in (NEW, UPDATE, DESTROY):
        pipeline.offer(flow(kind))
    pipeline.close(1.0)
    assert [e.kind for e in archive.events] == [DESTROY]
    assert [e.kind for e in everything.events] == [NEW, UPDATE, DESTROY]


def test_close_drains_within_the_deadline_and_counts_the_rest():
    stats = Stats()
    sink = FakeSink(delay=0.1)     # 20 records: 2 s to write them all
    worker = make_worker(sink, stats, batch_size=1)
    pipeline = Pipeline([worker])
    for event in numbered(20):
        pipeline.offer(event)
    pipeline.start()
    started = time.monotonic()
    pipeline.close(0.5)
    # Back at the deadline; the slack is for a loaded host's scheduling,
    # still far from the 2 s that writing everything takes.
    assert time.monotonic() - started < 0.5 + 0.7
    pipeline.offer(flow(UPDATE))   # after close: refused and counted
    snap = stats.snapshot()["sinks"]["fake"]
    assert 1 <= snap["emitted"] <= 5
    assert snap["dropped_by"]["shutdown"][UPDATE] == 21 - snap["emitted"]
    assert snap["received"] == 21


def test_close_with_time_to_spare_writes_everything_and_closes_the_sink():
    stats = Stats()
    sink = FakeSink()
    pipeline = Pipeline([make_worker(sink, stats, batch_size=4, flush_interval=30)])
    pipeline.start()
    for event in numbered(10):
        pipeline.offer(event)
    pipeline.close(2.0)
    assert ids(sink.events) == list(range(10)) and sink.closed
    assert stats.snapshot()["sinks"]["fake"]["dropped"] == 0


def test_close_gives_up_on_a_hung_sink_and_counts_its_batch():
    stats = Stats()
    gate = threading.Event()
    sink = FakeSink(gate=gate)
    pipeline = Pipeline([make_worker(sink, stats, batch_size=2)])
    pipeline.start()
    for event in numbered(5):
        pipeline.offer(event)
    wait_for(lambda: sink.calls)
    pipeline.close(0.05)
    snap = stats.snapshot()["sinks"]["fake"]
    assert snap["dropped_by"]["shutdown"][UPDATE] == 5 and snap["emitted"] == 0
    gate.set()   # the late write is not counted twice
    time.sleep(0.05)
    assert stats.snapshot()["sinks"]["fake"]["emitted"] == 0


def test_a_hung_sink_does_not_delay_another():
    """The hung sink's write returns only at gate.set(), after the checks:
    offer() waiting for it would never return, the fast sink delayed by it
    would never get its records.  The time bounds only keep a failure from
    hanging the test (offering takes ~20 ms, ~130 ms beside CPU hogs)."""
    gate = threading.Event()
    stats = Stats()
    hung, fast = FakeSink(gate=gate), FakeSink()
    pipeline = Pipeline([make_worker(hung, stats, name="hung", batch_size=1, queue_size=100),
                         make_worker(fast, stats, name="fast", batch_size=1000, flush_interval=0.02)])
    pipeline.start()
    events = numbered(1001)
    pipeline.offer(events[0])
    wait_for(lambda: hung.calls, timeout=10)      # the hung sink is in its write
    offered = []
    offering = threading.Thread(target=lambda: [pipeline.offer(e) for e in events[1:]] and
                                offered.append(time.monotonic()), daemon=True)
    started = time.monotonic()
    offering.start()
    offering.join(10)
    wait_for(lambda: len(fast.events) == 1001, timeout=10)
    assert offered and offered[0] - started < 2.0   # offer() never waited for the hung sink
    assert len(hung.calls) == 1 and not gate.is_set()
    hung_stats = stats.snapshot()["sinks"]["hung"]
    # Refused at once, not held: one record in the write, 100 queued, the rest dropped.
    assert (hung_stats["queue_depth"], hung_stats["dropped_by"]["queue_full"][UPDATE]) == (100, 900)
    gate.set()
    pipeline.close(1.0)


def test_error_log_reports_each_kind_once_per_interval(caplog):
    now = [0.0]
    errors = ErrorLog("es", interval=60, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="conntracct.pipeline"):
        for _ in range(5):
            errors.error("will retry", TransientSinkError("timeout"))
        errors.error("dropped", PermanentSinkError("400"))
        now[0] = 61.0
        errors.error("will retry", TransientSinkError("timeout"))
    assert [r.getMessage() for r in caplog.records] == [
        "sink es: will retry: TransientSinkError: timeout",
        "sink es: dropped: PermanentSinkError: 400",
        "sink es: will retry: TransientSinkError: timeout (4 more since the last report)"]


def test_pipeline_from_config_builds_registered_sinks_with_their_settings(capsys):
    config = parse_config("sinks:\n  - {type: stdout, format: json, kinds: [destroy], batch_size: 1}\n"
                          "  - {type: stderr, name: debug, flush_interval: 50ms}\n")
    stats = Stats()
    pipeline = Pipeline.from_config(config.sinks, stats)
    pipeline.start()
    pipeline.offer(flow(NEW))
    pipeline.offer(flow(DESTROY))
    pipeline.close(1.0)
    out, err = capsys.readouterr()
    assert [json.loads(line)["kind"] for line in out.splitlines()] == [DESTROY]
    assert [line.split()[1] for line in err.splitlines()] == ["NEW", "DESTROY"]
    snap = stats.snapshot()["sinks"]
    assert (snap["stdout"]["emitted"], snap["debug"]["emitted"]) == (1, 2)
    assert snap["stdout"]["queue_capacity"] == 10000 and snap["stdout"]["queue_depth"] == 0


def test_closing_a_pipeline_that_never_started_still_drains_and_closes():
    sink = FakeSink()
    pipeline = Pipeline([make_worker(sink, batch_size=2)])
    for event in numbered(3):
        pipeline.offer(event)
    pipeline.close(1.0)
    assert ids(sink.events) == [0, 1, 2] and sink.closed


def test_batches_keep_offer_order_when_kinds_interleave_at_random():
    """_take merges the DESTROY queue and the other one by sequence number,
    whole or in part, and leaves the rest in order for the next batch."""
    import random

    rng = random.Random(4)
    for _ in range(200):
        worker = make_worker(FakeSink(), batch_size=rng.randrange(1, 12))
        n = rng.randrange(0, 40)
        for i in range(n):
            worker.offer(flow(rng.choice([NEW, UPDATE, DESTROY, DESTROY]), flow_id=i))
        taken = []
        while worker.depth():
            batch = worker._take()
            assert 0 < len(batch) <= worker._batch_size
            taken += ids(batch)
        assert taken == list(range(n))
