"""The disk spool through sink outages, with real servers and real traffic.

The agent accounts the NAT lab's router (probe.netns) while churn makes
thousands of short TCP flows through it; its sinks write from the host
namespace to servers on loopback.  A stdout sink (JSON lines, a large
memory queue, never down) is the record of what the agent emitted; the
kernel's own DESTROY events (`conntrack -E`) are the truth for the totals.

Outages are "several minutes" compressed: a memory queue of 300 records
fills in about a second at these rates, so each outage spools thousands of
records, as a long outage would at 3,000 flows/s with the default queue.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conntracct.sinks.records import flow_id_text
from conntracct.spool import FILE_NAME, decode
from tests.integration.running_agent import FAST_CURVE, TEST_MODE, RunningAgent, exit_summary
from tests.netns import Topology
from tests.servers.es_double import EsDouble
from tests.servers.influx import Influxd

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

RATE = 200            # flows/s: ~2 records each (NEW, DESTROY)
QUEUE = 300           # the spooled sinks' memory queue
STDOUT = {"type": "stdout", "format": "json", "queue_size": 200_000, "batch_size": 5000, "flush_interval": "100ms"}
RETRY = {"backoff": "200ms", "max_backoff": "1s"}


def config(topo: Topology, *sinks: dict) -> dict:
    return {"probe": {"mode": TEST_MODE, "netns": topo.ns_path("router"), "rate_curve": FAST_CURVE},
            "sinks": [STDOUT, *sinks], "shutdown": {"drain_timeout": "5s"}}


def influx_sink(server: Influxd, db: str, spool: Path) -> dict:
    # source_ports and flow_id_tag: a point says which flow it belongs to.
    return {"type": "influxdb", "name": "influx", "url": server.url, "api": "v1", "database": db,
            "queue_size": QUEUE, "batch_size": 100, "flush_interval": "200ms", "timeout": "2s",
            "source_ports": True, "flow_id_tag": True, "retry": RETRY,
            "spool": {"path": str(spool), "max_size": "256MiB"}}


def influxd_or_skip() -> Influxd:
    if not Influxd.available():
        pytest.skip("influxd not installed (./tasks.py setup installs it)")
    server = Influxd()
    server.start()
    return server


def churn_in_background(topo: Topology, duration: float) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(churn=topo.churn(duration=duration, rate=RATE)))
    thread.start()
    return thread, result


def kernel_totals(events: list[dict], port: int) -> Counter:
    """The kernel's final totals of each churn flow, as (sport, packets, bytes,
    reply packets, reply bytes); source ports may repeat: a multiset."""
    return Counter((e["orig"]["sport"], e["orig"]["packets"], e["orig"]["bytes"], e["reply"]["packets"],
                    e["reply"]["bytes"]) for e in events if e["proto"] == "tcp" and e["orig"]["dport"] == port)


def churn_records(agent: RunningAgent, port: int) -> list[dict]:
    return [r for r in agent.records() if r["orig"]["dport"] == port]


def influx_flows(server: Influxd, db: str, port: int) -> dict[tuple[str, int], tuple]:
    """(flow id, sport) -> (points, sum of each delta) of the churn flows in InfluxDB."""
    rows = server.rows("SELECT count(finished) AS n, sum(delta_packets_orig) AS po, sum(delta_bytes_orig) AS bo, "
                       "sum(delta_packets_reply) AS pr, sum(delta_bytes_reply) AS br FROM ct_acct "
                       f"WHERE dport = '{port}' GROUP BY flow_id, sport", db)
    return {(r["flow_id"], int(r["sport"])): (r["n"], r["po"], r["bo"], r["pr"], r["br"]) for r in rows}


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def spool_line(stderr: str, sink: str) -> dict[str, int]:
    return exit_summary(stderr, f"sink {sink}")


def test_influxdb_outage_every_record_arrives_and_deltas_add_up(tmp_path):
    server = influxd_or_skip()
    db = "flows"
    server.create_database(db)
    try:
        with Topology(acct=True, timestamp=True) as topo:
            agent = RunningAgent(topo, ns=None, config=config(topo, influx_sink(server, db, tmp_path / "spool")))
            try:
                with topo.conntrack_events() as cap:
                    thread, result = churn_in_background(topo, duration=20)
                    time.sleep(2)
                    server.stop()            # the outage: 12 s of the 20 s of churn
                    time.sleep(12)
                    server.start()
                    thread.join()
                    topo.wait_conntrack_empty(timeout=30)
                port = result["churn"].port
                kernel = kernel_totals(cap.events, port)
                assert len(kernel) >= 2000, result["churn"].summary()
                wait_until(lambda: len(churn_records(agent, port)) >= 2 * sum(kernel.values()), 60,
                           "the agent's records of every flow")
                records = churn_records(agent, port)
                wait_until(lambda: sum(v[0] for v in influx_flows(server, db, port).values()) >= len(records),
                           90, "InfluxDB to have every record")
            finally:
                assert agent.stop() == 0
        assert "Traceback" not in agent.stderr
        # Every record the agent emitted is a point, flow by flow...
        stored = influx_flows(server, db, port)
        emitted = Counter((r["flow_id"], r["orig"]["sport"]) for r in records)
        assert {key: value[0] for key, value in stored.items()} == dict(emitted)
        # ...and each flow's deltas add up to the kernel's final totals.
        assert Counter((sport, *sums) for (_, sport), (_, *sums) in stored.items()) == kernel
        summary = spool_line(agent.stderr, "influx")
        print("influx sink:", summary)
        assert summary["dropped"] == 0 and summary["spooled"] > 1000
        assert summary["replayed"] == summary["spooled"] and summary["spool_records"] == 0
    finally:
        server.destroy()


def spooled_rows(spool: Path) -> list:
    """The records a killed agent's spool file holds (its lock died with it)."""
    db = sqlite3.connect(spool / FILE_NAME)
    try:
        return [decode(body) for (body,) in db.execute("SELECT body FROM q ORDER BY id")]
    finally:
        db.close()


