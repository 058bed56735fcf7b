"""The InfluxDB UDP sink (datagram packing, address, counting) and conntracct
(Go)'s line-protocol schema, against a plain reference built the way the Go
agent built it (a tag map and a field map, through a client library's Point)."""

from __future__ import annotations

import socket

import pytest
from influxdb_client import Point
from sample_flows import flow

from conntracct.config import ConfigError, parse_config
from conntracct.flow import DESTROY, FLAG_NO_ACCT, IPPROTO_NAMES
from conntracct.sinks import create_sink
from conntracct.sinks.goschema import ConntracctLineFormatter
from conntracct.sinks.influxdb_udp import datagrams, parse_address


def go_reference_line(e, source_ports=False) -> str:
    """internal/sinks/influxdb/influxdb.go Push(), in Python: tag and field
    maps, the client sorts them."""
    ports = e.proto in (6, 17)
    tags = {"conn_id": str(e.flow_id), "src_addr": e.orig.src, "dst_addr": e.orig.dst,
            "dst_port": str(e.orig.dport if ports else 0),
            "proto": IPPROTO_NAMES.get(e.proto, "unknown"), "connmark": format(e.mark, "x"),
            "netns": str(e.netns)}
    if source_ports:
        tags["src_port"] = str(e.orig.sport if ports else 0)
    point = Point("ct_acct")
    for key, value in tags.items():
        point.tag(key, value)
    for key, value in {"bytes_orig": e.bytes_orig, "bytes_ret": e.bytes_reply,
                       "packets_orig": e.packets_orig, "packets_ret": e.packets_reply}.items():
        point.field(key, int(value))
    return point.time(e.ts_ns).to_line_protocol()


@pytest.mark.parametrize("fields", [
    {},
    {"proto": 17, "mark": 0xBEEF},
    {"proto": 1, "orig": ("192.0.2.2", "198.51.100.2", 0, 0), "icmp": (8, 0, 77)},
    {"orig": ("2001:db8::2", "2001:db8::9", 40000, 443), "kind": DESTROY},
    {"proto": 58, "orig": ("2001:db8::2", "2001:db8::9", 0, 0)},
])
@pytest.mark.parametrize("source_ports", [False, True])
def test_conntracct_schema_is_the_go_agents_point(fields, source_ports):
    e = flow(**fields)
    series, values = ConntracctLineFormatter(source_ports=source_ports).point(e)
    assert f"{series} {values} {e.ts_ns}" == go_reference_line(e, source_ports)


def test_conntracct_schema_adds_the_users_labels_not_direction():
    e = flow(labels={"customer": "acme corp", "proto": "x", "direction": "outbound"}, memo={})
    formatter = ConntracctLineFormatter()
    series, _ = formatter.point(e)
    assert ",customer=acme\\ corp," in series and ",label_proto=x" in series and "direction" not in series
    assert formatter.point(e)[0] is series     # memoised per flow while the labels stay


@pytest.mark.parametrize(("text", "host", "port"), [
    ("127.0.0.1:8089", "127.0.0.1", 8089), ("localhost:8089", "localhost", 8089), ("[::1]:8089", "::1", 8089)])
def test_addresses(text, host, port):
    assert parse_address(text) == (host, port)


@pytest.mark.parametrize(("bad", "error"), [
    ("localhost", "expected host:port such as 127.0.0.1:8089"),
    ("::1:8089", "expected host:port such as 127.0.0.1:8089 or [::1]:8089 (IPv6 addresses in brackets)"),
    ("host:0", "expected a port from 1 to 65535, got 0"), ("host:x", "expected host:port"),
    (":8089", "expected host:port"), ("[::1]8089", "expected host:port")])
def test_bad_addresses_are_named(bad, error):
    with pytest.raises(ConfigError) as info:
        parse_config(f"sinks: [{{type: influxdb-udp, address: '{bad}'}}]", "u.yml")
    assert f"u.yml:1: sinks[0].address: {error}" in str(info.value)


def test_datagrams_never_split_a_line_and_stay_under_the_payload_size():
    lines = [(b"x" * n) + b"\n" for n in (10, 50, 99, 100, 30, 200, 1, 99)]
    packets, oversized = datagrams(lines, 100)
    assert oversized == [3, 5]                                   # 101 and 201 bytes
    assert all(len(p) <= 100 for p in packets)
    assert b"".join(packets) == b"".join(line for i, line in enumerate(lines) if i not in (3, 5))
    assert all(p.endswith(b"\n") for p in packets)
    assert [len(p) for p in packets] == [11 + 51, 100, 31 + 2, 100]  # in order, filled greedily


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


def received(sock) -> list[bytes]:
    out = []
    sock.settimeout(0.3)
    try:
        while True:
            out.append(sock.recv(70000))
    except TimeoutError:
        return out


def udp_sink(port: int, **keys):
    extra = "".join(f", {k}: {v}" for k, v in keys.items())
    return create_sink(parse_config(f"sinks: [{{type: influxdb-udp, address: '127.0.0.1:{port}'{extra}}}]").sinks[0])


def test_sink_sends_every_line_in_bounded_datagrams_and_counts(listener):
    sink = udp_sink(listener.getsockname()[1], payload_size=400)
    batch = [flow(flow_id=i, orig=("192.0.2.2", "198.51.100.2", 40000 + i, 80)) for i in range(40)]
    batch.append(flow(flow_id=99, labels={"note": "y" * 500}))    # a line no datagram can hold
    result = sink.write(batch)
    packets = received(listener)
    assert all(len(p) <= 400 and p.endswith(b"\n") for p in packets)
    lines = b"".join(packets).decode().splitlines()
    assert len(lines) == 40 and all(f"flow_id={i}i," in lines[i] for i in range(40))
    assert [e.flow_id for e in result.rejected] == [99] and "longer than payload_size (400 bytes)" in result.reason
    counters = sink.counters()
    assert counters == {"datagrams_sent": len(packets), "bytes_sent": sum(map(len, packets)), "lines_sent": 40,
                        "lines_oversized": 1, "lines_unwritable": 0}
    sink.close()


def test_conntracct_schema_rejects_records_without_counters(listener):
    sink = udp_sink(listener.getsockname()[1], schema="conntracct")
    result = sink.write([flow(flow_id=1), flow(flow_id=2, flags=FLAG_NO_ACCT)])
    lines = b"".join(received(listener)).decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ct_acct,conn_id=1,")
    assert [e.flow_id for e in result.rejected] == [2] and "without counters" in result.reason
    sink.close()


def test_conntracct_schema_takes_no_flow_id_tag():
    with pytest.raises(ConfigError) as info:
        parse_config("sinks: [{type: influxdb-udp, address: '127.0.0.1:1', schema: conntracct, flow_id_tag: true}]")
    assert "sinks[0].flow_id_tag: only for schema: default" in str(info.value)
