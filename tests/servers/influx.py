"""Real InfluxDB 1.x and VictoriaMetrics servers for tests and benchmarks.

Each server is a subprocess bound only to 127.0.0.1 on free ports, with its
own config and data in a temporary directory that is deleted when it stops.
The pytest fixtures at the bottom are session-scoped and skip (with the
reason) only when the binary is not installed; `./tasks.py setup` installs
both (Debian's `influxdb` 1.6.7 and `victoria-metrics`).

Usable without pytest too (bench/influx_sink_throughput.py):

    with Influxd() as server:
        server.create_database("flows")
        ...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

INFLUXD = "/usr/bin/influxd"
VICTORIA_METRICS = "/usr/bin/victoria-metrics"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, data: bytes | None = None, headers: dict | None = None,
         timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    """A server subprocess with its own temp dir; start() waits until healthy."""

    binary = ""
    name = ""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix=f"conntracct-{self.name}-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = None

    @classmethod
    def available(cls) -> bool:
        return os.access(cls.binary, os.X_OK)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def choose_ports(self) -> None:
        self.port = free_port()

    def start(self) -> None:
        """Start (or, after stop(), start again on the same ports and data)."""
        for attempt in range(3):
            if not self.port or attempt:
                self.choose_ports()
            self._log = open(self.log_path, "ab")   # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if self.healthy():
                        return
                except OSError:
                    pass
                time.sleep(0.05)
            self.stop()   # died (e.g. a port taken meanwhile) or never got healthy: new ports
        raise RuntimeError(f"{self.name} did not start; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL); keeps the data for a restart."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop and delete everything it wrote."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


class Influxd(Server):
    """InfluxDB 1.x (Debian's 1.6.7): the v1 /write and /query API.

    With `auth=True` the HTTP API needs credentials; an admin user
    (`admin_user`/`admin_password`) is created at the first start.  With
    `udp_database`, its [[udp]] listener (line protocol datagrams) is on too,
    on 127.0.0.1:`udp_port`, writing into that database in batches flushed
    every 50 ms.  The database is created at start: the listener creates it
    only with its first batch, and a query before that fails."""

    binary = INFLUXD
    name = "influxd"
    admin_user, admin_password = "admin", "admin-secret"

    def __init__(self, root=None, auth: bool = False, udp_database: str | None = None):
        super().__init__(root)
        self.auth = auth
        self.udp_database = udp_database
        self.rpc_port = 0
        self.udp_port = 0
        self._admin_created = False

    def choose_ports(self) -> None:
        self.port, self.rpc_port = free_port(), free_port()
        self.udp_port = free_udp_port() if self.udp_database else 0

    def _udp_section(self) -> str:
        if not self.udp_database:
            return "[[udp]]\n  enabled = false\n"
        return (f'[[udp]]\n  enabled = true\n  bind-address = "127.0.0.1:{self.udp_port}"\n'
                f'  database = "{self.udp_database}"\n  batch-size = 1000\n  batch-timeout = "50ms"\n'
                '  read-buffer = 8388608\n')

    def config_text(self) -> str:
        # Every listener on 127.0.0.1; the optional services stay off.
        return f"""\
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"

[meta]
  dir = "{self.root}/meta"
  logging-enabled = false

[data]
  dir = "{self.root}/data"
  wal-dir = "{self.root}/wal"
  query-log-enabled = false
  trace-logging-enabled = false

[retention]
  enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
  pprof-enabled = false

[subscriber]
  enabled = false

[[graphite]]
  enabled = false

[[collectd]]
  enabled = false

[[opentsdb]]
  enabled = false

{self._udp_section()}
[continuous_queries]
  enabled = false
"""

    def command(self) -> list[str]:
        config = self.root / "influxdb.conf"
        config.write_text(self.config_text())
        return [self.binary, "-config", str(config)]

    def healthy(self) -> bool:
        return http("GET", self.url + "/ping", timeout=1)[0] == 204

    def start(self) -> None:
        super().start()
        if self.auth and not self._admin_created:
            # Allowed without credentials while no admin exists.
            self.query(f"CREATE USER {self.admin_user} WITH PASSWORD '{self.admin_password}' "
                       "WITH ALL PRIVILEGES", auth=False)
            self._admin_created = True
        if self.udp_database:
            self.create_database(self.udp_database)

    def _auth_header(self) -> dict[str, str]:
        import base64
        if not self.auth:
            return {}
        token = base64.b64encode(f"{self.admin_user}:{self.admin_password}".encode()).decode()
        return {"Authorization": "Basic " + token}

    def query(self, q: str, db: str | None = None, auth: bool = True) -> list[dict]:
        """Run InfluxQL; the statements' results (epoch=ns); raises on errors."""
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        status, body = http("POST", self.url + "/query", urllib.parse.urlencode(params).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded",
                             **(self._auth_header() if auth else {})})
        if status != 200:
            raise RuntimeError(f"influxd /query {q!r}: HTTP {status}: {body[:300]!r}")
        results = json.loads(body)["results"]
        for result in results:
            if "error" in result:
                raise RuntimeError(f"influxd /query {q!r}: {result['error']}")
        return results

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        self.query(f'DROP DATABASE "{name}"')

    def rows(self, q: str, db: str) -> list[dict]:
        """Every row of a SELECT as {column: value} dicts, series tags merged in."""
        out = []
        for result in self.query(q, db):
            for series in result.get("series", []):
                for values in series["values"]:
                    row = dict(series.get("tags") or {})
                    row.update(zip(series["columns"], values, strict=True))
                    out.append(row)
        return out


