"""influxdb sink against real servers on 127.0.0.1 (tests/servers/influx.py):

- Debian's InfluxDB 1.6.7 through `api: v1` (/write), read back with InfluxQL;
- VictoriaMetrics through `api: v2` (influxdb-client, /api/v2/write), read
  back with /api/v1/export, where measurement+field is the metric name
  (`ct_acct_bytes_orig`) and timestamps are milliseconds.

Records are written directly (sink.write) and through the real pipeline, and
the stored values are compared exactly.  No root needed."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from conntracct.config import parse_config
from conntracct.flow import DESTROY, NEW, UPDATE, FlowEvent, FlowTuple
from conntracct.pipeline import Pipeline
from conntracct.selfmetrics import Stats
from conntracct.sinks import create_sink
from conntracct.sinks.base import PermanentSinkError, TransientSinkError
from tests.servers.influx import Influxd, http

_names = itertools.count()


def unique(prefix: str) -> str:
    """A database / measurement name of its own for each test."""
    return f"{prefix}{next(_names)}_{time.monotonic_ns() % 10**6}"


def tcp(kind: str, flow_id: int, ts_ns: int, src: str = "192.0.2.2", dst: str = "198.51.100.2",
        sport: int = 40000, dport: int = 443, totals=(3, 180, 2, 120), deltas=(1, 60, 1, 40),
        labels: dict | None = None, **fields) -> FlowEvent:
    o = FlowTuple(src, dst, sport, dport)
    values = dict(kind=kind, flow_id=flow_id, family=6 if ":" in src else 4, proto=6, orig=o,
                  reply=FlowTuple(dst, src, dport, sport),
                  packets_orig=totals[0], bytes_orig=totals[1], packets_reply=totals[2], bytes_reply=totals[3],
                  delta_packets_orig=deltas[0], delta_bytes_orig=deltas[1],
                  delta_packets_reply=deltas[2], delta_bytes_reply=deltas[3],
                  start_ns=ts_ns - 10**9, stop_ns=ts_ns if kind == DESTROY else 0, ts_ns=ts_ns,
                  netns=4026531840, tcp_state=3 if kind != DESTROY else 7,
                  labels={"direction": "outbound"} if labels is None else labels)
    values.update(fields)
    return FlowEvent(**values)


def sample_batch(now: int) -> list[FlowEvent]:
    """A TCP flow's UPDATE and DESTROY at the same nanosecond, a NATed IPv6
    UDP flow with a label needing escapes, an ICMP echo."""
    udp6 = FlowEvent(
        kind=UPDATE, flow_id=0x0123_4567_89AB_CD, family=6, proto=17,
        orig=FlowTuple("2001:db8::1", "2001:db8:1::53", 5353, 53),
        reply=FlowTuple("2001:db8:1::53", "2001:db8::ff", 53, 5353),
        packets_orig=10, bytes_orig=1000, packets_reply=9, bytes_reply=900,
        delta_packets_orig=4, delta_bytes_orig=400, delta_packets_reply=3, delta_bytes_reply=300,
        start_ns=now - 10**9, stop_ns=0, ts_ns=now + 5, zone=7, mark=0x20,
        labels={"direction": "forward", "site": "fra 1,rack=2"})
    icmp = FlowEvent(
        kind=DESTROY, flow_id=42, family=4, proto=1,
        orig=FlowTuple("192.0.2.9", "198.51.100.9", 0, 0), reply=FlowTuple("198.51.100.9", "192.0.2.9", 0, 0),
        packets_orig=2, bytes_orig=168, packets_reply=2, bytes_reply=168,
        delta_packets_orig=1, delta_bytes_orig=84, delta_packets_reply=1, delta_bytes_reply=84,
        start_ns=now - 10**9, stop_ns=now + 7, ts_ns=now + 7, icmp=(8, 0, 4242), labels={"direction": "outbound"})
    return [tcp(UPDATE, 0x1234_ABCD_5678_EF90, now, totals=(3, 180, 2, 120), deltas=(1, 60, 1, 40)),
            tcp(DESTROY, 0x1234_ABCD_5678_EF90, now, totals=(4, 240, 3, 160), deltas=(1, 60, 1, 40)),
            udp6, icmp]


def influx_sink(server, database: str, **keys):
    text = "".join(f"    {k}: {v}\n" for k, v in
                   {"url": server.url, "api": "v1", "database": database, "name": "influx-v1", **keys}.items())
    return create_sink(parse_config("sinks:\n  - type: influxdb\n" + text).sinks[0])


def vm_sink(server, measurement: str, **keys):
    text = "".join(f"    {k}: {v}\n" for k, v in
                   {"url": server.url, "bucket": "flows", "org": "conntracct", "token": "unused",
                    "measurement": measurement, "name": "influx-v2", **keys}.items())
    return create_sink(parse_config("sinks:\n  - type: influxdb\n" + text).sinks[0])


def run_pipeline(sink_yaml: str, events: list[FlowEvent], stats: Stats | None = None) -> dict:
    """Offer `events` through a real Pipeline to the one sink described; close
    (drain) it; return the sink's counters."""
    stats = stats or Stats()
    config = parse_config("sinks:\n" + sink_yaml)
    pipeline = Pipeline.from_config(config.sinks, stats)
    pipeline.start()
    for event in events:
        pipeline.offer(event)
    pipeline.close(30)
    return stats.snapshot()["sinks"][config.sinks[0].name]


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- InfluxDB 1.6, api v1 ----------------------------------------------------

