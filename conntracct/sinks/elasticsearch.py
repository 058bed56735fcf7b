"""elasticsearch sink: finished flows as Elastic Common Schema documents.

One document per finished flow (DESTROY), `_id` = the flow id, written with
the official `elasticsearch` client's bulk helper; an index template (ip, long,
date_nanos, keyword mappings) installed before the first write.  With
`index_live_flows: true`, NEW/UPDATE records also upsert one document per
living flow into `<index>-live`, and the DESTROY marks it finished.
Fields, template and modes: docs/elasticsearch.md.

Client version: the 8.x client.  It sends `Accept: application/vnd.elasticsearch+json;
compatible-with=8`, which Elasticsearch 8 and 9 both accept; the 9.x client sends
compatible-with=9, which Elasticsearch 8 rejects (400 media_type_header_exception).

Errors: the pipeline retries, the sink only classifies.  Whole requests that
fail with connection errors, timeouts, 429 or 5xx are transient; 401/403, 404,
other 4xx and a server that is not Elasticsearch are permanent.  Per document:
429/5xx items are transient, other 4xx items (mapping errors) are permanent.

A bulk request whose documents failed in part returns a WriteResult
(sinks/base.py): `retry` the throttled ones, `rejected` the refused ones; the
pipeline retries the first and counts the second dropped (permanent_error)
at once.  The sink keeps nothing from one write() to the next.  Every
rejection is also counted in the sink's own counters
(ElasticsearchSink.counters()).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from ..configtypes import PositiveDuration, config_errors
from ..flow import DESTROY, FLAG_NO_ACCT, KINDS, NEW, UPDATE, FlowEvent
from .base import PermanentSinkError, Sink, SinkConfig, TransientSinkError, WriteResult
from .common import PORT_PROTOS, TLSConfig, http_url, read_secrets
from .goschema import conntracct_document
from .records import flag_names, flow_id_text, rfc3339

log = logging.getLogger(__name__)

TEMPLATE_VERSION = 1          # bump when the mappings change: the template is replaced
TEMPLATE_PRIORITY = 200       # above the built-in templates (100); live index: +1

# enrichment's direction label -> ECS network.direction
ECS_DIRECTIONS = {"inbound": "inbound", "outbound": "outbound", "local": "internal", "forward": "external"}

# IPS_* status bits, as `conntrack -L` names them (nf_conntrack_common.h).
STATUS_NAMES = ("expected", "seen_reply", "assured", "confirmed", "src_nat", "dst_nat", "seq_adjust",
                "src_nat_done", "dst_nat_done", "dying", "fixed_timeout", "template", "nat_clash",
                "helper", "offload", "hw_offload")

_EVENT_TYPES = {NEW: ["connection", "start"], UPDATE: ["connection", "info"], DESTROY: ["connection", "end"]}


# -- configuration -----------------------------------------------------------

_INDEX_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _index_prefix(value: str) -> str:
    if not _INDEX_NAME.fullmatch(value) or len(value) > 200:
        raise ValueError("expected an index name: lowercase letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


def _one_or_more(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _some_hosts(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("expected at least one URL such as http://127.0.0.1:9200")
    return value


class ElasticsearchConfig(SinkConfig):
    type: Literal["elasticsearch"]
    hosts: Annotated[list[Annotated[str, AfterValidator(http_url("http://127.0.0.1:9200", port_required=True))]],
                     BeforeValidator(_one_or_more), AfterValidator(_some_hosts)]
    username: str | None = None
    password: str | None = Field(None, repr=False)
    password_env: str | None = None
    api_key: str | None = Field(None, repr=False)    # the encoded key (base64 of id:key)
    api_key_env: str | None = None
    tls: TLSConfig = Field(default_factory=TLSConfig)
    timeout: PositiveDuration = 10.0
    index: Annotated[str, AfterValidator(_index_prefix)] = "conntracct-flows"
    index_mode: Literal["daily", "data_stream"] = "daily"
    index_live_flows: bool = False
    install_template: bool = True
    gzip: bool = True
    observer_hostname: str | None = None   # None: this host's name
    # ecs: Elastic Common Schema (docs/elasticsearch.md); conntracct: the Go
    # agent's documents, event_type and hostname beside its event's fields
    # (goschema.conntracct_document, docs/migrating.md)
    document: Literal["ecs", "conntracct"] = "ecs"

    @model_validator(mode="after")
    def _auth_and_kinds(self) -> ElasticsearchConfig:
        if self.observer_hostname is None:
            self.observer_hostname = socket.gethostname()
        self.password, self.api_key = read_secrets(self, "password", "api_key")
        errors = []
        if self.username is not None and self.password is None:
            errors.append((("password",), "expected password or password_env with username", None))
        if self.password is not None and self.username is None:
            errors.append((("username",), "expected username with password", None))
        if self.api_key is not None and self.username is not None:
            errors.append((("api_key",), "give either username/password or api_key, not both", "<hidden>"))
        living = sorted(self.kinds - {DESTROY})
        if living and not self.index_live_flows:
            errors.append((("kinds",), "new/update records are written only with index_live_flows: true;"
                                       " expected [destroy]", living))
        if self.document == "conntracct" and self.index_mode == "data_stream":
            errors.append((("document",), "expected ecs with index_mode: data_stream (a data stream "
                                          "needs @timestamp, which conntracct's documents have not)",
                           self.document))
        if errors:
            raise config_errors(errors)
        if self.index_live_flows and self.kinds == frozenset({DESTROY}):
            self.kinds = frozenset(KINDS)   # live documents are made of NEW and UPDATE records
        return self


# -- documents ---------------------------------------------------------------

def status_names(status: int) -> list[str]:
    return [name for bit, name in enumerate(STATUS_NAMES) if status >> bit & 1]


def end_ns(event: FlowEvent) -> int:
    """When the document happened: the flow's stop time, else when the record was taken."""
    return event.stop_ns or event.ts_ns


