"""conntracct (Go) configuration files: recognised, translated, warned about,
errors in the file's own terms, and `conntracct config convert`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from test_config import error_of

from conntracct.cli import main
from conntracct.compat import is_conntracct_format, translate
from conntracct.config import load_config, parse_config, read_yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "integration" / "data" / "conntracct.yml"
EXPECTED_WARNINGS = [
    "api_enabled: ignored: conntracct's HTTP stats API is not implemented; the agent's own counters "
    "are served by a prometheus sink (type: prometheus, listen: 127.0.0.1:9100)",
    "api_endpoint: ignored: conntracct's HTTP stats API is not implemented; give a prometheus sink's "
    "`listen` instead",
    "sinks.clickhouse: type clickhouse: the ClickHouse sink is not implemented; this sink is left out "
    "(keep flows with an elasticsearch or influxdb sink)",
    "pprof_enabled: ignored: Go's pprof profiler does not apply to this agent; profile it with py-spy if needed",
    "pprof_endpoint: ignored: Go's pprof profiler does not apply to this agent; profile it with py-spy if needed",
]


def test_our_own_format_is_not_translated():
    data, _ = read_yaml("sinks: [{type: stdout}]\nsysctl: {manage: true}\n")
    assert not is_conntracct_format(data)
    assert parse_config("sinks: [{type: stdout}]").warnings == []


def test_the_example_translates_into_our_keys():
    data, _ = read_yaml(EXAMPLE.read_text())
    assert is_conntracct_format(data)
    ours = translate(data)
    assert ours.warnings == EXPECTED_WARNINGS
    assert ours.data["probe"] == {"rate_curve": [{"below": "60s", "every": "20s"},
                                                 {"below": "5m", "every": "60s"}, {"then": "5m"}]}
    assert ours.data["sysctl"] == {"manage": True}
    assert ours.data["sinks"] == [
        {"name": "influxdb_udp", "type": "influxdb-udp", "batch_size": 200, "schema": "conntracct",
         "address": "localhost:8089", "payload_size": 512},
        {"name": "influxdb_http", "type": "influxdb", "batch_size": 200, "api": "v1", "schema": "conntracct",
         "url": "http://localhost:8086", "database": "conntracct_http"},
        {"name": "elastic", "type": "elasticsearch", "document": "conntracct",
         "hosts": ["http://localhost:9200"], "index": "conntracct"},
        {"name": "stdout", "type": "stdout"},
        {"name": "dummy", "type": "dummy"},
    ]


def test_the_example_loads_unchanged_with_its_warnings():
    config = load_config(EXAMPLE)
    assert config.warnings == EXPECTED_WARNINGS
    assert [(s.name, s.type) for s in config.sinks] == [
        ("influxdb_udp", "influxdb-udp"), ("influxdb_http", "influxdb"), ("elastic", "elasticsearch"),
        ("stdout", "stdout"), ("dummy", "dummy")]
    udp, http, es = config.sinks[:3]
    assert (udp.host, udp.port, udp.payload_size, udp.batch_size, udp.line_schema) == ("localhost", 8089, 512, 200,
                                                                                  "conntracct")
    assert (http.api, http.url, http.database, http.line_schema, http.source_ports) == (
        "v1", "http://localhost:8086", "conntracct_http", "conntracct", False)
    assert (es.hosts, es.index, es.document) == (["http://localhost:9200"], "conntracct", "conntracct")
    assert config.probe.rate_curve_ns() == ([(60 * 10**9, 20 * 10**9), (300 * 10**9, 60 * 10**9)], 300 * 10**9)
    assert config.sysctl.manage is True


def test_sink_options_map_onto_ours():
    config = parse_config("""\
sinks:
  es:
    type: elasticsearch
    address: "http://es1:9200, http://es2:9200"
    database: flows
    username: elastic
    password: secret
    shards: 3
  influx:
    type: influxdb-http
    address: http://127.0.0.1:8086
    database: ct
    sourcePorts: true
    timeout: 5s
    udpPayloadSize: 1400
  udp:
    type: influxdb-udp
    address: "[::1]:8089"
    udpPayloadSize: 1400
    sourcePorts: true
