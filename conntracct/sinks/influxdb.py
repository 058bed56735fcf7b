"""InfluxDB sink (`type: influxdb`): one line-protocol point per record.

Two ways in, both writing the same points:

- `api: v2` (default): the `influxdb-client` library's /api/v2/write, for
  InfluxDB 2.x and 3.x, InfluxDB 1.8+ through its compatibility API, and
  servers that speak it (VictoriaMetrics).
- `api: v1`: InfluxDB before 1.8, its /write endpoint, over urllib3.

Line protocol is built here by hand, once per record (LineFormatter): making
Point objects costs about three times as much (bench/influx_line_protocol.py).

Schema (docs/influxdb.md has it with example queries):

    ct_acct,<tags> <fields> <ts_ns>

    tags    family protocol src dst [dport] [sport] [reply_src reply_dst]
            [direction] [zone] [netns] [mark] [flow_id] + enrichment labels
    fields  packets_orig bytes_orig packets_reply bytes_reply
            delta_packets_orig delta_bytes_orig delta_packets_reply
            delta_bytes_reply flow_id finished [tcp_state] [icmp_type
            icmp_code icmp_id]

Point identity: InfluxDB keeps one point per (measurement, tag set,
timestamp); a second write with the same three overwrites the first.  The
flow id is a field, not a tag, by default (a tag would make every flow its own
series: unbounded cardinality).  Records of different flows that share a tag
set -- two connections from one host to one service, source ports untagged --
or two records of one flow could therefore meet at the same nanosecond.  The
sink never lets that happen: a point whose series and timestamp were already
written (in this batch or a recent one) moves 1 ns later, so no record, DESTROY
or other, is lost to an overwrite.  Retries resend exactly the same lines.
"""

from __future__ import annotations

import base64
import gzip as gzip_module
import json
import logging
import os
import warnings
from collections.abc import Iterable
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlencode, urlsplit

from pydantic import AfterValidator, Field, PrivateAttr, model_validator

from ..configtypes import (
    NO_VALUE,
    ConfigError,
    PositiveDuration,
    StrictModel,
    config_errors,
    resolve_secret,
)
from ..flow import DESTROY, FLAG_NO_ACCT, ICMP_PROTOS, IPPROTO_NAMES, KINDS, TCP_STATES, FlowEvent
from .base import PermanentSinkError, Sink, SinkConfig, TransientSinkError
from .records import flow_id_text
from .stdout import PORT_PROTOS

log = logging.getLogger(__name__)

FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}

# Names the schema uses; an enrichment label with one of them is written as
# `label_<name>` so it can neither duplicate a tag (the server would reject
# the point) nor shadow a field.  `direction` is the enricher's own label.
SCHEMA_TAGS = frozenset({"family", "protocol", "src", "dst", "sport", "dport", "reply_src", "reply_dst",
                         "direction", "zone", "netns", "mark", "flow_id"})
SCHEMA_FIELDS = frozenset({"packets_orig", "bytes_orig", "packets_reply", "bytes_reply",
                           "delta_packets_orig", "delta_bytes_orig", "delta_packets_reply",
                           "delta_bytes_reply", "flow_id", "finished", "tcp_state",
                           "icmp_type", "icmp_code", "icmp_id"})

# Line-protocol escaping (the same rules as influxdb-client's Point).
_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})


def escape_measurement(name: str) -> str:
    return name.translate(_ESCAPE_MEASUREMENT)


def escape_key(key: str) -> str:
    """A tag key, tag value or field key."""
    return key.translate(_ESCAPE_KEY)


def escape_tag_value(value: str) -> str:
    escaped = value.translate(_ESCAPE_KEY)
    # A trailing backslash would escape the separator after it; line protocol
    # has no escape for a backslash in tags, so (like influxdb-client) a space
    # follows it.
    return escaped + " " if escaped.endswith("\\") else escaped


def escape_string(value: str) -> str:
    """A string field value, without its quotes."""
    return value.translate(_ESCAPE_STRING)


# -- config ------------------------------------------------------------------

def _http_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL such as http://127.0.0.1:8086")
    if parts.username is not None or parts.password is not None:
        raise ValueError("expected a URL without credentials: give them as token (api v2) "
                         "or username/password (api v1)")
    if parts.query or parts.fragment:
        raise ValueError("expected a URL without ?query or #fragment")
    try:
        parts.port   # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("expected a URL with a port number from 1 to 65535") from None
    return value.strip().rstrip("/")