def _ecs_endpoint(ip: str, port: int, with_port: bool) -> dict[str, Any]:
    return {"ip": ip, "port": port} if with_port else {"ip": ip}


def flow_document(event: FlowEvent, observer_hostname: str, live: bool = False) -> dict[str, Any]:
    """The ECS document of one flow record (docs/elasticsearch.md)."""
    o, r = event.orig, event.reply
    ports = event.proto in PORT_PROTOS
    when = end_ns(event)
    ended = event.kind == DESTROY
    ev: dict[str, Any] = {"kind": "event", "category": ["network"], "type": _EVENT_TYPES[event.kind],
                          "action": f"flow-{event.kind}", "module": "conntracct", "dataset": "conntracct.flow"}
    if event.start_ns:
        ev["start"] = rfc3339(event.start_ns)
    if ended:
        ev["end"] = rfc3339(when)
    if event.start_ns and when >= event.start_ns:
        ev["duration"] = when - event.start_ns

    source = _ecs_endpoint(o.src, o.sport, ports)
    destination = _ecs_endpoint(o.dst, o.dport, ports)
    network: dict[str, Any] = {"transport": event.proto_name, "iana_number": str(event.proto),
                               "type": f"ipv{event.family}"}
    if not event.flags & FLAG_NO_ACCT:    # absent, not zero
        source["packets"], source["bytes"] = event.packets_orig, event.bytes_orig
        destination["packets"], destination["bytes"] = event.packets_reply, event.bytes_reply
        network["bytes"] = event.bytes_orig + event.bytes_reply
        network["packets"] = event.packets_orig + event.packets_reply
    network["direction"] = ECS_DIRECTIONS.get(event.labels.get("direction", ""), "unknown")
    nat = event.nat
    if nat:
        if (r.dst, r.dport) != (o.src, o.sport):      # SNAT: the source as the responder sees it
            source["nat"] = _ecs_endpoint(r.dst, r.dport, ports)
        if (r.src, r.sport) != (o.dst, o.dport):      # DNAT: where the flow really went
            destination["nat"] = _ecs_endpoint(r.src, r.sport, ports)

    conntrack: dict[str, Any] = {
        "flow_id": flow_id_text(event.flow_id),
        "zone": event.zone, "mark": event.mark, "netns": event.netns,
        "status": event.status, "status_flags": status_names(event.status),
        "flags": flag_names(event.flags),
    }
    if event.proto == 6:
        conntrack["tcp_state"] = event.tcp_state_name
    conntrack["nat"] = nat
    conntrack["reply"] = {"source": _ecs_endpoint(r.src, r.sport, ports),
                          "destination": _ecs_endpoint(r.dst, r.dport, ports)}
    if live:
        conntrack["finished"] = ended

    doc: dict[str, Any] = {"@timestamp": rfc3339(when), "event": ev, "source": source,
                           "destination": destination, "network": network,
                           "observer": {"hostname": observer_hostname}}
    if event.labels:
        doc["labels"] = dict(event.labels)
    if event.icmp is not None:
        doc["icmp"] = dict(zip(("type", "code", "id"), event.icmp, strict=True))
    doc["conntrack"] = conntrack
    return doc


