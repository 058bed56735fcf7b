"""InfluxDB sink: line protocol (golden strings), point identity, config
validation, and how HTTP answers map to transient/permanent errors."""

from __future__ import annotations

import gzip
import http.server
import shutil
import socket
import ssl
import subprocess
import threading

import pytest
from sample_flows import T0, flow

from conntracct.config import ConfigError, parse_config
from conntracct.flow import DESTROY, FLAG_NO_ACCT, UPDATE
from conntracct.sinks import SINKS, create_sink
from conntracct.sinks.base import PermanentSinkError, TransientSinkError
from conntracct.sinks.influxdb import InfluxDBSink
from conntracct.sinks.lineprotocol import (
    LineFormatter,
    PointLog,
    escape_key,
    escape_measurement,
    escape_string,
    escape_tag_value,
)
from tests.reference.line_protocol import ReferenceFormatter, line_of

FIELDS = ("packets_orig=3i,bytes_orig=180i,packets_reply=2i,bytes_reply=120i,"
          "delta_packets_orig=1i,delta_bytes_orig=60i,delta_packets_reply=1i,delta_bytes_reply=40i,"
          "flow_id=1311862289879068560i")


def line(event, **options) -> str:
    return line_of(LineFormatter(**options), event)


def series(event, **options) -> str:
    """Measurement and tags: the point's identity with its timestamp."""
    return LineFormatter(**options).point(event)[0]


# -- line protocol -----------------------------------------------------------

def test_tcp_update_golden_line():
    event = flow(UPDATE, labels={"direction": "outbound"})
    assert line(event) == (
        "ct_acct,direction=outbound,dport=80,dst=198.51.100.2,family=ipv4,netns=4026531840,protocol=tcp,"
        f"src=192.0.2.2 {FIELDS},finished=false,tcp_state=\"established\" {T0}\n")


def test_destroy_is_marked_finished():
    assert line(flow(DESTROY)) == (
        "ct_acct,dport=80,dst=198.51.100.2,family=ipv4,netns=4026531840,protocol=tcp,src=192.0.2.2 "
        f"{FIELDS},finished=true,tcp_state=\"established\" {T0}\n")


def test_finished_flow_with_conntrack_timestamps_has_its_duration_in_ms():
    """duration_ms = stop - start, whole milliseconds (truncated), on the
    DESTROY point only, and only when both timestamps are known."""
    ended = flow(DESTROY, start_ns=T0 - 2_345_999_999, stop_ns=T0)
    assert line(ended) == (
        "ct_acct,dport=80,dst=198.51.100.2,family=ipv4,netns=4026531840,protocol=tcp,src=192.0.2.2 "
        f"{FIELDS},finished=true,duration_ms=2345i,tcp_state=\"established\" {T0}\n")
    no_acct = flow(DESTROY, netns=0, flags=FLAG_NO_ACCT, start_ns=T0 - 999_999, stop_ns=T0)
    assert "flow_id=1311862289879068560i,finished=true,duration_ms=0i,tcp_state=" in line(no_acct)
    for no_duration in (flow(UPDATE, stop_ns=T0), flow(DESTROY, start_ns=0, stop_ns=T0),
                        flow(DESTROY, stop_ns=0), flow(DESTROY, start_ns=T0 + 1, stop_ns=T0)):
        assert "duration_ms" not in line(no_duration)


def test_ipv6_with_nat_tags_the_reply_addresses():
    event = flow(UPDATE, orig=("2001:db8::1", "2001:db8:1::2", 40000, 443),
                 reply=("2001:db8:1::2", "2001:db8::ff", 443, 40000), netns=0, tcp_state=7)
    assert line(event) == (
        "ct_acct,dport=443,dst=2001:db8:1::2,family=ipv6,protocol=tcp,reply_dst=2001:db8::ff,"
        f"reply_src=2001:db8:1::2,src=2001:db8::1 {FIELDS},finished=false,tcp_state=\"time_wait\" {T0}\n")


