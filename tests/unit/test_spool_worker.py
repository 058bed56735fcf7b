"""A sink worker with a disk spool (conntracct.pipeline.SpoolingWorker):
outages, order across memory and disk, restarts, full disks, counters."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time

import pytest
from sample_flows import flow

from conntracct import selfmetrics
from conntracct.flow import DESTROY, KINDS, NEW, UPDATE, FlowEvent
from conntracct.pipeline import Pipeline, SpoolingWorker
from conntracct.selfmetrics import DISK_FULL, PERMANENT_ERROR, Stats
from conntracct.sinks.base import PermanentSinkError, Sink, SinkConfig, SinkError, TransientSinkError
from conntracct.spool import DiskFull


class FlakySink(Sink):
    """Down (TransientSinkError) while `up` is clear; records what it wrote."""

    def __init__(self, up: bool = True, reject_ids: frozenset[int] = frozenset()):
        super().__init__(SinkConfig(type="fake"))
        self.up = threading.Event()
        if up:
            self.up.set()
        self.reject_ids = reject_ids
        self.written: list[FlowEvent] = []
        self.attempts = 0

    def write(self, batch: list[FlowEvent]) -> None:
        self.attempts += 1
        if not self.up.is_set():
            raise TransientSinkError("down")
        if any(e.flow_id in self.reject_ids for e in batch):
            raise PermanentSinkError("rejected")
        self.written.extend(batch)


def spooling(sink: Sink, path, stats: Stats | None = None, max_size: int = 10**8, **settings) -> SpoolingWorker:
    values = {"queue_size": 20, "batch_size": 5, "flush_interval": 0.02,
              "retry": {"max_attempts": 1, "backoff": "10ms", "max_backoff": "20ms"}, **settings}
    config = SinkConfig(type="fake", name="fake", spool={"path": str(path), "max_size": max_size}, **values)
    return SpoolingWorker("fake", sink, config, (stats or Stats()).sink("fake"))


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def flows(n: int, seed: int = 1) -> list[FlowEvent]:
    """n records of a few interleaved flows, each flow NEW, UPDATEs, DESTROY;
    delta_packets_orig numbers each flow's records (their order)."""
    rng = random.Random(seed)
    live: dict[int, int] = {}
    out, next_id = [], 0
    while len(out) < n:
        if not live or (len(live) < 8 and rng.random() < 0.3):
            live[next_id] = 0
            out.append(flow(NEW, flow_id=next_id, delta_packets_orig=0))
            next_id += 1
            continue
        fid = rng.choice(list(live))
        live[fid] += 1
        kind = DESTROY if rng.random() < 0.2 else UPDATE
        out.append(flow(kind, flow_id=fid, delta_packets_orig=live[fid]))
        if kind == DESTROY:
            del live[fid]
    return out


def test_an_outage_spills_to_disk_and_everything_arrives_in_order(tmp_path):
    sink, stats = FlakySink(up=False), Stats()
    worker = spooling(sink, tmp_path / "sp", stats)
    worker.start()
    events = flows(400)
    for e in events:
        assert worker.offer(e)
    wait_for(lambda: worker.spool.records + worker.depth() >= 390)
    s = stats.snapshot()["sinks"]["fake"]
    assert s["spooled"] > 300 and s["spool_records"] > 300 and s["dropped"] == 0
    assert s["spool_oldest_age_seconds"] > 0
    sink.up.set()
    wait_for(lambda: len(sink.written) == len(events))
    assert sink.written == events                        # offer order, memory then disk
    wait_for(lambda: not worker._spilling)
    later = flows(30, seed=2)
    for e in later:
        worker.offer(e)
    wait_for(lambda: len(sink.written) == len(events) + len(later))
    worker.close(time.monotonic() + 5)
    assert worker.join(5)
    s = stats.snapshot()["sinks"]["fake"]
    assert s["emitted"] == s["received"] == len(events) + len(later) and s["dropped"] == 0
    assert s["replayed"] == s["spooled"] > 0 and s["spool_records"] == 0


