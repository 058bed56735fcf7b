"""The ipfix sink on loopback sockets: configuration errors, delta semantics,
template refresh over UDP, templates per connection and reconnection over TCP,
and partial writes reported to the pipeline."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from conntracct.config import ConfigError, parse_config
from conntracct.sinks import create_sink
from conntracct.sinks.base import TransientSinkError
from conntracct.sinks.ipfix import FlowDeltas, IPFIXConfig, IPFIXSink, parse_collector
from tests.unit.sample_flows import T0, flow

pytest.importorskip("ipfix", reason="python3-ipfix (./tasks.py test installs it)")
from tests.servers.ipfix import TcpCollector, decode  # noqa: E402


@pytest.mark.parametrize("text,expected", [
    ("192.0.2.10:4739", ("192.0.2.10", 4739)),
    ("[2001:db8::10]:9995", ("2001:db8::10", 9995)),
    ("collector.example:2055", ("collector.example", 2055)),
    ("192.0.2.10", ("192.0.2.10", 4739)),
])
def test_collector_text(text, expected):
    assert parse_collector(text) == expected


@pytest.mark.parametrize("text,message", [
    ("300.1.2.3:4739", "expected an IPv4 address"),
    ("192.0.2.10:0", "port from 1 to 65535"),
    ("192.0.2.10:70000", "port from 1 to 65535"),
    ("[2001:db8::zz]:4739", "IPv6 address between the brackets"),
    ("2001:db8::10:4739", "IPv6 addresses in brackets"),
    ("bad_host!:4739", "expected host:port"),
])
def test_bad_collector_names_the_key(text, message):
    with pytest.raises(ConfigError) as info:
        parse_config(f"sinks:\n  - type: ipfix\n    collector: '{text}'\n")
    assert "sinks[0].collector" in str(info.value)
    assert message in str(info.value)


def test_defaults_export_updates_and_destroys():
    config = parse_config("sinks:\n  - type: ipfix\n    collector: 127.0.0.1:4739\n")
    [sink_config] = config.sinks
    assert sink_config.kinds == frozenset({"update", "destroy"})
    assert (sink_config.transport, sink_config.observation_domain_id, sink_config.mtu) == ("udp", 1, 1500)


def _sum(records, key):
    return sum(r[key] for r in records)


def test_deltas_add_up_to_the_totals_whatever_is_exported():
    """A flow's records: NEW (not exported), UPDATE, UPDATE, DESTROY."""
    steps = [(1, 60, 1, 40), (5, 400, 3, 900), (9, 800, 7, 5000), (12, 900, 10, 6000)]
    kinds = ["new", "update", "update", "destroy"]
    events = [flow(kind, packets_orig=p, bytes_orig=b, packets_reply=pr, bytes_reply=br, ts_ns=T0 + i)
              for i, (kind, (p, b, pr, br)) in enumerate(zip(kinds, steps, strict=True))]
    for exported in (events[1:], events[3:], events):
        deltas = FlowDeltas()
        got = []
        for e in exported:     # one record per batch
            [base] = deltas.bases([e])
            got.append(tuple(t - b for t, b in zip((e.bytes_orig, e.packets_orig, e.bytes_reply, e.packets_reply),
                                                    base, strict=True)))
            deltas.sent([e])
        assert tuple(map(sum, zip(*got, strict=True))) == (900, 12, 6000, 10)
        assert len(deltas) == 0   # the DESTROY let the flow go


def test_a_retried_record_gets_the_same_deltas():
    deltas = FlowDeltas()
    first = flow("update", packets_orig=5, bytes_orig=500)
    deltas.sent([first])
    batch = [flow("update", packets_orig=8, bytes_orig=800, ts_ns=T0 + 1),
             flow("destroy", packets_orig=9, bytes_orig=900, ts_ns=T0 + 2)]
    assert deltas.bases(batch) == deltas.bases(batch) == [(500, 5, 120, 2), (800, 8, 120, 2)]
    deltas.sent(batch[:1])              # the first went out, the second is retried
    assert deltas.bases(batch[1:]) == [(800, 8, 120, 2)]


def test_the_flow_table_is_bounded():
    deltas = FlowDeltas(limit=10)
    deltas.sent([flow("update", flow_id=i) for i in range(25)])
    assert len(deltas) == 10


