"""The agent's counters about itself: where they are kept, what they mean.

Two halves:

- Stats (SinkStats, StageStats): counters kept by the pipeline and the
  stages, safe to update from any thread.  Agent.snapshot() adds the probe's
  counters (FlowSource.stats()) to Stats.snapshot().
- The typed metrics (Metric, and the PROBE_VALUES / sink / stage tables
  below): the one definition of every counter the agent reports about
  itself -- its exported name, type, help text, labels, and which snapshot
  key it reads.  collect(snapshot) turns a snapshot into typed families;
  the Prometheus sink exposes them, LossWatch (losses()) and the exit
  summary (summary_lines()) read the same definitions.  A counter renamed
  in the probe without its definition here fails
  tests/unit/test_selfmetrics.py instead of silently vanishing.

The snapshot's key names (a stable interface):

  {"sinks":  {<sink name>: {"received", "emitted", "dropped", "batches_sent",
                            "batches_failed", "retries", "queue_depth",
                            "queue_capacity",
                            "dropped_by": {<reason>: {<kind>: count}},
                            # with a spool only:
                            "spool_records", "spool_bytes", "spool_oldest_age_seconds",
                            "spool_pending", "spooled", "replayed"}},
   "stages": {<stage name>: {<counter>: count}},
   "conntrack": {"ipv4" | "ipv6": {"tracking": 1 | 0 | -1, "untracked_packets": n}}}

"received" counts events offered to a sink; every one of them ends up in
"emitted", in "dropped", or still queued or in flight -- or, with a spool,
"spooled" (on disk, to be "replayed": emitted then too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .flow import KINDS, FlowEvent

QUEUE_FULL = "queue_full"                 # the sink's queue had no room
RETRIES_EXHAUSTED = "retries_exhausted"   # transient errors outlasted retry.max_attempts
PERMANENT_ERROR = "permanent_error"       # the sink rejected the records
SHUTDOWN = "shutdown"                     # still queued when the drain deadline passed
SPOOL_FULL = "spool_full"                 # the disk spool reached spool.max_size
DISK_FULL = "disk_full"                   # the spool's file system is full (ENOSPC)
SPOOL_ERROR = "spool_error"               # the spool could not be written (another I/O error)
SPOOL_CORRUPT = "spool_corrupt"           # a spooled record could not be read back
DROP_REASONS = (QUEUE_FULL, RETRIES_EXHAUSTED, PERMANENT_ERROR, SHUTDOWN)
SPOOL_DROP_REASONS = (SPOOL_FULL, DISK_FULL, SPOOL_ERROR, SPOOL_CORRUPT)   # counted for sinks with a spool


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
        # Set by a sink's spool (pipeline.SpoolingWorker): its figures now.
        self.spool: Callable[[], dict[str, int | float]] | None = None
        self._spooled = self._replayed = 0

    def add_emitted(self, n: int) -> None:
        with self._lock:
            self._emitted += n

    def add_dropped(self, reason: str, kind: str, n: int = 1) -> None:
        with self._lock:
            self._by_kind(reason)[kind] += n

    def add_dropped_events(self, reason: str, events: Iterable[FlowEvent]) -> None:
        with self._lock:
            by_kind = self._by_kind(reason)
            for event in events:
                by_kind[event.kind] += 1

    def _by_kind(self, reason: str) -> dict[str, int]:
        by_kind = self._dropped.get(reason)
        if by_kind is None:   # a spool's reasons, made on first use (lock held)
            by_kind = self._dropped[reason] = dict.fromkeys(KINDS, 0)
        return by_kind

    def add_batch(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._batches_sent += 1
            else:
                self._batches_failed += 1

    def add_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def add_spooled(self, n: int) -> None:
        with self._lock:
            self._spooled += n

    def add_replayed(self, n: int) -> None:
        with self._lock:
            self._replayed += n

    def snapshot(self) -> dict[str, Any]:
        depth, received = self.queue_depth(), self.received()
        spool = self.spool() if self.spool is not None else None
        with self._lock:
            dropped_by = {reason: dict(kinds) for reason, kinds in self._dropped.items()}
            if spool is not None:
                for reason in SPOOL_DROP_REASONS:
                    dropped_by.setdefault(reason, dict.fromkeys(KINDS, 0))
            out = {
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
            if spool is not None:
                out.update({f"spool_{key}": value for key, value in spool.items()},
                           spooled=self._spooled, replayed=self._replayed)
            return out


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


# -- typed metrics -------------------------------------------------------------

COUNTER, GAUGE, INFO = "counter", "gauge", "info"


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric the agent reports about itself.  Counter names go without
    the `_total` the exposition adds."""

    name: str
    type: str                       # COUNTER, GAUGE or INFO
    help: str
    labels: tuple[str, ...] = ()