@lru_cache(maxsize=64)
def _day(day_number: int) -> str:
    return time.strftime("%Y.%m.%d", time.gmtime(day_number * 86400))


def daily_index(prefix: str, event: FlowEvent) -> str:
    """`<prefix>-YYYY.MM.DD` of the flow's end time (UTC)."""
    return f"{prefix}-{_day(end_ns(event) // 86_400_000_000_000)}"


def live_index(prefix: str) -> str:
    return f"{prefix}-live"


# -- index templates ---------------------------------------------------------

_KW, _LONG, _IP, _DATE = {"type": "keyword"}, {"type": "long"}, {"type": "ip"}, {"type": "date_nanos"}


def _endpoint_mapping(counters: bool) -> dict[str, Any]:
    props: dict[str, Any] = {"ip": _IP, "port": _LONG}
    if counters:
        props.update(packets=_LONG, bytes=_LONG, nat={"properties": {"ip": _IP, "port": _LONG}})
    return {"properties": props}


def mappings() -> dict[str, Any]:
    """Explicit mappings for every field the sink writes.  Unmapped fields are
    kept in _source but not indexed (dynamic: false), so a field added by a
    later agent version never fails a document; labels.* are keywords."""
    return {
        "dynamic": False,
        "date_detection": False,
        "dynamic_templates": [{"labels_as_keywords": {
            "path_match": "labels.*", "match_mapping_type": "string", "mapping": _KW}}],
        "properties": {
            "@timestamp": _DATE,
            "event": {"properties": {
                "kind": _KW, "category": _KW, "type": _KW, "action": _KW, "module": _KW, "dataset": _KW,
                "start": _DATE, "end": _DATE, "duration": _LONG}},
            "source": _endpoint_mapping(True),
            "destination": _endpoint_mapping(True),
            "network": {"properties": {
                "transport": _KW, "iana_number": _KW, "type": _KW, "bytes": _LONG, "packets": _LONG,
                "direction": _KW}},
            "observer": {"properties": {"hostname": _KW}},
            "labels": {"type": "object", "dynamic": True},
            "icmp": {"properties": {"type": _LONG, "code": _LONG, "id": _LONG}},
            "conntrack": {"dynamic": False, "properties": {
                "flow_id": _KW, "zone": _LONG, "mark": _LONG, "netns": _LONG, "status": _LONG,
                "status_flags": _KW, "flags": _KW, "tcp_state": _KW, "nat": {"type": "boolean"},
                "finished": {"type": "boolean"},
                "reply": {"properties": {"source": _endpoint_mapping(False),
                                         "destination": _endpoint_mapping(False)}}}},
        },
    }