def test_icmp_has_type_code_id_fields_and_no_ports():
    event = flow(DESTROY, orig=("192.0.2.2", "198.51.100.2", 0, 0), proto=1, icmp=(8, 0, 4242),
                 tcp_state=0, netns=0)
    assert line(event) == (
        "ct_acct,dst=198.51.100.2,family=ipv4,protocol=icmp,src=192.0.2.2 "
        f"{FIELDS},finished=true,icmp_type=8i,icmp_code=0i,icmp_id=4242i {T0}\n")
    v6 = flow(UPDATE, orig=("2001:db8::1", "2001:db8::2", 0, 0), proto=58, icmp=(128, 0, 7), netns=0)
    assert line(v6).startswith("ct_acct,dst=2001:db8::2,family=ipv6,protocol=icmpv6,src=2001:db8::1 ")
    assert ",icmp_type=128i,icmp_code=0i,icmp_id=7i " in line(v6)


def test_udp_has_ports_and_no_tcp_state():
    event = flow(UPDATE, orig=("192.0.2.2", "198.51.100.53", 5353, 53), proto=17, tcp_state=0, netns=0)
    assert line(event) == (
        f"ct_acct,dport=53,dst=198.51.100.53,family=ipv4,protocol=udp,src=192.0.2.2 {FIELDS},finished=false {T0}\n")


def test_labels_are_escaped_and_sorted_in():
    event = flow(UPDATE, netns=0, labels={"direction": "inbound", "site name": "fra 1,rack=3",
                                          "a=b": "x", "zz": "c\\"})
    assert series(event) == (
        r"ct_acct,a\=b=x,direction=inbound,dport=80,dst=198.51.100.2,family=ipv4,protocol=tcp,"
        r"site\ name=fra\ 1\,rack\=3,src=192.0.2.2,zz=c\ ")


def test_labels_named_like_the_schema_are_prefixed_and_empty_ones_skipped():
    event = flow(UPDATE, netns=0, labels={"src": "x", "finished": "y", "empty": ""})
    assert series(event) == (
        "ct_acct,dport=80,dst=198.51.100.2,family=ipv4,label_finished=y,label_src=x,protocol=tcp,src=192.0.2.2")


def test_measurement_is_escaped():
    assert line(flow(netns=0), measurement="ct acct,v2").startswith(r"ct\ acct\,v2,dport=80,")


def test_zone_mark_netns_only_when_non_zero():
    tags = series(flow(UPDATE, zone=3, mark=0x1F, netns=4026532000))
    assert tags == ("ct_acct,dport=80,dst=198.51.100.2,family=ipv4,mark=0x1f,netns=4026532000,protocol=tcp,"
                    "src=192.0.2.2,zone=3")
    assert "zone=" not in line(flow(netns=0)) and "mark=" not in line(flow(netns=0))


def test_source_ports_and_flow_id_tag_are_opt_in():
    tags = series(flow(netns=0), source_ports=True, flow_id_tag=True)
    assert tags == ("ct_acct,dport=80,dst=198.51.100.2,family=ipv4,flow_id=1234abcd5678ef90,protocol=tcp,"
                    "sport=40000,src=192.0.2.2")


def test_no_accounting_writes_no_counters():
    assert line(flow(DESTROY, netns=0, flags=FLAG_NO_ACCT)) == (
        "ct_acct,dport=80,dst=198.51.100.2,family=ipv4,protocol=tcp,src=192.0.2.2 "
        f"flow_id=1311862289879068560i,finished=true,tcp_state=\"established\" {T0}\n")


def test_escape_functions_follow_line_protocol():
    assert escape_measurement("a b,c=d") == r"a\ b\,c=d"
    assert escape_key("a b,c=d") == r"a\ b\,c\=d"
    assert escape_tag_value("x\n") == r"x\n"
    assert escape_tag_value("ends\\") == "ends\\ "
    assert escape_string('say "hi" \\o/') == r'say \"hi\" \\o/'


# -- point identity ----------------------------------------------------------

def _timestamps(text: str) -> list[int]:
    return [int(row.rsplit(" ", 1)[1]) for row in text.splitlines()]


def test_same_series_and_timestamp_in_a_batch_moves_by_one_ns():
    # Two connections from one host to one service (source ports untagged),
    # and a flow's last UPDATE and DESTROY, all at the same nanosecond.
    a, b = flow(UPDATE, flow_id=1), flow(UPDATE, flow_id=2, orig=("192.0.2.2", "198.51.100.2", 40001, 80))
    end = flow(DESTROY, flow_id=2, orig=("192.0.2.2", "198.51.100.2", 40001, 80))
    other = flow(UPDATE, flow_id=3, orig=("192.0.2.3", "198.51.100.2", 40000, 80))
    text, _ = PointLog().lines(LineFormatter(), [a, b, end, other])
    assert _timestamps(text) == [T0, T0 + 1, T0 + 2, T0]
    assert "finished=true" in text.splitlines()[2]


