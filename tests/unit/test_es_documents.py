"""elasticsearch sink without a server: ECS documents, index names, bulk
actions, the index template, and the sink's config keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sample_flows import T0, flow

from conntracct.config import ConfigError, parse_config
from conntracct.flow import DESTROY, FLAG_BACKDATED, FLAG_NO_ACCT, NEW, UPDATE
from conntracct.sinks.elasticsearch import (
    BulkBody,
    daily_index,
    flow_document,
    index_templates,
    mappings,
    status_names,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "elasticsearch.md"
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "conntracct.yml"
STOP = T0 + 5_000_000_000

# 192.0.2.2:40000 -> 198.51.100.2:80, masqueraded behind 198.51.100.1:61000
SNAT_V4 = flow(DESTROY, reply=("198.51.100.2", "198.51.100.1", 80, 61000), stop_ns=STOP,
               labels={"direction": "forward", "site": "fra1"}, zone=2, mark=0x10, tcp_state=7)
# port-forward: 203.0.113.9:5000 -> 192.0.2.1:8080 really goes to 10.0.0.5:80
DNAT_V4 = flow(DESTROY, orig=("203.0.113.9", "192.0.2.1", 5000, 8080), reply=("10.0.0.5", "203.0.113.9", 80, 5000),
               stop_ns=STOP, labels={"direction": "inbound"})
UDP_V6 = flow(DESTROY, orig=("2001:db8:1::2", "2001:db8:2::2", 5353, 53), proto=17, stop_ns=STOP, tcp_state=0,
              status=0x0A, labels={"direction": "outbound"})
ICMP_V4 = flow(DESTROY, orig=("192.0.2.2", "192.0.2.1", 0, 0), proto=1, icmp=(8, 0, 4660), stop_ns=0,
               start_ns=0, tcp_state=0, status=0, flags=FLAG_BACKDATED | FLAG_NO_ACCT)


def test_ipv4_snat_document():
    assert flow_document(SNAT_V4, "gw1") == {
        "@timestamp": "2026-11-18T11:06:45.123456789Z",
        "event": {"kind": "event", "category": ["network"], "type": ["connection", "end"],
                  "action": "flow-destroy", "module": "conntracct", "dataset": "conntracct.flow",
                  "start": "2026-11-18T11:06:38.123456789Z", "end": "2026-11-18T11:06:45.123456789Z",
                  "duration": 7_000_000_000},
        "source": {"ip": "192.0.2.2", "port": 40000, "packets": 3, "bytes": 180,
                   "nat": {"ip": "198.51.100.1", "port": 61000}},
        "destination": {"ip": "198.51.100.2", "port": 80, "packets": 2, "bytes": 120},
        "network": {"transport": "tcp", "iana_number": "6", "type": "ipv4", "bytes": 300, "packets": 5,
                    "direction": "external"},
        "observer": {"hostname": "gw1"},
        "labels": {"direction": "forward", "site": "fra1"},
        "conntrack": {
            "flow_id": "1234abcd5678ef90", "zone": 2, "mark": 16, "netns": 4026531840,
            "status": 0x18E, "status_flags": ["seen_reply", "assured", "confirmed", "src_nat_done", "dst_nat_done"],
            "flags": [], "tcp_state": "time_wait", "nat": True,
            "reply": {"source": {"ip": "198.51.100.2", "port": 80},
                      "destination": {"ip": "198.51.100.1", "port": 61000}}},
    }


def test_dnat_sets_destination_nat_only():
    doc = flow_document(DNAT_V4, "gw1")
    assert doc["destination"]["nat"] == {"ip": "10.0.0.5", "port": 80}
    assert "nat" not in doc["source"]
    assert (doc["destination"]["ip"], doc["destination"]["port"]) == ("192.0.2.1", 8080)
    assert doc["conntrack"]["reply"] == {"source": {"ip": "10.0.0.5", "port": 80},
                                         "destination": {"ip": "203.0.113.9", "port": 5000}}
    assert doc["network"]["direction"] == "inbound"


def test_ipv6_udp_document():
    doc = flow_document(UDP_V6, "h")
    assert doc["source"] == {"ip": "2001:db8:1::2", "port": 5353, "packets": 3, "bytes": 180}
    assert doc["destination"] == {"ip": "2001:db8:2::2", "port": 53, "packets": 2, "bytes": 120}
    assert doc["network"] == {"transport": "udp", "iana_number": "17", "type": "ipv6", "bytes": 300,
                              "packets": 5, "direction": "outbound"}
    assert doc["conntrack"]["nat"] is False and "tcp_state" not in doc["conntrack"]
    assert doc["conntrack"]["status_flags"] == ["seen_reply", "confirmed"]
    assert "icmp" not in doc


def test_icmp_document_without_ports_counters_or_start():
    doc = flow_document(ICMP_V4, "h")
    assert doc["@timestamp"] == "2026-11-18T11:06:40.123456789Z"   # no stop time: when the record was taken
    assert doc["event"] == {"kind": "event", "category": ["network"], "type": ["connection", "end"],
                            "action": "flow-destroy", "module": "conntracct", "dataset": "conntracct.flow",
                            "end": "2026-11-18T11:06:40.123456789Z"}
    assert doc["source"] == {"ip": "192.0.2.2"} and doc["destination"] == {"ip": "192.0.2.1"}
    assert doc["network"] == {"transport": "icmp", "iana_number": "1", "type": "ipv4", "direction": "unknown"}
    assert doc["icmp"] == {"type": 8, "code": 0, "id": 4660}
    assert doc["conntrack"]["flags"] == ["backdated", "no_acct"]
    assert doc["conntrack"]["reply"] == {"source": {"ip": "192.0.2.1"}, "destination": {"ip": "192.0.2.2"}}
    assert "labels" not in doc


def test_live_documents_say_whether_the_flow_finished():
    new = flow_document(flow(NEW), "h", live=True)
    assert new["event"]["type"] == ["connection", "start"] and "end" not in new["event"]
    assert new["event"]["duration"] == 2_000_000_000       # age so far
    assert new["conntrack"]["finished"] is False
    assert flow_document(flow(UPDATE), "h", live=True)["event"]["type"] == ["connection", "info"]
    assert flow_document(SNAT_V4, "h", live=True)["conntrack"]["finished"] is True
    assert "finished" not in flow_document(SNAT_V4, "h")["conntrack"]


def test_status_names():
    assert status_names(0) == []
    assert status_names((1 << 4) | (1 << 15)) == ["src_nat", "hw_offload"]


# -- index names and bulk actions --------------------------------------------

def test_daily_index_follows_the_flow_end_in_utc():
    assert daily_index("conntracct-flows", SNAT_V4) == "conntracct-flows-2026.11.18"
    midnight = 1_795_046_400 * 10**9                      # 2026-11-19T00:00:00Z
    assert daily_index("p", flow(DESTROY, stop_ns=midnight - 1)) == "p-2026.11.18"
    assert daily_index("p", flow(DESTROY, stop_ns=midnight)) == "p-2026.11.19"
    assert daily_index("p", flow(UPDATE, ts_ns=midnight)) == "p-2026.11.19"   # no stop yet: record time


def _lines(body: bytes) -> list[dict]:
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body.decode().splitlines()]


def test_daily_mode_indexes_by_flow_id():
    lines = _lines(BulkBody("conntracct-flows", "daily", False, "h").ndjson([SNAT_V4, UDP_V6]))
    assert lines[0] == {"index": {"_index": "conntracct-flows-2026.11.18", "_id": "1234abcd5678ef90"}}
    assert lines[1] == flow_document(SNAT_V4, "h")
    assert len(lines) == 4


def test_data_stream_mode_creates_in_the_stream():
    lines = _lines(BulkBody("flows", "data_stream", False, "h").ndjson([SNAT_V4]))
    assert lines[0] == {"create": {"_index": "flows", "_id": "1234abcd5678ef90"}}
    assert lines[1]["@timestamp"] == "2026-11-18T11:06:45.123456789Z"


def test_live_flows_are_upserts_and_destroy_writes_both():
    body = BulkBody("flows", "daily", True, "h")
    update = {"update": {"_index": "flows-live", "_id": "1234abcd5678ef90", "retry_on_conflict": 3}}
    new = _lines(body.ndjson([flow(NEW)]))
    assert new == [update, {"doc": flow_document(flow(NEW), "h", live=True), "doc_as_upsert": True}]
    end = _lines(body.ndjson([SNAT_V4]))
    assert [next(iter(line)) for line in end[::2]] == ["index", "update"]
    assert end[3]["doc"]["conntrack"]["finished"] is True


# -- template ----------------------------------------------------------------

def test_daily_template():
    templates = index_templates("conntracct-flows", "daily", False)
    assert list(templates) == ["conntracct-flows"]
    body = templates["conntracct-flows"]
    assert body["index_patterns"] == ["conntracct-flows-*"]
    assert body["priority"] == 200 and "data_stream" not in body
    assert body["template"]["mappings"] == mappings()
    assert body["_meta"]["managed_by"] == "conntracct"


def test_data_stream_and_live_templates():
    templates = index_templates("flows", "data_stream", True)
    assert templates["flows"]["index_patterns"] == ["flows"] and templates["flows"]["data_stream"] == {}
    live = templates["flows-live"]
    assert live["index_patterns"] == ["flows-live"] and "data_stream" not in live
    assert live["priority"] == templates["flows"]["priority"] + 1   # wins over flows-* in daily mode


def _field_type(path: str) -> str | None:
    node = {"properties": mappings()["properties"]}
    for part in path.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node.get("type", "object")


def _leaves(doc: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        out += _leaves(value, path + ".") if isinstance(value, dict) else [path]
    return out


def test_mapping_types():
    assert mappings()["dynamic"] is False
    assert mappings()["properties"]["conntrack"]["dynamic"] is False
    expected = {"@timestamp": "date_nanos", "event.start": "date_nanos", "event.duration": "long",
                "source.ip": "ip", "source.port": "long", "source.bytes": "long", "destination.nat.ip": "ip",
                "network.iana_number": "keyword", "network.transport": "keyword", "observer.hostname": "keyword",
                "conntrack.mark": "long", "conntrack.flow_id": "keyword", "conntrack.nat": "boolean",
                "conntrack.reply.source.ip": "ip", "conntrack.reply.destination.port": "long",
                "icmp.type": "long", "conntrack.status_flags": "keyword"}
    assert {path: _field_type(path) for path in expected} == expected


@pytest.mark.parametrize("event", [SNAT_V4, DNAT_V4, UDP_V6, ICMP_V4, flow(NEW)])
def test_every_written_field_is_mapped(event):
    for path in _leaves(flow_document(event, "h", live=event.kind != DESTROY)):
        if path.startswith("labels."):
            continue    # keywords through the dynamic template
        assert _field_type(path) not in (None, "object"), path


def test_docs_list_every_mapped_field():
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    mapped = {p for e in (SNAT_V4, DNAT_V4, ICMP_V4) for p in _leaves(flow_document(e, "h", live=True))
              if not p.startswith("labels.")}
    assert mapped <= documented, sorted(mapped - documented)


# -- config ------------------------------------------------------------------

def _config(extra: str = ""):
    return parse_config("sinks: [{type: elasticsearch, hosts: ['http://127.0.0.1:9200']%s}]" % extra).sinks[0]


def _error(extra: str) -> str:
    with pytest.raises(ConfigError) as info:
        _config(extra)
    return str(info.value)


def test_config_defaults():
    c = _config()
    assert (c.index, c.index_mode, c.index_live_flows, c.install_template, c.gzip, c.timeout) == (
        "conntracct-flows", "daily", False, True, True, 10.0)
    assert (c.tls.verify, c.tls.ca_file, c.username, c.api_key) == (True, None, None, None)
    assert c.kinds == frozenset({DESTROY}) and c.observer_hostname


def test_live_flows_bring_new_and_update():
    assert _config(", index_live_flows: true").kinds == frozenset({NEW, UPDATE, DESTROY})
    assert _config(", index_live_flows: true, kinds: [new, update]").kinds == frozenset({NEW, UPDATE})
    assert "sinks[0].kinds: new/update records are written only with index_live_flows: true" in _error(
        ", kinds: [new, destroy]")


def test_secrets_and_auth(monkeypatch):
    monkeypatch.setenv("ES_PASSWORD", "s3cret")
    c = _config(", username: agent, password_env: ES_PASSWORD")
    assert (c.username, c.password) == ("agent", "s3cret") and "s3cret" not in repr(c)
    assert "sinks[0].password: expected password or password_env with username" in _error(", username: agent")
    assert "give either username/password or api_key, not both" in _error(", username: a, password: b, api_key: k")
    monkeypatch.delenv("ES_KEY", raising=False)
    assert "api_key_env: environment variable 'ES_KEY' is not set" in _error(", api_key_env: ES_KEY")


@pytest.mark.parametrize(("hosts", "message"), [
    ("['localhost:9200']", "sinks[0].hosts[0]: expected an http:// or https:// URL"),
    ("['http://127.0.0.1:9200', 'http://es2']", "sinks[0].hosts[1]: expected a port in the URL"),
    ("[]", "sinks[0].hosts: expected at least one URL"),
])
def test_bad_hosts(hosts, message):
    with pytest.raises(ConfigError) as info:
        parse_config(f"sinks: [{{type: elasticsearch, hosts: {hosts}}}]")
    assert message in str(info.value)


def test_index_and_tls_are_checked(tmp_path):
    assert "sinks[0].index: expected an index name" in _error(", index: Flows")
    assert "sinks[0].tls.ca_file: expected a readable PEM file" in _error(", tls: {ca_file: /nonexistent.pem}")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert _config(f", tls: {{ca_file: '{ca}', verify: false}}").tls.ca_file == str(ca)
    assert "sinks[0].index_mode: expected 'daily' or 'data_stream'" in _error(", index_mode: weekly")


def test_the_commented_example_in_the_full_config_is_valid(monkeypatch):
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index("  #- type: elasticsearch")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append(line.replace("  #", "  ", 1))
    monkeypatch.setenv("ES_PASSWORD", "s3cret")
    sink = parse_config("sinks:\n" + "\n".join(block) + "\n").sinks[0]
    assert (sink.type, sink.username, sink.password, sink.index_mode) == ("elasticsearch", "conntracct", "s3cret",
                                                                          "daily")
    assert sink.observer_hostname and sink.kinds == frozenset({DESTROY})
