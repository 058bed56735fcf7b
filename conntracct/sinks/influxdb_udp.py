"""InfluxDB UDP sink (`type: influxdb-udp`): line protocol in datagrams to
InfluxDB 1.x's UDP listener ([[udp]] in influxdb.conf), conntracct (Go)'s
default transport.

    sinks:
      - type: influxdb-udp
        address: 127.0.0.1:8089      # host:port, [v6addr]:port
        payload_size: 512            # bytes of line protocol per datagram
        schema: conntracct           # or default (the influxdb sink's schema)

The same points as the `influxdb` sink (lineprotocol.py / goschema.py), packed
into datagrams of at most `payload_size` bytes; a line is never split across
datagrams (the listener parses each datagram on its own).  A line longer than
`payload_size` cannot be sent: it is dropped and counted (the pipeline's
permanent_error drops; `lines_oversized` here).  512 bytes is safe on any
path; up to the path MTU minus 48 bytes (IPv6 + UDP) avoids IP fragments.

UDP loses silently: nothing tells the agent that a datagram was dropped on
the wire, by the receiving socket's buffer, or by a listener that is not
running.  What the agent counts is what it sent (the pipeline's `written`;
datagrams_sent, bytes_sent, lines_sent here).  Compare with what InfluxDB
holds, or use the HTTP `influxdb` sink where every write is acknowledged.
docs/influxdb.md has more.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, PrivateAttr, model_validator

from ..flow import FlowEvent
from .base import ACCEPTED, PermanentSinkError, Sink, SinkConfig, TransientSinkError, WriteResult
from .common import host_port
from .goschema import UNWRITABLE_REASON, LineOptions
from .lineprotocol import PointLog

log = logging.getLogger(__name__)

MAX_UDP_PAYLOAD = 65507     # IPv4's limit for one UDP datagram


ADDRESS_HINT = "expected host:port such as 127.0.0.1:8089 or [::1]:8089"


def parse_address(value: str) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port) (common.host_port)."""
    return host_port(value, ADDRESS_HINT)


class InfluxDBUDPConfig(SinkConfig, LineOptions):
    type: Literal["influxdb-udp"]
    address: Annotated[str, AfterValidator(lambda v: (parse_address(v), v.strip())[1])]
    payload_size: int = Field(512, ge=64, le=MAX_UDP_PAYLOAD)

    _host: str = PrivateAttr("")
    _port: int = PrivateAttr(0)

    @model_validator(mode="after")
    def _split(self) -> InfluxDBUDPConfig:
        self._host, self._port = parse_address(self.address)
        return self

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port


def datagrams(lines: list[bytes], payload_size: int) -> tuple[list[bytes], list[int]]:
    """Lines (each ending in a newline) packed in order into datagrams of at
    most payload_size bytes, never splitting one; and the indices of the
    lines too long for any datagram (left out)."""
    out: list[bytes] = []
    oversized: list[int] = []
    current: list[bytes] = []
    size = 0
    for i, line in enumerate(lines):
        if len(line) > payload_size:
            oversized.append(i)
            continue
        if size + len(line) > payload_size:
            out.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        out.append(b"".join(current))
    return out, oversized


class InfluxDBUDPSink(Sink):
    Config = InfluxDBUDPConfig

    def __init__(self, config: InfluxDBUDPConfig):
        super().__init__(config)
        self.formatter = config.formatter()
        self._points = PointLog()
        self._where = f"influxdb-udp sink {self.name!r} ({config.address})"
        self._target: tuple | None = None     # resolved at the first write: no DNS at start
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(("datagrams_sent", "bytes_sent", "lines_sent", "lines_oversized",
                                        "lines_unwritable"), 0)

    def counters(self) -> dict[str, int]:
        """What this sink sent (all UDP can tell) and what it could not."""
        with self._lock:
            return dict(self._counters)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._counters[key] += value

    def _socket(self) -> tuple[socket.socket, tuple]:
        if self._sock is None:
            host, port = self.config.host, self.config.port
            try:
                family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
                infos = [(family, (host, port))]
            except ValueError:
                try:
                    infos = [(info[0], info[4]) for info in
                             socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)]
                except socket.gaierror as exc:
                    raise TransientSinkError(f"{self._where}: cannot resolve {host}: {exc.strerror}") from exc
            family, target = infos[0]
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._target = target
        return self._sock, self._target

    def write(self, batch: list[FlowEvent]) -> WriteResult:
        if not batch:
            return ACCEPTED
        batch, unwritable = self.config.writable(batch)
        text, taken = self._points.lines(self.formatter, batch)
        lines = [line + b"\n" for line in text.encode().split(b"\n")[:-1]]
        packets, oversized = datagrams(lines, self.config.payload_size)
        sock, target = self._socket()
        sent = 0
        for packet in packets:
            try:
                sock.sendto(packet, target)
            except OSError as exc:
                self._count(datagrams_sent=sent)
                # Nothing is half-written in a datagram; resent points
                # overwrite themselves (same series and timestamp).
                if exc.errno in (errno.EMSGSIZE,):
                    raise PermanentSinkError(f"{self._where}: datagram of {len(packet)} bytes too large "
                                             f"for the path: lower payload_size") from exc
                raise TransientSinkError(f"{self._where}: {exc.strerror or exc}") from exc
            sent += 1
        self._points.commit(taken)
        self._count(datagrams_sent=sent, bytes_sent=sum(map(len, packets)),
                    lines_sent=len(lines) - len(oversized), lines_oversized=len(oversized),
                    lines_unwritable=len(unwritable))
        rejected = [batch[i] for i in oversized] + unwritable
        if not rejected:
            return ACCEPTED
        reasons = []
        if oversized:
            reasons.append(f"{len(oversized)} line(s) longer than payload_size "
                           f"({self.config.payload_size} bytes) dropped")
        if unwritable:
            reasons.append(f"{len(unwritable)} {UNWRITABLE_REASON}")
        return WriteResult(rejected=rejected, reason="; ".join(reasons))

    def close(self) -> None:
        # UDP has no acknowledgement: say at the end what was sent, to compare
        # with what the server holds.
        log.info("%s: sent %s", self._where, " ".join(f"{k}={v}" for k, v in self.counters().items()))
        if self._sock is not None:
            self._sock.close()
            self._sock = None

