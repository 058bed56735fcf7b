"""influxdb-udp sink against Debian's InfluxDB 1.6 with its [[udp]] listener
on (tests/servers/influx.py, the test's own config), read back over HTTP with
InfluxQL: every point, exact values, both schemas.  No root needed.

On 127.0.0.1 with an 8 MiB socket buffer nothing is lost; on a real network
UDP may lose datagrams without anyone noticing (docs/influxdb.md)."""

from __future__ import annotations

import time

import pytest

from conntracct.config import parse_config
from conntracct.flow import DESTROY, UPDATE, FlowEvent, FlowTuple
from conntracct.sinks import create_sink
from tests.servers.influx import Influxd, _serve

DATABASE = "conntracct_udp"


@pytest.fixture(scope="module")
def influxd_udp():
    yield from _serve(Influxd, udp_database=DATABASE)


def record(i: int, now: int, kind: str = UPDATE) -> FlowEvent:
    src, dst = ("2001:db8::2", f"2001:db8:1::{i:x}") if i % 3 == 0 else ("192.0.2.2", f"198.51.100.{i % 250}")
    o = FlowTuple(src, dst, 30000 + i, 443 if i % 2 else 53)
    proto = 6 if i % 2 else 17
    return FlowEvent(kind=kind, flow_id=10_000 + i, family=6 if ":" in src else 4, proto=proto, orig=o,
                     reply=FlowTuple(dst, src, o.dport, o.sport), packets_orig=i + 1, bytes_orig=100 * (i + 1),
                     packets_reply=i, bytes_reply=90 * i, delta_packets_orig=1, delta_bytes_orig=100,
                     delta_packets_reply=1, delta_bytes_reply=90, start_ns=now - 10**9,
                     stop_ns=now + i if kind == DESTROY else 0, ts_ns=now + i, mark=i % 4, netns=4026531840,
                     labels={"direction": "outbound", "customer": f"c{i % 5}"})


def udp_sink(server: Influxd, **keys):
    text = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    config = parse_config(f"sinks:\n  - type: influxdb-udp\n    address: '127.0.0.1:{server.udp_port}'\n" + text)
    return create_sink(config.sinks[0])


def wait_rows(server: Influxd, query: str, count: int, timeout: float = 15.0) -> list[dict]:
    """The listener writes in batches (batch-timeout 50 ms): poll."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = server.rows(query, DATABASE)
        except RuntimeError:    # the listener creates the database with its first batch
            rows = []
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_conntracct_schema_over_udp_reads_back_exactly(influxd_udp):
    now = time.time_ns() - 60 * 10**9
    batch = [record(i, now, DESTROY if i % 7 == 0 else UPDATE) for i in range(300)]
    sink = udp_sink(influxd_udp, schema="conntracct", measurement="ct_acct_udp1", source_ports="true",
                    payload_size=512)
    assert not sink.write(batch[:150]).rejected and not sink.write(batch[150:]).rejected
    sink.close()
    rows = wait_rows(influxd_udp, 'SELECT * FROM "ct_acct_udp1" GROUP BY *', len(batch))
    assert len(rows) == len(batch)
    got = {int(r["conn_id"]): r for r in rows}
    for e in batch:
        row = got[e.flow_id]
        assert row["time"] == e.ts_ns
        assert (row["src_addr"], row["dst_addr"], row["dst_port"], row["src_port"], row["proto"]) == (
            e.orig.src, e.orig.dst, str(e.orig.dport), str(e.orig.sport), e.proto_name)
        assert (row["connmark"], row["netns"], row["customer"]) == (format(e.mark, "x"), str(e.netns),
                                                                     e.labels["customer"])
        assert (row["bytes_orig"], row["bytes_ret"], row["packets_orig"], row["packets_ret"]) == (
            e.bytes_orig, e.bytes_reply, e.packets_orig, e.packets_reply)
    counters = sink.counters()
    assert counters["lines_sent"] == len(batch) and counters["lines_oversized"] == 0
    assert counters["datagrams_sent"] >= counters["bytes_sent"] // 512    # bounded datagrams


def test_default_schema_over_udp_and_an_oversized_line_dropped(influxd_udp):
    now = time.time_ns() - 30 * 10**9
    batch = [record(i, now) for i in range(50)]
    big = record(50, now)
    big.labels = {"direction": "outbound", "note": "x" * 600}
    sink = udp_sink(influxd_udp, measurement="ct_acct_udp2", payload_size=512)
    result = sink.write([*batch, big])
    sink.close()
    assert [e.flow_id for e in result.rejected] == [big.flow_id]
    rows = wait_rows(influxd_udp, 'SELECT * FROM "ct_acct_udp2" GROUP BY *', len(batch))
    assert sorted(r["flow_id"] for r in rows) == [e.flow_id for e in batch]
    assert sum(r["bytes_orig"] for r in rows) == sum(e.bytes_orig for e in batch)
    assert sink.counters()["lines_oversized"] == 1