def test_point_identity_spans_batches_once_written():
    points, formatter = PointLog(), LineFormatter()
    first, taken = points.lines(formatter, [flow(UPDATE, flow_id=1)])
    again, _ = points.lines(formatter, [flow(UPDATE, flow_id=1)])
    assert again == first                       # not written yet: a retry sends the same line
    points.commit(taken)
    later, _ = points.lines(formatter, [flow(DESTROY, flow_id=1)])
    assert _timestamps(later) == [T0 + 1]


def test_point_log_is_bounded():
    points, formatter = PointLog(generation=4), LineFormatter()
    for i in range(20):
        points.commit(points.lines(formatter, [flow(ts_ns=T0 + 10 * i)])[1])
    assert len(points._new) + len(points._old) <= 8


class ReferencePointLog(PointLog):
    """The point log as first written (two sets, each looked up per point)."""

    def __init__(self, generation):
        super().__init__(generation)
        self._new, self._old = set(), set()

    def lines(self, formatter, batch):
        taken, out = set(), []
        for e in batch:
            s, fields = formatter.point(e)
            ts = e.ts_ns
            key = hash((s, ts))
            while key in taken or key in self._new or key in self._old:
                ts += 1
                key = hash((s, ts))
            taken.add(key)
            out.append(f"{s} {fields} {ts}\n")
        return "".join(out), taken

    def commit(self, taken):
        self._new |= taken
        if len(self._new) >= self._generation:
            self._old, self._new = self._new, set()


def test_point_log_gives_the_reference_lines_across_generations():
    import random

    rng = random.Random(3)
    tuned, reference = PointLog(generation=16), ReferencePointLog(generation=16)
    formatter = LineFormatter()
    for _ in range(300):
        batch = [flow(rng.choice([UPDATE, DESTROY]), flow_id=rng.randrange(4), ts_ns=T0 + rng.randrange(40),
                      orig=("192.0.2.2", "198.51.100.2", 40000 + rng.randrange(3), rng.choice([80, 443])))
                 for _ in range(rng.randrange(1, 8))]
        text, taken = tuned.lines(formatter, batch)
        assert (text, taken) == reference.lines(formatter, batch)
        assert tuned.lines(formatter, batch)[0] == text          # a retry before commit: the same lines
        if rng.random() < 0.8:                                   # else the batch failed: never committed
            tuned.commit(taken)
            reference.commit(taken)
    assert len(tuned._seen) <= 32


# -- config ------------------------------------------------------------------

def sink_config(text: str):
    return parse_config("sinks:\n  - type: influxdb\n" + text, "test.yml").sinks[0]


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        sink_config(text)
    return str(info.value)


def test_registered_with_its_defaults():
    assert SINKS["influxdb"] is InfluxDBSink
    config = sink_config("    url: http://127.0.0.1:8086/\n    bucket: flows\n")
    assert (config.url, config.api, config.bucket, config.org, config.measurement) == (
        "http://127.0.0.1:8086", "v2", "flows", None, "ct_acct")
    assert config.kinds == frozenset({"new", "update", "destroy"})
    assert (config.source_ports, config.flow_id_tag, config.timeout, config.gzip) == (False, False, 10.0, False)
    assert (config.tls.verify, config.tls.ca_file) == (True, None)
    assert isinstance(create_sink(config), InfluxDBSink)   # no network I/O at construction


def test_v1_config_and_secrets_from_the_environment(monkeypatch):
    monkeypatch.setenv("INFLUX_PW", "pw")
    config = sink_config("    url: https://influx.example:8086\n    api: v1\n    database: flows\n"
                         "    retention_policy: week\n    username: agent\n    password_env: INFLUX_PW\n"
                         "    timeout: 2s\n    kinds: [new, update, destroy]\n")
    assert (config.database, config.retention_policy, config.username, config.secret_password) == (
        "flows", "week", "agent", "pw")
    assert config.timeout == 2.0 and config.kinds == frozenset({"new", "update", "destroy"})
    assert "pw" not in repr(config) and "pw" not in str(config.model_dump())
    monkeypatch.setenv("INFLUX_TOKEN", "tok")
    assert sink_config("    url: http://h:8086\n    bucket: b\n    token_env: INFLUX_TOKEN\n").secret_token == "tok"


