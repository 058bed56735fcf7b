"""prometheus sink: an HTTP endpoint Prometheus scrapes (docs/prometheus.md).

Three groups of metrics on one endpoint, each read at scrape time:

- conntrack_exporter's connection-state gauges per remote host
  (conntrack_opening/open/closing/closed_connections{host}), from the live
  flows this sink tracks from NEW / UPDATE / DESTROY records;
- traffic counters per remote host and direction
  (conntrack_flow_bytes_total / conntrack_flow_packets_total{host, direction});
- the agent's own counters (conntracct_*), from the snapshot the agent hands
  over through observe(), as conntracct.selfmetrics defines them (names,
  types, help: one definition the loss log and exit summary share).

The remote host of a flow, from the enricher's `direction` label:
  inbound                        orig.src, with the port the client connected
                                 to (orig.dport): the client's own port is
                                 ephemeral and would make a series per connection
  outbound / forward / local /   reply.src:reply.sport, where the flow really
  unlabelled                     ends: orig.dst:orig.dport unless DNAT moved it
With `host_ports: false` the label is the address alone; protocols without
ports (ICMP, GRE) never carry one.  IPv6 addresses with a port are bracketed.

Host labels: the enricher's labels of a host's first record (configured
labels, range labels: enrich.ranges), all but the per-flow `direction`, are
extra labels on its series (`host_labels: false` leaves them out).  With
range labels of the remote endpoint they follow from the host's address, so
they add no series beyond the cap; `other` has them empty.

Cardinality: at most `max_hosts` hosts have their own series (shared by all
host-labelled families); every other host's flows and traffic count under
host="other".  Hosts are admitted first come while there is room; every
`rebalance_interval` the hosts are ranked by recent traffic (bytes, halved
each interval) and the top `max_hosts` hold the places, incumbents winning
ties.  A demoted host's series end; its past traffic stays where it was
counted, so every series only grows (a host admitted again later starts a new
series from 0, which rate()/increase() read as a counter reset).  Without
accounting (no byte counts) hosts rank by their live flows.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from .. import __version__, selfmetrics
from ..configtypes import Network, PositiveDuration, config_errors
from ..flow import DESTROY, FLAG_NO_ACCT, FlowEvent
from .base import PermanentSinkError, Sink, SinkConfig
from .common import PORT_PROTOS, endpoint, host_port, remote_endpoint

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

# prometheus_client (and the HTTP server) are imported where used: the sink
# registry imports every sink module, and an unused sink should cost nothing.

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9318"   # conntrack_exporter's port
OTHER = "other"                     # the host label of every host without its own series

# Connection-state buckets, as conntrack_exporter's README maps TCP states.
OPENING, OPEN, CLOSING, CLOSED = range(4)
BUCKETS = ("opening", "open", "closing", "closed")
TCP_BUCKETS = {
    "syn_sent": OPENING, "syn_sent2": OPENING, "syn_recv": OPENING,
    "established": OPEN,
    "fin_wait": CLOSING, "close_wait": CLOSING, "last_ack": CLOSING, "time_wait": CLOSING,
    "close": CLOSED,
}
# Index order of a flow's/host's traffic counters.
BYTES_ORIG, BYTES_REPLY, PACKETS_ORIG, PACKETS_REPLY = range(4)


def state_bucket(event: FlowEvent) -> int:
    """The connection-state bucket of a live flow: TCP by its state (an
    unknown or `none` state counts as open), every other protocol open."""
    if event.proto != 6:
        return OPEN
    return TCP_BUCKETS.get(event.tcp_state_name, OPEN)


# -- config --------------------------------------------------------------------

LISTEN_HINT = "expected host:port such as 127.0.0.1:9318, 0.0.0.0:9318 or [::1]:9318"


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:9318' / '[::1]:9318' / 'localhost:9318' -> (host, port); port 0: any free one."""
    return host_port(value, LISTEN_HINT, min_port=0)