def test_transient_errors_never_exhaust_retries_with_a_spool(tmp_path):
    sink, stats = FlakySink(up=False), Stats()
    worker = spooling(sink, tmp_path, stats)   # retry.max_attempts: 1
    worker.start()
    worker.offer(flow(DESTROY, flow_id=1))
    wait_for(lambda: sink.attempts >= 5)
    sink.up.set()
    wait_for(lambda: sink.written)
    worker.close(time.monotonic() + 2)
    worker.join(5)
    assert stats.snapshot()["sinks"]["fake"]["dropped"] == 0


def test_shutdown_spools_memory_and_a_restart_delivers_it_first(tmp_path, caplog):
    path = tmp_path / "sp"
    sink = FlakySink(up=False)
    first = spooling(sink, path)
    first.start()
    old = flows(60)
    for e in old:
        first.offer(e)
    wait_for(lambda: first.spool.records >= 30)    # 20 in memory (queue_size), the rest on disk
    first.close(time.monotonic() + 0.2)
    assert first.join(5)
    assert sink.written == []

    sink2, stats2 = FlakySink(), Stats()
    with caplog.at_level(logging.INFO, "conntracct.pipeline"):
        second = spooling(sink2, path, stats2)
    assert "60 records spooled before this start" in caplog.text
    new = flows(10, seed=5)
    for e in new:   # before start: the spool cannot drain first, so these queue behind it
        second.offer(e)
    second.start()
    wait_for(lambda: len(sink2.written) == 70)
    assert sink2.written == old + new
    second.close(time.monotonic() + 2)
    assert second.join(5)
    assert stats2.snapshot()["sinks"]["fake"]["replayed"] == 70   # the new ones queued behind the old