""", "test.yml")
    es, influx, udp = config.sinks
    assert (es.hosts, es.index, es.username, es.secret_password if hasattr(es, "secret_password") else
            es.password) == (["http://es1:9200", "http://es2:9200"], "flows", "elastic", "secret")
    assert (influx.source_ports, influx.timeout) == (True, 5.0)
    assert (udp.host, udp.port, udp.payload_size, udp.source_ports) == ("::1", 8089, 1400, True)
    assert config.warnings == [
        "sinks.es.shards: ignored: the agent's index template leaves number_of_shards to the cluster's defaults",
        "sinks.influx.udpPayloadSize: ignored: not used by type influxdb-http (as conntracct does)"]


@pytest.mark.parametrize(("text", "error"), [
    # the user's own key names and lines, not the translated ones
    ("sinks:\n  http:\n    type: influxdb-http\n    address: localhost:8086\n",
     "test.yml:4: sinks.http.address: expected an http:// or https:// URL"),
    ("sinks:\n  e:\n    type: elastic\n    address: 'http://a:9200,ftp://b'\n",
     "test.yml:4: sinks.e.address[1]: expected an http:// or https:// URL"),
    ("sinks:\n  s:\n    type: stdout\n    batchSize: -1\n", "test.yml:4: sinks.s.batchSize: expected a number >= 1"),
    ("sinks:\n  s:\n    type: stdout\n    colour: red\n", "test.yml:4: sinks.s.colour: unknown key"),
    ("sinks:\n  s:\n    type: mysql\n", "test.yml:3: sinks.s.type: sink 's' has unknown type 'mysql'"),
    ("sinks:\n  u:\n    type: influxdb-udp\n    address: localhost\n",
     "test.yml:4: sinks.u.address: expected host:port"),
    ("sysctl_manage: maybe\n", "test.yml:1: sysctl_manage: expected true or false"),
    ("api_enabled: true\nfrobnicate: 1\n", "test.yml:2: frobnicate: unknown key"),
    ("probe:\n  rate_curve:\n    0: {age: 0, rate: 20s}\n    1: {age: 10x, rate: 60s}\n",
     "test.yml:4: probe.rate_curve.1.age: expected a duration"),
    ("probe:\n  rate_curve:\n    0: {age: 0, rate: 20s}\n    1: {age: 60s, rate: 5s}\n",
     "test.yml:4: probe.rate_curve.1.rate: expected an interval of at least the previous 20s"),
    ("probe:\n  rate_curve:\n    0: {age: 0, rate: 20s, jitter: 1s}\n",
     "test.yml:3: probe.rate_curve.0.jitter: unknown key"),
])
def test_errors_name_the_files_own_keys_and_lines(text, error):
    assert error in error_of(text)


def test_clickhouse_alone_leaves_no_sink_and_says_so():
    assert "sinks: expected at least one sink" in error_of("sinks:\n  ch:\n    type: clickhouse\n")


def test_go_and_our_keys_mix():
    config = parse_config("sysctl_manage: false\nsinks:\n  out: {type: stdout}\n"
                          "enrich: {ignore: ['udp/53']}\nlog_level: debug\n")
    assert (config.sysctl.manage, config.log_level, str(config.enrich.ignore[0])) == (False, "debug", "udp/53")


# -- conntracct config convert -------------------------------------------------

def test_convert_round_trips_to_the_same_effective_config(tmp_path):
    result = CliRunner().invoke(main, ["config", "convert", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    converted = result.stdout
    assert "# left out: api_enabled: ignored" in converted
    again = parse_config(converted, "converted.yml")
    assert again.warnings == []                       # nothing of conntracct's format left
    original = load_config(EXAMPLE)
    assert again.model_dump() == original.model_dump()
    # converting our own format again changes nothing
    path = tmp_path / "ours.yml"
    path.write_text(converted)
    second = CliRunner().invoke(main, ["config", "convert", str(path)])
    assert parse_config(second.stdout).model_dump() == original.model_dump()


def test_convert_a_bad_file_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("sinks:\n  http:\n    type: influxdb-http\n    address: nowhere\n")
    result = CliRunner().invoke(main, ["config", "convert", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:4: sinks.http.address: expected an http:// or https:// URL" in result.stderr


# -- conntracct's Elasticsearch document ---------------------------------------

def test_elastic_sink_writes_conntracct_documents():
    from sample_flows import flow

    from conntracct.flow import DESTROY
    from conntracct.sinks.elasticsearch import BulkBody
    body = BulkBody("conntracct", "daily", False, "host1", "conntracct")
    e = flow(DESTROY, orig=("192.0.2.2", "198.51.100.2", 40000, 443), stop_ns=1_795_000_001_000_000_000,
             mark=5, labels={"direction": "outbound", "customer": "acme"})
    [(header, source)] = list(body.actions(e))
    assert header["index"]["_index"].startswith("conntracct-")
    import json
    assert json.loads(source) == {
        "event_type": "destroy", "hostname": "host1", "start": e.start_ns, "timestamp": e.ts_ns,
        "flow_id": e.flow_id, "connmark": 5, "src_addr": "192.0.2.2", "dst_addr": "198.51.100.2",
        "packets_orig": 3, "bytes_orig": 180, "packets_ret": 2, "bytes_ret": 120, "src_port": 40000,
        "dst_port": 443, "netns": e.netns, "proto": 6, "labels": {"customer": "acme"}}


def test_conntracct_documents_need_daily_indices():
    assert "sinks.e.document: expected ecs with index_mode: data_stream" in error_of(
        "sinks:\n  e:\n    type: elastic\n    address: http://127.0.0.1:9200\n    index_mode: data_stream\n")


def test_influxdb_http_sink_rejects_records_without_counters_in_conntracct_schema():
    from sample_flows import flow

    from conntracct.flow import FLAG_NO_ACCT
    from conntracct.sinks import create_sink
    sink = create_sink(parse_config("sinks: [{type: influxdb, api: v1, url: 'http://127.0.0.1:9', "
                                    "database: x, schema: conntracct}]").sinks[0])
    result = sink.write([flow(flags=FLAG_NO_ACCT)])     # nothing left to send: no request made
    assert len(result.rejected) == 1 and "without counters" in result.reason