def test_v1_points_read_back_exactly(influxd):
    db = unique("flows")
    influxd.create_database(db)
    now = time.time_ns()
    sink = influx_sink(influxd, db, gzip="true")
    sink.write(sample_batch(now))
    sink.close()
    rows = influxd.rows("SELECT * FROM ct_acct ORDER BY time", db)
    got = [{k: v for k, v in row.items() if v is not None} for row in rows]
    tcp_tags = {"family": "ipv4", "protocol": "tcp", "src": "192.0.2.2", "dst": "198.51.100.2",
                "dport": "443", "direction": "outbound", "netns": "4026531840"}
    assert got == [
        {"time": now, **tcp_tags, "packets_orig": 3, "bytes_orig": 180, "packets_reply": 2, "bytes_reply": 120,
         "delta_packets_orig": 1, "delta_bytes_orig": 60, "delta_packets_reply": 1, "delta_bytes_reply": 40,
         "flow_id": 0x1234_ABCD_5678_EF90, "finished": False, "tcp_state": "established"},
        # The DESTROY shares the UPDATE's series and nanosecond: it moved 1 ns
        # instead of overwriting it.
        {"time": now + 1, **tcp_tags, "packets_orig": 4, "bytes_orig": 240, "packets_reply": 3, "bytes_reply": 160,
         "delta_packets_orig": 1, "delta_bytes_orig": 60, "delta_packets_reply": 1, "delta_bytes_reply": 40,
         "flow_id": 0x1234_ABCD_5678_EF90, "finished": True, "duration_ms": 1000, "tcp_state": "time_wait"},
        {"time": now + 5, "family": "ipv6", "protocol": "udp", "src": "2001:db8::1", "dst": "2001:db8:1::53",
         "dport": "53", "reply_src": "2001:db8:1::53", "reply_dst": "2001:db8::ff", "direction": "forward",
         "site": "fra 1,rack=2", "zone": "7", "mark": "0x20",
         "packets_orig": 10, "bytes_orig": 1000, "packets_reply": 9, "bytes_reply": 900,
         "delta_packets_orig": 4, "delta_bytes_orig": 400, "delta_packets_reply": 3, "delta_bytes_reply": 300,
         "flow_id": 0x0123_4567_89AB_CD, "finished": False},
        {"time": now + 7, "family": "ipv4", "protocol": "icmp", "src": "192.0.2.9", "dst": "198.51.100.9",
         "direction": "outbound", "packets_orig": 2, "bytes_orig": 168, "packets_reply": 2, "bytes_reply": 168,
         "delta_packets_orig": 1, "delta_bytes_orig": 84, "delta_packets_reply": 1, "delta_bytes_reply": 84,
         "flow_id": 42, "finished": True, "duration_ms": 1000, "icmp_type": 8, "icmp_code": 0, "icmp_id": 4242},
    ]
    # Tags are tags, fields are fields, with the types the schema promises.
    keys = influxd.rows("SHOW FIELD KEYS FROM ct_acct", db)
    assert {row["fieldKey"]: row["fieldType"] for row in keys} == {
        **dict.fromkeys(["packets_orig", "bytes_orig", "packets_reply", "bytes_reply", "delta_packets_orig",
                         "delta_bytes_orig", "delta_packets_reply", "delta_bytes_reply", "flow_id",
                         "duration_ms", "icmp_type", "icmp_code", "icmp_id"], "integer"),
        "finished": "boolean", "tcp_state": "string"}


