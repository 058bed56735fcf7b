"""InfluxDB sink (`type: influxdb`): one line-protocol point per record.

Two ways in, both writing the same points:

- `api: v2` (default): the `influxdb-client` library's /api/v2/write, for
  InfluxDB 2.x and 3.x, InfluxDB 1.8+ through its compatibility API, and
  servers that speak it (VictoriaMetrics).
- `api: v1`: InfluxDB before 1.8, its /write endpoint, over urllib3.

Line protocol is built by hand, once per record, in the shared module
conntracct/sinks/lineprotocol.py (LineFormatter, PointLog): making Point
objects costs about three times as much (bench/influx_line_protocol.py).

Schema (docs/influxdb.md has it with example queries):

    ct_acct,<tags> <fields> <ts_ns>

    tags    family protocol src dst [dport] [sport] [reply_src reply_dst]
            [direction] [zone] [netns] [mark] [flow_id] + enrichment labels
    fields  packets_orig bytes_orig packets_reply bytes_reply
            delta_packets_orig delta_bytes_orig delta_packets_reply
            delta_bytes_reply flow_id finished [duration_ms] [tcp_state]
            [icmp_type icmp_code icmp_id]

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
import warnings
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlencode

from pydantic import AfterValidator, Field, PrivateAttr, model_validator

from ..configtypes import NO_VALUE, PositiveDuration, config_errors
from ..flow import KINDS, FlowEvent
from .base import PermanentSinkError, Sink, SinkConfig, TransientSinkError, WriteResult
from .common import TLSConfig, http_url, read_secrets
from .goschema import UNWRITABLE_REASON, LineOptions
from .lineprotocol import PointLog

log = logging.getLogger(__name__)


# -- config ------------------------------------------------------------------

V2_KEYS = ("org", "bucket", "token", "token_env")
V1_KEYS = ("database", "retention_policy", "username", "password", "password_env")


class InfluxDBConfig(SinkConfig, LineOptions):
    type: Literal["influxdb"]
    batch_size: int = Field(5000, ge=1)    # InfluxDB's recommended batch (lines per write)
    url: Annotated[str, AfterValidator(http_url("http://127.0.0.1:8086"))]
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
    # both (and schema, measurement, source_ports, flow_id_tag: goschema.LineOptions)
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
        if errors:
            raise config_errors(errors)
        self._token, self._password = read_secrets(self, "token", "password")
        return self

    @property
    def secret_token(self) -> str | None:
        return self._token

    @property
    def secret_password(self) -> str | None:
        return self._password


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
        self.formatter = config.formatter()    # the schema's (goschema.LineOptions)
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

    def write(self, batch: list[FlowEvent]) -> WriteResult | None:
        batch, unwritable = self.config.writable(batch)
        if batch:
            text, taken = self._points.lines(self.formatter, batch)
            body = text.encode()
            if self.config.gzip:
                body = gzip_module.compress(body, GZIP_LEVEL)
            self._writer.write(body, self._where)
            self._points.commit(taken)
        if unwritable:
            return WriteResult(rejected=unwritable, reason=f"{len(unwritable)} {UNWRITABLE_REASON}")
        return None

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
