"""prometheus sink: config, remote host, the connection-state machine, traffic
counters, the cardinality cap, ignore CIDRs and the agent's own metrics.

Metrics are checked as Prometheus reads them: rendered in the text exposition
format and parsed back with prometheus_client.parser."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sample_flows import flow

from conntracct import __version__
from conntracct.config import ConfigError, parse_config
from conntracct.configtypes import parse_network
from conntracct.flow import DESTROY, FLAG_NO_ACCT, NEW, TCP_STATES, UPDATE
from conntracct.sinks.prometheus import (
    BUCKETS,
    AgentCollector,
    FlowCollector,
    FlowTable,
    parse_listen,
)

GAUGES = [f"conntrack_{b}_connections" for b in BUCKETS]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def render(*collectors) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of the exposition text."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(table: FlowTable) -> dict[tuple[str, tuple], float]:
    return render(FlowCollector(table, "prometheus"))


def states(table: FlowTable, host: str) -> list[float | None]:
    """Live flows of `host` per bucket: opening, open, closing, closed."""
    metrics = scrape(table)
    return [metrics.get((g, (("host", host),))) for g in GAUGES]


def traffic(table: FlowTable, host: str) -> tuple | None:
    """(bytes orig, bytes reply, packets orig, packets reply) of `host`, None if it has no series."""
    m = scrape(table)
    keys = [(f"conntrack_flow_{unit}_total", (("direction", d), ("host", host)))
            for unit in ("bytes", "packets") for d in ("orig", "reply")]
    if keys[0] not in m:
        return None
    return tuple(m[k] for k in keys)


def out(flow_id: int, dst: str = "198.51.100.2", dport: int = 80, kind: str = NEW, tcp_state: int = 3,
        totals: tuple[int, int, int, int] = (180, 120, 3, 2), **fields):
    """An outbound TCP flow 192.0.2.2:40000 -> dst:dport with (bytes o/r, packets o/r) totals."""
    bo, br, po, pr = totals
    return flow(kind, orig=("192.0.2.2", dst, 40000 + flow_id % 20000, dport), flow_id=flow_id,
                tcp_state=tcp_state, bytes_orig=bo, bytes_reply=br, packets_orig=po, packets_reply=pr,
                labels={"direction": "outbound"}, **fields)


# -- config --------------------------------------------------------------------

def test_defaults():
    sink = parse_config("sinks: [{type: prometheus}]").sinks[0]
    assert (sink.name, sink.listen, sink.path, sink.max_hosts, sink.ignore, sink.host_ports) == (
        "prometheus", "127.0.0.1:9318", "/metrics", 1000, [], True)
    assert sink.kinds == frozenset({"new", "update", "destroy"}) and sink.rebalance_interval == 60


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9318", ("127.0.0.1", 9318)), ("[::1]:9318", ("::1", 9318)),
    ("0.0.0.0:0", ("0.0.0.0", 0)), ("localhost:9100", ("localhost", 9100)), ("[::]:9318", ("::", 9318))])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


def config_error(yaml_text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml_text, "test.yml")
    return str(info.value)


@pytest.mark.parametrize(("listen", "message"), [
    ("9318", "expected host:port such as 127.0.0.1:9318"),
    ("::1:9318", "(IPv6 addresses in brackets)"),
    ("[fe80::zz]:9318", "expected an IPv6 address between the brackets"),
    ("127.0.0.1:70000", "expected a port from 0 to 65535")])
def test_bad_listen_names_key_and_value(listen, message):
    error = config_error(f"sinks: [{{type: prometheus, listen: '{listen}'}}]")
    assert error.startswith("test.yml:1: sinks[0].listen: ") and message in error and f"(got '{listen}')" in error


def test_bad_values_are_reported_with_their_keys():
    assert "sinks[0].path: expected a URL path such as /metrics" in config_error(
        "sinks: [{type: prometheus, path: metrics}]")
    assert "sinks[0].max_hosts: expected a number >= 0 (got -1)" in config_error(
        "sinks: [{type: prometheus, max_hosts: -1}]")
    assert "sinks[0].ignore[0]: expected a CIDR" in config_error("sinks: [{type: prometheus, ignore: [10.0.0.0/99]}]")
    assert "sinks[0].kinds: expected destroy among the kinds" in config_error(
        "sinks: [{type: prometheus, kinds: [new, update]}]")
    assert "sinks[0].host_port: unknown key (did you mean 'host_ports'?)" in config_error(
        "sinks: [{type: prometheus, host_port: false}]")


# -- the remote host -----------------------------------------------------------

@pytest.mark.parametrize(("event", "host_ports", "label"), [
    (out(1), True, "198.51.100.2:80"),
    (out(1), False, "198.51.100.2"),
    # inbound: the client's address, with the port it connected to (not its ephemeral one)
    (flow(orig=("203.0.113.9", "192.0.2.1", 51515, 443), labels={"direction": "inbound"}), True, "203.0.113.9:443"),
    # forward with DNAT (a port forward): where the flow really ends
    (flow(orig=("203.0.113.9", "192.0.2.1", 51515, 8080), reply=("10.0.0.5", "203.0.113.9", 80, 51515),
          labels={"direction": "forward"}), True, "10.0.0.5:80"),
    (flow(orig=("2001:db8::2", "2001:db8::5", 40000, 443), labels={"direction": "outbound"}), True,
     "[2001:db8::5]:443"),
    (flow(orig=("2001:db8::2", "2001:db8::5", 40000, 443), labels={"direction": "outbound"}), False, "2001:db8::5"),
    (flow(orig=("192.0.2.2", "192.0.2.9", 0, 0), proto=1, icmp=(8, 0, 7), labels={"direction": "local"}), True,
     "192.0.2.9"),
])
def test_remote_host_label(event, host_ports, label):
    assert FlowTable(host_ports=host_ports).remote(event)[1] == label


# -- connection states ------------------------------------------------------------

EXPECTED_BUCKET = {"none": "open", "syn_sent": "opening", "syn_recv": "opening", "established": "open",
                   "fin_wait": "closing", "close_wait": "closing", "last_ack": "closing",
                   "time_wait": "closing", "close": "closed", "syn_sent2": "opening"}


@pytest.mark.parametrize("state", range(len(TCP_STATES)))
def test_each_tcp_state_maps_as_conntrack_exporter(state):
    table = FlowTable()
    table.apply([out(1, tcp_state=state)])
    counts = states(table, "198.51.100.2:80")
    assert counts == [1 if b == EXPECTED_BUCKET[TCP_STATES[state]] else 0 for b in BUCKETS]


def test_a_tcp_flow_moves_through_the_buckets_and_leaves_at_destroy():
    table, host = FlowTable(), "198.51.100.2:80"
    table.apply([out(1, tcp_state=1)])                       # syn_sent
    assert states(table, host) == [1, 0, 0, 0]
    table.apply([out(1, kind=UPDATE, tcp_state=3)])          # established
    assert states(table, host) == [0, 1, 0, 0]
    table.apply([out(2, tcp_state=2)])                       # a second flow, syn_recv
    assert states(table, host) == [1, 1, 0, 0]
    table.apply([out(1, kind=UPDATE, tcp_state=7)])          # time_wait
    assert states(table, host) == [1, 0, 1, 0]
    table.apply([out(1, kind=UPDATE, tcp_state=8)])          # close
    assert states(table, host) == [1, 0, 0, 1]
    table.apply([out(1, kind=DESTROY, tcp_state=8), out(2, kind=DESTROY, tcp_state=0)])
    assert states(table, host) == [0, 0, 0, 0]               # the host keeps its (zero) series
    assert states(table, "other") == [0, 0, 0, 0]


def test_non_tcp_flows_are_open_while_alive():
    table = FlowTable()
    udp = dict(orig=("192.0.2.2", "192.0.2.53", 5353, 53), proto=17, tcp_state=0,
               labels={"direction": "outbound"}, flow_id=7)
    table.apply([flow(NEW, **udp)])
    table.apply([flow(UPDATE, **udp)])
    assert states(table, "192.0.2.53:53") == [0, 1, 0, 0]
    table.apply([flow(DESTROY, **udp)])
    assert states(table, "192.0.2.53:53") == [0, 0, 0, 0]


def test_a_flow_first_seen_at_update_or_destroy():
    table, host = FlowTable(), "198.51.100.2:80"
    table.apply([out(1, kind=UPDATE, tcp_state=3)])   # its NEW never reached the sink
    assert states(table, host) == [0, 1, 0, 0]
    table.apply([out(2, kind=DESTROY, totals=(1000, 2000, 10, 20))])   # seen only at its end
    assert states(table, host) == [0, 1, 0, 0]
    assert traffic(table, host) == (180 + 1000, 120 + 2000, 3 + 10, 2 + 20)


# -- traffic counters ----------------------------------------------------------

def test_traffic_is_the_gain_of_each_flows_totals():
    table, host = FlowTable(), "198.51.100.2:80"
    table.apply([out(1, totals=(100, 50, 2, 1))])
    assert traffic(table, host) == (100, 50, 2, 1)
    table.apply([out(1, kind=UPDATE, totals=(300, 80, 5, 2)), out(2, totals=(10, 0, 1, 0))])
    assert traffic(table, host) == (310, 80, 6, 2)
    # an UPDATE lost on the way (queue full) costs no traffic: the next totals carry it
    table.apply([out(1, kind=DESTROY, totals=(1000, 900, 20, 19))])
    assert traffic(table, host) == (1010, 900, 21, 19)


def test_records_without_accounting_count_no_traffic():
    table, host = FlowTable(), "198.51.100.2:80"
    table.apply([out(1, totals=(0, 0, 0, 0), flags=FLAG_NO_ACCT)])
    table.apply([out(1, kind=DESTROY, totals=(0, 0, 0, 0), flags=FLAG_NO_ACCT)])
    assert traffic(table, host) == (0, 0, 0, 0)
    assert states(table, host) == [0, 0, 0, 0]


# -- ignore --------------------------------------------------------------------

def test_ignored_remote_hosts_are_left_out():
    table = FlowTable(ignore=[parse_network("198.51.100.0/24"), parse_network("2001:db8::/32")])
    table.apply([out(1), out(2, dst="203.0.113.7"),
                 flow(orig=("2001:db8::2", "2001:db8::5", 40000, 443), flow_id=3,
                      labels={"direction": "outbound"})])
    metrics = scrape(table)
    hosts = {dict(labels).get("host") for name, labels in metrics if name == "conntrack_open_connections"}
    assert hosts == {"203.0.113.7:80", "other"}
    assert metrics[("conntracct_prometheus_flows", (("sink", "prometheus"),))] == 1
    table.apply([out(1, kind=DESTROY)])   # an ignored flow's end is ignored too
    assert states(table, "203.0.113.7:80") == [0, 1, 0, 0]


# -- the cardinality cap ------------------------------------------------------------

def host_labels(table: FlowTable) -> set[str]:
    return {dict(labels)["host"] for name, labels in scrape(table) if name == "conntrack_open_connections"}


def test_hosts_past_the_cap_count_as_other():
    table = FlowTable(max_hosts=2)
    table.apply([out(1, dst="203.0.113.1"), out(2, dst="203.0.113.2"), out(3, dst="203.0.113.3"),
                 out(4, dst="203.0.113.4", tcp_state=1)])
    assert host_labels(table) == {"203.0.113.1:80", "203.0.113.2:80", "other"}
    assert states(table, "other") == [1, 1, 0, 0]
    assert traffic(table, "other") == (360, 240, 6, 4)
    assert traffic(table, "203.0.113.1:80") == (180, 120, 3, 2)


def test_zero_hosts_means_only_other():
    table = FlowTable(max_hosts=0)
    table.apply([out(1), out(2, dst="203.0.113.2")])
    assert host_labels(table) == {"other"} and states(table, "other") == [0, 2, 0, 0]


def test_rebalance_gives_places_to_the_busiest_hosts_and_counters_never_decrease():
    clock = Clock()
    table = FlowTable(max_hosts=2, rebalance_interval=60, clock=clock)
    history: dict[tuple, float] = {}

    def check_monotonic():
        """Every counter series only grows while it exists (a new series may start anywhere)."""
        metrics = scrape(table)
        for key, value in metrics.items():
            if key[0].endswith("_total") and key in history:
                assert value >= history[key], key
        for key in set(history) - set(metrics):   # a series that ended may start again from 0
            del history[key]
        history.update({k: v for k, v in metrics.items() if k[0].endswith("_total")})
        return metrics

    a, b, c = "203.0.113.1", "203.0.113.2", "203.0.113.3"
    table.apply([out(1, dst=a, totals=(100, 100, 1, 1)), out(2, dst=b, totals=(50, 50, 1, 1)),
                 out(3, dst=c, totals=(10_000, 10_000, 10, 10))])
    check_monotonic()
    assert host_labels(table) == {f"{a}:80", f"{b}:80", "other"}   # first come, first served
    assert traffic(table, "other") == (10_000, 10_000, 10, 10)

    clock.now += 61                        # c is far busier than b: it takes b's place
    metrics = check_monotonic()
    assert host_labels(table) == {f"{a}:80", f"{c}:80", "other"}
    assert metrics[("conntracct_prometheus_host_demotions_total", (("sink", "prometheus"),))] == 1
    assert traffic(table, f"{c}:80") == (0, 0, 0, 0)              # a new series: counts from now on
    assert traffic(table, "other") == (10_000, 10_000, 10, 10)     # what other counted stays
    assert states(table, "other") == [0, 1, 0, 0]                  # b's live flow is now other's
    assert states(table, f"{c}:80") == [0, 1, 0, 0]

    table.apply([out(3, dst=c, kind=UPDATE, totals=(10_500, 10_000, 15, 10)),
                 out(2, dst=b, kind=UPDATE, totals=(80, 50, 2, 1))])
    check_monotonic()
    assert traffic(table, f"{c}:80") == (500, 0, 5, 0)
    assert traffic(table, "other") == (10_030, 10_000, 11, 10)     # b's traffic after demotion

    # b's recent traffic stays below a's: a quiet interval changes nothing.
    clock.now += 61
    check_monotonic()
    assert host_labels(table) == {f"{a}:80", f"{c}:80", "other"}

    # b ends; a host with neither a place nor a live flow is forgotten at the next rebalance.
    table.apply([out(2, dst=b, kind=DESTROY, totals=(80, 50, 2, 1))])
    clock.now += 61
    check_monotonic()
    assert states(table, "other") == [0, 0, 0, 0]
    assert len(table._hosts) == 2


def test_incumbents_win_ties():
    clock = Clock()
    table = FlowTable(max_hosts=1, rebalance_interval=60, clock=clock)
    table.apply([out(1, dst="203.0.113.2"), out(2, dst="203.0.113.1")])   # same traffic, b sorts first
    clock.now += 61
    assert host_labels(table) == {"203.0.113.2:80", "other"}


def test_a_busy_host_of_short_flows_still_ranks():
    # Flows seen only at their end leave the host without a live flow; its
    # traffic still counts for the next ranking.
    clock = Clock()
    table = FlowTable(max_hosts=1, rebalance_interval=60, clock=clock)
    table.apply([out(1, dst="203.0.113.1", totals=(10, 10, 1, 1))])
    table.apply([out(n, dst="203.0.113.9", kind=DESTROY, totals=(500, 500, 2, 2)) for n in range(2, 6)])
    assert host_labels(table) == {"203.0.113.1:80", "other"}
    clock.now += 61
    assert host_labels(table) == {"203.0.113.9:80", "other"}
    assert states(table, "other") == [0, 1, 0, 0]


def test_hosts_kept_only_for_ranking_are_bounded():
    table = FlowTable(max_hosts=3)
    table.apply([out(n, dst=f"203.0.{n // 250}.{n % 250}", kind=DESTROY) for n in range(1000)])
    assert len(table._hosts) <= 3 + 3
    assert traffic(table, "other") == (997 * 180, 997 * 120, 997 * 3, 997 * 2)


# -- the agent's own metrics ---------------------------------------------------

SNAPSHOT = {
    "sinks": {
        "prometheus": {"received": 10, "emitted": 9, "dropped": 1, "batches_sent": 3, "batches_failed": 0,
                       "retries": 0, "queue_depth": 0, "queue_capacity": 10000,
                       "dropped_by": {"queue_full": {"new": 1, "update": 0, "destroy": 0}}},
        "influxdb": {"received": 20, "emitted": 12, "dropped": 2, "batches_sent": 2, "batches_failed": 1,
                     "retries": 4, "queue_depth": 6, "queue_capacity": 500,
                     "dropped_by": {"retries_exhausted": {"new": 0, "update": 1, "destroy": 1}}},
    },
    "stages": {"enrich": {"ignored": 5}},
    "probe": {"received_new": 7, "received_update": 11, "received_destroy": 5, "decode_errors": 0,
              "ctnetlink_overruns": 2, "ends_unseen": 1, "flows_without_end_events": 3, "state_deletes": 4,
              "probe_records_lost": 8, "probe_state_full": 1, "probe_state_inserts": 100,
              "probe_state_deletes": 90, "mode": "netfilter", "max_flows": 262144,
              "programs": {"ct_pre_routing": {"run_cnt": 1000, "run_time_ns": 2_500_000_000}}},
}


def agent(snapshot) -> dict[tuple[str, tuple], float]:
    collector = AgentCollector()
    collector.snapshot = snapshot if callable(snapshot) else (lambda: snapshot)
    return render(collector)


def test_agent_metrics_from_a_snapshot():
    m = agent(SNAPSHOT)
    assert m[("conntracct_build_info", (("mode", "netfilter"), ("version", __version__)))] == 1
    assert [m[("conntracct_records_total", (("kind", k), ("stage", "probe")))] for k in ("new", "update", "destroy")
            ] == [7, 11, 5]
    assert m[("conntracct_stage_events_total", (("event", "ignored"), ("stage", "enrich")))] == 5
    assert m[("conntracct_probe_lost_records_total", ())] == 8
    assert m[("conntracct_ctnetlink_overruns_total", ())] == 2
    assert m[("conntracct_probe_ends_unseen_total", ())] == 1
    assert m[("conntracct_flow_state_entries", ())] == 100 - 90 - 4
    assert m[("conntracct_flow_state_capacity", ())] == 262144
    assert m[("conntracct_flow_state_full_total", ())] == 1
    assert m[("conntracct_flows_without_end_events", ())] == 3
    assert m[("conntracct_bpf_program_runs_total", (("program", "ct_pre_routing"),))] == 1000
    assert m[("conntracct_bpf_program_run_seconds_total", (("program", "ct_pre_routing"),))] == 2.5
    sink = (("sink", "influxdb"),)
    assert m[("conntracct_sink_records_total", (("outcome", "received"), *sink))] == 20
    assert m[("conntracct_sink_records_total", (("outcome", "emitted"), *sink))] == 12
    assert m[("conntracct_sink_dropped_total", (("kind", "destroy"), ("reason", "retries_exhausted"), *sink))] == 1
    assert m[("conntracct_sink_dropped_total", (("kind", "new"), ("reason", "queue_full"),
                                                ("sink", "prometheus")))] == 1
    assert m[("conntracct_sink_queue_depth", sink)] == 6
    assert m[("conntracct_sink_queue_capacity", sink)] == 500
    assert m[("conntracct_sink_batches_total", (("outcome", "sent"), *sink))] == 2
    assert m[("conntracct_sink_batches_total", (("outcome", "failed"), *sink))] == 1
    assert m[("conntracct_sink_retries_total", sink)] == 4


def test_missing_keys_leave_their_metrics_out():
    m = agent({"sinks": {}, "stages": {}})
    assert m == {("conntracct_build_info", (("mode", ""), ("version", __version__))): 1}
    m = agent({"probe": {"received_new": 1, "mode": "kprobe"}})   # no programs, no ctnetlink, ...
    assert set(m) == {("conntracct_build_info", (("mode", "kprobe"), ("version", __version__))),
                      ("conntracct_records_total", (("kind", "new"), ("stage", "probe")))}


def test_a_failing_snapshot_costs_only_the_agent_metrics():
    def broken():
        raise RuntimeError("probe gone")

    collector = AgentCollector()
    collector.snapshot = broken
    table = FlowTable()
    table.apply([out(1)])
    m = render(FlowCollector(table, "prometheus"), collector)
    assert m[("conntrack_open_connections", (("host", "198.51.100.2:80"),))] == 1
    assert ("conntracct_build_info", (("mode", ""), ("version", __version__))) in m


def test_exposition_types_are_gauges_and_counters():
    table = FlowTable()
    table.apply([out(1)])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlowCollector(table, "prometheus"))
    registry.register(AgentCollector())
    types = {f.name: f.type for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {n: types[n] for n in GAUGES} == dict.fromkeys(GAUGES, "gauge")
    assert types["conntrack_flow_bytes"] == types["conntrack_flow_packets"] == "counter"


def test_without_accounting_hosts_rank_by_live_flows():
    clock = Clock()
    table = FlowTable(max_hosts=1, rebalance_interval=60, clock=clock)
    none = dict(totals=(0, 0, 0, 0), flags=FLAG_NO_ACCT)
    table.apply([out(1, dst="203.0.113.1", **none), out(1, dst="203.0.113.1", kind=DESTROY, **none),
                 out(2, dst="203.0.113.2", **none), out(3, dst="203.0.113.2", **none)])
    assert host_labels(table) == {"203.0.113.1:80", "other"}   # first come, but idle now
    clock.now += 61
    assert host_labels(table) == {"203.0.113.2:80", "other"}
    assert states(table, "203.0.113.2:80") == [0, 2, 0, 0]