@pytest.mark.parametrize(("text", "message"), [
    ("    bucket: b\n", "test.yml:2: sinks[0].url: required key is missing"),
    ("    url: influx:8086\n    bucket: b\n",
     "test.yml:3: sinks[0].url: expected an http:// or https:// URL such as http://127.0.0.1:8086 "
     "(got 'influx:8086')"),
    ("    url: http://u:p@h:8086\n    bucket: b\n", "sinks[0].url: expected a URL without credentials"),
    ("    url: http://h:99999\n    bucket: b\n", "sinks[0].url: expected a URL with a port number"),
    ("    url: http://h:8086\n", "test.yml:2: sinks[0].bucket: required key is missing for api: v2"),
    ("    url: http://h:8086\n    api: v1\n", "test.yml:2: sinks[0].database: required key is missing for api: v1"),
    ("    url: http://h:8086\n    api: v3\n", "test.yml:4: sinks[0].api: expected 'v2' or 'v1' (got 'v3')"),
    ("    url: http://h:8086\n    api: v1\n    database: d\n    bucket: b\n",
     "test.yml:6: sinks[0].bucket: only for api: v2 (this sink has api: v1, which takes database, "
     "retention_policy, username, password) (got 'b')"),
    ("    url: http://h:8086\n    bucket: b\n    database: d\n",
     "test.yml:5: sinks[0].database: only for api: v1 (this sink has api: v2, which takes org, bucket, token)"),
    ("    url: http://h:8086\n    api: v1\n    database: d\n    password: x\n",
     "sinks[0].username: required key is missing: a password needs a username"),
    ("    url: http://h:8086\n    api: v1\n    database: d\n    username: x\n",
     "sinks[0].password: required key is missing: give password or password_env with username"),
    ("    url: http://h:8086\n    bucket: b\n    token: t\n    token_env: T\n",
     "sinks[0].token: give either token or token_env, not both"),
    ("    url: http://h:8086\n    bucket: b\n    token_env: CONNTRACCT_TEST_UNSET\n",
     "test.yml:5: sinks[0].token_env: environment variable 'CONNTRACCT_TEST_UNSET' is not set"),
    ("    url: http://h:8086\n    bucket: b\n    measurement: '#m'\n",
     "sinks[0].measurement: expected a name not starting with '#'"),
    ("    url: http://h:8086\n    bucket: b\n    timeout: soon\n", "sinks[0].timeout: expected a duration"),
    ("    url: https://h:8086\n    bucket: b\n    tls: {ca_file: /nonexistent/ca.pem}\n",
     "sinks[0].tls.ca_file: expected a readable PEM file"),
    ("    url: http://h:8086\n    bucket: b\n    tls: {verify: false, cafile: x}\n",
     "sinks[0].tls.cafile: unknown key (did you mean 'ca_file'?)"),
    ("    url: http://h:8086\n    bucket: b\n    source_port: true\n",
     "sinks[0].source_port: unknown key (did you mean 'source_ports'?)"),
])
def test_config_errors_name_the_key(text, message, monkeypatch):
    monkeypatch.delenv("CONNTRACCT_TEST_UNSET", raising=False)
    assert message in error_of(text)


# -- HTTP answers -> errors --------------------------------------------------

class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers each request with the server's next (status, body); records requests."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append((self.path, dict(self.headers), body))
        status, text = self.server.answers.pop(0) if self.server.answers else (204, b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args):
        pass


def _serve(tls_files: tuple[str, str] | None = None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.requests, server.answers = [], []
    if tls_files is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls_files)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_server():
    yield from _serve()


