"""A wire-level Elasticsearch double for the elasticsearch sink's tests.

No Elasticsearch or OpenSearch server can be installed on the CI machine, so
the tests talk HTTP to this in-process server instead.  It behaves like
Elasticsearch 8.x / 9.x on the points the official Python client and the sink
rely on, and nothing more:

- `X-Elastic-Product: Elasticsearch` on every response (the client refuses a
  2xx response without it), unless built with product=False;
- the REST compatibility headers: `Accept` / `Content-Type` of
  `application/vnd.elasticsearch+json; compatible-with=N` are accepted for
  N = major or major-1 and answered with the same vendor media type; any other
  N is a 400 media_type_header_exception, as the real server does (an ES 8
  server rejects the 9.x client's compatible-with=9);
- gzip request bodies (`Content-Encoding: gzip`) and gzip responses when the
  client accepts them (http.compression);
- basic and ApiKey authentication (401 security_exception when missing/wrong);
- `GET /`, `PUT|GET /_index_template/<name>` (with the same-priority overlap
  check), `POST [/<index>]/_bulk` (index/create/update/delete, per-item status,
  `errors`, created/updated/noop results, 409 on create of an existing _id,
  data streams: create only, `@timestamp` required, backing `.ds-` indices),
  `GET /<index>/_doc/<id>`, `POST /<index>/_search` (match_all, term, size),
  `POST /<index>/_refresh`, `filter_path` on every response;
- fault injection: whole-request errors (429/503/...) for the next N requests,
  per-document statuses (429 for the first N tries, 400 mapping errors always),
  a delay before every answer, a reverse-proxy path prefix (404 elsewhere).

Documents are visible at once (refresh is a no-op).  Not modelled: mappings
enforcement, shards, scoring, aggregations, sorting, scroll.
"""

from __future__ import annotations

import base64
import fnmatch
import gzip
import json
import re
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_COMPAT = re.compile(r"application/vnd\.elasticsearch\+([a-z-]+)\s*;\s*compatible-with\s*=\s*(\d+)", re.I)
_ERROR_TYPES = {400: "document_parsing_exception", 429: "es_rejected_execution_exception",
                500: "exception", 503: "unavailable_shards_exception"}
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


class ApiError(Exception):
    def __init__(self, status: int, error_type: str, reason: str, caused_by: dict | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.error_type, self.reason = status, error_type, reason
        self.caused_by, self.headers = caused_by, headers or {}

    def body(self) -> dict[str, Any]:
        cause = {"type": self.error_type, "reason": self.reason}
        error = dict(cause, root_cause=[cause])
        if self.caused_by:
            error["caused_by"] = self.caused_by
        return {"error": error, "status": self.status}


@dataclass
class Request:
    """One request as the double saw it (for assertions)."""
    method: str
    path: str
    headers: dict[str, str]
    raw_length: int             # body bytes on the wire
    body: bytes                 # decoded (gunzipped) body
    status: int = 0


@dataclass
class Index:
    name: str
    template: str | None
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)   # _id -> {_source, _version, _seq_no}
    seq_no: int = 0
    data_stream: str | None = None


@lru_cache(maxsize=4096)
def _key_matches(key: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern)


def filter_path(value: Any, patterns: list[list[str]]) -> Any:
    """Elasticsearch's filter_path: dotted paths, `*` matches one key, `**` any
    depth; arrays are transparent.  None when nothing is left."""
    if not patterns:
        return None
    if isinstance(value, list):
        kept = [v for v in (filter_path(item, patterns) for item in value) if v is not None]
        return kept or None
    if not isinstance(value, dict):
        return None
    out = {}
    for key, sub in value.items():
        rest, whole = [], False
        for pattern in patterns:
            head, tail = pattern[0], pattern[1:]
            if head == "**":
                rest.append(pattern)          # ** may match deeper levels too
                if tail and _key_matches(key, tail[0]):
                    if len(tail) == 1:
                        whole = True
                    else:
                        rest.append(tail[1:])
            elif _key_matches(key, head):
                if tail:
                    rest.append(tail)
                else:
                    whole = True
        if whole:
            out[key] = sub
        elif rest:
            kept = filter_path(sub, rest)
            if kept is not None:
                out[key] = kept
    return out or None