def test_v1_through_the_pipeline_with_retention_policy(influxd):
    db = unique("flows")
    influxd.create_database(db)
    influxd.query(f'CREATE RETENTION POLICY "week" ON "{db}" DURATION 7d REPLICATION 1')
    now = time.time_ns()
    events = []
    for i in range(1200):   # NEW, UPDATE and DESTROY of 1200 flows, batches of 500
        for kind in (NEW, UPDATE, DESTROY):
            events.append(tcp(kind, i + 1, now + i * 1000, sport=10000 + i % 50,
                              totals=(i, 100 * i, i, 10 * i), deltas=(1, 100, 1, 10)))
    stats = run_pipeline(f"  - type: influxdb\n    name: v1pipe\n    url: {influxd.url}\n    api: v1\n"
                         f"    database: {db}\n    retention_policy: week\n    batch_size: 500\n", events)
    assert (stats["received"], stats["emitted"], stats["dropped"], stats["batches_sent"]) == (3600, 3600, 0, 8)
    [[count, flagged, total, delta, ids]] = [[r["count"], r["flagged"], r["total"], r["delta"], r["ids"]] for r in
                                              influxd.rows('SELECT count(bytes_orig) AS "count", '
                                                           'count(finished) AS flagged, sum(bytes_orig) AS total, '
                                                           'sum(delta_bytes_orig) AS delta, sum(flow_id) AS ids '
                                                           'FROM "week".ct_acct', db)]
    assert (count, total, delta, ids) == (3600, 3 * sum(100 * i for i in range(1200)), 3600 * 100,
                                          3 * sum(range(1, 1201)))
    assert flagged == 3600   # every point says whether its flow finished
    finished = influxd.rows('SELECT count(flow_id) FROM "week".ct_acct WHERE finished = true', db)
    assert finished[0]["count"] == 1200
    assert influxd.rows("SELECT count(flow_id) FROM ct_acct", db) == []   # nothing in the default policy


def test_v1_missing_database_is_permanent_and_named(influxd):
    sink = influx_sink(influxd, "no_such_db")
    with pytest.raises(PermanentSinkError) as info:
        sink.write([tcp(UPDATE, 1, time.time_ns())])
    assert str(info.value) == (f"influxdb sink 'influx-v1' ({influxd.url}, api v1): HTTP 404: "
                               'database not found: "no_such_db" (wrong URL, database or bucket)')


def test_v1_rejected_points_are_permanent(influxd):
    db = unique("flows")
    influxd.create_database(db)
    now = time.time_ns()
    # bytes_orig already holds strings in this measurement (and shard): ours are rejected.
    status, _ = http("POST", f"{influxd.url}/write?db={db}", f'ct_acct,src=x bytes_orig="many" {now - 1000}'.encode())
    assert status == 204
    with pytest.raises(PermanentSinkError, match=r"influxdb sink 'influx-v1' .*HTTP 400: .*field type conflict"):
        influx_sink(influxd, db).write([tcp(UPDATE, 1, now)])