class UdpCollector:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def receive(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65535))
            except TimeoutError:
                return out


def _template_ids(message: bytes) -> list[int]:
    """Template ids in a message's template sets."""
    ids, offset = [], 16
    while offset < len(message):
        set_id, length = struct.unpack_from("!HH", message, offset)
        if set_id == 2:
            inner = offset + 4
            while inner < offset + length:
                tid, count = struct.unpack_from("!HH", message, inner)
                ids.append(tid)
                inner += 4
                for _ in range(count):
                    number = struct.unpack_from("!H", message, inner)[0]
                    inner += 8 if number & 0x8000 else 4
        offset += length
    return ids


def test_udp_templates_at_start_then_on_timer_and_message_count():
    collector = UdpCollector()
    now = [1000.0]
    config = IPFIXConfig(type="ipfix", collector=f"127.0.0.1:{collector.port}", template_refresh="30s",
                         template_refresh_messages=3)
    sink = IPFIXSink(config, clock=lambda: now[0])
    try:
        sink.write([flow("destroy", flow_id=1, stop_ns=T0)])
        first = collector.receive()
        assert len({t for m in first for t in _template_ids(m)}) == 16    # all templates at start
        assert len(decode(first)[-1][1]) == 1
        for flow_id in (2, 3):                                            # 2nd and 3rd data message
            sink.write([flow("destroy", flow_id=flow_id, stop_ns=T0)])
            assert [m for m in collector.receive() if _template_ids(m)] == []  # not due yet
        sink.write([flow("destroy", flow_id=4, stop_ns=T0)])              # 3 messages since: due
        assert any(_template_ids(m) for m in collector.receive())
        sink.write([flow("destroy", flow_id=5, stop_ns=T0)])
        assert not any(_template_ids(m) for m in collector.receive())
        now[0] += 31                                                      # timer
        sink.write([flow("destroy", flow_id=6, stop_ns=T0)])
        assert any(_template_ids(m) for m in collector.receive())
    finally:
        sink.close()


def test_udp_send_error_resends_templates():
    """A collector that went away answers with ICMP port unreachable; the
    connected socket reports it on a later send, and the templates go out
    again with the next message."""
    collector = UdpCollector()
    port = collector.port
    sink = IPFIXSink(IPFIXConfig(type="ipfix", collector=f"127.0.0.1:{port}", template_refresh_messages=1000))
    try:
        sink.write([flow("destroy", flow_id=1, stop_ns=T0)])
        collector.sock.close()
        failed = False
        for i in range(5):
            try:
                sink.write([flow("destroy", flow_id=10 + i, stop_ns=T0)])
            except TransientSinkError:
                failed = True
                break
            time.sleep(0.05)
        assert failed
        collector.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        collector.sock.bind(("127.0.0.1", port))
        collector.sock.settimeout(0.2)
        sink.write([flow("destroy", flow_id=99, stop_ns=T0)])
        messages = collector.receive()
        assert _template_ids(messages[0])
        assert [r["sourceTransportPort"] for _, rs in decode(messages) for r in rs] == [40000]
    finally:
        sink.close()