@dataclass(slots=True)
class Family:
    """A metric's samples from one snapshot: (label values, value)."""

    metric: Metric
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProbeValue:
    """A metric that is one number of the probe's stats (FlowSource.stats())."""

    key: str                # the probe's stats key
    metric: Metric
    loss: str = ""          # when it grows, records were lost: what LossWatch says


BUILD = Metric("conntracct_build", INFO, "conntracct's version and probe mode", ("version", "mode"))
RECORDS = Metric("conntracct_records", COUNTER, "Flow records read, by stage and record kind", ("stage", "kind"))
PROBE_VALUES = (
    ProbeValue("probe_records_lost", Metric("conntracct_probe_lost_records", COUNTER,
               "Records the probe could not put in the full BPF ring buffer"),
               loss="records lost: ring buffer full (raise probe.ringbuf_pages)"),
    ProbeValue("decode_errors", Metric("conntracct_probe_decode_errors", COUNTER,
               "Probe records that could not be decoded"), loss="undecodable probe records"),
    ProbeValue("ctnetlink_overruns", Metric("conntracct_ctnetlink_overruns", COUNTER,
               "ctnetlink receive-buffer overruns (ENOBUFS): DESTROY events lost and recovered by a table dump")),
    ProbeValue("ends_unseen", Metric("conntracct_probe_ends_unseen", COUNTER,
               "Flows whose end event never came, reported with their last seen totals")),
    ProbeValue("probe_state_full", Metric("conntracct_flow_state_full", COUNTER,
               "Flows left untracked because the probe's per-flow state map was full"),
               loss="flows not tracked: flow map full (raise probe.max_flows)"),
    ProbeValue("max_flows", Metric("conntracct_flow_state_capacity", GAUGE,
               "Size of the probe's per-flow state map (probe.max_flows)")),
    ProbeValue("flows_without_end_events", Metric("conntracct_flows_without_end_events", GAUGE,
               "Live flows conntrack will send no DESTROY event for (swept for their end)")),
)
# Flows in the state map: the probe's inserts minus its deletes minus the
# entries the agent deleted itself (flows found ended by the sweep).
STATE_ENTRIES = Metric("conntracct_flow_state_entries", GAUGE,
                       "Flows in the probe's per-flow state map (inserts minus deletes)")
STATE_ENTRY_KEYS = ("probe_state_inserts", "probe_state_deletes", "state_deletes")
SWEEPS = Metric("conntracct_probe_sweeps", COUNTER, "Sweeps for the end of flows without end events, "
                "by how the kernel was asked (a lookup per flow, or one table dump)", ("by",))
SWEEP_KEYS = {"lookup": "sweeps_by_lookup", "dump": "sweeps_by_dump"}
BPF_RUNS = Metric("conntracct_bpf_program_runs", COUNTER,
                  "Runs of each BPF program (counted while kernel.bpf_stats_enabled=1)", ("program",))
BPF_RUN_SECONDS = Metric("conntracct_bpf_program_run_seconds", COUNTER,
                         "Time spent in each BPF program (counted while kernel.bpf_stats_enabled=1)", ("program",))
STAGE_EVENTS = Metric("conntracct_stage_events", COUNTER, "Events counted by a pipeline stage (e.g. enrich: ignored)",
                      ("stage", "event"))
SINK_RECORDS = Metric("conntracct_sink_records", COUNTER,
                      "Records offered to a sink (received) and written by it (emitted)", ("sink", "outcome"))
SINK_DROPPED = Metric("conntracct_sink_dropped", COUNTER, "Records a sink dropped, by reason and record kind",
                      ("sink", "reason", "kind"))
SINK_QUEUE_DEPTH = Metric("conntracct_sink_queue_depth", GAUGE, "Records waiting in a sink's queue", ("sink",))
SINK_QUEUE_CAPACITY = Metric("conntracct_sink_queue_capacity", GAUGE, "Size of a sink's queue (queue_size)",
                             ("sink",))
SINK_BATCHES = Metric("conntracct_sink_batches", COUNTER, "Batches a sink wrote (sent) or gave up on (failed)",
                      ("sink", "outcome"))
SINK_RETRIES = Metric("conntracct_sink_retries", COUNTER, "Batch writes a sink retried after a transient error",
                      ("sink",))