def test_v1_credentials(influxd_auth):
    db = unique("secure")
    influxd_auth.create_database(db)
    influxd_auth.query("CREATE USER agent WITH PASSWORD 'right'")
    influxd_auth.query(f'GRANT WRITE ON "{db}" TO agent')
    now = time.time_ns()
    for keys, text in [({}, "unable to parse authentication credentials"),
                       ({"username": "agent", "password": "wrong"}, "authorization failed")]:
        with pytest.raises(PermanentSinkError) as info:
            influx_sink(influxd_auth, db, **keys).write([tcp(UPDATE, 1, now)])
        assert str(info.value) == (f"influxdb sink 'influx-v1' ({influxd_auth.url}, api v1): HTTP 401: "
                                   f"{text} (bad credentials)")
    influx_sink(influxd_auth, db, username="agent", password="right").write([tcp(UPDATE, 1, now)])
    assert influxd_auth.rows("SELECT flow_id, bytes_orig FROM ct_acct", db) == [
        {"time": now, "flow_id": 1, "bytes_orig": 180}]


def test_api_v2_against_a_pre_18_server_is_a_clear_permanent_error(influxd):
    sink = vm_sink(influxd, "ct_acct")
    with pytest.raises(PermanentSinkError) as info:
        sink.write([tcp(UPDATE, 1, time.time_ns())])
    assert str(info.value) == (f"influxdb sink 'influx-v2' ({influxd.url}, api v2): HTTP 404: "
                               "404 page not found (wrong URL, database or bucket)")


# -- VictoriaMetrics, api v2 (influxdb-client) -------------------------------

def samples_of(events) -> int:
    """Samples VictoriaMetrics makes of these points: one per field; a string
    field (tcp_state) becomes a sample of value 0.  The DESTROYs here all have
    start and stop: duration_ms."""
    return sum(10 + (e.proto == 6) + 3 * (e.icmp is not None) + (e.kind == DESTROY) for e in events if e.kind != NEW)


def export(server, measurement: str, samples: int) -> dict[tuple, tuple[list, list]]:
    """{(metric name, sorted labels): (values, timestamps)} of the measurement's
    fields, once (at least) `samples` samples of them are searchable."""
    def count(series):
        return sum(len(s["values"]) for s in series)

    out = {}
    for series in server.export(f'{{__name__=~"{measurement}_.*"}}', until=lambda s: count(s) >= samples):
        metric = dict(series["metric"])
        name = metric.pop("__name__")
        out[(name, tuple(sorted(metric.items())))] = (series["values"], series["timestamps"])
    return out


