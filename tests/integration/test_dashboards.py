"""The shipped Grafana dashboards show data, and the right data.

The real agent accounts the lab's router namespace (probe.netns) and writes
to a real InfluxDB 1.6 (api v1), a real VictoriaMetrics (api v2, the InfluxDB
protocol) and its own Prometheus endpoint, scraped by a real Prometheus.
Known traffic goes through the router in all four directions (the test
declares the client's IPv4 subnet and the server's IPv6 subnet local), with
NAT, TCP, UDP, ICMP, ICMPv6 and a refused connection.  Then every query of
every panel and variable of dashboards/grafana/*.json runs against its server
after Grafana's interpolation (tests/integration/grafana_macros.py), once
with every variable on All and once with each variable on a selection:
each must return data, and the traffic panels must give the byte totals that
the kernel itself reported for the test flows (conntrack -E DESTROY events
with their counters).  The duration panels count each finished flow in the
bucket of its duration_ms (stop - start of the agent's own JSON records),
whose timestamps must be the kernel's: the seconds conntrack -E prints, the
start within DURATION_TOLERANCE_S before the NEW event arrived.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.integration.grafana_macros import Interpolator, TimeRange, Variable
from tests.integration.running_agent import TEST_MODE, RunningAgent
from tests.netns import Topology
from tests.netns.conntrack import EventCapture
from tests.servers.influx import VictoriaMetrics, free_port, http

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards" / "grafana"
HOST = f"dash-{os.getpid()}"
SITE = "lab"        # a label of the agent's other than host: the dashboard's Label/Value filter
SCRAPE_MS = 1000    # the test Prometheus scrapes every second
FLOWS = 9           # the flows make_traffic() makes
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
# The duration panels' buckets, [from, to) ms, in their order (a test's own statement of them)
DURATION_BUCKETS = [("< 10 ms", 0, 10), ("10-100 ms", 10, 100), ("0.1-1 s", 100, 1000), ("1-10 s", 1000, 10_000),
                    ("10 s-1 min", 10_000, 60_000), ("1-10 min", 60_000, 600_000),
                    ("10 min-1 h", 600_000, 3_600_000), (">= 1 h", 3_600_000, math.inf)]
# conntrack -E stamps an event when it reads it, a little after the kernel sent it
DURATION_TOLERANCE_S = 0.25


class PromptVictoriaMetrics(VictoriaMetrics):
    """VictoriaMetrics answering with points of the last 30 s too (its default
    -search.latencyOffset hides them) and without its rollup cache, so a test
    sees what was just written."""

    def command(self) -> list[str]:
        return [*super().command(), "-search.latencyOffset=0s", "-search.disableCache"]


class TimedEventCapture(EventCapture):
    """conntrack -E with each event's time of arrival too (-o timestamp, in
    microseconds): a flow's NEW and DESTROY events are sent as the kernel
    stamps its start and stop, so their times measure its duration apart
    from the agent."""
    OUTPUT = EventCapture.OUTPUT + ",timestamp"


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.extend(p.get("panels", []) if p["type"] == "row" else [p])
    return [p for p in out if p["type"] != "row"]


# -- traffic ------------------------------------------------------------------

def refused_connection(topo: Topology) -> None:
    """A TCP SYN answered by a RST: conntrack's CLOSE state."""
    code = ("import socket, sys\n"
            "s = socket.socket(); s.settimeout(5)\n"
            "try:\n    s.connect((sys.argv[1], 9))\nexcept ConnectionRefusedError:\n    print('refused')\n")
    out = topo.run("client", sys.executable, "-c", code, topo.addr("server", 4)).stdout
    assert "refused" in out


SLOW_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("READY", flush=True)
c, _ = s.accept()
while c.recv(65536):
    pass
c.close()
"""
SLOW_CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
for _ in range(4):
    c.sendall(b"x" * 1000); time.sleep(0.8)
c.close()
"""