# A sink's disk spool (`spool:`): only for sinks that have one.
SPOOL_RECORDS = Metric("conntracct_spool_records", GAUGE, "Records held in a sink's disk spool", ("sink",))
SPOOL_BYTES = Metric("conntracct_spool_bytes", GAUGE,
                     "Bytes of the records held in a sink's disk spool (what spool.max_size bounds)", ("sink",))
SPOOL_OLDEST_AGE = Metric("conntracct_spool_oldest_record_age_seconds", GAUGE,
                          "Age of the oldest record in a sink's disk spool (0 when empty)", ("sink",))
SPOOL_WRITTEN = Metric("conntracct_spool_written_records", COUNTER,
                       "Records a sink put in its disk spool (they did not fit in its memory queue)", ("sink",))
SPOOL_REPLAYED = Metric("conntracct_spool_replayed_records", COUNTER,
                        "Records read back from a sink's disk spool and written by the sink", ("sink",))
SPOOL_VALUES = ((SPOOL_RECORDS, "spool_records"), (SPOOL_BYTES, "spool_bytes"),
                (SPOOL_OLDEST_AGE, "spool_oldest_age_seconds"), (SPOOL_WRITTEN, "spooled"),
                (SPOOL_REPLAYED, "replayed"))

# Does conntrack track each address family in the accounted namespace, and the
# packets that passed while it did not (conntracct/tracking.py).
CONNTRACK_TRACKING = Metric("conntracct_conntrack_tracking", GAUGE,
                            "Whether conntrack tracks this address family in the accounted network namespace "
                            "(1 yes; 0 no: its flows are not reported; -1 cannot tell)", ("family",))
UNTRACKED_PACKETS = Metric("conntracct_untracked_packets", COUNTER,
                           "IP packets that passed in the accounted network namespace while conntrack did not "
                           "track their family (reported as no flow)", ("family",))
TRACKING_WORDS = {1: "tracking", 0: "not tracking", -1: "cannot tell"}

# Every key of the probe's stats a metric reads: what the probe must keep
# reporting under these names (tests/unit/test_selfmetrics.py).
PROBE_KEYS = frozenset({"mode", "programs", *(f"received_{kind}" for kind in KINDS),
                        *(v.key for v in PROBE_VALUES), *STATE_ENTRY_KEYS, *SWEEP_KEYS.values()})