def _measurement(value: str) -> str:
    if not value:
        raise ValueError("expected a measurement name")
    if value.startswith("#"):
        raise ValueError("expected a name not starting with '#' (line protocol would read a comment)")
    return value


def _file(value: str | None) -> str | None:
    if value is not None and not os.path.isfile(value):
        raise ValueError("expected the path of an existing file (PEM CA certificates)")
    return value


class TLSConfig(StrictModel):
    verify: bool = True       # check the server's certificate and host name
    ca_file: Annotated[str | None, AfterValidator(_file)] = None   # default: the system's CAs


V2_KEYS = ("org", "bucket", "token", "token_env")
V1_KEYS = ("database", "retention_policy", "username", "password", "password_env")


class InfluxDBConfig(SinkConfig):
    type: Literal["influxdb"]
    batch_size: int = Field(5000, ge=1)    # InfluxDB's recommended batch (lines per write)
    url: Annotated[str, AfterValidator(_http_url)]
    api: Literal["v2", "v1"] = "v2"
    # api v2
    org: str | None = None
    bucket: str | None = None
    token: str | None = None
    token_env: str | None = None
    # api v1
    database: str | None = None
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    password_env: str | None = None
    # both
    measurement: Annotated[str, AfterValidator(_measurement)] = "ct_acct"
    source_ports: bool = False
    flow_id_tag: bool = False
    timeout: PositiveDuration = 10.0
    tls: TLSConfig = Field(default_factory=TLSConfig)
    gzip: bool = False

    _token: str | None = PrivateAttr(None)
    _password: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _api_keys(self) -> InfluxDBConfig:
        errors = []
        other_api, other_keys, own = (("v1", V1_KEYS, "org, bucket, token") if self.api == "v2"
                                      else ("v2", V2_KEYS, "database, retention_policy, username, password"))
        for key in other_keys:
            value = getattr(self, key)
            if value is not None:
                errors.append(((key,), f"only for api: {other_api} (this sink has api: {self.api}, "
                                       f"which takes {own})", value))
        if self.api == "v2" and not self.bucket:
            errors.append((("bucket",), "required key is missing for api: v2 (the bucket to write to; "
                                        "with InfluxDB 1.8+ 'database/retention_policy')", NO_VALUE))
        if self.api == "v1":
            if not self.database:
                errors.append((("database",), "required key is missing for api: v1", NO_VALUE))
            if self.username is None and (self.password is not None or self.password_env is not None):
                errors.append((("username",), "required key is missing: a password needs a username", NO_VALUE))
            if self.username is not None and self.password is None and self.password_env is None:
                errors.append((("password",), "required key is missing: give password or password_env "
                                              "with username", NO_VALUE))
        if self.url.startswith("http://") and self.tls.ca_file is not None:
            errors.append((("tls", "ca_file"), "only for https:// URLs", self.tls.ca_file))
        if errors:
            raise config_errors(errors)
        try:
            self._token = resolve_secret(self.token, self.token_env, "token")
            self._password = resolve_secret(self.password, self.password_env, "password")
        except ConfigError as exc:
            key = str(exc).split(":", 1)[0]
            raise config_errors([((key,), str(exc).split(": ", 1)[1], NO_VALUE)]) from None
        return self

    @property
    def secret_token(self) -> str | None:
        return self._token

    @property
    def secret_password(self) -> str | None:
        return self._password


# -- line protocol -----------------------------------------------------------

RECENT_POINTS = 65536   # (series, timestamp) pairs remembered across batches, per generation

# Tags and fields that depend on one small number, formatted once.
_FAMILY_TAGS = {number: f"family={name}" for number, name in FAMILY_NAMES.items()}
_PROTOCOL_TAGS = {number: f"protocol={name}" for number, name in IPPROTO_NAMES.items()}
_TCP_STATE_FIELDS = tuple(f',tcp_state="{name}"' for name in TCP_STATES)
_TCP_STATES = len(_TCP_STATE_FIELDS)


def _protocol_fields(e: FlowEvent) -> str:
    """The fields after `finished`: TCP state or ICMP type/code/id."""
    proto = e.proto
    if proto == 6:
        state = e.tcp_state
        return _TCP_STATE_FIELDS[state] if state < _TCP_STATES else f',tcp_state="{state}"'
    if proto in ICMP_PROTOS and e.icmp is not None:
        icmp_type, code, ident = e.icmp
        return f",icmp_type={icmp_type}i,icmp_code={code}i,icmp_id={ident}i"
    return ""