def test_a_batch_read_from_the_spool_is_kept_until_the_sink_answers(tmp_path):
    """Killed while the sink is down (nothing acknowledged): it is all still there."""
    path = tmp_path / "sp"
    sink = FlakySink(up=False)
    worker = spooling(sink, path)
    worker.start()
    for e in flows(200):
        worker.offer(e)
    wait_for(lambda: worker.spool.records == 180 and sink.attempts > 3)
    # No close(): as if killed.  The spool is still held open by this worker,
    # so look at the file through a plain read-only view of what was committed.
    reader = sqlite3.connect(f"file:{path}/spool.db?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError):   # locked: one agent per spool
        reader.execute("SELECT count(*) FROM q").fetchone()
    worker.close(time.monotonic())
    worker.join(5)
    reader = sqlite3.connect(f"file:{path}/spool.db?mode=ro", uri=True)
    assert reader.execute("SELECT count(*) FROM q").fetchone()[0] == 200


def test_rejected_records_from_the_spool_are_dropped_and_counted(tmp_path):
    sink, stats = FlakySink(up=False, reject_ids=frozenset({3})), Stats()
    worker = spooling(sink, tmp_path, stats, batch_size=1)
    worker.start()
    events = [flow(DESTROY, flow_id=i) for i in range(40)]
    for e in events:
        worker.offer(e)
    wait_for(lambda: worker.spool.records == 20)
    sink.up.set()
    wait_for(lambda: len(sink.written) == 39)
    worker.close(time.monotonic() + 2)
    worker.join(5)
    s = stats.snapshot()["sinks"]["fake"]
    assert s["dropped_by"][PERMANENT_ERROR][DESTROY] == 1 and s["spool_records"] == 0
    assert [e.flow_id for e in sink.written] == [i for i in range(40) if i != 3]


def test_a_full_disk_is_a_counted_drop_with_one_log_line(tmp_path, caplog):
    sink, stats = FlakySink(up=False), Stats()
    worker = spooling(sink, tmp_path, stats)

    def full(events):
        raise DiskFull("/x/spool.db: no space left on the file system (ENOSPC)")

    worker.spool.append = full
    worker.start()
    with caplog.at_level(logging.WARNING, "conntracct.pipeline"):
        for e in flows(100):
            worker.offer(e)
        wait_for(lambda: stats.snapshot()["sinks"]["fake"]["dropped"] == 80)
    s = stats.snapshot()["sinks"]["fake"]
    assert sum(s["dropped_by"][DISK_FULL].values()) == 80
    lines = [r for r in caplog.records if "ENOSPC" in r.getMessage()]
    assert len(lines) == 1 and "records dropped" in lines[0].getMessage()
    sink.up.set()
    wait_for(lambda: len(sink.written) == 20)   # memory's records still go out
    worker.close(time.monotonic() + 2)
    worker.join(5)


def test_spool_figures_are_typed_metrics(tmp_path):
    sink, stats = FlakySink(up=False), Stats()
    worker = spooling(sink, tmp_path, stats)
    worker.start()
    for e in flows(50):
        worker.offer(e)
    wait_for(lambda: worker.spool.records == 30)
    families = {f.metric.name: f.samples for f in selfmetrics.collect(stats.snapshot())}
    assert families["conntracct_spool_records"] == [(("fake",), 30)]
    assert families["conntracct_spool_written_records"] == [(("fake",), 30)]
    assert families["conntracct_spool_bytes"][0][1] == worker.spool.bytes > 30 * 200
    assert families["conntracct_spool_oldest_record_age_seconds"][0][1] > 0
    assert families["conntracct_spool_replayed_records"] == [(("fake",), 0)]
    dropped = {labels[1] for labels, _ in families["conntracct_sink_dropped"]}
    assert {"spool_full", "disk_full", "spool_error", "spool_corrupt"} <= dropped
    line = [x for x in selfmetrics.summary_lines(stats.snapshot()) if x.startswith("sink fake")][0]
    assert "spool_records=30" in line and "spooled=30" in line
    worker.close(time.monotonic())
    worker.join(5)


def test_sinks_without_a_spool_report_no_spool_figures():
    stats = Stats()
    stats.sink("plain")
    names = {f.metric.name for f in selfmetrics.collect(stats.snapshot())}
    assert not any(name.startswith("conntracct_spool") for name in names)
    assert set(stats.snapshot()["sinks"]["plain"]["dropped_by"]) == set(selfmetrics.DROP_REASONS)


def test_a_spool_that_cannot_be_opened_stops_the_start(tmp_path):
    (tmp_path / "spool.db").mkdir()   # a directory where the file should be
    config = SinkConfig(type="stdout", name="out", spool={"path": str(tmp_path), "max_size": "1GiB"})
    with pytest.raises(SinkError, match=r"sink out: spool.path: .*spool.db"):
        SpoolingWorker("out", FlakySink(), config, Stats().sink("out"))


def test_pipeline_picks_the_spooling_worker_only_with_a_spool(tmp_path):
    from conntracct.config import parse_config
    config = parse_config(f"sinks:\n- {{type: stdout, name: a}}\n"
                          f"- {{type: stdout, name: b, spool: {{path: {tmp_path}/b}}}}\n")
    pipeline = Pipeline.from_config(config.sinks, Stats())
    assert [type(w).__name__ for w in pipeline.workers] == ["SinkWorker", "SpoolingWorker"]
    pipeline.close(1)


def test_every_kind_is_spooled(tmp_path):
    sink = FlakySink(up=False)
    worker = spooling(sink, tmp_path)
    worker.start()
    events = [flow(kind, flow_id=i) for i, kind in enumerate(KINDS * 20)]
    for e in events:
        worker.offer(e)
    sink.up.set()
    wait_for(lambda: len(sink.written) == len(events))
    assert sink.written == events
    worker.close(time.monotonic() + 1)
    worker.join(5)