def test_v2_points_read_back_exactly(victoria_metrics):
    m = unique("vm")
    now_ms = time.time_ns() // 10**6
    now = now_ms * 10**6
    sink = vm_sink(victoria_metrics, m, gzip="true")
    batch = sample_batch(now)
    sink.write(batch)
    sink.close()
    got = export(victoria_metrics, m, samples=samples_of(batch))
    tcp_labels = (("direction", "outbound"), ("dport", "443"), ("dst", "198.51.100.2"), ("family", "ipv4"),
                  ("netns", "4026531840"), ("protocol", "tcp"), ("src", "192.0.2.2"))
    udp_labels = (("direction", "forward"), ("dport", "53"), ("dst", "2001:db8:1::53"), ("family", "ipv6"),
                  ("mark", "0x20"), ("protocol", "udp"), ("reply_dst", "2001:db8::ff"),
                  ("reply_src", "2001:db8:1::53"), ("site", "fra 1,rack=2"), ("src", "2001:db8::1"), ("zone", "7"))
    icmp_labels = (("direction", "outbound"), ("dst", "198.51.100.9"), ("family", "ipv4"), ("protocol", "icmp"),
                   ("src", "192.0.2.9"))

    def values(labels, field):
        vals, stamps = got[(f"{m}_{field}", labels)]
        return sorted(zip(stamps, vals, strict=True))

    # UPDATE and DESTROY of the TCP flow: both kept (milliseconds: same stamp).
    assert values(tcp_labels, "bytes_orig") == [(now_ms, 180), (now_ms, 240)]
    assert values(tcp_labels, "delta_bytes_reply") == [(now_ms, 40), (now_ms, 40)]
    assert values(tcp_labels, "finished") == [(now_ms, 0), (now_ms, 1)]
    assert values(udp_labels, "packets_orig") == [(now_ms, 10)]
    assert values(udp_labels, "bytes_reply") == [(now_ms, 900)]
    assert values(udp_labels, "delta_packets_reply") == [(now_ms, 3)]
    assert values(udp_labels, "delta_bytes_orig") == [(now_ms, 400)]
    # Exact below 2**53: VictoriaMetrics keeps numbers as float64.
    assert values(udp_labels, "flow_id") == [(now_ms, 0x0123_4567_89AB_CD)]
    assert values(udp_labels, "finished") == [(now_ms, 0)]
    assert values(icmp_labels, "flow_id") == [(now_ms, 42)]
    assert values(icmp_labels, "finished") == [(now_ms, 1)]
    assert values(icmp_labels, "icmp_type") == [(now_ms, 8)]
    assert values(icmp_labels, "icmp_id") == [(now_ms, 4242)]
    assert values(tcp_labels, "duration_ms") == [(now_ms, 1000)]   # the DESTROY's only
    assert values(icmp_labels, "duration_ms") == [(now_ms, 1000)]
    assert {name for name, _ in got} >= {f"{m}_{f}" for f in (
        "packets_orig", "bytes_orig", "packets_reply", "bytes_reply", "delta_packets_orig", "delta_bytes_orig",
        "delta_packets_reply", "delta_bytes_reply", "flow_id", "finished", "duration_ms")}


def test_v2_through_the_pipeline_with_flow_id_tags(victoria_metrics):
    m = unique("vmpipe")
    now_ms = time.time_ns() // 10**6
    events = [tcp(kind, i + 1, (now_ms + i) * 10**6, totals=(i, 100 * i, i, 10 * i), deltas=(1, 100, 1, 10))
              for i in range(1000) for kind in (NEW, UPDATE, DESTROY)]
    stats = run_pipeline(f"  - type: influxdb\n    name: v2pipe\n    url: {victoria_metrics.url}\n"
                         f"    bucket: flows\n    org: o\n    measurement: {m}\n    flow_id_tag: true\n"
                         f"    batch_size: 700\n    kinds: [update, destroy]\n", events)
    assert (stats["received"], stats["emitted"], stats["dropped"], stats["batches_sent"]) == (2000, 2000, 0, 3)
    got = export(victoria_metrics, m, samples=samples_of(events))
    bytes_orig = {dict(labels)["flow_id"]: sorted(vals) for (name, labels), (vals, _) in got.items()
                  if name == f"{m}_bytes_orig"}
    assert bytes_orig == {f"{i + 1:016x}": [100 * i, 100 * i] for i in range(1000)}
    finished = {dict(labels)["flow_id"]: sorted(vals) for (name, labels), (vals, _) in got.items()
                if name == f"{m}_finished"}
    assert finished == {f"{i + 1:016x}": [0, 1] for i in range(1000)}