@pytest.fixture
def tls_server(tmp_path):
    """An https server with a self-signed certificate for 127.0.0.1; .ca_file trusts it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (makes the test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    for server in _serve((str(cert), str(key))):
        server.ca_file = str(cert)
        yield server


def _sink(url: str, api: str, **extra) -> InfluxDBSink:
    keys = {"url": url, "api": api, "name": "influx-test", "timeout": "2s",
            **({"bucket": "b", "org": "o", "token": "t"} if api == "v2"
               else {"database": "d", "username": "u", "password": "p"}), **extra}
    return create_sink(sink_config("".join(f"    {k}: {v}\n" for k, v in keys.items())))


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_writes_one_request_per_batch_with_auth_and_gzip(fake_server, api):
    sink = _sink(f"http://127.0.0.1:{fake_server.server_port}", api, gzip="true")
    sink.write([flow(UPDATE), flow(DESTROY)])
    sink.close()
    [(path, headers, body)] = fake_server.requests
    if api == "v1":
        assert path == "/write?db=d&precision=ns"
        assert headers["Authorization"] == "Basic dTpw"
    else:
        assert path.startswith("/api/v2/write?") and "bucket=b" in path and "precision=ns" in path
        assert headers["Authorization"] == "Token t"
    assert headers["Content-Encoding"] == "gzip"
    lines = gzip.decompress(body).decode().splitlines()
    assert [row.rsplit(" ", 1)[1] for row in lines] == [str(T0), str(T0 + 1)]
    assert "finished=true" in lines[1]


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize(("status", "error", "text"), [
    (500, TransientSinkError, "HTTP 500: engine on fire"),
    (503, TransientSinkError, "HTTP 503"),
    (429, TransientSinkError, "HTTP 429"),
    (400, PermanentSinkError, "HTTP 400: engine on fire (the server rejected points"),
    (401, PermanentSinkError, "HTTP 401: engine on fire (bad credentials)"),
    (403, PermanentSinkError, "HTTP 403"),
    (404, PermanentSinkError, "HTTP 404: engine on fire (wrong URL, database or bucket)"),
])
def test_http_status_maps_to_transient_or_permanent(fake_server, api, status, error, text):
    url = f"http://127.0.0.1:{fake_server.server_port}"
    fake_server.answers.append((status, b'{"error": "engine on fire"}' if api == "v1"
                                else b'{"code": "x", "message": "engine on fire"}'))
    with pytest.raises(error) as info:
        _sink(url, api).write([flow(UPDATE)])
    # raised, not a WriteResult: the whole batch failed
    assert f"influxdb sink 'influx-test' ({url}, api {api}): {text}" in str(info.value)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_connection_refused_is_transient(api):
    port = unused_port()
    with pytest.raises(TransientSinkError, match=rf"influxdb sink 'influx-test' \(http://127.0.0.1:{port}, "):
        _sink(f"http://127.0.0.1:{port}", api).write([flow(UPDATE)])


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_timeout_is_transient(api):
    with socket.socket() as listener:   # accepts (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        sink = _sink(f"http://127.0.0.1:{listener.getsockname()[1]}", api, timeout="300ms")
        with pytest.raises(TransientSinkError, match="influx-test"):
            sink.write([flow(UPDATE)])


def test_the_full_example_config_blocks_are_valid(monkeypatch):
    """configs/conntracct.yml's commented influxdb sinks, uncommented, load."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "configs" / "conntracct.yml").read_text()
    blocks = re.findall(r"^  #- type: influxdb\n(?:  #  .*\n)+", text, re.MULTILINE)
    assert len(blocks) == 2
    monkeypatch.setenv("INFLUX_TOKEN", "t")
    monkeypatch.setenv("INFLUX_PASSWORD", "p")
    uncommented = "".join(re.sub(r"^  #", "  ", block, flags=re.MULTILINE) for block in blocks)
    v2, v1 = parse_config("sinks:\n" + uncommented).sinks
    assert (v2.api, v2.bucket, v2.secret_token, v2.batch_size, v2.kinds) == (
        "v2", "conntracct", "t", 5000, frozenset({"new", "update", "destroy"}))
    assert (v1.api, v1.database, v1.username, v1.secret_password) == ("v1", "conntracct", "conntracct", "p")


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_tls_untrusted_certificate_is_permanent_and_ca_file_or_verify_false_fix_it(tls_server, api):
    url = f"https://127.0.0.1:{tls_server.server_port}"
    with pytest.raises(PermanentSinkError) as info:
        _sink(url, api).write([flow(UPDATE)])
    assert str(info.value).startswith(f"influxdb sink 'influx-test' ({url}, api {api}): TLS: server certificate "
                                      "not trusted (tls.ca_file, tls.verify): ")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    _sink(url, api, tls=f"{{ca_file: {tls_server.ca_file}}}").write([flow(UPDATE)])
    _sink(url, api, tls="{verify: false}").write([flow(UPDATE)])
    assert len(tls_server.requests) == 2


