"""The agent with every sink at once, as the full example config has them:
it accounts the router namespace (probe.netns) while its sinks write from the
host namespace to real servers on loopback — InfluxDB 1.6 (v1 API),
VictoriaMetrics (v2 API), the Elasticsearch wire double, its own Prometheus
endpoint scraped by a real Prometheus — plus a dead InfluxDB URL that must
neither delay the others nor keep the agent from exiting 0 on SIGTERM."""

from __future__ import annotations

import os
import time

import pytest

from tests.integration.running_agent import RunningAgent, exit_summary
from tests.netns import Topology
from tests.servers.es_double import EsDouble
from tests.servers.influx import free_port

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]


def test_every_sink_receives_the_flows(influxd, victoria_metrics, prometheus_server):
    db = f"flows_{os.getpid()}"
    influxd.create_database(db)
    es = EsDouble().start()
    prom_port = free_port()
    sinks = [
        {"type": "stdout", "format": "json", "flush_interval": "100ms"},
        {"type": "influxdb", "name": "influx_v1", "url": influxd.url, "api": "v1", "database": db,
         "flush_interval": "200ms"},
        {"type": "influxdb", "name": "victoria", "url": victoria_metrics.url, "bucket": "flows",
         "measurement": f"ct_all_{os.getpid()}", "flush_interval": "200ms"},
        {"type": "elasticsearch", "hosts": [es.url], "flush_interval": "200ms"},
        {"type": "prometheus", "listen": f"127.0.0.1:{prom_port}"},
        {"type": "influxdb", "name": "dead", "url": "http://127.0.0.1:9", "api": "v1", "database": "x",
         "timeout": "1s", "retry": {"max_attempts": 100, "backoff": "200ms", "max_backoff": "1s"}},
    ]
    try:
        with Topology() as topo:
            agent = RunningAgent(topo, ns=None, config={
                "probe": {"mode": "netfilter", "netns": topo.ns_path("router"),
                          "rate_curve": [{"below": "3s", "every": "1s"}, {"then": "2s"}]},
                "sinks": sinks, "shutdown": {"drain_timeout": "3s"}})
            try:
                prometheus_server.scrape(f"127.0.0.1:{prom_port}")
                transfers = [topo.tcp_transfer(n, reply_bytes=500) for n in (10_000, 50_000, 1_000_000)]
                transfers.append(topo.tcp_transfer(20_000, family=6))
                topo.udp_exchange(3, 100)
                topo.ping(3)
                topo.flush()
                records = agent.wait_for_records(lambda rs: sum(r["kind"] == "destroy" for r in rs) >= 6)
                # The dead sink must not delay the others: InfluxDB has the DESTROYs already.
                destroys = [r for r in records if r["kind"] == "destroy"]
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    got = influxd.rows("SELECT count(bytes_orig) FROM ct_acct WHERE finished = true", db)
                    if got and got[0]["count"] >= len(destroys):
                        break
                    time.sleep(0.2)
                # Prometheus scraped the agent: traffic counters equal the deltas' sum.
                records = agent.records()
                total = sum(r["delta_bytes_orig"] + r["delta_bytes_reply"] for r in records)
                prometheus_server.wait_for("sum(conntrack_flow_bytes_total)", {(): float(total)})
                # ...and the agent's own metrics (queried while it runs: a gone target's series go stale).
                received = sum(r["kind"] in ("new", "destroy") for r in records)
                assert prometheus_server.query(
                    'sum(conntracct_records_total{kind=~"new|destroy"})')[()] >= received
            finally:
                started = time.monotonic()
                assert agent.stop() == 0
                assert time.monotonic() - started < 15     # drain deadline 3 s, plus compile-free exit
        assert "Traceback" not in agent.stderr

        final = {r["flow_id"]: r for r in destroys}
        assert len(final) >= 6
        # InfluxDB 1.6: one finished point per flow with the DESTROY's totals.
        rows = influxd.rows("SELECT bytes_orig, bytes_reply, flow_id FROM ct_acct WHERE finished = true", db)
        assert {format(r["flow_id"], "016x"): (r["bytes_orig"], r["bytes_reply"]) for r in rows} == {
            fid: (r["bytes_orig"], r["bytes_reply"]) for fid, r in final.items()}
        # The deltas of every point add up to the flows' final totals.
        [deltas] = influxd.rows("SELECT sum(delta_bytes_orig) FROM ct_acct", db)
        assert deltas["sum"] == sum(r["bytes_orig"] for r in final.values())
        # Elasticsearch: one ECS document per finished flow, id = flow id.
        docs = es.docs("conntracct-flows-*")
        assert {doc_id: doc["source"]["bytes"] for doc_id, doc in docs.items()} == {
            fid: r["bytes_orig"] for fid, r in final.items()}
        for fid, doc in docs.items():
            assert doc["destination"]["ip"] == final[fid]["orig"]["dst"]
        # VictoriaMetrics got the points too (a float per field).
        victoria_metrics.flush()
        exported = victoria_metrics.export(f'{{__name__="ct_all_{os.getpid()}_bytes_orig"}}',
                                           until=lambda s: sum(len(x["values"]) for x in s) >= len(records))
        assert sum(len(s["values"]) for s in exported) == len(records)
        # The dead sink's records were counted as dropped, not lost silently.
        summary = exit_summary(agent.stderr, "sink dead")
        assert summary["dropped"] > 0 and summary["emitted"] == 0
    finally:
        es.stop()