def test_v2_server_down_is_transient_and_queued_records_arrive_when_it_is_back(victoria_metrics):
    m = unique("vmdown")
    now_ms = time.time_ns() // 10**6
    sink = vm_sink(victoria_metrics, m, timeout="2s")
    victoria_metrics.stop()
    try:
        with pytest.raises(TransientSinkError, match=rf"influxdb sink 'influx-v2' \({victoria_metrics.url}, api v2\)"
                                                     r".*(refused|NewConnectionError)"):
            sink.write([tcp(UPDATE, 1, now_ms * 10**6)])

        stats = Stats()
        config = parse_config(
            f"sinks:\n  - type: influxdb\n    name: comeback\n    url: {victoria_metrics.url}\n"
            f"    bucket: b\n    measurement: {m}\n    batch_size: 50\n    flush_interval: 100ms\n"
            "    retry: {max_attempts: 100, backoff: 100ms, max_backoff: 300ms}\n")
        pipeline = Pipeline.from_config(config.sinks, stats)
        pipeline.start()
        for i in range(120):
            pipeline.offer(tcp(DESTROY, i + 1, (now_ms + i) * 10**6, totals=(1, i, 1, i)))
        counters = lambda: stats.snapshot()["sinks"]["comeback"]  # noqa: E731
        wait_for(lambda: counters()["retries"] >= 3, what="the sink to retry")
        assert counters()["emitted"] == 0
    finally:
        victoria_metrics.start()
    wait_for(lambda: counters()["emitted"] == 120, what="queued records to arrive")
    pipeline.close(10)
    assert counters()["dropped"] == 0
    got = export(victoria_metrics, m, samples=120 * 11)
    [(vals, stamps)] = [v for (name, _), v in got.items() if name == f"{m}_bytes_orig"]
    assert sorted(zip(stamps, vals, strict=True)) == [(now_ms + i, i) for i in range(120)]


def test_v1_server_down_then_back_through_the_pipeline(influxd):
    db = unique("down")
    influxd.create_database(db)
    now = time.time_ns()
    stats = Stats()
    config = parse_config(
        f"sinks:\n  - type: influxdb\n    name: comeback1\n    url: {influxd.url}\n    api: v1\n"
        f"    database: {db}\n    batch_size: 50\n    flush_interval: 100ms\n"
        "    retry: {max_attempts: 100, backoff: 100ms, max_backoff: 300ms}\n")
    pipeline = Pipeline.from_config(config.sinks, stats)
    pipeline.start()
    counters = lambda: stats.snapshot()["sinks"]["comeback1"]  # noqa: E731
    influxd.stop()
    try:
        for i in range(100):
            pipeline.offer(tcp(UPDATE if i % 2 else DESTROY, i + 1, now + i, totals=(1, i, 1, i)))
        wait_for(lambda: counters()["retries"] >= 3, what="the sink to retry")
        assert counters()["emitted"] == 0
    finally:
        influxd.start()
    wait_for(lambda: counters()["emitted"] == 100, what="queued records to arrive")
    pipeline.close(10)
    assert counters()["dropped"] == 0
    rows = influxd.rows("SELECT bytes_orig, flow_id, finished FROM ct_acct", db)
    assert [(r["time"], r["bytes_orig"], r["flow_id"], r["finished"]) for r in rows] == [
        (now + i, i, i + 1, i % 2 == 0) for i in range(100)]


def test_constructing_a_sink_for_a_dead_server_does_no_io():
    from tests.servers.influx import free_port

    port = free_port()
    for api_keys in ("    bucket: b\n", "    api: v1\n    database: d\n"):
        config = parse_config(f"sinks:\n  - type: influxdb\n    url: http://127.0.0.1:{port}\n{api_keys}")
        start = time.monotonic()
        sink = create_sink(config.sinks[0])
        sink.close()
        assert time.monotonic() - start < 1.0


def test_influxd_is_bound_to_loopback_only(influxd):
    import subprocess
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ours = [line for line in out.splitlines() if f"pid={influxd.proc.pid}," in line]
    assert ours and all(" 127.0.0.1:" in line for line in ours), ours
    assert any(f"127.0.0.1:{influxd.rpc_port}" in line for line in ours)
    assert isinstance(influxd, Influxd)


# -- the queries docs/influxdb.md documents ----------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "influxdb.md"


def documented(language: str) -> list[str]:
    import re
    return re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), re.DOTALL)