def slow_connection(topo: Topology) -> str:
    """A TCP connection open for ~3 s: records of it in ESTABLISHED.  Its
    remote host label (the server's address and port) is returned: of all the
    hosts, its counter is sure to grow between scrapes."""
    port, dst = topo.next_port(), topo.addr("server", 4)
    server = topo.popen("server", sys.executable, "-c", SLOW_SERVER, dst, str(port),
                        stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "READY"
    topo.run("client", sys.executable, "-c", SLOW_CLIENT, dst, str(port))
    server.wait(10)
    return f"{dst}:{port}"


def make_traffic(topo: Topology) -> str:
    """FLOWS flows in four directions (see local_addresses in the agent config);
    the slow connection's host label."""
    for n, reply in ((10_000, 500), (200_000, 1_000), (1_000_000, 500)):
        topo.tcp_transfer(n, reply_bytes=reply)                 # outbound, SNAT
    topo.tcp_transfer(300_000, reply_bytes=2_000, family=6)     # inbound (server v6 is "local"), SNAT
    topo.udp_exchange(3, 100)                                   # outbound
    topo.ping(3, target=topo.addr("router_client", 4))          # local: client v4 to the router
    topo.ping(3, family=6, target=topo.addr("router_client", 6))   # forward: neither end local
    refused_connection(topo)                                    # TCP CLOSE
    return slow_connection(topo)                                # TCP ESTABLISHED for a while


# -- the running lab, shared by the tests of this module ----------------------

class Lab:
    def __init__(self, topo, agent, influxd, db, vm, prom, kernel_flows, start_ms):
        self.topo, self.agent, self.influxd, self.db, self.vm, self.prom = topo, agent, influxd, db, vm, prom
        self.kernel_flows = kernel_flows
        self.kernel_new: list[dict] = []
        self.kernel_bytes = sum(f["orig"]["bytes"] + f["reply"]["bytes"] for f in kernel_flows)
        self.start_ms = start_ms

    def time_range(self) -> TimeRange:
        # From before the first flow to a little after now (the last range
        # query step must reach past the last point: VictoriaMetrics aligns
        # steps to their size).
        return TimeRange(self.start_ms - 60_000, int(time.time() * 1000) + 30_000)


@pytest.fixture(scope="module")
def bpf_stats():
    """kernel.bpf_stats_enabled=1 while the module runs (the BPF run-time panel), then as it was."""
    before = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1")
    try:
        yield
    finally:
        BPF_STATS.write_text(before)


@pytest.fixture(scope="module")
def lab(influxd, prometheus_server, bpf_stats):
    db = f"dash_{os.getpid()}"
    influxd.create_database(db)
    vm = PromptVictoriaMetrics()
    vm.start()
    prom_port = free_port()
    try:
        with Topology() as topo:
            config = {
                "probe": {"mode": TEST_MODE, "netns": topo.ns_path("router"),
                          "rate_curve": [{"below": "3s", "every": "1s"}, {"then": "2s"}]},
                "enrich": {"labels": {"host": HOST, "site": SITE},
                           "local_addresses": ["192.0.2.0/24", "2001:db8:2::/64"]},
                "sinks": [
                    {"type": "stdout", "format": "json", "flush_interval": "100ms"},
                    {"type": "influxdb", "name": "influx", "url": influxd.url, "api": "v1", "database": db,
                     "flush_interval": "200ms"},
                    {"type": "influxdb", "name": "victoria", "url": vm.url, "bucket": "flows",
                     "flush_interval": "200ms"},
                    {"type": "prometheus", "listen": f"127.0.0.1:{prom_port}"},
                    # a sink that cannot write, so the drop panels have something to show
                    {"type": "influxdb", "name": "dead", "url": "http://127.0.0.1:9", "api": "v1",
                     "database": "x", "timeout": "1s", "retry": {"max_attempts": 1}},
                ],
                "shutdown": {"drain_timeout": "3s"},
            }
            agent = RunningAgent(topo, ns=None, config=config)
            try:
                prom_target = f"127.0.0.1:{prom_port}"
                prometheus_server.scrape(prom_target)
                # Prometheus applies a new target up to 5 s later: traffic
                # before its first scrape would be one sample per series
                start_ms = int(time.time() * 1000)
                prometheus_server.scrapes_after(prom_target, start_ms / 1000)
                with TimedEventCapture(topo, "router", ("NEW", "DESTROY")).start() as cap:
                    slow_host = make_traffic(topo)
                    cap.wait_for(lambda f: f["event"] == "DESTROY", count=FLOWS, timeout=30)
                    topo.wait_conntrack_empty()
                kernel_flows = [f for f in cap.events if f["event"] == "DESTROY"]
                assert len(kernel_flows) == FLOWS, [f["line"] for f in kernel_flows]
                lab = Lab(topo, agent, influxd, db, vm, prometheus_server, kernel_flows, start_ms)
                lab.kernel_new = [f for f in cap.events if f["event"] == "NEW"]
                lab.prom_target, lab.slow_host = prom_target, slow_host
                wait_until_stored(lab)
                yield lab
            finally:
                assert agent.stop() == 0
    finally:
        vm.destroy()
        influxd.drop_database(db)


def is_sentinel(record: dict) -> bool:
    return record["orig"]["src"] == EventCapture.SENTINEL_SRC


def wait_until_stored(lab: Lab, timeout: float = 30) -> None:
    """Every sink has every flow's last record.  The flows are the test's
    and the entries `conntrack -E`'s capture inserts to synchronise (no
    packets, no bytes: they count as flows, not as traffic)."""
    destroys = lambda rs: [r for r in rs if r["kind"] == "destroy"]   # noqa: E731
    records = lab.agent.wait_for_records(lambda rs: sum(not is_sentinel(r) for r in destroys(rs)) >= FLOWS)
    time.sleep(1)   # the closing sentinel
    lab.flows = len(destroys(lab.agent.records()))
    assert lab.flows - sum(map(is_sentinel, destroys(records))) >= FLOWS
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished = lab.influxd.rows('SELECT count("flow_id") FROM "ct_acct" WHERE "finished" = true', lab.db)
        if finished and finished[0]["count"] >= lab.flows:
            break
        time.sleep(0.2)
    lab.vm.export('{__name__="ct_acct_finished"}',
                  until=lambda s: sum(sum(x["values"]) for x in s) >= lab.flows, timeout=timeout)
    lab.prom.wait_for(f'sum(conntrack_flow_bytes_total{{instance="{lab.prom_target}"}})',
                      {(): float(lab.kernel_bytes)}, timeout=timeout)


# -- running a dashboard's queries --------------------------------------------

def influx_frames(lab: Lab, query: str) -> list[dict]:
    """The series of an InfluxQL query: [{"tags", "columns", "values"}]."""
    results = lab.influxd.query(query, lab.db)
    return [s for r in results for s in r.get("series", [])]


def prom_api(url: str, endpoint: str, **params) -> dict:
    status, body = http("GET", f"{url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}")
    data = json.loads(body)
    assert status == 200 and data.get("status") == "success", f"{endpoint} {params}: {status} {body[:500]!r}"
    return data["data"]


def prom_frames(url: str, target: dict, query: str, interval_ms: int, tr: TimeRange) -> list[dict]:
    """A panel target as Grafana's Prometheus data source runs it."""
    if target.get("instant"):
        data = prom_api(url, "query", query=query, time=f"{tr.to_ms / 1000:.3f}")
        rows = {id(r): [r["value"]] for r in data["result"]}
    else:
        data = prom_api(url, "query_range", query=query, start=f"{tr.from_ms / 1000:.3f}",
                        end=f"{tr.to_ms / 1000:.3f}", step=f"{interval_ms / 1000:g}")
        rows = {id(r): r["values"] for r in data["result"]}
    return [{"tags": r["metric"], "values": [[t, float(v)] for t, v in rows[id(r)]]} for r in data["result"]]


def numbers(frames: list[dict]) -> list[float]:
    """Every value of the frames but times, as floats (None/NaN left out)."""
    out = []
    for f in frames:
        for row in f["values"]:
            for v in row[1:]:
                # numbers only: tag values such as ports come as strings
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                    out.append(float(v))
    return out


def label_values(url: str, query: str, tr: TimeRange) -> list[str]:
    """Grafana's label_values(metric{...}, label), as the Prometheus data source asks for it."""
    inner = query[len("label_values("):-1]
    metric, _, label = inner.rpartition(",")
    return prom_api(url, f"label/{label.strip()}/values", **{"match[]": metric.strip(),
                    "start": str(tr.from_ms // 1000), "end": str(tr.to_ms // 1000)})


def variable_options(lab: Lab, kind: str, url: str, dashboard: dict, interp: Interpolator,
                     tr: TimeRange, selections: dict) -> dict[str, list[str]]:
    """Run every variable's own query (after the variables before it, as
    selected: a single-value variable left alone takes its first option, as
    in Grafana) and keep its options."""
    options = {}
    for v in dashboard["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = interp.variables_replaced(v["query"], selections)
        if kind == "influxdb":
            frames = influx_frames(lab, query)
            values = [row[-1] for f in frames for row in f["values"]]
        else:
            values = label_values(url, query, tr)
        regex = v.get("regex")
        if regex:
            pattern = re.compile(regex.strip("/"))
            values = [x for x in values if pattern.search(x)]
        interp.variables[v["name"]].options = values
        options[v["name"]] = values
    return options


def run_dashboard(lab: Lab, name: str, kind: str, url: str, selections: dict[str, list[str] | str],
                  scrape_ms: int = SCRAPE_MS) -> dict[str, list[tuple[dict, list[dict], int]]]:
    """Panel title -> [(target, frames, interval ms)] for every target of every panel."""
    dashboard = load(name)
    tr = lab.time_range()
    variables = [Variable.from_json(v) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    interp = Interpolator(kind, variables, tr, scrape_interval_ms=scrape_ms)
    options = variable_options(lab, kind, url, dashboard, interp, tr, selections)
    out: dict[str, list] = {}
    for panel in panels(dashboard):
        for target in panel["targets"]:
            text = target["query"] if kind == "influxdb" else target["expr"]
            query, interval = interp.query(text, panel.get("interval"), selections)
            frames = influx_frames(lab, query) if kind == "influxdb" else prom_frames(url, target, query,
                                                                                      interval, tr)
            out.setdefault(panel["title"], []).append((target, frames, interval, query))
    out["__options__"] = options
    return out


def assert_all_show_data(results: dict, may_be_zero: set[str] = frozenset()) -> None:
    empty = []
    for title, targets in results.items():
        if title == "__options__":
            continue
        for target, frames, _interval, query in targets:
            values = numbers(frames)
            label = f"{title} [{target.get('alias') or target.get('legendFormat') or target['refId']}]"
            if not values:
                empty.append(f"{label}: no data from {query}")
            elif label.split(" [")[0] not in may_be_zero and label not in may_be_zero and not any(values):
                empty.append(f"{label}: only zeros from {query}")
    assert not empty, "\n".join(empty)


def integral(frames: list[dict], interval_ms: int) -> float:
    """Sum of per-second values times the bucket length: what a rate panel adds up to."""
    return sum(numbers(frames)) * interval_ms / 1000


def only(results: dict, title: str) -> tuple[dict, list[dict], int, str]:
    [entry] = results[title]
    return entry


def kernel_key(flow: dict) -> tuple:
    """A conntrack -E flow's original tuple, as record_key() makes it."""
    o = flow["orig"]
    return flow["proto"], o["src"], o["dst"], o.get("sport"), o.get("dport"), o.get("id")


def record_key(record: dict) -> tuple:
    o, ports = record["orig"], record["protocol"] in ("tcp", "udp")
    return (record["protocol"], o["src"], o["dst"], o["sport"] if ports else None, o["dport"] if ports else None,
            record["icmp"]["id"] if "icmp" in record else None)


def finished_durations_ms(lab: Lab) -> list[int]:
    """stop - start in whole ms of every flow the agent saw end (the sentinels
    too), after checking the test flows' against the kernel's timestamps:
    start and stop in the seconds conntrack -E prints, the start just before
    the NEW event arrived, the stop not after the DESTROY event (the kernel
    dates an expired flow's stop back to its expiry: the event comes when the
    entry is reaped)."""
    destroys = [r for r in lab.agent.records() if r["kind"] == "destroy"]
    by_key = {record_key(r): r for r in destroys if not is_sentinel(r)}
    new_at = {f["id"]: f["event_time"] for f in lab.kernel_new}
    for f in lab.kernel_flows:
        r = by_key[kernel_key(f)]
        start, stop = r["start_ns"], r["stop_ns"]
        assert start and stop, r   # the agent turns nf_conntrack_timestamp on
        assert (start // 10**9, stop // 10**9) == (int(f["start"]), int(f["stop"])), (f["line"], r)
        assert 0 <= new_at[f["id"]] - start / 1e9 <= DURATION_TOLERANCE_S, (new_at[f["id"]], f["line"], r)
        assert stop / 1e9 <= f["event_time"] + 1e-6, (f["line"], r)   # event times are in microseconds
    return [(r["stop_ns"] - r["start_ns"]) // 10**6 for r in destroys if r["start_ns"] and r["stop_ns"]]


def duration_buckets(durations_ms: list[int]) -> dict[str, int]:
    return {name: sum(low <= d < high for d in durations_ms) for name, low, high in DURATION_BUCKETS}


# -- InfluxDB -----------------------------------------------------------------

INFLUX_SELECTIONS = [
    {},   # every variable on All
    {"host": [HOST], "direction": ["outbound", "inbound", "forward", "local"],
     "protocol": ["tcp", "udp", "icmp", "icmpv6"], "label": "site", "label_value": [SITE]},
]


@pytest.mark.parametrize("selections", INFLUX_SELECTIONS, ids=["all", "selected"])
def test_influxdb_dashboard(lab, selections):
    results = run_dashboard(lab, "conntracct-influxdb.json", "influxdb", lab.influxd.url, selections)
    options = results["__options__"]
    assert HOST in options["host"]
    assert set(options["direction"]) == {"inbound", "outbound", "forward", "local"}
    assert {"tcp", "udp", "icmp", "icmpv6"} <= set(options["protocol"])
    assert options["label"] == ["site"]   # the agent's labels but host, not the schema's tags
    assert options["label_value"] == [SITE]
    assert_all_show_data(results)
    total = lab.kernel_bytes

    _, frames, interval, _ = only(results, "Bandwidth by direction")
    assert {f["tags"]["direction"] for f in frames} == {"inbound", "outbound", "forward", "local"}
    assert integral(frames, interval) == pytest.approx(total, rel=1e-9)
    assert numbers(only(results, "Traffic in range")[1]) == [total]
    servers = sum(numbers(only(results, "Top talkers: remote servers")[1]))
    clients = sum(numbers(only(results, "Top talkers: remote clients")[1]))
    assert servers + clients == total
    inbound = [f for f in lab.kernel_flows if f["family"] == "ipv6" and f["proto"] == "tcp"]
    assert clients == sum(f["orig"]["bytes"] + f["reply"]["bytes"] for f in inbound)
    assert sum(numbers(only(results, "Top conversations")[1])) == total

    _, frames, interval, _ = only(results, "New flows per second by protocol")
    assert integral(frames, interval) == pytest.approx(FLOWS)   # the sentinels have no packets
    _, frames, interval, _ = only(results, "Finished flows per second by protocol")
    assert integral(frames, interval) == pytest.approx(lab.flows)
    by_bucket = {t["alias"]: sum(numbers(f)) for t, f, _, _ in results["TCP state mix"]}
    assert by_bucket["opening"] >= 5 and by_bucket["closing"] >= 5
    assert by_bucket["open"] >= 1 and by_bucket["closed"] >= 1
    sizes = sorted(x for x in numbers(only(results, "Finished flows by size")[1]) if x)   # sentinels: 0
    assert sizes == sorted(f["orig"]["bytes"] + f["reply"]["bytes"] for f in lab.kernel_flows)
    [frame] = only(results, "Finished flows by duration")[1]
    [row] = frame["values"]
    durations = finished_durations_ms(lab)
    assert len(durations) == lab.flows
    assert dict(zip(frame["columns"][1:], row[1:], strict=True)) == duration_buckets(durations)
    # NAT: the masqueraded flows (every TCP/UDP/ICMP flow to the server side) with the router's address
    replied_to = {f["tags"]["reply_dst"] for f in only(results, "NAT translations")[1]}
    assert replied_to == {lab.topo.addr("router_server", 4), lab.topo.addr("router_server", 6)}


# -- VictoriaMetrics ----------------------------------------------------------

@pytest.mark.parametrize("selections", INFLUX_SELECTIONS[:1] + [{"host": [HOST], "protocol": ["tcp", "udp", "icmp",
                                                                                            "icmpv6"]}],
                         ids=["all", "selected"])
def test_victoriametrics_dashboard(lab, selections):
    results = run_dashboard(lab, "conntracct-victoriametrics.json", "prometheus", lab.vm.url, selections,
                            scrape_ms=1000)
    assert HOST in results["__options__"]["host"]
    by_duration = duration_buckets(finished_durations_ms(lab))
    assert_all_show_data(results, {f"Finished flows by duration [{name}]" for name, n in by_duration.items() if not n})
    assert {t["legendFormat"]: numbers(f) for t, f, _, _ in results["Finished flows by duration"]} == \
        {name: [n] for name, n in by_duration.items()}
    total = lab.kernel_bytes
    frames = [f for _, fs, _, _ in results["Bandwidth by direction"] for f in fs]
    interval = results["Bandwidth by direction"][0][2]
    assert {f["tags"]["direction"] for f in frames} == {"inbound", "outbound", "forward", "local"}
    assert integral(frames, interval) == pytest.approx(total, rel=1e-9)
    assert numbers(only(results, "Traffic in range")[1]) == [total]
    servers = sum(numbers(only(results, "Top talkers: remote servers")[1]))
    clients = sum(numbers(only(results, "Top talkers: remote clients")[1]))
    assert servers + clients == total
    assert sum(numbers(only(results, "Top conversations")[1])) == total
    _, frames, interval, _ = only(results, "Traffic by protocol")
    assert integral(frames, interval) == pytest.approx(total, rel=1e-9)
    _, frames, interval, _ = only(results, "Finished flows per second by protocol")
    assert integral(frames, interval) == pytest.approx(lab.flows)


# -- Prometheus ---------------------------------------------------------------

def sentinel_hosts(lab: Lab) -> set[str]:
    """The host labels of the entries the conntrack -E capture inserts (no traffic)."""
    return {f"{r['reply']['src']}:{r['reply']['sport']}" for r in lab.agent.records() if is_sentinel(r)}


def kernel_bytes_by_remote_host(flows: list[dict]) -> dict[str, int]:
    """The Prometheus sink's host label of each test flow (docs/prometheus.md: an inbound flow's
    source with its service port, else the reply's source and port), with the kernel's bytes.
    Inbound here: the IPv6 TCP flow (the server's IPv6 subnet is "local")."""
    out: dict[str, int] = {}
    for f in flows:
        inbound = f["family"] == "ipv6" and f["proto"] == "tcp"
        addr, port = (f["orig"]["src"], f["orig"].get("dport")) if inbound else (f["reply"]["src"],
                                                                                f["reply"].get("sport"))
        host = addr if port is None else (f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}")
        out[host] = out.get(host, 0) + f["orig"]["bytes"] + f["reply"]["bytes"]
    return out


@pytest.mark.parametrize("one_host", [False, True], ids=["all", "selected"])
def test_prometheus_dashboard(lab, one_host):
    # This agent's target (the session's Prometheus may hold earlier tests' agents too)
    selections: dict = {"instance": [lab.prom_target]}
    if one_host:   # a real remote host, whose traffic spanned scrapes
        selections["host"] = [lab.slow_host]
    results = run_dashboard(lab, "conntracct-prometheus.json", "prometheus", lab.prom.url, selections)
    options = results["__options__"]
    assert len(options["instance"]) >= 1 and {"other", lab.slow_host} <= set(options["host"])
    zero_ok = {"Records lost", "Sink queue use", "Flow-state map use [{{instance}} untracked/s]", "Untracked packets",
               "Connections by state", "Open connections per remote host", "Connections per remote host"}
    assert_all_show_data(results, zero_ok)
    if not one_host:
        assert numbers(only(results, "Bytes counted")[1]) == [lab.kernel_bytes]
        expected = kernel_bytes_by_remote_host(lab.kernel_flows)
        counted = {f["tags"]["host"]: numbers([f])[0] for f in only(results,
                                                                   "Top remote hosts since the agent started")[1]}
        assert {host: value for host, value in counted.items() if value} == expected   # not: other, sentinels
        # increase() extrapolates to the range's ends and misses a series' first sample (a host whose
        # whole traffic fell between two scrapes shows 0: here the 1 MB transfer, done in well under
        # a second): only real hosts, and some traffic
        in_range = {f["tags"]["host"]: numbers([f])[0] for f in only(results, "Top remote hosts")[1]}
        assert set(in_range) - {"other"} <= set(expected) | sentinel_hosts(lab) and any(in_range.values())
    # the lab's router tracks both families (its nft rules use ct state)
    tracking = {f["tags"]["family"]: numbers([f]) for f in only(results, "Conntrack tracking")[1]}
    assert tracking == {"ipv4": [1.0], "ipv6": [1.0]}
    drops = only(results, "Sink drops by reason")[1]
    assert {f["tags"]["sink"] for f in drops if any(numbers([f]))} == {"dead"}
    run_time = numbers(only(results, "BPF run time per packet")[1])
    assert run_time and max(run_time) < 1e-3   # seconds per run: microseconds at most