class VictoriaMetrics(Server):
    """VictoriaMetrics single node: accepts influxdb-client v2 writes at
    /api/v2/write; stores measurement+field as metric `<measurement>_<field>`,
    timestamps in milliseconds."""

    binary = VICTORIA_METRICS
    name = "victoria-metrics"

    def command(self) -> list[str]:
        return [self.binary, f"-httpListenAddr=127.0.0.1:{self.port}",
                f"-storageDataPath={self.root / 'data'}", "-retentionPeriod=100y",
                "-loggerLevel=WARN"]

    def healthy(self) -> bool:
        return http("GET", self.url + "/health", timeout=1)[0] == 200

    def flush(self) -> None:
        """Make what was written searchable now."""
        status, body = http("GET", self.url + "/internal/force_flush")
        if status != 200:
            raise RuntimeError(f"victoria-metrics force_flush: HTTP {status}: {body[:200]!r}")

    def export(self, match: str, until=None, timeout: float = 20.0) -> list[dict]:
        """Every series matching a selector, as /api/v1/export's JSON lines
        ({"metric": {...}, "values": [...], "timestamps": [...]}).

        New series become searchable a moment after the write (even after a
        force_flush): with `until`, a predicate on the result, poll until it
        holds or `timeout` passes (then the last result is returned)."""
        deadline = time.monotonic() + timeout
        while True:
            self.flush()
            status, body = http("POST", self.url + "/api/v1/export",
                                urllib.parse.urlencode({"match[]": match}).encode(),
                                {"Content-Type": "application/x-www-form-urlencoded"})
            if status != 200:
                raise RuntimeError(f"victoria-metrics export {match!r}: HTTP {status}: {body[:300]!r}")
            series = [json.loads(line) for line in body.splitlines() if line.strip()]
            if until is None or until(series) or time.monotonic() > deadline:
                return series
            time.sleep(0.1)

    def delete(self, match: str) -> None:
        status, body = http("POST", self.url + "/api/v1/admin/tsdb/delete_series",
                            urllib.parse.urlencode({"match[]": match}).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})
        if status // 100 != 2:
            raise RuntimeError(f"victoria-metrics delete {match!r}: HTTP {status}: {body[:300]!r}")


# -- pytest fixtures ---------------------------------------------------------

def _serve(server_class: type[Server], **kwargs):
    if not server_class.available():
        pytest.skip(f"{server_class.binary} is not installed (Debian package "
                    f"{'influxdb' if server_class is Influxd else 'victoria-metrics'}; ./tasks.py setup installs it)")
    server = server_class(**kwargs)
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def influxd():
    """InfluxDB 1.6 without authentication."""
    yield from _serve(Influxd)


@pytest.fixture(scope="session")
def influxd_auth():
    """InfluxDB 1.6 with authentication on (admin user: Influxd.admin_user)."""
    yield from _serve(Influxd, auth=True)


@pytest.fixture(scope="session")
def victoria_metrics():
    yield from _serve(VictoriaMetrics)