def traffic(now: int) -> list[FlowEvent]:
    """Three hosts with known deltas; finished flows: 2 TCP, 1 UDP, 1 ICMP,
    lasting 1 s but one TCP flow of 90 s and the ICMP one of 0.5 s."""
    events = []
    for n, (src, sent, received) in enumerate([("10.0.0.1", 6000, 60000), ("10.0.0.2", 600, 1200),
                                               ("10.0.0.3", 120000, 600)]):
        for half in (0, 1):   # two records per host: the sums add them
            events.append(tcp(UPDATE, 100 + n, now + n * 10 + half, src=src, sport=1000 + n,
                              deltas=(1, sent // 2, 1, received // 2)))
    events.append(tcp(DESTROY, 100, now + 100, src="10.0.0.1", deltas=(0, 0, 0, 0)))
    events.append(tcp(DESTROY, 101, now + 101, src="10.0.0.2", deltas=(0, 0, 0, 0), start_ns=now + 101 - 90 * 10**9))
    events.append(tcp(DESTROY, 102, now + 102, src="10.0.0.3", deltas=(0, 0, 0, 0), proto=17, tcp_state=0))
    events.append(tcp(DESTROY, 103, now + 103, src="10.0.0.3", deltas=(0, 0, 0, 0), proto=1, tcp_state=0,
                      orig=FlowTuple("10.0.0.3", "198.51.100.2", 0, 0), icmp=(8, 0, 1), start_ns=now + 103 - 5 * 10**8))
    return events


def test_documented_influxql_queries(influxd):
    db = unique("docs")
    influxd.create_database(db)
    now_s = time.time_ns() // 10**9 // 60 * 60 - 600   # the start of a minute, 10 minutes ago
    influx_sink(influxd, db).write(traffic(now_s * 10**9))
    bandwidth, top, finished, long_lived = documented("sql")

    per_src: dict[str, list[float]] = {}
    for row in influxd.rows(bandwidth, db):
        sums = per_src.setdefault(row["src"], [0, 0])
        sums[0] += row["sent_Bps"] * 60
        sums[1] += row["received_Bps"] * 60
    assert {src: [round(v) for v in sums] for src, sums in per_src.items()} == {
        "10.0.0.1": [6000, 60000], "10.0.0.2": [600, 1200], "10.0.0.3": [120000, 600]}
    assert [(row["src"], row["top"]) for row in influxd.rows(top, db)] == [
        ("10.0.0.3", 120600), ("10.0.0.1", 66000), ("10.0.0.2", 1800)]
    assert {row["protocol"]: row["flows"] for row in influxd.rows(finished, db)} == {"tcp": 2, "udp": 1, "icmp": 1}
    assert [(row["src"], row["dport"], row["duration_ms"]) for row in influxd.rows(long_lived, db)] == [
        ("10.0.0.2", "443", 90000)]


def test_documented_metricsql_queries(victoria_metrics):
    import json
    import urllib.parse

    m = "ct_acct"   # the documented queries name the default measurement
    victoria_metrics.delete(f'{{__name__=~"{m}_.*"}}')
    now_ms = time.time_ns() // 10**6 - 600_000
    events = traffic(now_ms * 10**6)
    vm_sink(victoria_metrics, m).write(events)
    victoria_metrics.export(f'{{__name__=~"{m}_.*"}}', until=lambda s: sum(len(x["values"]) for x in s)
                            >= samples_of(events))
    queries = [line for block in documented("promql") for line in block.splitlines()
               if line.strip() and not line.startswith("#")]
    assert len(queries) == 4

    def query(q: str, at_ms: int) -> dict[str, float]:
        status, body = http("GET", f"{victoria_metrics.url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": q, "time": f"{at_ms / 1000:.3f}", "nocache": "1"}))
        assert status == 200, body
        return {next(iter(r["metric"].values()), ""): float(r["value"][1])
                for r in json.loads(body)["data"]["result"]}

    at = now_ms + 30_000
    assert query(queries[0], at) == {"10.0.0.1": 66000 / 60, "10.0.0.2": 1800 / 60, "10.0.0.3": 120600 / 60}
    assert query(queries[1], at) == {"10.0.0.1": 66000, "10.0.0.2": 1800, "10.0.0.3": 120600}
    assert query(queries[2], at) == {"tcp": 2, "udp": 1, "icmp": 1}
    assert query(queries[3], at) == {"": 3}   # 1 s or longer: not the 0.5 s ICMP flow