def test_tcp_templates_once_per_connection_and_reconnect():
    collector = TcpCollector()
    sink = create_sink(IPFIXConfig(type="ipfix", collector=f"127.0.0.1:{collector.port}", transport="tcp",
                                   timeout="2s"))
    try:
        sink.write([flow("destroy", flow_id=1, stop_ns=T0)])
        sink.write([flow("destroy", flow_id=2, stop_ns=T0), flow("destroy", flow_id=3, stop_ns=T0)])
        deadline = time.monotonic() + 5
        while len(collector.messages()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        decoded = decode(collector.messages())
        with_templates = [i for i, m in enumerate(collector.messages()) if _template_ids(m)]
        assert with_templates == list(range(len(with_templates)))   # only at the start of the connection
        assert [h["sequence"] for h, rs in decoded if rs] == [0, 1]
        port = collector.port
        collector.close()
        time.sleep(0.2)
        with pytest.raises(TransientSinkError):   # peer closed: reconnect fails, the pipeline will retry
            sink.write([flow("destroy", flow_id=4, stop_ns=T0)])
        collector = TcpCollector(port)
        sink.write([flow("destroy", flow_id=4, stop_ns=T0)])
        deadline = time.monotonic() + 5
        while not collector.messages() or not decode(collector.messages())[-1][1]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        decoded = decode(collector.messages())
        assert _template_ids(collector.messages()[0])        # templates again on the new connection
        assert [h["sequence"] for h, rs in decoded if rs] == [0]   # a new session counts from 0
    finally:
        sink.close()
        collector.close()


def test_end_reasons_from_the_records():
    from conntracct.flow import FLAG_END_UNSEEN

    collector = UdpCollector()
    sink = IPFIXSink(IPFIXConfig(type="ipfix", collector=f"127.0.0.1:{collector.port}"))
    try:
        sink.write([flow("update", flow_id=1),                                  # active timeout
                    flow("destroy", flow_id=2, tcp_state=7, stop_ns=T0),        # TCP closed: end of flow
                    flow("destroy", flow_id=3, proto=17, tcp_state=0, stop_ns=T0),   # idle timeout
                    flow("destroy", flow_id=4, proto=17, tcp_state=0, stop_ns=T0, flags=FLAG_END_UNSEEN)])
        reasons = [r["flowEndReason"] for _, rs in decode(collector.receive()) for r in rs]
        assert reasons == [2, 3, 1, 4]
    finally:
        sink.close()


def test_ipv6_collector_and_the_mtu_bound():
    """Over IPv6 a message leaves room for 40 bytes of IP and 8 of UDP header."""
    receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        receiver.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    receiver.settimeout(0.2)
    port = receiver.getsockname()[1]
    sink = IPFIXSink(IPFIXConfig(type="ipfix", collector=f"[::1]:{port}", mtu=600))
    try:
        sink.write([flow("destroy", flow_id=i, orig=("2001:db8:1::2", "2001:db8:2::2", 30000 + i, 443),
                         reply=("2001:db8:2::2", "2001:db8:2::1", 443, 30000 + i), stop_ns=T0)
                    for i in range(40)])
        messages = []
        while True:
            try:
                messages.append(receiver.recv(65535))
            except TimeoutError:
                break
        assert messages and max(map(len, messages)) <= 600 - 40 - 8
        ports = [r["sourceTransportPort"] for _, rs in decode(messages) for r in rs]
        assert ports == [30000 + i for i in range(40)]
    finally:
        sink.close()
        receiver.close()


class _FailingSocket:
    """A socket whose send fails from the `fail_at`-th call on (1-based)."""

    def __init__(self, sock: socket.socket, fail_at: int):
        self._sock, self._fail_at, self.calls = sock, fail_at, 0

    def send(self, data: bytes) -> int:
        self.calls += 1
        if self.calls >= self._fail_at:
            raise ConnectionRefusedError(111, "Connection refused")
        return self._sock.send(data)

    def close(self) -> None:
        self._sock.close()


def test_a_failed_send_mid_batch_is_a_partial_write_retried_with_the_same_deltas():
    collector = UdpCollector()
    sink = IPFIXSink(IPFIXConfig(type="ipfix", collector=f"127.0.0.1:{collector.port}", mtu=400,
                                 template_refresh_messages=1000))
    try:
        sink.write([flow("update", flow_id=i, packets_orig=1, bytes_orig=100, stop_ns=0) for i in range(6)])
        before = collector.receive()
        batch = [flow("destroy", flow_id=i, packets_orig=5, bytes_orig=500, stop_ns=T0, ts_ns=T0 + 1)
                 for i in range(6)]
        sink._sock = _FailingSocket(sink._sock, fail_at=2)   # the second message fails
        result = sink.write(batch)
        first = collector.receive()
        sent = [r for _, rs in decode(before + first)[len(before):] for r in rs]
        assert 0 < len(sent) < 6 and list(result.retry) == batch[len(sent):] and not result.rejected
        sink._sock = sink._sock._sock
        assert sink.write(list(result.retry)) is None      # the pipeline's retry
        again = collector.receive()
        assert _template_ids(again[0])                      # the failure re-sends the templates
        retried = [r for _, rs in decode(before + first + again)[len(before + first):] for r in rs]
        assert len(retried) == 6 - len(sent)
        # The deltas the first attempt had: 400 bytes, 4 packets since the UPDATE.
        assert {(r["octetDeltaCount"], r["packetDeltaCount"]) for r in sent + retried} == {(400, 4)}
    finally:
        sink.close()
