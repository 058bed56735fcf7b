#!/usr/bin/env python3
"""Writes the Grafana dashboards in dashboards/grafana/ and the Kibana saved
objects in dashboards/kibana/ (run after changing a panel; a unit test checks
that the committed files are what this script writes).

    .venv/bin/python dashboards/build.py

Grafana dashboards are built with grafana-foundation-sdk (Grafana's own typed
builders, schemaVersion 41); every dashboard asks for its data source on
import (`__inputs`).  The queries are in one place each, in PANELS below, so
the integration test (tests/integration/test_dashboards.py) runs exactly what
users import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import histogram as histogram_panel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dashboard_model
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    TableBarGaugeCellOptions,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from grafana_queries import InfluxQL  # noqa: E402 - beside this script
from kibana_objects import saved_objects  # noqa: E402

GRAFANA_DIR = HERE / "grafana"
KIBANA_DIR = HERE / "kibana"
MEASUREMENT = "ct_acct"   # the influxdb sink's default `measurement`

INFLUX = DataSourceRef(type_val="influxdb", uid="${DS_INFLUXDB}")
PROM = DataSourceRef(type_val="prometheus", uid="${DS_PROMETHEUS}")
VICTORIA = DataSourceRef(type_val="prometheus", uid="${DS_VICTORIAMETRICS}")

# Tag/label values that Grafana's "All" turns into ".*": a regex every value,
# and an absent tag, matches (InfluxQL compares an absent tag as "").
ALL = ".*"


# -- variables ---------------------------------------------------------------

def query_variable(name: str, label: str, query: str, ds: DataSourceRef, description: str,
                   include_all: bool = True, multi: bool = True, regex: str | None = None):
    v = (dashboard.QueryVariable(name).label(label).query(query).datasource(ds).description(description)
         .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
         .multi(multi).include_all(include_all))
    if include_all:
        v = v.all_value(ALL).current(dashboard_model.VariableOption(text="All", value="$__all", selected=True))
    if regex:
        v = v.regex(regex)
    return v


def influx_variables() -> list:
    tag_values = 'SHOW TAG VALUES FROM "%s" WITH KEY = "%%s"' % MEASUREMENT
    schema_tags = "family|protocol|src|dst|sport|dport|reply_src|reply_dst|direction|zone|netns|mark|flow_id|host"
    return [
        query_variable("host", "Host", tag_values % "host", INFLUX,
                       "The agent's `host` label (enrich.labels: {host: ...}); All also matches points without it"),
        query_variable("direction", "Direction", tag_values % "direction", INFLUX,
                       "inbound, outbound, forward or local (set by the agent's enricher)"),
        query_variable("protocol", "Protocol", tag_values % "protocol", INFLUX, "L4 protocol"),
        query_variable("label", "Label", 'SHOW TAG KEYS FROM "%s"' % MEASUREMENT, INFLUX,
                       "Any other label the agent adds (enrich.labels, range labels): pick its name here "
                       "and its values in 'Value'. With no such label this filter matches everything.",
                       include_all=False, multi=False, regex=f"/^(?!({schema_tags})$).+$/"),
        query_variable("label_value", "Value", tag_values % "$label", INFLUX,
                       "Values of the label chosen in 'Label'"),
    ]


def prom_regex_variables(ds: DataSourceRef, metric: str, names: list[tuple[str, str, str]]) -> list:
    return [query_variable(name, label, f"label_values({metric}, {name})", ds, description)
            for name, label, description in names]


# -- panels ------------------------------------------------------------------

def _finished(panel, targets: list, w: int, h: int):
    """The panel with its queries, at its size."""
    for target in targets:
        panel = panel.with_target(target)
    return panel.span(w).height(h)


def time_series(title: str, description: str, unit: str, targets: list, ds: DataSourceRef,
                w: int = 12, h: int = 8, stacked: bool = False, interval: str | None = None):
    p = (timeseries.Panel().title(title).description(description).datasource(ds).unit(unit)
         .fill_opacity(20 if stacked else 8).line_width(1)
         .legend(common.VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.TABLE)
                 .placement(LegendPlacement.BOTTOM).calcs(["mean", "max"])))
    if stacked:
        p = p.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
    if interval:
        p = p.interval(interval)
    return _finished(p, targets, w, h)


def table_panel(title: str, description: str, unit: str, targets: list, ds: DataSourceRef,
                sort_field: str, w: int = 12, h: int = 9, gauge_field: str | None = None):
    p = (table.Panel().title(title).description(description).datasource(ds).unit(unit)
         .sort_by([common.TableSortByFieldState().display_name(sort_field).desc(True)]))
    if gauge_field:
        p = p.override_by_name(gauge_field, [dashboard_model.DynamicConfigValue(
            id_val="custom.cellOptions",
            value=TableBarGaugeCellOptions(mode=BarGaugeDisplayMode.GRADIENT))])
    return _finished(p, targets, w, h)


def stat_panel(title: str, description: str, unit: str, targets: list, ds: DataSourceRef, w: int = 6, h: int = 4):
    p = stat.Panel().title(title).description(description).datasource(ds).unit(unit)
    return _finished(p, targets, w, h)


def bar_gauge(title: str, description: str, unit: str, targets: list, ds: DataSourceRef, w: int = 12, h: int = 8):
    """Horizontal bars, one per field or series, each its last value; one colour per bar
    (the default thresholds would paint counts above 80 red)."""
    p = (bargauge.Panel().title(title).description(description).datasource(ds).unit(unit)
         .display_mode(BarGaugeDisplayMode.GRADIENT).orientation(VizOrientation.HORIZONTAL)
         .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .color_scheme(dashboard.FieldColor().mode(dashboard_model.FieldColorModeId.PALETTE_CLASSIC)))
    return _finished(p, targets, w, h)


def histogram(title: str, description: str, unit: str, targets: list, ds: DataSourceRef, w: int = 12, h: int = 8):
    p = histogram_panel.Panel().title(title).description(description).datasource(ds).unit(unit)
    return _finished(p, targets, w, h)


def promql(expr: str, legend: str = "", ref: str = "A", instant: bool = False, table_format: bool = False,
           ds: DataSourceRef = PROM):
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(ds)
    q = q.instant() if instant else q.range()
    if legend:
        q = q.legend_format(legend)
    if table_format:
        q = q.format(PromQueryFormat.TABLE)
    return q


# -- InfluxDB (InfluxQL) -----------------------------------------------------

# Every InfluxQL panel filters on the template variables.  Variables are
# regexes: Grafana writes a multi-value selection as (a|b), All as ".*".
INFLUX_FILTER = ('"host" =~ /^$host$/ AND "direction" =~ /^$direction$/ AND "protocol" =~ /^$protocol$/ '
                 'AND "$label" =~ /^$label_value$/')
BYTES_PER_S = '* 1000 / $__interval_ms'   # a bucket's sum -> per second
TOTAL_BYTES = 'sum("delta_bytes_orig") + sum("delta_bytes_reply")'

# conntrack_exporter's buckets of TCP states (docs/prometheus.md)
TCP_BUCKETS = {
    "opening": "syn_sent|syn_sent2|syn_recv",
    "open": "established|none",
    "closing": "fin_wait|close_wait|last_ack|time_wait",
    "closed": "close",
}


# Buckets of the finished-flows-by-duration panels, [from, to) in milliseconds
# (the duration_ms field: stop - start, whole ms): decades, since flow
# durations spread from microseconds to days.
DURATION_BUCKETS = [("< 10 ms", 0, 10), ("10-100 ms", 10, 100), ("0.1-1 s", 100, 1000), ("1-10 s", 1000, 10_000),
                    ("10 s-1 min", 10_000, 60_000), ("1-10 min", 60_000, 600_000), ("10 min-1 h", 600_000, 3_600_000),
                    (">= 1 h", 3_600_000, None)]


def influx_under(ms: int) -> str:
    """1 for a point whose duration is under `ms`, 0 above, null without one:
    InfluxQL has no comparison in expressions (floor(d / ms) is 0 only under it)."""
    return f'floor(1 / (1 + floor("duration_ms" / {ms})))'


def influx_duration_buckets() -> str:
    """Finished flows per duration bucket, one column each, counted by InfluxDB."""
    columns, sums = [], []
    for i, (name, low, high) in enumerate(DURATION_BUCKETS):
        if not low:
            expr = influx_under(high)
        elif high is None:
            expr = f"1 - {influx_under(low)}"
        else:
            expr = f"{influx_under(high)} - {influx_under(low)}"
        columns.append(f'{expr} AS "b{i}"')
        sums.append(f'sum("b{i}") AS "{name}"')
    return iq(f'SELECT {", ".join(sums)} FROM (SELECT {", ".join(columns)} FROM {{M}} WHERE {{F}} '
              'AND "finished" = true AND $timeFilter)')


def iq(query: str) -> str:
    return query.replace("{M}", f'"{MEASUREMENT}"').replace("{F}", INFLUX_FILTER)


def influx_top(by: str, where: str, n: int) -> str:
    tags = ", ".join(f'"{t}"' for t in by.split(","))
    return iq(f'SELECT top("bytes", {tags}, {n}) AS "bytes" FROM (SELECT {TOTAL_BYTES} AS "bytes" FROM {{M}} '
              f'WHERE {{F}}{where} AND $timeFilter GROUP BY {tags})')


def influx_dashboard():
    ds = INFLUX
    panels = [
        dashboard.Row("Traffic"),
        time_series(
            "Bandwidth by direction", "Bytes per second of every flow, by the enricher's direction: "
            "inbound (a client connected to this host), outbound, forward (routed through it), local. "
            "orig: sent by the side that opened the flow; reply: sent back. Sums of the delta fields, "
            "which are stamped at each record's time (the rate curve: every 20 s to 5 min per flow).",
            "Bps", [InfluxQL(iq(
                f'SELECT sum("delta_bytes_orig") {BYTES_PER_S} AS "orig", sum("delta_bytes_reply") {BYTES_PER_S} '
                f'AS "reply" FROM {{M}} WHERE {{F}} AND $timeFilter GROUP BY time($__interval), "direction" fill(0)'))
                .alias("$tag_direction $col").datasource(ds)],
            ds, w=18, stacked=True, interval="10s"),
        stat_panel("Traffic in range", "Bytes of every flow in the time range, both directions.", "decbytes",
                   [InfluxQL(iq(f'SELECT {TOTAL_BYTES} AS "bytes" FROM {{M}} WHERE {{F}} AND $timeFilter'))
                    .datasource(ds)], ds, w=6, h=8),
        table_panel(
            "Top talkers: remote servers", "Remote hosts by bytes in the range, both directions, for flows this "
            "host opened or routed (outbound, forward, local): the flow's destination.", "decbytes",
            [InfluxQL(influx_top("dst", ' AND "direction" != \'inbound\'', 20)).table().datasource(ds)],
            ds, "bytes", gauge_field="bytes"),
        table_panel(
            "Top talkers: remote clients", "Remote hosts by bytes in the range, both directions, for inbound "
            "flows (a client connected to this host): the flow's source.", "decbytes",
            [InfluxQL(influx_top("src", ' AND "direction" = \'inbound\'', 20)).table().datasource(ds)],
            ds, "bytes", gauge_field="bytes"),
        table_panel(
            "Top conversations", "Source, destination, destination port and protocol by bytes in the range "
            "(both directions).", "decbytes",
            [InfluxQL(influx_top("src,dst,dport,protocol", "", 25)).table().datasource(ds)],
            ds, "bytes", w=24, gauge_field="bytes"),
        dashboard.Row("Flows"),
        time_series(
            "New flows per second by protocol", "Flows whose first record with packets falls in the interval "
            "(its delta equals its total: the NEW record, or the first record of a flow that existed before "
            "the agent). Entries without packets (inserted with conntrack -I) are left out.",
            "ops", [InfluxQL(iq(
                f'SELECT count("flow_id") {BYTES_PER_S} AS "flows" FROM {{M}} WHERE {{F}} '
                f'AND "delta_packets_orig" = "packets_orig" AND "packets_orig" > 0 AND $timeFilter '
                f'GROUP BY time($__interval), "protocol" fill(0)')).alias("$tag_protocol").datasource(ds)],
            ds, stacked=True, interval="10s"),
        time_series(
            "Finished flows per second by protocol", "Flows that ended (conntrack destroyed them): "
            "points with finished = true.", "ops", [InfluxQL(iq(
                f'SELECT count("flow_id") {BYTES_PER_S} AS "flows" FROM {{M}} WHERE {{F}} AND "finished" = true '
                f'AND $timeFilter GROUP BY time($__interval), "protocol" fill(0)')).alias("$tag_protocol")
                .datasource(ds)],
            ds, stacked=True, interval="10s"),
        time_series(
            "TCP state mix", "TCP flows seen in each state per interval, in conntrack_exporter's buckets: "
            "opening (SYN_SENT, SYN_RECV), open (ESTABLISHED), closing (FIN_WAIT, CLOSE_WAIT, LAST_ACK, "
            "TIME_WAIT), closed (CLOSE: reset or refused).", "short",
            [InfluxQL(iq(
                f'SELECT count(distinct("flow_id")) AS "{bucket}" FROM {{M}} WHERE {{F}} AND "protocol" = \'tcp\' '
                f'AND "tcp_state" =~ /^({states})$/ AND $timeFilter GROUP BY time($__interval) fill(0)'))
             .ref_id(chr(ord("A") + i)).alias(bucket).datasource(ds)
             for i, (bucket, states) in enumerate(TCP_BUCKETS.items())],
            ds, stacked=True, interval="10s"),
        histogram(
            "Finished flows by size", "Distribution of the total bytes (both directions) of the flows that "
            "ended in the range.", "decbytes",
            [InfluxQL(iq('SELECT "bytes_orig" + "bytes_reply" AS "bytes" FROM {M} WHERE {F} AND "finished" = true '
                         'AND $timeFilter LIMIT 10000')).datasource(ds)], ds),
        bar_gauge(
            "Finished flows by duration", "Flows that ended in the range, by how long they lived (conntrack's "
            "start and stop timestamps: the duration_ms field of finished points). Flows without timestamps "
            "(nf_conntrack_timestamp off when they began) are not counted.", "short",
            [InfluxQL(influx_duration_buckets()).table().datasource(ds)], ds),
        table_panel(
            "NAT translations", "Flows whose reply tuple is not the mirror of the original: reply_dst is the "
            "translated source (SNAT, masquerade), reply_src the real server (DNAT, port forwards).", "decbytes",
            [InfluxQL(iq(f'SELECT {TOTAL_BYTES} AS "bytes", count(distinct("flow_id")) AS "flows" FROM {{M}} '
                         'WHERE {F} AND "reply_dst" != \'\' AND $timeFilter '
                         'GROUP BY "src", "reply_dst", "dst", "reply_src", "dport", "protocol"'))
             .table().datasource(ds)],
            ds, "bytes", w=24, gauge_field="bytes"),
    ]
    return build_dashboard("conntracct-influxdb", "conntracct: flows (InfluxDB)",
                           "Flow metrics the conntracct agent writes to InfluxDB (measurement ct_acct, InfluxQL).",
                           influx_variables(), panels, "DS_INFLUXDB", "influxdb", "InfluxDB")


# -- Prometheus (the agent's own endpoint) -----------------------------------

P = 'instance=~"$instance"'
H = 'instance=~"$instance", host=~"$host"'


def prometheus_dashboard():
    ds = PROM
    states = ("opening", "open", "closing", "closed")
    panels = [
        dashboard.Row("Connections (conntrack_exporter metrics)"),
        time_series("Connections by state", "Live flows in each of conntrack_exporter's states, all hosts.",
                    "short", [promql(f"sum(conntrack_{s}_connections{{{H}}})", s, chr(65 + i))
                              for i, s in enumerate(states)], ds, stacked=True),
        time_series("Open connections per remote host", "The 10 hosts with the most open connections.",
                    "short", [promql(f"topk(10, sum by (host) (conntrack_open_connections{{{H}}}))", "{{host}}")],
                    ds),
        table_panel("Connections per remote host", "Live flows per remote host and state, now.", "short",
                    [promql(f"sum by (host) (conntrack_{s}_connections{{{H}}})", s, chr(65 + i), instant=True,
                            table_format=True) for i, s in enumerate(states)],
                    ds, "Value #B", w=24).with_transformation(dashboard_model.DataTransformerConfig(
                        id_val="merge", options={})),
        dashboard.Row("Traffic"),
        time_series("Traffic per remote host", "Bytes per second by remote host; orig: sent by the side that "
                    "opened the flow, reply: sent back.", "Bps",
                    [promql(f"sum by (host, direction) (rate(conntrack_flow_bytes_total{{{H}}}[$__rate_interval]))",
                            "{{host}} {{direction}}")], ds, w=18, stacked=True),
        stat_panel("Bytes counted", "Bytes of every flow since the agents started (counters).", "decbytes",
                   [promql(f"sum(conntrack_flow_bytes_total{{{H}}})", instant=True)], ds, w=6, h=8),
        table_panel("Top remote hosts", "Remote hosts by bytes in the time range, both directions "
                    "(increase(): a host whose series was scraped only once in the range shows 0).",
                    "decbytes", [promql(f"topk(20, sum by (host) (increase(conntrack_flow_bytes_total{{{H}}}"
                                        "[$__range])))", instant=True, table_format=True)],
                    ds, "Value", gauge_field="Value"),
        table_panel("Top remote hosts since the agent started", "Remote hosts by bytes counted since each "
                    "agent started (the counters themselves), both directions.", "decbytes",
                    [promql(f"topk(20, sum by (host) (conntrack_flow_bytes_total{{{H}}}))", instant=True,
                            table_format=True)],
                    ds, "Value", gauge_field="Value"),
        dashboard.Row("Agent health"),
        time_series("Records read from the probe", "Flow records per second, by kind.", "ops",
                    [promql(f'sum by (kind) (rate(conntracct_records_total{{{P}, stage="probe"}}[$__rate_interval]))',
                            "{{kind}}")], ds, w=8),
        time_series("Records lost", "Records the BPF ring buffer had no room for (raise probe.ringbuf_pages), "
                    "and records that could not be decoded.", "ops",
                    [promql(f"sum(rate(conntracct_probe_lost_records_total{{{P}}}[$__rate_interval]))", "ring buffer"),
                     promql(f"sum(rate(conntracct_probe_decode_errors_total{{{P}}}[$__rate_interval]))",
                            "decode errors", "B")], ds, w=8),
        time_series("Sink drops by reason", "Records a sink dropped: queue_full, retries_exhausted, "
                    "permanent_error, shutdown.", "ops",
                    [promql(f"sum by (sink, reason) (rate(conntracct_sink_dropped_total{{{P}}}[$__rate_interval]))",
                            "{{sink}} {{reason}}")], ds, w=8),
        time_series("Sink queue use", "Records waiting in each sink's queue, as a share of queue_size.",
                    "percentunit", [promql(f"sum by (sink) (conntracct_sink_queue_depth{{{P}}}) / "
                                           f"sum by (sink) (conntracct_sink_queue_capacity{{{P}}})", "{{sink}}")],
                    ds, w=8),
        time_series("BPF run time per packet", "Average time of one run of each BPF program (the kernel counts "
                    "it only while sysctl kernel.bpf_stats_enabled=1).", "s",
                    [promql(f"sum by (program) (rate(conntracct_bpf_program_run_seconds_total{{{P}}}"
                            f"[$__rate_interval])) / sum by (program) (rate(conntracct_bpf_program_runs_total"
                            f"{{{P}}}[$__rate_interval]))", "{{program}}")], ds, w=8),
        stat_panel("Conntrack tracking", "Whether conntrack tracks each address family in the namespace the "
                   "agent accounts: a family it does not track has no flows to report (conntrack.ensure_tracking "
                   "fixes it). Untracked packets: IP packets that passed meanwhile.", "none",
                   [promql(f"min by (instance, family) (conntracct_conntrack_tracking{{{P}}})",
                           "{{instance}} {{family}}", instant=True)], ds, w=8, h=8)
        .mappings([dashboard_model.ValueMap(options={
            "1": dashboard_model.ValueMappingResult(text="tracking", color="green", index=0),
            "0": dashboard_model.ValueMappingResult(text="NOT tracking", color="red", index=1),
            "-1": dashboard_model.ValueMappingResult(text="cannot tell", color="orange", index=2)})]),
        time_series("Untracked packets", "IP packets per second that passed in the accounted namespace while "
                    "conntrack did not track their family (their traffic is in no flow).", "pps",
                    [promql(f"sum by (instance, family) (rate(conntracct_untracked_packets_total{{{P}}}"
                            "[$__rate_interval]))", "{{instance}} {{family}}")], ds, w=8),
        time_series("Flow-state map use", "Flows in the probe's per-flow state map as a share of "
                    "probe.max_flows; flows left untracked because it was full.", "percentunit",
                    [promql(f"sum by (instance) (conntracct_flow_state_entries{{{P}}}) / "
                            f"sum by (instance) (conntracct_flow_state_capacity{{{P}}})", "{{instance}} use"),
                     promql(f"sum by (instance) (rate(conntracct_flow_state_full_total{{{P}}}[$__rate_interval]))",
                            "{{instance}} untracked/s", "B")], ds, w=8),
    ]
    variables = [
        query_variable("instance", "Agent", "label_values(conntracct_build_info, instance)", ds,
                       "The agents' scrape targets"),
        query_variable("host", "Remote host", 'label_values(conntrack_open_connections{instance=~"$instance"}, host)',
                       ds, "Remote hosts with their own series (max_hosts), and 'other'"),
    ]
    return build_dashboard("conntracct-prometheus", "conntracct: connections and agent health (Prometheus)",
                           "The conntracct agent's Prometheus endpoint: conntrack_exporter's connection "
                           "states, traffic per remote host, and the agent's own health.",
                           variables, panels, "DS_PROMETHEUS", "prometheus", "Prometheus")


# -- VictoriaMetrics (flows written through the InfluxDB protocol) -----------

V = 'host=~"$host", direction=~"$direction", protocol=~"$protocol"'


def vm_sum(by: str, window: str, extra: str = "") -> str:
    """Bytes of both directions summed over `window`, grouped `by`."""
    sel = V + extra
    return (f"sum by ({by}) (sum_over_time({MEASUREMENT}_delta_bytes_orig{{{sel}}}[{window}])) + "
            f"sum by ({by}) (sum_over_time({MEASUREMENT}_delta_bytes_reply{{{sel}}}[{window}]))")


def vm_duration_bucket(low: int, high: int | None) -> str:
    """Finished flows with a duration in [low, high) ms: MetricsQL's count_le_over_time
    of the duration_ms points (whole milliseconds: under `high` is at most high - 1)."""
    def at_most(ms: int) -> str:
        return f"sum(count_le_over_time({MEASUREMENT}_duration_ms{{{V}}}[$__range], {ms}))"
    if high is None:
        return f"sum(count_over_time({MEASUREMENT}_duration_ms{{{V}}}[$__range])) - {at_most(low - 1)}"
    return at_most(high - 1) if not low else f"{at_most(high - 1)} - {at_most(low - 1)}"


def victoria_dashboard():
    ds = VICTORIA
    m = MEASUREMENT
    per_s = " / ($__interval_ms / 1000)"
    panels = [
        dashboard.Row("Traffic"),
        time_series("Bandwidth by direction", "Bytes per second by the enricher's direction; orig: sent by "
                    "the side that opened the flow, reply: sent back (sums of the delta fields).", "Bps",
                    [promql(f"sum by (direction) (sum_over_time({m}_delta_bytes_{side}{{{V}}}[$__interval])){per_s}",
                            "{{direction}} " + side, chr(65 + i), ds=ds) for i, side in enumerate(("orig", "reply"))],
                    ds, w=18, stacked=True, interval="10s"),
        stat_panel("Traffic in range", "Bytes of every flow in the time range, both directions.", "decbytes",
                   [promql(f"sum(sum_over_time({m}_delta_bytes_orig{{{V}}}[$__range])) + "
                           f"sum(sum_over_time({m}_delta_bytes_reply{{{V}}}[$__range]))", instant=True, ds=ds)],
                   ds, w=6, h=8),
        table_panel("Top talkers: remote servers", "Remote hosts by bytes in the range for flows this host "
                    "opened or routed (outbound, forward, local): the flow's destination.", "decbytes",
                    [promql("topk(20, %s)" % vm_sum("dst", "$__range", ', direction!="inbound"'), instant=True,
                            table_format=True, ds=ds)], ds, "Value", gauge_field="Value"),
        table_panel("Top talkers: remote clients", "Remote hosts by bytes in the range for inbound flows: "
                    "the flow's source.", "decbytes",
                    [promql("topk(20, %s)" % vm_sum("src", "$__range", ', direction="inbound"'), instant=True,
                            table_format=True, ds=ds)], ds, "Value", gauge_field="Value"),
        table_panel("Top conversations", "Source, destination, destination port and protocol by bytes in "
                    "the range.", "decbytes",
                    [promql(f"topk(25, {vm_sum('src, dst, dport, protocol', '$__range')})", instant=True,
                            table_format=True, ds=ds)], ds, "Value", w=24, gauge_field="Value"),
        time_series("Traffic by protocol", "Bytes per second by L4 protocol, both directions.", "Bps",
                    [promql(f"({vm_sum('protocol', '$__interval')}){per_s}", "{{protocol}}", ds=ds)],
                    ds, stacked=True, interval="10s"),
        time_series("Finished flows per second by protocol", "Flows that ended (the finished field is 1 on "
                    "their last point).", "ops",
                    [promql(f"sum by (protocol) (sum_over_time({m}_finished{{{V}}}[$__interval])){per_s}",
                            "{{protocol}}", ds=ds)], ds, stacked=True, interval="10s"),
        bar_gauge("Finished flows by duration", "Flows that ended in the range, by how long they lived "
                  "(conntrack's start and stop timestamps: ct_acct_duration_ms). Flows without timestamps are "
                  "not counted.", "short",
                  [promql(vm_duration_bucket(low, high), name, chr(65 + i), instant=True, ds=ds)
                   for i, (name, low, high) in enumerate(DURATION_BUCKETS)], ds),
        table_panel("NAT translations", "Flows whose reply tuple is not the mirror of the original: reply_dst "
                    "is the translated source (SNAT), reply_src the real server (DNAT).", "decbytes",
                    [promql(vm_sum("src, reply_dst, dst, reply_src, dport, protocol", "$__range",
                                   ', reply_dst!=""'), instant=True, table_format=True, ds=ds)],
                    ds, "Value", w=24, gauge_field="Value"),
    ]
    variables = prom_regex_variables(ds, f"{m}_bytes_orig", [
        ("host", "Host", "The agent's `host` label (enrich.labels); All also matches series without it"),
        ("direction", "Direction", "inbound, outbound, forward or local"),
        ("protocol", "Protocol", "L4 protocol"),
    ]) + [dashboard.AdHocVariable("filters").label("Labels").datasource(ds)
          .description("Filter on any other label (range labels, enrich.labels): added to every query")]
    return build_dashboard("conntracct-victoriametrics", "conntracct: flows (VictoriaMetrics)",
                           "Flow metrics the conntracct agent writes to VictoriaMetrics through the InfluxDB "
                           "line protocol (metrics ct_acct_<field>, tags as labels), queried with PromQL.",
                           variables, panels, "DS_VICTORIAMETRICS", "prometheus", "Prometheus",
                           ds_label="VictoriaMetrics")


# -- assembling --------------------------------------------------------------

def build_dashboard(uid: str, title: str, description: str, variables: list, panels: list,
                    input_name: str, plugin_id: str, plugin_name: str, ds_label: str | None = None) -> dict:
    d = (dashboard.Dashboard(title).uid(uid).description(description).tags(["conntracct", "flows"])
         .time("now-1h", "now").refresh("30s").timezone("browser")
         .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR))
    for v in variables:
        d = d.with_variable(v)
    for panel in panels:
        d = d.with_row(panel) if isinstance(panel, dashboard.Row) else d.with_panel(panel)
    model = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    for i, panel in enumerate(model["panels"], 1):
        panel["id"] = i
    # What Grafana's "Export for sharing externally" adds: the import asks for
    # the data source and fills in ${DS_...}.
    return {
        "__inputs": [{"name": input_name, "label": ds_label or plugin_name,
                      "description": f"The {ds_label or plugin_name} data source conntracct writes to",
                      "type": "datasource", "pluginId": plugin_id, "pluginName": plugin_name}],
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
                       {"type": "datasource", "id": plugin_id, "name": plugin_name, "version": "1.0.0"}],
        **model,
    }


def grafana_dashboards() -> dict[str, dict]:
    """File name -> dashboard JSON."""
    return {
        "conntracct-influxdb.json": influx_dashboard(),
        "conntracct-prometheus.json": prometheus_dashboard(),
        "conntracct-victoriametrics.json": victoria_dashboard(),
    }


def render(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def outputs() -> dict[Path, str]:
    """Every file this script writes, with its text."""
    files = {GRAFANA_DIR / name: render(d) for name, d in grafana_dashboards().items()}
    files[KIBANA_DIR / "conntracct-flows.ndjson"] = "".join(
        json.dumps(obj, separators=(",", ":")) + "\n" for obj in saved_objects())
    return files


def main() -> None:
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