class LineFormatter:
    """FlowEvent -> line-protocol point, split as (series, fields): the series
    (measurement and sorted tags) is the point's identity with its timestamp.

    A flow's records repeat its tag set, so the series is built once per flow
    and kept in the record's FlowEvent.memo, which the probe decoder shares
    between the records of one flow identity: tuples, family, protocol, zone,
    netns, mark (a CONNMARK change makes a new identity) and flow id.  The
    labels come from enrichment, not from the identity: a record whose labels
    differ from the memo's builds its series anew.  TCP state and ICMP values
    are fields, formatted for every record."""

    def __init__(self, measurement: str = "ct_acct", source_ports: bool = False, flow_id_tag: bool = False):
        self._measurement = escape_measurement(measurement)
        self._series_prefix = self._measurement + ","
        self._source_ports = source_ports
        self._flow_id_tag = flow_id_tag
        self._labels: dict[tuple[str, str], str] = {}   # (key, value) -> 'key=value', escaped
        # The labels of the last series memoised, a copy: shared by the memo
        # entries of flows with equal labels (they come in a few combinations).
        self._last_labels: dict[str, str] = {}

    def _label(self, key: str, value: str) -> str:
        tag = self._labels.get((key, value))
        if tag is None:
            name = key if key == "direction" or (key not in SCHEMA_TAGS and key not in SCHEMA_FIELDS) \
                else "label_" + key
            tag = f"{escape_key(name)}={escape_tag_value(value)}" if name and value else ""
            if len(self._labels) >= 65536:   # bounded: label values are few, but not trusted to be
                self._labels.clear()
            self._labels[(key, value)] = tag
        return tag

    def series(self, e: FlowEvent) -> str:
        """The point's series: measurement and sorted tags (memoised per flow)."""
        return self._flow_text(e)[1]

    def _flow_text(self, e: FlowEvent) -> tuple[dict[str, str], str, str]:
        """(labels, series, 'flow_id=<id>i,finished='): the flow's memo entry,
        made if missing or made for other labels."""
        memo = e.memo
        if memo is not None:
            known = memo.get(self)
            if known is not None and known[0] == e.labels:
                return known
        labels = e.labels
        if labels != self._last_labels:
            self._last_labels = dict(labels)
        known = (self._last_labels, self.build_series(e), f"flow_id={e.flow_id}i,finished=")
        if memo is not None:
            memo[self] = known
        return known

    def build_series(self, e: FlowEvent) -> str:
        """The series, built from the event (no memo)."""
        o = e.orig
        proto = e.proto
        # Sorted by key, as InfluxDB keys series: one canonical string per tag set.
        tags = [f"dst={o.dst}", _FAMILY_TAGS.get(e.family) or f"family={e.family}",
                _PROTOCOL_TAGS.get(proto) or f"protocol={proto}", f"src={o.src}"]
        if proto in PORT_PROTOS:
            tags.append(f"dport={o.dport}")
            if self._source_ports:
                tags.append(f"sport={o.sport}")
        r = e.reply
        if o.src != r.dst or o.dst != r.src or o.sport != r.dport or o.dport != r.sport:   # e.nat
            tags.append(f"reply_dst={r.dst}")
            tags.append(f"reply_src={r.src}")
        if e.zone:
            tags.append(f"zone={e.zone}")
        if e.netns:
            tags.append(f"netns={e.netns}")
        if e.mark:
            tags.append(f"mark={e.mark:#x}")
        if self._flow_id_tag:
            tags.append("flow_id=" + flow_id_text(e.flow_id))
        if e.labels:
            known = self._labels
            for item in e.labels.items():
                tag = known.get(item)
                if tag is None:
                    tag = self._label(*item)
                if tag:
                    tags.append(tag)
        tags.sort()
        return self._series_prefix + ",".join(tags)

    def fields(self, e: FlowEvent) -> str:
        return self.point(e)[1]

    def line(self, e: FlowEvent) -> str:
        """One point, newline-terminated, at the record's own timestamp."""
        return f"{self.series(e)} {self.fields(e)} {e.ts_ns}\n"

    def point(self, e: FlowEvent) -> tuple[str, str]:
        """(series, fields) in one go, the flow id field memoised with the
        series: the sink's per-record work."""
        _, series, flow_id = self._flow_text(e)
        finished = "true" if e.kind == DESTROY else "false"
        tail = _protocol_fields(e)
        if e.flags & FLAG_NO_ACCT:   # no accounting: counters are absent, not zero
            return series, f"{flow_id}{finished}{tail}"
        return series, (f"packets_orig={e.packets_orig}i,bytes_orig={e.bytes_orig}i,"
                        f"packets_reply={e.packets_reply}i,bytes_reply={e.bytes_reply}i,"
                        f"delta_packets_orig={e.delta_packets_orig}i,delta_bytes_orig={e.delta_bytes_orig}i,"
                        f"delta_packets_reply={e.delta_packets_reply}i,delta_bytes_reply={e.delta_bytes_reply}i,"
                        f"{flow_id}{finished}{tail}")