def index_templates(prefix: str, mode: str, live: bool) -> dict[str, dict[str, Any]]:
    """Template name -> composable index template body (PUT /_index_template/<name>)."""
    meta = {"managed_by": "conntracct", "description": "conntracct flow records (docs/elasticsearch.md)"}
    main: dict[str, Any] = {
        "index_patterns": [prefix] if mode == "data_stream" else [f"{prefix}-*"],
        "priority": TEMPLATE_PRIORITY,
        "version": TEMPLATE_VERSION,
        "_meta": meta,
        "template": {"mappings": mappings()},
    }
    if mode == "data_stream":
        main["data_stream"] = {}
    templates = {prefix: main}
    if live:
        # A plain index even in data_stream mode (documents are updated in
        # place); one priority higher, so it wins over `<prefix>-*` in daily mode.
        templates[live_index(prefix)] = {
            "index_patterns": [live_index(prefix)], "priority": TEMPLATE_PRIORITY + 1,
            "version": TEMPLATE_VERSION, "_meta": meta, "template": {"mappings": mappings()}}
    return templates


# -- bulk actions ------------------------------------------------------------

_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _conntracct_document(event: FlowEvent, hostname: str, live: bool = False) -> dict[str, Any]:
    return conntracct_document(event, hostname)


class BulkBody:
    """Turns flow records into bulk actions: (header, pre-encoded source)."""

    def __init__(self, prefix: str, mode: str, live: bool, observer_hostname: str, document: str = "ecs"):
        self.prefix, self.mode, self.live, self.hostname = prefix, mode, live, observer_hostname
        self._live_index = live_index(prefix)
        self._document = flow_document if document == "ecs" else _conntracct_document

    def actions(self, event: FlowEvent) -> Iterator[tuple[dict[str, Any], bytes]]:
        fid = flow_id_text(event.flow_id)
        if event.kind == DESTROY:
            doc = _ENCODE(self._document(event, self.hostname)).encode()
            if self.mode == "data_stream":
                yield {"create": {"_index": self.prefix, "_id": fid}}, doc
            else:
                yield {"index": {"_index": daily_index(self.prefix, event), "_id": fid}}, doc
        if self.live:
            live_doc = _ENCODE({"doc": self._document(event, self.hostname, live=True),
                                "doc_as_upsert": True}).encode()
            yield {"update": {"_index": self._live_index, "_id": fid, "retry_on_conflict": 3}}, live_doc

    def ndjson(self, batch: list[FlowEvent]) -> bytes:
        """The whole bulk request body (what the benchmark measures as encode-only)."""
        lines = []
        for event in batch:
            for header, source in self.actions(event):
                lines += (_ENCODE(header).encode(), source)
        lines.append(b"")
        return b"\n".join(lines)


# -- the sink ----------------------------------------------------------------

OK, TRANSIENT, PERMANENT = 0, 1, 2
_FILTER_PATH = "errors,items.*._index,items.*._id,items.*.status,items.*.error"


def _item_verdict(op: str, item: dict[str, Any]) -> int:
    status = item.get("status", 500)
    if 200 <= status < 300 or (status == 409 and op == "create"):   # create: already written
        return OK
    if status == 429 or status >= 500 or (status == 409 and op == "update"):
        return TRANSIENT
    return PERMANENT


def _item_reason(item: dict[str, Any]) -> str:
    error = item.get("error")
    if isinstance(error, dict):
        text = f"{error.get('type', '?')}: {error.get('reason', '')}"
    else:
        text = str(error)
    return f"{item.get('status', '?')} {text} (index {item.get('_index', '?')}, id {item.get('_id', '?')})"