def test_sigkill_mid_outage_loses_nothing_spooled(tmp_path):
    server = influxd_or_skip()
    db = "flows"
    server.create_database(db)
    server.stop()                 # down from the start
    spool = tmp_path / "spool"
    try:
        with Topology(acct=True, timestamp=True) as topo:
            cfg = config(topo, influx_sink(server, db, spool))
            agent = RunningAgent(topo, ns=None, config=cfg)
            try:
                with topo.conntrack_events() as cap:
                    result = topo.churn(duration=8, rate=RATE)
                    topo.wait_conntrack_empty(timeout=30)
                port = result.port
                kernel = kernel_totals(cap.events, port)
                wait_until(lambda: len(churn_records(agent, port)) >= 2 * sum(kernel.values()), 60,
                           "the agent's records of every flow")
                time.sleep(1)             # the spool writer commits within 50 ms
            finally:
                agent.stop(signal.SIGKILL)
            spooled = spooled_rows(spool)
            assert len(spooled) > 1000
            # Per flow, how many records the spool held (a flow's NEW seen at
            # its end shares the DESTROY's nanosecond: InfluxDB gets it 1 ns later).
            wanted = Counter(flow_id_text(e.flow_id) for e in spooled)

            server.start()
            again = RunningAgent(topo, ns=None, config=cfg)
            try:
                assert f"{len(spooled)} records spooled before this start" in again.stderr
                wait_until(lambda: server.rows("SELECT count(finished) FROM ct_acct", db)
                           and server.rows("SELECT count(finished) FROM ct_acct", db)[0]["count"] >= len(spooled),
                           60, "InfluxDB to have the spooled records")
            finally:
                assert again.stop() == 0
        rows = server.rows("SELECT finished FROM ct_acct GROUP BY flow_id", db)
        points = Counter(r["flow_id"] for r in rows)
        assert wanted <= points                       # nothing spooled before the kill is lost
        times = {(r["flow_id"], r["time"]) for r in rows}
        assert all((flow_id_text(e.flow_id), e.ts_ns) in times or (flow_id_text(e.flow_id), e.ts_ns + 1) in times
                   for e in spooled)                  # with the record's own timestamp
        emitted = Counter(r["flow_id"] for r in churn_records(agent, port))
        lost = emitted - points
        print(f"spooled before SIGKILL: {len(spooled)}; emitted by the agent: {emitted.total()}; "
              f"in memory at the kill (lost, not spooled): {lost.total()}")
        assert lost.total() <= QUEUE + 200   # at most the memory queue and a writer's batch
        summary = spool_line(again.stderr, "influx")
        assert summary["replayed"] >= len(spooled) and summary["dropped"] == 0
    finally:
        server.destroy()


def recover(es: EsDouble) -> None:
    with es.lock:
        es._request_faults.clear()


def test_elasticsearch_503_outage_then_recovery(tmp_path):
    es = EsDouble().start()
    es.fail_requests(503, count=10**6)
    sink = {"type": "elasticsearch", "hosts": [es.url], "queue_size": QUEUE, "batch_size": 100,
            "flush_interval": "200ms", "retry": RETRY, "spool": {"path": str(tmp_path / "spool")}}
    try:
        with Topology(acct=True, timestamp=True) as topo:
            agent = RunningAgent(topo, ns=None, config=config(topo, sink))
            try:
                with topo.conntrack_events() as cap:
                    thread, result = churn_in_background(topo, duration=12)
                    time.sleep(10)
                    recover(es)
                    thread.join()
                    topo.wait_conntrack_empty(timeout=30)
                port = result["churn"].port
                kernel = kernel_totals(cap.events, port)
                assert len(kernel) >= 1500, result["churn"].summary()

                def docs() -> dict:
                    return {i: d for i, d in es.docs("conntracct-flows-*").items()
                            if d["destination"].get("port") == port}

                wait_until(lambda: len(docs()) >= sum(kernel.values()), 60, "a document per flow")
            finally:
                assert agent.stop() == 0
        # One document per finished flow (_id = flow id), with the kernel's totals.
        stored = Counter((d["source"]["port"], d["source"]["packets"], d["source"]["bytes"],
                          d["destination"]["packets"], d["destination"]["bytes"]) for d in docs().values())
        assert stored == kernel
        destroys = {r["flow_id"] for r in churn_records(agent, port) if r["kind"] == "destroy"}
        assert set(docs()) == destroys
        summary = spool_line(agent.stderr, "elasticsearch")
        print("elasticsearch sink:", summary)
        assert summary["dropped"] == 0 and summary["spooled"] > 1000 and summary["replayed"] == summary["spooled"]
    finally:
        es.stop()