class PointLog:
    """The (series, timestamp) pairs written lately, to keep points unique.

    Two generations of hashed pairs, bounded in memory; records of one
    timestamp arrive close together, so a collision with a pair older than
    both generations cannot happen in practice.  A hash collision only moves a
    point by 1 ns.  Both generations are also kept as one set, so a point
    costs one look-up there (nearly every look-up misses, in a large set)."""

    def __init__(self, generation: int = RECENT_POINTS):
        self._generation = generation
        self._new: set[int] = set()
        self._old: set[int] = set()
        self._seen: set[int] = set()   # _new | _old

    def lines(self, formatter: LineFormatter, batch: Iterable[FlowEvent]) -> tuple[str, set[int]]:
        """The batch's lines, each point unique, and the pairs they use
        (pass them to commit() once written: a failed batch resent gives the
        same lines)."""
        seen = self._seen
        taken: set[int] = set()
        take = taken.add
        out = []
        point = formatter.point
        for e in batch:
            s, fields = point(e)
            ts = e.ts_ns
            key = hash((s, ts))
            while key in taken or key in seen:
                ts += 1
                key = hash((s, ts))
            take(key)
            out.append(f"{s} {fields} {ts}\n")
        return "".join(out), taken

    def commit(self, taken: set[int]) -> None:
        self._new |= taken
        self._seen |= taken
        if len(self._new) >= self._generation:
            self._old, self._new = self._new, set()
            self._seen = set(self._old)


# -- the sink ----------------------------------------------------------------

TRANSIENT_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
GZIP_LEVEL = 1   # fast: line protocol compresses ~10x even at level 1