class ElasticsearchSink(Sink):
    Config = ElasticsearchConfig
    default_kinds = frozenset({DESTROY})

    def __init__(self, config: ElasticsearchConfig):
        super().__init__(config)
        # Imported here, not at module level: an unused sink costs nothing.
        import elasticsearch
        import elasticsearch.helpers

        self._es = elasticsearch
        self._streaming_bulk = elasticsearch.helpers.streaming_bulk
        self._body = BulkBody(config.index, config.index_mode, config.index_live_flows,
                              config.observer_hostname, config.document)
        self._templates = index_templates(config.index, config.index_mode, config.index_live_flows)
        self._templates_installed = not config.install_template
        self._client = elasticsearch.Elasticsearch(**self._client_options(config))
        self._lock = threading.Lock()
        self._counters = dict.fromkeys((
            "bulk_requests", "bulk_failures", "documents_written", "documents_throttled",
            "documents_rejected", "documents_superseded", "template_installs", "template_failures"), 0)

    def _client_options(self, config: ElasticsearchConfig) -> dict[str, Any]:
        options: dict[str, Any] = {
            "hosts": config.hosts,
            "request_timeout": config.timeout,
            "http_compress": config.gzip,
            # Retries are the pipeline's; the transport only fails over to the
            # next host on a connection error.
            "max_retries": len(config.hosts) - 1,
            "retry_on_timeout": False,
            "retry_on_status": (),
        }
        if config.username is not None:
            options["basic_auth"] = (config.username, config.password)
        elif config.api_key is not None:
            options["api_key"] = config.api_key
        if any(h.startswith("https:") for h in config.hosts):
            options["verify_certs"] = config.tls.verify
            if config.tls.ca_file:
                options["ca_certs"] = config.tls.ca_file
            if not config.tls.verify:
                options["ssl_show_warn"] = False
                log.warning("sink %s: tls.verify is false: the server's certificate is not checked", self.name)
        return options

    # -- counters ------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, n in deltas.items():
                self._counters[key] += n

    def counters(self) -> dict[str, int]:
        """The sink's own counters (in addition to the pipeline's)."""
        with self._lock:
            return dict(self._counters)

    # -- errors --------------------------------------------------------------

    def _what(self) -> str:
        return f"elasticsearch sink {self.name!r}"

    def _request_error(self, exc: Exception, doing: str) -> TransientSinkError | PermanentSinkError:
        """The sink error for a request that failed as a whole."""
        es = self._es
        hosts = ", ".join(self.config.hosts)
        if isinstance(exc, es.UnsupportedProductError):
            return PermanentSinkError(
                f"{self._what()}: {hosts} is not Elasticsearch or runs an unsupported version "
                f"(no 'X-Elastic-Product: Elasticsearch' header; OpenSearch is not supported): {exc}")
        if isinstance(exc, es.ApiError):
            status = exc.status_code
            where = f"{doing} at {self._url(exc)}"
            if status in (401, 403):
                kind = "bad credentials" if status == 401 else "credentials lack the privilege"
                return PermanentSinkError(f"{self._what()}: {kind} ({status} from {where}); "
                                          f"check username/password or api_key: {exc}")
            if status == 404:
                return PermanentSinkError(f"{self._what()}: {status} not found: {where}; check hosts "
                                          f"(URL path prefix) and index: {exc}")
            if status == 400 and "media_type_header_exception" in str(exc):
                return PermanentSinkError(
                    f"{self._what()}: the server rejected the client's compatible-with header ({where}): "
                    f"use the elasticsearch 8.x Python client with Elasticsearch 8 servers: {exc}")
            if status == 429 or status >= 500:
                return TransientSinkError(f"{self._what()}: {doing}: {exc}")
            if status == 413:
                return PermanentSinkError(f"{self._what()}: {doing}: request too large; lower batch_size: {exc}")
            return PermanentSinkError(f"{self._what()}: {doing} rejected at {where}: {exc}")
        if isinstance(exc, es.SSLError):
            return PermanentSinkError(f"{self._what()}: TLS to {hosts} failed; check tls.ca_file / tls.verify: "
                                      f"{exc}")
        if isinstance(exc, es.TransportError):   # connection refused, timeout, reset, bad response
            detail = getattr(exc, "message", None) or str(exc)
            return TransientSinkError(f"{self._what()}: {doing}: {hosts}: {type(exc).__name__}: {detail}")
        raise exc   # a bug, not a server problem: the pipeline logs and drops

    def _url(self, exc: Exception) -> str:
        node = getattr(getattr(exc, "meta", None), "node", None)
        path = getattr(exc, "_conntracct_path", "")
        if node is None:
            return ", ".join(self.config.hosts) + path
        return f"{node.scheme}://{node.host}:{node.port}{node.path_prefix}{path}"

    # -- template ------------------------------------------------------------

    def _install_templates(self) -> None:
        """Before the first write, and before every write until it worked:
        never writes documents into indices created without the template."""
        if self._templates_installed:
            return
        for name, body in self._templates.items():
            try:
                self._client.indices.put_index_template(name=name, **body)
            except Exception as exc:
                exc._conntracct_path = f"/_index_template/{name}"
                self._count(template_failures=1)
                error = self._request_error(exc, f"installing index template {name!r}")
                if isinstance(error, TransientSinkError) or getattr(exc, "status_code", 0) in (400, 403):
                    error = type(error)(f"{error}; nothing is written until the template is installed "
                                        "(or set install_template: false and install it yourself)")
                raise error from exc
        self._templates_installed = True
        self._count(template_installs=1)
        log.info("sink %s: index template %s installed", self.name, ", ".join(self._templates))

    # -- writing -------------------------------------------------------------

    def write(self, batch: list[FlowEvent]) -> WriteResult | None:
        self._install_templates()
        owners: list[int] = []       # action -> its event's position in batch
        actions: list[tuple[dict[str, Any], bytes]] = []
        for i, event in enumerate(batch):
            for action in self._body.actions(event):
                actions.append(action)
                owners.append(i)
        results = self._bulk(actions) if actions else []
        return self._result(batch, owners, actions, results)

    def _bulk(self, actions: list[tuple[dict[str, Any], bytes]]) -> list[tuple[int, str]]:
        """Send the actions; (verdict, reason) per action, in order.  Actions
        left unanswered when a request fails take that request's verdict."""
        results: list[tuple[int, str]] = []
        self._count(bulk_requests=1)
        try:
            for _ok, info in self._streaming_bulk(
                    self._client, actions, expand_action_callback=lambda action: action,
                    chunk_size=len(actions), raise_on_error=False, raise_on_exception=True,
                    max_retries=0, filter_path=_FILTER_PATH):
                op, item = next(iter(info.items()))
                results.append((_item_verdict(op, item), _item_reason(item)))
        except Exception as exc:
            self._count(bulk_failures=1)
            exc._conntracct_path = "/_bulk"
            error = self._request_error(exc, "bulk request")
            if not results:
                raise error from exc
            verdict = TRANSIENT if isinstance(error, TransientSinkError) else PERMANENT
            results += [(verdict, str(error))] * (len(actions) - len(results))
        return results

    def _result(self, batch: list[FlowEvent], owners: list[int], actions: list[tuple[dict, bytes]],
                results: list[tuple[int, str]]) -> WriteResult | None:
        """The batch's WriteResult from the verdicts of its actions (an event
        fails with its worst action); None when every document was written."""
        verdicts = [OK] * len(batch)
        reasons: dict[int, str] = {}
        live_ok_later: set[int] = set()    # flow ids whose live document a later record wrote
        for k in range(len(actions) - 1, -1, -1):
            i, (verdict, reason) = owners[k], results[k]
            event = batch[i]
            is_live = "update" in actions[k][0]
            if is_live and verdict == TRANSIENT and event.kind != DESTROY and event.flow_id in live_ok_later:
                self._count(documents_superseded=1)   # a later record of the flow already replaced it
                verdict = OK
            if is_live and verdict == OK:
                live_ok_later.add(event.flow_id)
            if verdict > verdicts[i]:
                verdicts[i], reasons[i] = verdict, reason
        throttled = [i for i, v in enumerate(verdicts) if v == TRANSIENT]
        rejected = [i for i, v in enumerate(verdicts) if v == PERMANENT]
        self._count(documents_written=len(batch) - len(throttled) - len(rejected),
                    documents_throttled=len(throttled), documents_rejected=len(rejected))
        if not throttled and not rejected:
            return None
        parts = []
        if throttled:
            parts.append(f"{len(throttled)} of {len(batch)} documents not written, will retry: "
                         f"{reasons[throttled[0]]}")
        if rejected:
            parts.append(f"{len(rejected)} of {len(batch)} documents rejected by Elasticsearch: "
                         f"{reasons[rejected[0]]}")
        return WriteResult(retry=[batch[i] for i in throttled], rejected=[batch[i] for i in rejected],
                           reason=f"{self._what()}: " + "; ".join(parts))

    def close(self) -> None:
        self._client.close()