def _check_listen(value: str) -> str:
    parse_listen(value)
    return value.strip()


def _check_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() or c in "?#" for c in value):
        raise ValueError("expected a URL path such as /metrics (starting with '/', no spaces, '?' or '#')")
    return value


class PrometheusConfig(SinkConfig):
    type: Literal["prometheus"]
    listen: Annotated[str, AfterValidator(_check_listen)] = DEFAULT_LISTEN
    path: Annotated[str, AfterValidator(_check_path)] = "/metrics"
    max_hosts: int = Field(1000, ge=0)          # hosts with their own series; 0: only `other`
    ignore: list[Network] = Field(default_factory=list)   # remote hosts left out entirely
    host_ports: bool = True                     # host label ip:port (conntrack_exporter) or ip
    rebalance_interval: PositiveDuration = 60.0   # how often the top hosts are re-ranked
    host_labels: bool = True                    # the enricher's labels of a host on its series

    @model_validator(mode="after")
    def _needs_destroy(self) -> PrometheusConfig:
        if "destroy" not in self.kinds:
            raise config_errors([(("kinds",), "expected destroy among the kinds: without DESTROY records "
                                              "ended flows would stay in the connection gauges",
                                  sorted(self.kinds))])
        return self


# -- live flows and hosts ------------------------------------------------------

class _Host:
    """One remote host: live flows per bucket, traffic counted under its own
    label (only while admitted), and its recent traffic for ranking."""

    __slots__ = ("label", "admitted", "live", "totals", "score", "labels")

    def __init__(self, label: str, admitted: bool, labels: tuple[tuple[str, str], ...] = ()):
        self.label = label
        self.admitted = admitted
        self.labels = labels         # (name, value) pairs: the enricher's labels (host_labels)
        self.live = [0, 0, 0, 0]     # flows per bucket
        self.totals = [0, 0, 0, 0]   # BYTES_ORIG.. PACKETS_REPLY since admitted
        self.score = 0               # bytes seen lately, halved each rebalance

    def has_flows(self) -> bool:
        return any(self.live)


_NOTHING_SEEN = (0, 0, 0, 0)
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_]")
_TAKEN = frozenset({"host", "direction"})   # the families' own labels


@lru_cache(maxsize=4096)
def _label_name(name: str) -> str:
    """An enrichment label's name as a Prometheus label name."""
    clean = _NOT_A_NAME.sub("_", name)
    if clean[:1].isdigit() or clean.startswith("__") or clean in _TAKEN:
        clean = "label_" + clean
    return clean


