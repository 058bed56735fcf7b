"""The agent's own metrics: one typed definition per counter (selfmetrics),
read by the Prometheus sink, the loss log and the exit summary."""

from __future__ import annotations

import logging
import re

from conntracct import selfmetrics
from conntracct.flow import KINDS

SNAPSHOT = {
    "sinks": {"influxdb": {"received": 20, "emitted": 12, "dropped": 1, "batches_sent": 2, "batches_failed": 1,
                           "retries": 4, "queue_depth": 6, "queue_capacity": 500,
                           "dropped_by": {"retries_exhausted": {"new": 0, "update": 0, "destroy": 1},
                                          "queue_full": {"new": 0, "update": 0, "destroy": 0}}}},
    "stages": {"enrich": {"ignored": 5}},
    "probe": {"received_new": 7, "received_update": 11, "received_destroy": 5, "decode_errors": 0,
              "ctnetlink_overruns": 2, "ends_unseen": 1, "flows_without_end_events": 3, "state_deletes": 4,
              "probe_records_lost": 8, "probe_state_full": 1, "probe_state_inserts": 100,
              "probe_state_deletes": 90, "sweeps_by_lookup": 3, "sweeps_by_dump": 2, "mode": "netfilter",
              "max_flows": 262144, "programs": {"ct_pre_routing": {"run_cnt": 1000, "run_time_ns": 2_500_000_000}}},
}

# Keys FlowSource.stats() sets itself, beside its counters and the BPF stats.
SOURCE_EXTRAS = {"mode", "max_flows", "programs", "flows_without_end_events"}


def test_every_counter_the_probe_reports_has_one_definition():
    """A probe counter renamed (or added) without its metric fails here,
    instead of vanishing from the metrics and the loss log."""
    from conntracct.probe.record import STAT_NAMES
    from conntracct.probe.source import COUNTERS

    reported = set(COUNTERS) | {"probe_" + name for name in STAT_NAMES} | SOURCE_EXTRAS
    assert reported == selfmetrics.PROBE_KEYS


def test_metric_names_are_unique_and_typed():
    metrics = [value for value in vars(selfmetrics).values() if isinstance(value, selfmetrics.Metric)]
    metrics += [value.metric for value in selfmetrics.PROBE_VALUES]
    names = [m.name for m in metrics]
    assert len(names) == len(set(names))
    for m in metrics:
        assert m.type in (selfmetrics.COUNTER, selfmetrics.GAUGE, selfmetrics.INFO), m
        assert re.fullmatch(r"conntracct_[a-z_]+", m.name) and not m.name.endswith("_total"), m
        assert m.help


def test_collect_gives_every_family_with_its_labels():
    families = {f.metric.name: f for f in selfmetrics.collect(SNAPSHOT, "1.2.3")}
    assert families["conntracct_build"].samples == [(("1.2.3", "netfilter"), 1)]
    assert families["conntracct_records"].samples == [(("probe", kind), n) for kind, n in zip(KINDS, (7, 11, 5),
                                                                                               strict=True)]
    assert families["conntracct_probe_sweeps"].samples == [(("lookup",), 3), (("dump",), 2)]
    assert families["conntracct_flow_state_entries"].samples == [((), 100 - 90 - 4)]
    for family in families.values():
        for labels, _ in family.samples:
            assert len(labels) == len(family.metric.labels), family


def test_the_loss_log_reads_the_same_definitions():
    losses = selfmetrics.losses(SNAPSHOT)
    assert losses["probe_records_lost"] == (8, "records lost: ring buffer full (raise probe.ringbuf_pages)")
    assert losses["probe_state_full"][0] == 1 and losses["decode_errors"][0] == 0
    assert losses["sink influxdb"] == (1, "records dropped (see its dropped_by counters)")
    assert {key for key in losses if not key.startswith("sink ")} == {
        v.key for v in selfmetrics.PROBE_VALUES if v.loss}


def test_loss_watch_logs_what_grew(caplog):
    from conntracct.agent import LossWatch

    watch = LossWatch(interval=0)
    with caplog.at_level(logging.WARNING, logger="conntracct"):
        watch.check(lambda: SNAPSHOT)
        watch.check(lambda: SNAPSHOT)   # nothing grew since
    assert [r.getMessage() for r in caplog.records] == [
        "probe_records_lost: 8 records lost: ring buffer full (raise probe.ringbuf_pages)",
        "probe_state_full: 1 flows not tracked: flow map full (raise probe.max_flows)",
        "sink influxdb: 1 records dropped (see its dropped_by counters)"]


def test_summary_is_readable_lines_per_stage_and_sink():
    lines = selfmetrics.summary_lines(SNAPSHOT)
    assert lines[0].startswith("probe (netfilter): received_new=7 received_update=11 received_destroy=5 ")
    assert "probe_state_full=1" in lines[0] and "{" not in "".join(lines)
    assert lines[1] == "stage enrich: ignored=5"
    assert lines[2] == ("sink influxdb: received=20 emitted=12 dropped=1 batches_sent=2 batches_failed=1 "
                        "retries=4 queue_depth=6 queue_capacity=500 (dropped: retries_exhausted/destroy=1)")
    assert lines[3:] == [
        "lost: probe_records_lost: 8 records lost: ring buffer full (raise probe.ringbuf_pages)",
        "lost: probe_state_full: 1 flows not tracked: flow map full (raise probe.max_flows)",
        "lost: sink influxdb: 1 records dropped (see its dropped_by counters)"]
    counters = dict(re.findall(r"(\w+)=(\d+)", lines[0]))
    assert {k: int(v) for k, v in counters.items()} == {
        k: v for k, v in SNAPSHOT["probe"].items() if isinstance(v, int)}