def test_tuned_formatter_gives_the_reference_lines():
    import random

    rng = random.Random(7)
    addresses = ["192.0.2.2", "198.51.100.2", "203.0.113.9", "2001:db8:1::2", "2001:db8:2::2"]
    for options in ({}, {"source_ports": True, "flow_id_tag": True, "measurement": "ct acct,x"}):
        tuned, reference = LineFormatter(**options), ReferenceFormatter(**options)
        for _ in range(3000):
            orig = (rng.choice(addresses), rng.choice(addresses), rng.randrange(65536), rng.randrange(65536))
            # mirrored (no NAT), SNAT, or NAT that changed only one port
            reply = rng.choice([None, (orig[1], rng.choice(addresses), orig[3], rng.randrange(65536)),
                                (orig[1], orig[0], orig[3], orig[2] + 1), (orig[1], orig[0], orig[3] + 1, orig[2])])
            labels = rng.choice([{}, {"direction": "outbound"}, {"site": "fra 1", "direction": "inbound"},
                                 {"src": "x", "zone": "", "": "y", "flow_id": "a=b", "tail": "c\\"}])
            e = flow(kind=rng.choice(["new", "update", DESTROY]), orig=orig, reply=reply,
                     family=rng.choice([4, 6, 7]), proto=rng.choice([6, 17, 1, 58, 132, 47, 250]),
                     zone=rng.choice([0, 3]), mark=rng.choice([0, 0x1f]), netns=rng.choice([0, 4026531840]),
                     tcp_state=rng.randrange(12), flags=rng.choice([0, FLAG_NO_ACCT, 1]),
                     icmp=rng.choice([None, (8, 0, rng.randrange(65536))]), labels=dict(labels),
                     # start/stop unknown (0), known, or a stop before the start (clock stepped back)
                     start_ns=rng.choice([0, T0 - rng.randrange(10**13)]),
                     stop_ns=rng.choice([0, T0, T0 - 10**13]))
            assert tuned.point(e)[0] == reference.series(e)
            assert tuned.point(e)[1] == reference.fields(e)
            assert line_of(tuned, e) == reference.line(e)
            assert tuned.point(e) == (reference.series(e), reference.fields(e))


def test_series_memo_follows_mark_and_label_changes_mid_flow():
    """The decoder shares FlowEvent.memo between the records of one flow
    identity; the formatter keeps the series there, per formatter.  A record
    whose labels changed gets its own series, as does one of a new identity
    (a CONNMARK mid-flow is one: the mark is part of it)."""
    import random
    import socket as sock

    from conntracct.probe.record import RECORD, decode, pack_tuple

    a, b, nat = (sock.inet_pton(sock.AF_INET, x) for x in ("192.0.2.2", "198.51.100.2", "198.51.100.1"))
    orig = pack_tuple(sock.AF_INET, 6, a, b, 40000, 80)
    reply = pack_tuple(sock.AF_INET, 6, b, nat, 80, 40000)
    rng = random.Random(11)
    formatters = [(LineFormatter(), ReferenceFormatter()),
                  (LineFormatter(flow_id_tag=True, source_ports=True), ReferenceFormatter(flow_id_tag=True,
                                                                                      source_ports=True))]
    memos = set()
    for i in range(400):
        mark, zone, state = rng.choice([0, 0, 0x1F]), rng.choice([0, 0, 3]), rng.choice([1, 3, 7])
        raw = RECORD.pack(i, 1_000 * rng.choice([1, 1, 2]), 0, 4, i, i, i, i, 1, 1, 1, 1, 0x18E,
                          orig, rng.choice([reply, reply, orig]), 4026531840, mark, zone, 2, state, 0)
        e = decode(raw, 0)
        memos.add(id(e.memo))
        e.labels = rng.choice([{}, {"direction": "outbound"}, {"direction": "outbound", "site": "fra1"},
                               {"direction": "forward"}])
        for tuned, reference in formatters:
            assert tuned.point(e) == (reference.series(e), reference.fields(e))
            assert line_of(tuned, e) == reference.line(e)
        assert len(e.memo) == 2   # one entry per formatter
    assert len(memos) > 4


def test_point_log_writes_what_line_gives():
    events = [flow(kind, ts_ns=T0 + i, flow_id=i, proto=proto, icmp=(8, 0, 7) if proto == 1 else None,
                   flags=flags)
              for i, (kind, proto, flags) in enumerate([(UPDATE, 6, 0), (DESTROY, 17, 0), (UPDATE, 1, 0),
                                                        (DESTROY, 6, FLAG_NO_ACCT), (UPDATE, 47, 0)])]
    formatter = LineFormatter()
    assert PointLog().lines(formatter, events)[0] == "".join(line_of(formatter, e) for e in events)