def _num(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def collect(snapshot: dict[str, Any], version: str = "") -> Iterator[Family]:
    """The typed families of one Agent.snapshot().  Keys that are missing
    (a stage not running, a counter this probe mode lacks) leave their metric
    out rather than fail."""
    probe, sinks, stages = (_dict(snapshot.get(k)) for k in ("probe", "sinks", "stages"))
    yield Family(BUILD, [((version, str(probe.get("mode") or "")), 1)])
    yield from _probe_families(probe)
    stage_events = [((str(stage), str(counter)), v) for stage, counts in sorted(stages.items())
                    for counter, n in sorted(_dict(counts).items()) if (v := _num(n)) is not None]
    if stage_events:
        yield Family(STAGE_EVENTS, stage_events)
    if sinks:
        yield from _sink_families(sinks)
    yield from _conntrack_families(_dict(snapshot.get("conntrack")))


def _conntrack_families(conntrack: dict[str, Any]) -> Iterator[Family]:
    tracking, untracked = Family(CONNTRACK_TRACKING), Family(UNTRACKED_PACKETS)
    for family, figures in sorted(conntrack.items()):
        figures = _dict(figures)
        if (v := _num(figures.get("tracking"))) is not None:
            tracking.samples.append(((str(family),), v))
        if (v := _num(figures.get("untracked_packets"))) is not None:
            untracked.samples.append(((str(family),), v))
    yield from (f for f in (tracking, untracked) if f.samples)


def _probe_families(probe: dict[str, Any]) -> Iterator[Family]:
    received = [(("probe", kind), v) for kind in KINDS if (v := _num(probe.get(f"received_{kind}"))) is not None]
    if received:
        yield Family(RECORDS, received)
    for value in PROBE_VALUES:
        if (v := _num(probe.get(value.key))) is not None:
            yield Family(value.metric, [((), v)])
    inserts, deletes, ours = (_num(probe.get(k)) for k in STATE_ENTRY_KEYS)
    if inserts is not None and deletes is not None:
        yield Family(STATE_ENTRIES, [((), max(inserts - deletes - (ours or 0), 0))])
    sweeps = [((by,), v) for by, key in SWEEP_KEYS.items() if (v := _num(probe.get(key))) is not None]
    if sweeps:
        yield Family(SWEEPS, sweeps)
    programs = _dict(probe.get("programs"))
    if programs:
        runs, run_time = Family(BPF_RUNS), Family(BPF_RUN_SECONDS)
        for program, counts in sorted(programs.items()):
            counts = _dict(counts)
            if (n := _num(counts.get("run_cnt"))) is not None:
                runs.samples.append(((str(program),), n))
            if (ns := _num(counts.get("run_time_ns"))) is not None:
                run_time.samples.append(((str(program),), ns / 1e9))
        yield runs
        yield run_time


def _sink_families(sinks: dict[str, Any]) -> Iterator[Family]:
    records, dropped, depth = Family(SINK_RECORDS), Family(SINK_DROPPED), Family(SINK_QUEUE_DEPTH)
    capacity, batches, retries = Family(SINK_QUEUE_CAPACITY), Family(SINK_BATCHES), Family(SINK_RETRIES)
    spool: dict[Metric, Family] = {}   # only sinks with a spool have its figures
    for sink, s in sorted(sinks.items()):
        if not isinstance(s, dict):
            continue
        for outcome in ("received", "emitted"):
            if (v := _num(s.get(outcome))) is not None:
                records.samples.append(((sink, outcome), v))
        for reason, kinds in sorted(_dict(s.get("dropped_by")).items()):
            for kind, n in sorted(_dict(kinds).items()):
                if (v := _num(n)) is not None:
                    dropped.samples.append(((sink, reason, kind), v))
        for family, key in ((depth, "queue_depth"), (capacity, "queue_capacity"), (retries, "retries")):
            if (v := _num(s.get(key))) is not None:
                family.samples.append(((sink,), v))
        for outcome in ("sent", "failed"):
            if (v := _num(s.get(f"batches_{outcome}"))) is not None:
                batches.samples.append(((sink, outcome), v))
        for metric, key in SPOOL_VALUES:
            if (v := _num(s.get(key))) is not None:
                spool.setdefault(metric, Family(metric)).samples.append(((sink,), v))
    yield from (records, dropped, depth, capacity, batches, retries)
    yield from spool.values()


# -- what the log reads ----------------------------------------------------------

def losses(snapshot: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Every loss counter of a snapshot: name -> (count so far, what it means).
    The probe's from PROBE_VALUES (those with a `loss` text), each sink's drops."""
    probe = _dict(snapshot.get("probe"))
    out = {value.key: (int(_num(probe.get(value.key)) or 0), value.loss) for value in PROBE_VALUES if value.loss}
    for name, s in sorted(_dict(snapshot.get("sinks")).items()):
        out[f"sink {name}"] = (int(_num(_dict(s).get("dropped")) or 0),
                               "records dropped (see its dropped_by counters)")
    return out


def summary_lines(snapshot: dict[str, Any]) -> list[str]:
    """The snapshot as readable lines (the exit summary): one per stage and
    per sink, `counter=value` each, then one per loss counter that grew, with
    what it means.  The machine-readable form is the metrics (collect())."""
    probe = _dict(snapshot.get("probe"))
    lines = []
    if probe:
        counts = " ".join(f"{key}={value}" for key, value in probe.items() if _num(value) is not None)
        lines.append(f"probe ({probe.get('mode') or '?'}): {counts}")
    for stage, counts in sorted(_dict(snapshot.get("stages")).items()):
        text = " ".join(f"{counter}={n}" for counter, n in sorted(_dict(counts).items()))
        lines.append(f"stage {stage}: {text or 'nothing counted'}")
    for name, s in sorted(_dict(snapshot.get("sinks")).items()):
        s = _dict(s)
        counts = " ".join(f"{key}={value}" for key, value in s.items() if _num(value) is not None)
        drops = " ".join(f"{reason}/{kind}={n}" for reason, kinds in _dict(s.get("dropped_by")).items()
                         for kind, n in _dict(kinds).items() if n)
        lines.append(f"sink {name}: {counts}" + (f" (dropped: {drops})" if drops else ""))
    conntrack = {f: _dict(v) for f, v in sorted(_dict(snapshot.get("conntrack")).items())}
    if conntrack:
        lines.append("conntrack: " + ", ".join(
            f"{family} {TRACKING_WORDS.get(v.get('tracking'), '?')} untracked_packets={v.get('untracked_packets', 0)}"
            for family, v in conntrack.items()))
    for key, (count, what) in losses(snapshot).items():
        if count:
            lines.append(f"lost: {key}: {count} {what}")
    return lines