def _get_path(source: dict[str, Any], dotted: str) -> list[Any]:
    """Values at a dotted path (dotted keys and arrays of objects both work)."""
    values = [source]
    for part in dotted.split("."):
        found = []
        for v in values:
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, dict) and part in item:
                    found.append(item[part])
        values = found
    flat = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    if not flat and "." in dotted and dotted in source:
        flat = [source[dotted]]
    return flat


def _merge(target: dict[str, Any], doc: dict[str, Any]) -> bool:
    """Partial update: objects merge, everything else replaces.  True if changed."""
    changed = False
    for key, value in doc.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            changed |= _merge(target[key], value)
        elif target.get(key, object()) != value:
            target[key] = value
            changed = True
    return changed


class EsDouble:
    """The server.  `with EsDouble(version="8.19.3") as es: es.url ...`"""

    def __init__(self, version: str = "8.19.3", port: int = 0, auth: tuple[str, ...] | None = None,
                 product: bool = True, delay: float = 0.0, path_prefix: str = ""):
        self.version = version
        self.version_tuple = tuple(int(n) for n in version.split(".")[:2])
        self.major = self.version_tuple[0]
        self.auth = auth                 # ("basic", user, password) | ("apikey", encoded) | None
        self.product, self.delay, self.path_prefix = product, delay, path_prefix.rstrip("/")
        self.lock = threading.RLock()
        self.templates: dict[str, dict[str, Any]] = {}
        self.indices: dict[str, Index] = {}
        self.data_streams: dict[str, list[str]] = {}
        self.requests: list[Request] = []
        self._request_faults: list[tuple[int, tuple[str, ...]]] = []
        self._item_faults: dict[str, list[int | None]] = {}   # _id -> statuses for the next tries; None: ok
        self._sticky_faults: dict[str, int] = {}
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------

    def start(self) -> EsDouble:
        double = self

        class Handler(_Handler):
            es = double

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="es-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> EsDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # -- fault injection -----------------------------------------------------

    def fail_requests(self, status: int, count: int = 1, paths: tuple[str, ...] = ("/_bulk",)) -> None:
        """The next `count` requests whose path ends with one of `paths` fail as a whole."""
        with self.lock:
            self._request_faults += [(status, paths)] * count

    def throttle(self, doc_id: str, times: int = 1, status: int = 429) -> None:
        """The document with this _id gets `status` on its next `times` tries, then succeeds."""
        with self.lock:
            self._item_faults.setdefault(doc_id, []).extend([status] * times)

    def reject(self, doc_id: str, status: int = 400) -> None:
        """The document with this _id fails with `status` every time (a mapping error by default)."""
        with self.lock:
            self._sticky_faults[doc_id] = status

    # -- introspection -------------------------------------------------------

    def docs(self, pattern: str = "*") -> dict[str, dict[str, Any]]:
        """_id -> _source of the documents in indices or data streams matching `pattern`."""
        with self.lock:
            return {doc_id: json.loads(json.dumps(d["_source"]))
                    for index in self._resolve(pattern) for doc_id, d in index.docs.items()}

    def _resolve(self, expression: str) -> list[Index]:
        found: list[Index] = []
        for part in expression.split(","):
            for name, backing in self.data_streams.items():
                if fnmatch.fnmatchcase(name, part):
                    found += [self.indices[b] for b in backing]
            found += [ix for name, ix in self.indices.items()
                      if ix.data_stream is None and fnmatch.fnmatchcase(name, part)]
        return found

    # -- index resolution as on write ----------------------------------------

    def _template_for(self, name: str) -> tuple[str, dict[str, Any]] | None:
        best = None
        for tname, body in self.templates.items():
            if any(fnmatch.fnmatchcase(name, p) for p in body.get("index_patterns", [])):
                if best is None or body.get("priority", 0) > best[1].get("priority", 0):
                    best = (tname, body)
        return best

    def _write_target(self, name: str, op: str) -> Index:
        """The index a write to `name` lands in, auto-creating it (or a data stream)."""
        if name in self.data_streams:
            if op != "create":
                raise ApiError(400, "illegal_argument_exception",
                               "only write ops with an op_type of create are allowed in data streams")
            return self.indices[self.data_streams[name][-1]]
        if name in self.indices:
            return self.indices[name]
        if name.startswith(("_", "-", "+")) or name != name.lower():
            raise ApiError(400, "invalid_index_name_exception", f"Invalid index name [{name}]")
        template = self._template_for(name)
        if template is not None and "data_stream" in template[1]:
            if op != "create":
                raise ApiError(400, "illegal_argument_exception",
                               "only write ops with an op_type of create are allowed in data streams")
            backing = f".ds-{name}-{time.strftime('%Y.%m.%d', time.gmtime())}-000001"
            self.indices[backing] = Index(backing, template[0], data_stream=name)
            self.data_streams[name] = [backing]
            return self.indices[backing]
        self.indices[name] = Index(name, template[0] if template else None)
        return self.indices[name]

    # -- endpoints -----------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"name": "es-double", "cluster_name": "conntracct-test", "cluster_uuid": "dOuBlE0000000000000000",
                "version": {"number": self.version, "build_flavor": "default", "build_type": "docker",
                            "build_hash": "0" * 40, "build_date": "2026-01-01T00:00:00.000Z",
                            "build_snapshot": False, "lucene_version": "9.12.0" if self.major < 9 else "10.2.0",
                            "minimum_wire_compatibility_version": f"{self.major - 1}.17.0",
                            "minimum_index_compatibility_version": f"{self.major - 1}.0.0"},
                "tagline": "You Know, for Search"}

    def put_template(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        patterns = body.get("index_patterns")
        if not patterns:
            raise ApiError(400, "action_request_validation_exception",
                           "Validation Failed: 1: index patterns are missing;")
        if isinstance(patterns, str):
            body["index_patterns"] = patterns = [patterns]
        priority = body.get("priority", 0)
        for other, obody in self.templates.items():
            if other == name or obody.get("priority", 0) != priority:
                continue
            overlap = [p for p in obody["index_patterns"] for q in patterns
                       if fnmatch.fnmatchcase(p, q) or fnmatch.fnmatchcase(q, p)]
            if overlap:
                raise ApiError(400, "illegal_argument_exception",
                               f"index template [{name}] has index patterns {patterns} matching patterns from "
                               f"existing templates [{other}] with patterns ({other} => {obody['index_patterns']})"
                               f" that have the same priority [{priority}], multiple index templates may not "
                               "match during index creation, please use a different priority")
        self.templates[name] = body
        return {"acknowledged": True}

    def get_template(self, name: str) -> dict[str, Any]:
        if name not in self.templates:
            raise ApiError(404, "resource_not_found_exception", f"index template matching [{name}] not found")
        return {"index_templates": [{"name": name, "index_template": self.templates[name]}]}

    def bulk(self, body: bytes, default_index: str | None) -> tuple[int, dict[str, Any]]:
        started = time.monotonic()
        lines = [line for line in body.split(b"\n") if line.strip()]
        items, errors, n = [], False, 0
        while n < len(lines):
            try:
                action = json.loads(lines[n])
            except ValueError as exc:
                raise ApiError(400, "x_content_parse_exception", f"[{n + 1}:1] Unexpected character: {exc}") from None
            if not isinstance(action, dict) or len(action) != 1:
                raise ApiError(400, "illegal_argument_exception",
                               f"Malformed action/metadata line [{n + 1}], expected START_OBJECT")
            op, meta = next(iter(action.items()))
            if op not in ("index", "create", "update", "delete"):
                raise ApiError(400, "illegal_argument_exception",
                               f"Malformed action/metadata line [{n + 1}], expected field [create], [delete], "
                               f"[index] or [update] but found [{op}]")
            source = None
            if op != "delete":
                if n + 1 >= len(lines):
                    raise ApiError(400, "illegal_argument_exception",
                                   "The bulk request must be terminated by a newline [\\n]")
                source = json.loads(lines[n + 1])
                n += 1
            n += 1
            item = self._bulk_item(op, meta, source, default_index)
            errors |= "error" in item
            items.append({op: item})
        took = int((time.monotonic() - started) * 1000)
        return 200, {"errors": errors, "took": took, "items": items}

    def _bulk_item(self, op: str, meta: dict[str, Any], source: Any, default_index: str | None) -> dict[str, Any]:
        name = meta.get("_index", default_index)
        doc_id = meta.get("_id")
        if doc_id is None and op in ("index", "create"):
            doc_id = base64.urlsafe_b64encode(time.time_ns().to_bytes(12, "big")).decode().rstrip("=")
        item: dict[str, Any] = {"_index": name, "_id": doc_id}
        status = self._sticky_faults.get(doc_id)
        queued = self._item_faults.get(doc_id)
        if status is None and queued:
            status = queued.pop(0)
        if status is not None:
            return self._item_error(item, status)
        try:
            index = self._write_target(name, op)
            item["_index"] = index.name
            if index.data_stream and op != "delete" and "@timestamp" not in (source or {}):
                raise ApiError(400, "document_parsing_exception",
                               "data stream timestamp field [@timestamp] is missing")
            return self._apply(index, op, doc_id, source, item)
        except ApiError as exc:
            item.update(status=exc.status, error={"type": exc.error_type, "reason": exc.reason})
            return item

    def _item_error(self, item: dict[str, Any], status: int) -> dict[str, Any]:
        error_type = _ERROR_TYPES.get(status, "exception")
        if status == 400:
            # renamed in 8.8
            error_type = "document_parsing_exception" if self.version_tuple >= (8, 8) else "mapper_parsing_exception"
            reason = (f"[1:42] failed to parse field [source.ip] of type [ip] in document with id "
                      f"'{item['_id']}'. Preview of field's value: 'not-an-ip'")
        elif status == 429:
            reason = ("rejected execution of coordinating operation [coordinating_and_primary_bytes=0, "
                      "replica_bytes=0, all_bytes=0, coordinating_operation_bytes=1, max_coordinating_and_"
                      "primary_bytes=0]")
        else:
            reason = _REASONS.get(status, "injected failure")
        item.update(status=status, error={"type": error_type, "reason": reason, "index": item["_index"]})
        return item

    def _apply(self, index: Index, op: str, doc_id: str, source: Any, item: dict[str, Any]) -> dict[str, Any]:
        current = index.docs.get(doc_id)
        if op == "create" and current is not None:
            raise ApiError(409, "version_conflict_engine_exception",
                           f"[{doc_id}]: version conflict, document already exists "
                           f"(current version [{current['_version']}])")
        if op == "delete":
            if current is None:
                return self._written(index, doc_id, None, "not_found", 404, item)
            del index.docs[doc_id]
            return self._written(index, doc_id, None, "deleted", 200, item, current["_version"] + 1)
        if op == "update":
            if not isinstance(source, dict) or not ("doc" in source or "upsert" in source):
                raise ApiError(400, "action_request_validation_exception",
                               "Validation Failed: 1: script or doc is missing;")
            if current is None:
                if source.get("doc_as_upsert"):
                    new = source.get("doc", {})
                elif "upsert" in source:
                    new = source["upsert"]
                else:
                    raise ApiError(404, "document_missing_exception", f"[{doc_id}]: document missing")
                return self._written(index, doc_id, json.loads(json.dumps(new)), "created", 201, item)
            merged = json.loads(json.dumps(current["_source"]))
            if not _merge(merged, source.get("doc", {})) and source.get("detect_noop", True):
                return self._written(index, doc_id, merged, "noop", 200, item, current["_version"])
            return self._written(index, doc_id, merged, "updated", 200, item, current["_version"] + 1)
        if not isinstance(source, dict):
            raise ApiError(400, "document_parsing_exception", "[1:1] failed to parse: not an object")
        if current is None:
            return self._written(index, doc_id, source, "created", 201, item)
        return self._written(index, doc_id, source, "updated", 200, item, current["_version"] + 1)

    def _written(self, index: Index, doc_id: str, source: Any, result: str, status: int,
                 item: dict[str, Any], version: int = 1) -> dict[str, Any]:
        if source is not None and result != "noop":
            index.seq_no += 1
            index.docs[doc_id] = {"_source": source, "_version": version, "_seq_no": index.seq_no}
        item.update(_version=version, result=result,
                    _shards={"total": 2, "successful": 1, "failed": 0},
                    _seq_no=index.seq_no, _primary_term=1, status=status)
        return item

    def get_doc(self, name: str, doc_id: str) -> tuple[int, dict[str, Any]]:
        index = self.indices.get(name)
        if index is None:
            raise ApiError(404, "index_not_found_exception", f"no such index [{name}]")
        doc = index.docs.get(doc_id)
        if doc is None:
            return 404, {"_index": name, "_id": doc_id, "found": False}
        return 200, {"_index": name, "_id": doc_id, "_version": doc["_version"], "_seq_no": doc["_seq_no"],
                     "_primary_term": 1, "found": True, "_source": doc["_source"]}

    def search(self, expression: str, body: dict[str, Any], size: int | None) -> dict[str, Any]:
        query = body.get("query", {"match_all": {}})
        size = body.get("size", 10) if size is None else size
        hits = []
        for index in self._resolve(expression):
            for doc_id, doc in index.docs.items():
                if self._matches(query, doc["_source"]):
                    hits.append({"_index": index.name, "_id": doc_id, "_score": 1.0, "_source": doc["_source"]})
        return {"took": 1, "timed_out": False,
                "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
                "hits": {"total": {"value": len(hits), "relation": "eq"}, "max_score": 1.0 if hits else None,
                         "hits": hits[:size]}}

    @staticmethod
    def _matches(query: dict[str, Any], source: dict[str, Any]) -> bool:
        if "match_all" in query:
            return True
        if "term" in query:
            (field_name, value), = query["term"].items()
            if isinstance(value, dict):
                value = value["value"]
            return value in _get_path(source, field_name)
        raise ApiError(400, "parsing_exception", f"unknown query [{next(iter(query), '')}] (the double "
                                                 "supports match_all and term)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # as Elasticsearch (Netty) does: no 40 ms delayed-ACK stalls
    es: EsDouble

    def log_message(self, format: str, *args: Any) -> None:   # quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- plumbing ------------------------------------------------------------

    def _handle(self, method: str) -> None:
        es = self.es
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = gzip.decompress(raw) if "gzip" in self.headers.get("Content-Encoding", "") else raw
        split = urlsplit(self.path)
        path, params = unquote(split.path), {k: v[-1] for k, v in parse_qs(split.query).items()}
        request = Request(method, path, {k.lower(): v for k, v in self.headers.items()}, len(raw), body)
        with es.lock:
            es.requests.append(request)
        if es.delay:
            time.sleep(es.delay)
        if es.path_prefix:
            if not (path == es.path_prefix or path.startswith(es.path_prefix + "/")):
                # a reverse proxy in front of the cluster: its own 404, no product header
                request.status = 404
                return self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html",
                                  product=False)
            path = path[len(es.path_prefix):] or "/"
        compat = None
        try:
            compat = self._compat_version()
            self._check_auth(path)
            with es.lock:
                fault = next((f for f in es._request_faults if path.endswith(f[1])), None)
                if fault is not None:
                    es._request_faults.remove(fault)
                    status = fault[0]
                    raise ApiError(status, _ERROR_TYPES.get(status, "exception"), f"injected {status}: "
                                   f"{_REASONS.get(status, 'failure')}",
                                   headers={"Retry-After": "1"} if status in (429, 503) else None)
                status, payload = self._route(method, path, params, body)
        except ApiError as exc:
            request.status = exc.status
            return self._json(exc.status, exc.body(), compat, exc.headers)
        request.status = status
        if "filter_path" in params and isinstance(payload, dict):
            payload = filter_path(payload, [p.split(".") for p in params["filter_path"].split(",")]) or {}
        self._json(status, payload, compat, head=method == "HEAD")

    def _compat_version(self) -> int | None:
        """The compatible-with version the request asks for, checked like the server does."""
        es = self.es
        found = {}
        for header in ("Accept", "Content-Type"):
            value = self.headers.get(header)
            match = _COMPAT.search(value) if value else None
            if match:
                found[header] = (int(match.group(2)), value)
        for header, (version, value) in found.items():
            if version not in (es.major, es.major - 1):
                raise ApiError(400, "media_type_header_exception",
                               "Invalid media-type value on headers [Accept, Content-Type]",
                               caused_by={"type": "status_exception",
                                          "reason": f"{header} version must be either version {es.major} or "
                                                    f"{es.major - 1}, but found {version}. {header}={value}"})
        versions = {v for v, _ in found.values()}
        if len(versions) > 1:
            raise ApiError(400, "media_type_header_exception",
                           "Invalid media-type value on headers [Accept, Content-Type]",
                           caused_by={"type": "status_exception",
                                      "reason": "A compatible version is required on both Content-Type and Accept "
                                                "headers if either one has requested a compatible version and "
                                                "the compatible versions must match."})
        return versions.pop() if versions else None

    def _check_auth(self, path: str) -> None:
        es = self.es
        if es.auth is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        if es.auth[0] == "basic":
            expected = ("Basic", base64.b64encode(f"{es.auth[1]}:{es.auth[2]}".encode()).decode())
        else:
            expected = ("ApiKey", es.auth[1])
        if (scheme, credentials) == expected:
            return
        if not given:
            reason = f"missing authentication credentials for REST request [{path}]"
        elif scheme == "Basic":
            user = base64.b64decode(credentials + "==").decode(errors="replace").partition(":")[0]
            reason = f"unable to authenticate user [{user}] for REST request [{path}]"
        else:
            reason = "unable to authenticate with provided credentials and anonymous access is not allowed " \
                     "for this request"
        raise ApiError(401, "security_exception", reason,
                       headers={"WWW-Authenticate": 'Basic realm="security", charset="UTF-8", ApiKey'})

    def _route(self, method: str, path: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        es = self.es
        parts = [p for p in path.split("/") if p]

        def json_body() -> dict[str, Any]:
            try:
                return json.loads(body) if body.strip() else {}
            except ValueError as exc:
                raise ApiError(400, "x_content_parse_exception", f"[1:1] Unexpected character: {exc}") from None

        if not parts and method in ("GET", "HEAD"):
            return 200, es.info()
        if len(parts) == 2 and parts[0] == "_index_template":
            if method == "PUT" or method == "POST":
                return 200, es.put_template(parts[1], json_body())
            if method == "GET":
                return 200, es.get_template(parts[1])
        if parts and parts[-1] == "_bulk" and len(parts) <= 2 and method in ("POST", "PUT"):
            return es.bulk(body, parts[0] if len(parts) == 2 else None)
        if len(parts) == 3 and parts[1] == "_doc" and method == "GET":
            return es.get_doc(parts[0], parts[2])
        if len(parts) == 2 and parts[1] == "_search" and method in ("GET", "POST"):
            size = int(params["size"]) if "size" in params else None
            return 200, es.search(parts[0], json_body(), size)
        if len(parts) == 2 and parts[1] == "_refresh" and method in ("GET", "POST"):
            return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        # what the real server says for a URI it has no handler for
        raise ApiError(400, "illegal_argument_exception", f"no handler found for uri [{path}] and method [{method}]")

    def _json(self, status: int, payload: Any, compat: int | None, headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        content_type = (f"application/vnd.elasticsearch+json;compatible-with={compat}" if compat
                        else "application/json")
        data = json.dumps(payload, separators=(",", ":")).encode()
        self._send(status, b"" if head else data, content_type, headers=headers)

    def _send(self, status: int, data: bytes, content_type: str, product: bool = True,
              headers: dict[str, str] | None = None) -> None:
        if data and "gzip" in self.headers.get("Accept-Encoding", ""):
            data = gzip.compress(data, compresslevel=1)
            headers = dict(headers or {}, **{"Content-Encoding": "gzip"})
        self.send_response(status)
        if product and self.es.product:
            self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if data:
            self.wfile.write(data)