def host_labels(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The labels a host's series carry: the enricher's, but `direction`
    (a flow's, not a host's), names made Prometheus-safe."""
    return tuple(sorted((_label_name(k), str(v)) for k, v in labels.items() if k != "direction" and k))


class _Flow:
    __slots__ = ("host", "bucket", "seen")

    def __init__(self, host: _Host, bucket: int):
        self.host = host
        self.bucket = bucket
        self.seen = _NOTHING_SEEN    # the flow's totals already counted


class FlowTable:
    """Live flows by flow id, grouped by remote host, with the cardinality cap.

    Thread-safe: the sink's worker applies batches while scrapes read."""

    ADDRESS_CACHE = 65536

    def __init__(self, max_hosts: int = 1000, ignore: Iterable[Any] = (), host_ports: bool = True,
                 rebalance_interval: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 host_labels: bool = True):
        self.max_hosts = max_hosts
        self.host_ports = host_ports
        self.host_labels = host_labels
        self.rebalance_interval = rebalance_interval
        self._ignore = tuple(ignore)
        self._clock = clock
        self._lock = threading.Lock()
        self._flows: dict[int, _Flow] = {}
        self._hosts: dict[str, _Host] = {}
        self._admitted = 0
        self._idle = 0                # hosts kept for ranking only: not admitted, no live flow
        self._other = [0, 0, 0, 0]    # traffic of hosts without their own series
        self._ignored: dict[str, bool] = {}
        self.demotions = 0
        self._next_rebalance = clock() + rebalance_interval

    # -- classification ----------------------------------------------------

    def _is_ignored(self, address: str) -> bool:
        verdict = self._ignored.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                verdict = False
            else:
                verdict = any(ip in net for net in self._ignore)
            if len(self._ignored) >= self.ADDRESS_CACHE:
                self._ignored.clear()
            self._ignored[address] = verdict
        return verdict

    def remote(self, event: FlowEvent) -> tuple[str, str]:
        """(address, host label) of the flow's remote endpoint (module docstring)."""
        addr, port = remote_endpoint(event)
        with_port = self.host_ports and event.proto in PORT_PROTOS
        return addr, endpoint(addr, port if with_port else None)

    # -- updates (worker thread) -------------------------------------------

    def apply(self, events: Iterable[FlowEvent]) -> None:
        with self._lock:
            for event in events:
                self._apply(event)
            self._maybe_rebalance()

    def _host(self, label: str, event: FlowEvent) -> _Host:
        host = self._hosts.get(label)
        if host is None:
            admit = self._admitted < self.max_hosts
            labels = host_labels(event.labels) if self.host_labels and event.labels else ()
            host = self._hosts[label] = _Host(label, admit, labels)
            self._admitted += admit
            self._idle += not admit
        return host

    def _apply(self, event: FlowEvent) -> None:
        flow = self._flows.get(event.flow_id)
        if flow is None:
            addr, label = self.remote(event)
            if self._ignore and self._is_ignored(addr):
                return
            host, seen = self._host(label, event), _NOTHING_SEEN
        else:
            host, seen = flow.host, flow.seen
        accounted = not event.flags & FLAG_NO_ACCT   # no accounting: counters are absent, not zero
        if accounted:
            self._count(host, seen, event)
        if event.kind == DESTROY:
            if flow is not None:
                del self._flows[event.flow_id]
                host.live[flow.bucket] -= 1
                self._idle += not host.admitted and not host.has_flows()
            if not host.admitted and not host.has_flows() and self._idle > max(self.max_hosts, 1):
                # Hosts kept only for ranking are bounded too.
                del self._hosts[host.label]
                self._idle -= 1
            return
        bucket = state_bucket(event)
        if flow is None:
            self._idle -= not host.admitted and not host.has_flows()
            flow = self._flows[event.flow_id] = _Flow(host, bucket)
            host.live[bucket] += 1
        elif flow.bucket != bucket:
            host.live[flow.bucket] -= 1
            host.live[bucket] += 1
            flow.bucket = bucket
        if accounted:
            flow.seen = (event.bytes_orig, event.bytes_reply, event.packets_orig, event.packets_reply)

    def _count(self, host: _Host, seen: tuple[int, int, int, int], event: FlowEvent) -> None:
        # Gains from the flow's totals, not the record's deltas: a record lost
        # on the way (queue full, a kind not wanted) then loses no traffic.
        gains = (max(event.bytes_orig - seen[BYTES_ORIG], 0), max(event.bytes_reply - seen[BYTES_REPLY], 0),
                 max(event.packets_orig - seen[PACKETS_ORIG], 0),
                 max(event.packets_reply - seen[PACKETS_REPLY], 0))
        totals = host.totals if host.admitted else self._other
        for i, gain in enumerate(gains):
            totals[i] += gain
        host.score += gains[BYTES_ORIG] + gains[BYTES_REPLY]

    # -- the cap -----------------------------------------------------------

    def _maybe_rebalance(self) -> None:
        now = self._clock()
        if now >= self._next_rebalance:
            self._rebalance()
            self._next_rebalance = now + self.rebalance_interval

    def _rebalance(self) -> None:
        # By recent bytes; then live flows (what is left to rank by when
        # accounting is off); incumbents win ties.
        ranked = sorted((h for h in self._hosts.values() if h.admitted or h.score > 0 or h.has_flows()),
                        key=lambda h: (-h.score, -sum(h.live), not h.admitted, h.label))
        top = {h.label for h in ranked[:self.max_hosts]}
        for host in list(self._hosts.values()):
            if host.admitted and host.label not in top:
                host.admitted = False
                host.totals = [0, 0, 0, 0]
                self.demotions += 1
            elif not host.admitted and host.label in top:
                host.admitted = True
            host.score //= 2
            if not host.admitted and not host.has_flows():
                del self._hosts[host.label]   # forgotten: ranks again from its next flow
        self._admitted = sum(h.admitted for h in self._hosts.values())
        self._idle = 0

    # -- reading (scrape threads) ------------------------------------------

    def sample(self) -> tuple[list[tuple[str, list[int], list[int]]], dict[str, int]]:
        """([(host label, live flows per bucket, traffic totals), ...] with
        `other` last, table stats): a consistent view, rebalanced if due."""
        with self._lock:
            self._maybe_rebalance()
            rows = []
            other_live = [0, 0, 0, 0]
            for host in self._hosts.values():
                if host.admitted:
                    rows.append((host.label, list(host.live), list(host.totals), host.labels))
                else:
                    for i, n in enumerate(host.live):
                        other_live[i] += n
            rows.sort()
            rows.append((OTHER, other_live, list(self._other), ()))
            stats = {"flows": len(self._flows), "hosts": self._admitted, "demotions": self.demotions}
        return rows, stats


# -- collectors: what a scrape reads ------------------------------------------

class FlowCollector:
    """conntrack_exporter's gauges and the traffic counters, from a FlowTable."""

    def __init__(self, table: FlowTable, sink_name: str):
        self.table, self.sink_name = table, sink_name

    def describe(self) -> list:
        return []   # families vary with the table: no registration-time checks

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rows, stats = self.table.sample()
        extra = sorted({name for *_, labels in rows for name, _ in labels})   # host labels, if any
        gauges = [GaugeMetricFamily(f"conntrack_{bucket}_connections", help_text, labels=["host", *extra])
                  for bucket, help_text in zip(BUCKETS, (
                      "How many connections to the remote host are currently opening?",
                      "How many open connections are there to the remote host?",
                      "How many connections to the remote host are currently closing?",
                      "How many connections to the remote host have recently closed?"), strict=True)]
        traffic = CounterMetricFamily("conntrack_flow_bytes", "Bytes of flows with the remote host, by "
                                      "conntrack direction (orig: sent by the flow's initiator)",
                                      labels=["host", "direction", *extra])
        packets = CounterMetricFamily("conntrack_flow_packets", "Packets of flows with the remote host, by "
                                      "conntrack direction (orig: sent by the flow's initiator)",
                                      labels=["host", "direction", *extra])
        for label, live, totals, labels in rows:
            values = [dict(labels).get(name, "") for name in extra] if extra else []
            for gauge, n in zip(gauges, live, strict=True):
                gauge.add_metric([label, *values], n)
            traffic.add_metric([label, "orig", *values], totals[BYTES_ORIG])
            traffic.add_metric([label, "reply", *values], totals[BYTES_REPLY])
            packets.add_metric([label, "orig", *values], totals[PACKETS_ORIG])
            packets.add_metric([label, "reply", *values], totals[PACKETS_REPLY])
        yield from gauges
        yield traffic
        yield packets
        name = [self.sink_name]
        yield _gauge("conntracct_prometheus_flows", "Live flows the prometheus sink tracks",
                     ["sink"], [(name, stats["flows"])])
        yield _gauge("conntracct_prometheus_hosts", "Remote hosts with their own series (at most max_hosts)",
                     ["sink"], [(name, stats["hosts"])])
        yield _counter("conntracct_prometheus_host_demotions", "Hosts that lost their own series to "
                       "busier ones (their traffic counts under host=\"other\" since)",
                       ["sink"], [(name, stats["demotions"])])


def _gauge(name: str, help_text: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _counter(name: str, help_text: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Metric:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def agent_metrics(snapshot: dict[str, Any]) -> Iterator[Metric]:
    """The agent's own metrics from one Agent.snapshot(), as prometheus_client
    families of the typed metrics conntracct.selfmetrics defines."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    for family in selfmetrics.collect(snapshot, __version__):
        metric = family.metric
        if metric.type == selfmetrics.INFO:
            info = InfoMetricFamily(metric.name, metric.help)
            for values, _ in family.samples:
                info.add_metric([], dict(zip(metric.labels, values, strict=True)))
            yield info
            continue
        kind = CounterMetricFamily if metric.type == selfmetrics.COUNTER else GaugeMetricFamily
        out = kind(metric.name, metric.help, labels=list(metric.labels))
        for values, value in family.samples:
            out.add_metric(list(values), value)
        yield out


class AgentCollector:
    """The agent's own metrics, read from its snapshot at each scrape."""

    def __init__(self) -> None:
        self.snapshot: Callable[[], dict] | None = None
        self._failed = False

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot: dict = {}
        if self.snapshot is not None:
            try:
                snapshot = self.snapshot()
            except Exception:   # a broken snapshot must not cost the flow metrics
                if not self._failed:
                    log.warning("prometheus sink: reading the agent's counters failed", exc_info=True)
                self._failed = True
        yield from agent_metrics(snapshot if isinstance(snapshot, dict) else {})


# -- the endpoint --------------------------------------------------------------

def _metrics_app(registry: CollectorRegistry, path: str) -> Callable:
    """prometheus_client's WSGI app at `path` only (it answers on any path)."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        if environ.get("PATH_INFO") == path:
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"conntracct: metrics are at {path}\n".encode()]

    return app


def _make_server(host: str, port: int, family: int, app: Callable) -> WSGIServer:
    """A threaded wsgiref server (prometheus_client's own) bound to host:port."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class Server(ThreadingWSGIServer):
        address_family = family

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass   # a line per scrape would drown the agent's log

    return make_server(host, port, app, Server, handler_class=QuietHandler)


class PrometheusSink(Sink):
    """Serves the metrics from the moment it is created (at agent start)
    until close(); write() only updates the flow table."""

    Config = PrometheusConfig

    def __init__(self, config: PrometheusConfig, clock: Callable[[], float] = time.monotonic):
        super().__init__(config)
        self.table = FlowTable(config.max_hosts, config.ignore, config.host_ports,
                               config.rebalance_interval, clock, config.host_labels)
        self.agent = AgentCollector()
        from prometheus_client import CollectorRegistry

        # Our own registry: no process-wide state, no default process/GC collectors.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FlowCollector(self.table, self.name))
        self.registry.register(self.agent)
        self._server = self._listen(config)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"sink-{self.name}-http", daemon=True)
        self._thread.start()
        log.info("sink %s: serving metrics on %s", self.name, self.url)

    def _listen(self, config: PrometheusConfig) -> WSGIServer:
        host, port = parse_listen(config.listen)
        where = f"sink {self.name!r} (type: prometheus): cannot listen on {config.listen}"
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as exc:
            raise PermanentSinkError(f"{where}: cannot resolve {host!r}: {exc.strerror}") from None
        try:
            return _make_server(sockaddr[0], port, family, _metrics_app(self.registry, config.path))
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                hint = " (another exporter or a second conntracct?); set `listen` to a free address"
            elif exc.errno == errno.EACCES:
                hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            raise PermanentSinkError(f"{where}: {exc.strerror or exc}{hint}") from None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound: `listen` with port 0 picks a free one."""
        host, port = self._server.server_address[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{endpoint(host, port)}{self.config.path}"

    def observe(self, snapshot: Callable[[], dict]) -> None:
        self.agent.snapshot = snapshot

    def write(self, batch: list[FlowEvent]) -> None:
        self.table.apply(batch)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(5)