def _server_text(body: bytes | str | None, headers: dict | None = None) -> str:
    """The server's own error message: JSON {"error"|"message": ...} or text."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = (body or "").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        text = str(data.get("error") or data.get("message") or text)
    if not text and headers:
        text = headers.get("X-Influxdb-Error", "") or ""
    return text[:500] or "(no error text)"


class InfluxDBSink(Sink):
    Config = InfluxDBConfig
    # Every kind: a NEW carries the flow's first packets as deltas, so sums
    # of deltas are exact only when NEW points are written too.
    default_kinds: ClassVar[frozenset[str]] = frozenset(KINDS)

    def __init__(self, config: InfluxDBConfig):
        super().__init__(config)
        self.formatter = LineFormatter(config.measurement, config.source_ports, config.flow_id_tag)
        self._points = PointLog()
        self._where = f"influxdb sink {self.name!r} ({config.url}, api {config.api})"
        # No network I/O here: an unreachable server must not stop the agent
        # from starting; the first batch reports it, and is retried.
        if config.api == "v2":
            self._writer = _V2Writer(config)
        else:
            self._writer = _V1Writer(config)
        if not config.tls.verify and config.url.startswith("https://"):
            log.warning("%s: TLS certificate verification is off", self._where)

    def write(self, batch: list[FlowEvent]) -> None:
        if not batch:
            return
        text, taken = self._points.lines(self.formatter, batch)
        body = text.encode()
        if self.config.gzip:
            body = gzip_module.compress(body, GZIP_LEVEL)
        self._writer.write(body, self._where)
        self._points.commit(taken)

    def close(self) -> None:
        self._writer.close()


def _status_error(where: str, status: int, text: str) -> Exception:
    message = f"{where}: HTTP {status}: {text}"
    if status in TRANSIENT_STATUS:
        return TransientSinkError(message)
    hint = {400: " (the server rejected points of this batch)",
            401: " (bad credentials)", 403: " (not allowed to write: check the credentials' permissions)",
            404: " (wrong URL, database or bucket)", 413: " (batch too large: lower batch_size)"}.get(status, "")
    return PermanentSinkError(message + hint)


_UNTRUSTED = ("certificate verify failed", "CERTIFICATE_VERIFY_FAILED", "doesn't match", "hostname mismatch")


def _tls_error(where: str, text: str) -> Exception:
    if any(marker in text for marker in _UNTRUSTED):
        # A certificate the configuration does not trust: retrying cannot help.
        return PermanentSinkError(f"{where}: TLS: server certificate not trusted (tls.ca_file, "
                                  f"tls.verify): {text}")
    return TransientSinkError(f"{where}: TLS: {text}")   # e.g. a handshake cut short


def _connection_error(where: str, exc: Exception) -> Exception:
    import urllib3.exceptions as u3

    reason = getattr(exc, "reason", None) or exc
    if isinstance(exc, u3.SSLError) or isinstance(reason, u3.SSLError):
        return _tls_error(where, str(reason))
    return TransientSinkError(f"{where}: {type(reason).__name__}: {reason}")


class _V1Writer:
    """POST /write?db=&rp=&precision=ns (InfluxDB 1.x)."""

    def __init__(self, config: InfluxDBConfig):
        import urllib3

        self._urllib3 = urllib3
        params = {"db": config.database, "precision": "ns"}
        if config.retention_policy:
            params["rp"] = config.retention_policy
        self._url = f"{config.url}/write?{urlencode(params)}"
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if config.username is not None:
            credentials = f"{config.username}:{config.secret_password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        if config.gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._verify = config.tls.verify
        self._pool = urllib3.PoolManager(
            num_pools=1, maxsize=1, retries=False,
            timeout=urllib3.Timeout(connect=config.timeout, read=config.timeout),
            cert_reqs="CERT_REQUIRED" if config.tls.verify else "CERT_NONE",
            ca_certs=config.tls.ca_file)

    def write(self, body: bytes, where: str) -> None:
        u3 = self._urllib3.exceptions
        try:
            with warnings.catch_warnings():
                if not self._verify:   # said once, at start
                    warnings.simplefilter("ignore", u3.InsecureRequestWarning)
                response = self._pool.request("POST", self._url, body=body, headers=self._headers)
        except u3.HTTPError as exc:   # connection refused, timeouts, resets, TLS
            raise _connection_error(where, exc) from exc
        except OSError as exc:
            raise TransientSinkError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if response.status // 100 != 2:
            raise _status_error(where, response.status, _server_text(response.data, response.headers))

    def close(self) -> None:
        self._pool.clear()


class _V2Writer:
    """influxdb-client's /api/v2/write (InfluxDB 2.x/3.x, 1.8+, VictoriaMetrics).

    Through the client's write service rather than WriteApi.write(), which
    would copy the ready body again and, with its own gzip, compress at level 9
    (slow); the sink compresses the body itself and says so in Content-Encoding."""

    def __init__(self, config: InfluxDBConfig):
        import urllib3
        from influxdb_client import InfluxDBClient, WritePrecision
        from influxdb_client.rest import ApiException
        from influxdb_client.service.write_service import WriteService

        self._urllib3, self._api_exception = urllib3, ApiException
        self._client = InfluxDBClient(
            url=config.url, token=config.secret_token, org=config.org,
            timeout=max(1, round(config.timeout * 1000)), enable_gzip=False,
            verify_ssl=config.tls.verify, ssl_ca_cert=config.tls.ca_file, retries=False)
        self._service = WriteService(self._client.api_client)
        self._verify = config.tls.verify
        self._params = {
            "bucket": config.bucket,
            "org": config.org or "-",    # required by 2.x; 1.8+, 3.x and VictoriaMetrics ignore it
            "precision": WritePrecision.NS,
            "content_type": "text/plain; charset=utf-8",
            **({"content_encoding": "gzip"} if config.gzip else {}),
        }

    def write(self, body: bytes, where: str) -> None:
        u3 = self._urllib3.exceptions
        try:
            with warnings.catch_warnings():
                if not self._verify:   # said once, at start
                    warnings.simplefilter("ignore", u3.InsecureRequestWarning)
                self._service.post_write(body=body, **self._params)
        except self._api_exception as exc:
            if not exc.status:   # no HTTP answer: the client's wrapping of a TLS error
                raise _tls_error(where, str(exc.reason or exc).replace("\n", ": ")) from exc
            raise _status_error(where, exc.status, _server_text(exc.body, exc.headers)) from exc
        except u3.HTTPError as exc:
            raise _connection_error(where, exc) from exc
        except OSError as exc:
            raise TransientSinkError(f"{where}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._client.close()
