"""IPFIX sink (`type: ipfix`): biflow records to an IPFIX collector.

RFC 7011 messages over UDP (default) or TCP, one record per flow event with
both directions' counters (RFC 5103 reverse elements) and, when conntrack
translated the flow, its post-NAT addresses and ports.  docs/ipfix.md lists
every element and how nfdump, pmacct and tshark read them.

What is exported (the `kinds` key, default update and destroy):
- DESTROY: the flow's last record (flowEndReason idle timeout or end of flow);
- UPDATE: an active-timeout record (flowEndReason 2) while the flow lives;
  `kinds: [destroy]` exports finished flows only;
- NEW: not by default.
Delta counters are the gain since the flow's previous *exported* record, so
they add up to the flow's final totals whichever kinds are exported.

Transport:
- UDP: templates go out ahead of the first message, then again every
  `template_refresh` seconds and every `template_refresh_messages` messages
  (RFC 7011 §8.4), and after a send error (a collector that restarted has
  lost them).
- TCP: templates once per connection; a lost connection fails the write,
  and the pipeline's retries reconnect.  A new connection is a new transport
  session: its sequence numbers start again at 0.

The encoding (elements, templates, records, message packing) is
conntracct/ipfix_encoding.py; this module holds the configuration, the
per-flow delta state and the socket.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field

from ..configtypes import PositiveDuration
from ..flow import DESTROY, UPDATE, FlowEvent
from ..ipfix_encoding import (
    DEFAULT_PEN,
    ZERO,
    Body,
    Counters,
    RecordEncoder,
    Session,
    pack_records,
    template_bodies,
    totals,
)
from .base import Sink, SinkConfig, TransientSinkError, WriteResult
from .common import host_port

log = logging.getLogger(__name__)

DEFAULT_PORT = 4739   # IANA: ipfix over UDP and TCP
COLLECTOR_HINT = "expected host:port such as 192.0.2.10:4739, collector.example:4739 or [2001:db8::10]:4739"
# Bytes of IP and transport headers around a message, for the MTU bound.
_IP_HEADER = {socket.AF_INET: 20, socket.AF_INET6: 40}
_TRANSPORT_HEADER = {"udp": 8, "tcp": 20}
# Flows whose last exported counters are kept (for deltas); past it the
# least recently exported is forgotten (its next record's deltas restart
# from zero).  Finished flows leave at once.
FLOW_LIMIT = 1 << 20


def parse_collector(value: str) -> tuple[str, int]:
    """'192.0.2.10:4739' / '[2001:db8::10]:4739' / 'name:4739' / 'name' -> (host, port)."""
    return host_port(value, COLLECTOR_HINT, default_port=DEFAULT_PORT)


def _check_collector(value: str) -> str:
    parse_collector(value)
    return value.strip()


class IPFIXConfig(SinkConfig):
    type: Literal["ipfix"]
    collector: Annotated[str, AfterValidator(_check_collector)]
    transport: Literal["udp", "tcp"] = "udp"
    observation_domain_id: int = Field(1, ge=0, le=0xFFFFFFFF)
    # The path MTU: a message with its IP and UDP/TCP headers fits in it.
    mtu: int = Field(1500, ge=256, le=65535)
    template_refresh: PositiveDuration = 60.0          # UDP: re-send templates this often...
    template_refresh_messages: int = Field(100, ge=1)  # ...and after this many messages
    pen: int = Field(DEFAULT_PEN, ge=1, le=0xFFFFFFFF)   # enterprise number of zone and mark
    timeout: PositiveDuration = 5.0                    # TCP connect and send


class FlowDeltas:
    """Each flow's totals at its previous exported record: the base its next
    record's deltas are counted from.

    Only records that were sent move a flow on (`sent`), so a retried record
    gets the same deltas again, and a flow's deltas add up to its final
    totals whichever of its records the sink receives."""

    def __init__(self, limit: int = FLOW_LIMIT):
        self._last: dict[int, Counters] = {}   # flow id -> totals of its last sent record
        self._limit = limit

    def bases(self, batch: list[FlowEvent]) -> list[Counters]:
        """The base of each record, in order (a flow may appear more than once)."""
        last = self._last
        pending: dict[int, Counters] = {}
        out = []
        for e in batch:
            fid = e.flow_id
            out.append(pending.get(fid) or last.get(fid, ZERO))
            pending[fid] = (e.bytes_orig, e.packets_orig, e.bytes_reply, e.packets_reply)
        return out

    def sent(self, events: list[FlowEvent]) -> None:
        last = self._last
        for e in events:
            last.pop(e.flow_id, None)   # re-inserted last: the dict stays in export order
            if e.kind != DESTROY:
                last[e.flow_id] = totals(e)
        while len(last) > self._limit:
            del last[next(iter(last))]

    def __len__(self) -> int:
        return len(self._last)


class IPFIXSink(Sink):
    Config = IPFIXConfig
    default_kinds: ClassVar[frozenset[str]] = frozenset({UPDATE, DESTROY})

    def __init__(self, config: IPFIXConfig, clock: Callable[[], float] = time.monotonic):
        super().__init__(config)
        self.config: IPFIXConfig = config
        self._host, self._port = parse_collector(config.collector)
        self._udp = config.transport == "udp"
        self._clock = clock
        self._encoder = RecordEncoder(config.pen)
        self._deltas = FlowDeltas()
        self._sock: socket.socket | None = None
        self._max_message = 0
        self._session = Session(config.observation_domain_id)
        self._templates_due = True
        self._templates_at = 0.0
        self._messages_since_templates = 0

    # -- connection --------------------------------------------------------

    def _where(self) -> str:
        return f"collector {self.config.collector} ({self.config.transport})"

    def _connect(self) -> None:
        kind = socket.SOCK_DGRAM if self._udp else socket.SOCK_STREAM
        try:
            infos = socket.getaddrinfo(self._host, self._port, type=kind)
        except socket.gaierror as exc:
            raise TransientSinkError(f"{self._where()}: cannot resolve {self._host!r}: {exc.strerror}") from None
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, kind)
        try:
            sock.settimeout(self.config.timeout)
            # Connected UDP too: an ICMP port unreachable then fails a later
            # send, which tells us the collector went away (and lost templates).
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._max_message = self.config.mtu - _IP_HEADER[family] - _TRANSPORT_HEADER[self.config.transport]
        if not self._udp:
            self._session = Session(self.config.observation_domain_id)   # a new transport session
            self._send_templates()
            log.info("sink %s: connected to %s", self.name, self._where())

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._templates_due = True

    def _peer_closed(self) -> bool:
        """A TCP collector sends nothing: a readable socket means it closed
        (or reset) the connection, and what we write now would be lost."""
        readable, _, _ = select.select([self._sock], [], [], 0)
        if not readable:
            return False
        try:
            return self._sock.recv(4096, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- sending -----------------------------------------------------------

    def _send(self, body: Body) -> None:
        message = self._session.seal(body, int(time.time()))
        if self._udp:
            self._sock.send(message)
        else:
            self._sock.sendall(message)
        self._session.sent(body)
        self._messages_since_templates += 1

    def _send_templates(self) -> None:
        for body in template_bodies(self._max_message, self.config.pen):
            self._send(body)
        self._templates_due = False
        self._templates_at = self._clock()
        self._messages_since_templates = 0

    def _refresh_due(self) -> bool:
        return self._udp and (self._templates_due
                              or self._messages_since_templates >= self.config.template_refresh_messages
                              or self._clock() - self._templates_at >= self.config.template_refresh)

    def _ensure_connected(self) -> None:
        if self._sock is not None and not self._udp and self._peer_closed():
            log.warning("sink %s: %s closed the connection; reconnecting", self.name, self._where())
            self._disconnect()
        try:
            if self._sock is None:
                self._connect()
        except OSError as exc:
            self._disconnect()
            raise TransientSinkError(f"{self._where()}: cannot connect: {exc}") from exc

    def _records(self, batch: list[FlowEvent]) -> list[tuple[int, bytes]]:
        """(template id, record) of each event, deltas from the flow's last sent record."""
        encode = self._encoder.encode
        records = []
        for e, base in zip(batch, self._deltas.bases(batch), strict=True):
            template, record = encode(e, base, e.end_reason)
            records.append((template.id, record))
        return records

    def write(self, batch: list[FlowEvent]) -> WriteResult | None:
        self._ensure_connected()
        done = 0   # records of the batch sent so far (messages hold contiguous runs)
        try:
            for body in pack_records(self._records(batch), self._max_message):
                if self._refresh_due():
                    self._send_templates()
                self._send(body)
                done += body.records
        except OSError as exc:
            if self._udp:
                self._templates_due = True   # e.g. ICMP port unreachable: the collector restarted
            else:
                self._disconnect()
            self._deltas.sent(batch[:done])
            reason = f"{self._where()}: send failed: {exc}"
            if not done:
                raise TransientSinkError(reason) from exc
            return WriteResult(retry=batch[done:], reason=reason)
        self._deltas.sent(batch)
        return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
