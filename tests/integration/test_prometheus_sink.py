"""prometheus sink against a real Prometheus server scraping it on loopback.

Records go through the real pipeline (queue, worker, batches) into the sink;
Prometheus (Debian's `prometheus`, started by tests/servers/prometheus.py)
scrapes the endpoint every second, and the values are read back through its
query API.  No root needed."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

from conntracct.config import parse_config
from conntracct.flow import DESTROY, NEW, UPDATE, FlowEvent, FlowTuple
from conntracct.pipeline import Pipeline
from conntracct.selfmetrics import Stats
from conntracct.sinks import create_sink
from conntracct.sinks.base import PermanentSinkError
from conntracct.sinks.prometheus import PrometheusSink

T0 = 1_795_000_000_000_000_000
PROBE = {"received_new": 3, "received_update": 2, "received_destroy": 1, "probe_records_lost": 4,
         "probe_state_full": 0, "probe_state_inserts": 3, "probe_state_deletes": 1, "mode": "netfilter",
         "max_flows": 262144, "ctnetlink_overruns": 0,
         "programs": {"ct_local_out": {"run_cnt": 12, "run_time_ns": 3_000_000}}}


def tcp(kind: str, flow_id: int, dst: str, state: int, totals: tuple[int, int, int, int],
        direction: str = "outbound", src: str = "192.0.2.2", dport: int = 443) -> FlowEvent:
    bo, br, po, pr = totals
    orig = FlowTuple(src, dst, 40000 + flow_id, dport)
    return FlowEvent(kind=kind, flow_id=flow_id, family=6 if ":" in dst else 4, proto=6, orig=orig,
                     reply=FlowTuple(orig.dst, orig.src, orig.dport, orig.sport),
                     packets_orig=po, bytes_orig=bo, packets_reply=pr, bytes_reply=br,
                     delta_packets_orig=0, delta_bytes_orig=0, delta_packets_reply=0, delta_bytes_reply=0,
                     start_ns=T0, stop_ns=T0 + 1 if kind == DESTROY else 0, ts_ns=T0, tcp_state=state,
                     labels={"direction": direction})


@pytest.fixture
def agent():
    """The prometheus sink on a free loopback port behind a real pipeline, as the agent runs it."""
    config = parse_config("sinks:\n  - type: prometheus\n    listen: 127.0.0.1:0\n    max_hosts: 2\n"
                          "    flush_interval: 100ms\n")
    stats = Stats()
    pipeline = Pipeline.from_config(config.sinks, stats)
    sink = pipeline.workers[0].sink
    assert isinstance(sink, PrometheusSink)
    sink.observe(lambda: {**stats.snapshot(), "probe": PROBE})
    pipeline.start()
    try:
        yield pipeline, sink, stats
    finally:
        pipeline.close(5)


def written(stats: Stats, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while stats.snapshot()["sinks"]["prometheus"]["emitted"] < n:
        assert time.monotonic() < deadline, stats.snapshot()
        time.sleep(0.02)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_prometheus_scrapes_connection_states_traffic_and_agent_metrics(agent, prometheus_server):
    pipeline, sink, stats = agent
    host, port = sink.address
    target = f"{host}:{port}"
    for event in [
        tcp(NEW, 1, "198.51.100.7", 1, (60, 0, 1, 0)),                  # syn_sent
        tcp(UPDATE, 1, "198.51.100.7", 3, (1_000, 50_000, 10, 40)),     # established
        tcp(NEW, 2, "198.51.100.7", 3, (500, 700, 5, 6)),
        tcp(NEW, 3, "203.0.113.9", 2, (100, 200, 2, 3), direction="inbound", src="203.0.113.9",
            dport=22),                                                  # syn_recv, a client of ours
        tcp(NEW, 4, "198.51.100.99", 7, (10, 20, 1, 2)),                # past max_hosts: other
    ]:
        pipeline.offer(event)
    written(stats, 5)
    status, text = get(sink.url)
    assert status == 200 and 'conntrack_open_connections{host="198.51.100.7:443"} 2.0' in text
    assert get(f"http://{target}/")[0] == 404

    began = time.time()
    prometheus_server.scrape(target)
    prometheus_server.scrapes_after(target, began)
    q = prometheus_server.query
    a, b = (("host", "198.51.100.7:443"),), (("host", "203.0.113.9:22"),)
    other = (("host", "other"),)
    assert q("conntrack_open_connections") == {a: 2, b: 0, other: 0}
    assert q("conntrack_opening_connections") == {a: 0, b: 1, other: 0}
    assert q("conntrack_closing_connections") == {a: 0, b: 0, other: 1}
    assert q("conntrack_closed_connections") == {a: 0, b: 0, other: 0}
    assert q('sum by (host) (conntrack_flow_bytes_total{direction="reply"})') == {a: 50_700, b: 200, other: 20}
    assert q('sum by (host) (conntrack_flow_packets_total{direction="orig"})') == {a: 15, b: 2, other: 1}
    assert q("conntracct_build_info") == {(("mode", "netfilter"), ("version", _version())): 1}
    assert q("conntracct_sink_records_total") == {(("outcome", "emitted"), ("sink", "prometheus")): 5,
                                                  (("outcome", "received"), ("sink", "prometheus")): 5}
    assert q("conntracct_probe_lost_records_total") == {(): 4}
    assert q("conntracct_flow_state_entries") == {(): 2}
    assert q("conntracct_bpf_program_run_seconds_total") == {(("program", "ct_local_out"),): 0.003}
    assert q("conntracct_prometheus_hosts") == {(("sink", "prometheus"),): 2}

    # The flows end: the gauges empty, the counters keep what they counted and grow.
    for event in [tcp(UPDATE, 1, "198.51.100.7", 7, (1_100, 60_000, 12, 50)),
                  tcp(DESTROY, 1, "198.51.100.7", 8, (1_200, 60_000, 13, 50)),
                  tcp(DESTROY, 2, "198.51.100.7", 8, (500, 700, 5, 6)),
                  tcp(DESTROY, 4, "198.51.100.99", 8, (10, 20, 1, 2))]:
        pipeline.offer(event)
    written(stats, 9)
    began = time.time()
    prometheus_server.scrapes_after(target, began)
    assert q("conntrack_open_connections") == {a: 0, b: 0, other: 0}
    assert q("conntrack_closing_connections") == {a: 0, b: 0, other: 0}
    assert q('sum by (host) (conntrack_flow_bytes_total{direction="orig"})') == {a: 1_700, b: 100, other: 10}
    assert q('sum by (host) (conntrack_flow_bytes_total{direction="reply"})') == {a: 60_700, b: 200, other: 20}
    assert q('sum(conntracct_sink_records_total{outcome="emitted"})') == {(): 9}
    prometheus_server.scrape()


def _version() -> str:
    from conntracct import __version__
    return __version__


def test_port_in_use_is_a_clear_error_naming_sink_and_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config(f"sinks: [{{type: prometheus, name: scrape-me, listen: '127.0.0.1:{port}'}}]")
        with pytest.raises(PermanentSinkError) as info:
            create_sink(config.sinks[0])
    message = str(info.value)
    assert message.startswith(f"sink 'scrape-me' (type: prometheus): cannot listen on 127.0.0.1:{port}: ")
    assert "Address already in use" in message and "set `listen` to a free address" in message


def test_an_address_that_is_not_ours_is_a_clear_error():
    config = parse_config("sinks: [{type: prometheus, listen: '192.0.2.123:9318'}]")   # TEST-NET-1
    with pytest.raises(PermanentSinkError, match=r"^sink 'prometheus' \(type: prometheus\): cannot listen on "
                                                 r"192\.0\.2\.123:9318: Cannot assign requested address"):
        create_sink(config.sinks[0])


def test_close_stops_serving_and_frees_the_port():
    sink = create_sink(parse_config("sinks: [{type: prometheus, listen: '127.0.0.1:0', path: /m}]").sinks[0])
    host, port = sink.address
    assert get(f"http://{host}:{port}/m")[0] == 200
    assert get(f"http://{host}:{port}/metrics") == (404, "conntracct: metrics are at /m\n")
    sink.close()
    assert not sink._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()
    again = create_sink(parse_config(f"sinks: [{{type: prometheus, listen: '127.0.0.1:{port}'}}]").sinks[0])
    again.close()


def test_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    sink = create_sink(parse_config("sinks: [{type: prometheus, listen: '[::1]:0'}]").sinks[0])
    try:
        assert sink.url.startswith("http://[::1]:")
        status, text = get(sink.url)
        assert status == 200 and "conntracct_build_info" in text
    finally:
        sink.close()
