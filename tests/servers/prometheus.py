"""A real Prometheus server (Debian's `prometheus`) for the sink tests.

Started once per test session on a free 127.0.0.1 port, scraping every second
whatever targets a test hands it (file-based service discovery, so targets can
change without a restart), and killed at teardown.  Tests ask it back through
its HTTP API.

    from tests.servers.prometheus import prometheus_server  # noqa: F401 (fixture)

    def test_x(prometheus_server):
        prometheus_server.scrape("127.0.0.1:9318")
        prometheus_server.wait_for_scrape("127.0.0.1:9318")
        prometheus_server.query('conntrack_open_connections{host="..."}')
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BINARY = os.environ.get("PROMETHEUS_BINARY") or shutil.which("prometheus") or "/usr/bin/prometheus"
JOB = "conntracct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    def __init__(self, workdir: Path, binary: str = BINARY):
        self.workdir = workdir
        self.binary = binary
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.targets_file = workdir / "targets.json"
        self.log_file = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life cycle ----------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        self.scrape()   # no targets yet
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    file_sd_configs:\n"
            f"      - files: ['{self.targets_file}']\n"
            "        refresh_interval: 1s\n")
        for _attempt in range(3):   # the free port may be taken before Prometheus binds it
            self.port = free_port()
            log = self.log_file.open("ab")
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                 # the test host may be busy: do not let lookback staleness hide a sample
                 "--query.lookback-delta=1m"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            if self._wait_ready(timeout):
                return
            self.stop()
        raise RuntimeError(f"prometheus did not start; its log:\n{self.log_file.read_text()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    # -- targets and queries ---------------------------------------------------

    def scrape(self, *targets: str, path: str = "/metrics") -> None:
        """Scrape exactly these host:port targets from now on (replaces the previous ones)."""
        groups = [{"targets": list(targets), "labels": {"__metrics_path__": path}}] if targets else []
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets_file)   # atomic: Prometheus never reads half a file

    def api(self, endpoint: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API {endpoint}: {body}")
        return body["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """An instant query's result: {sorted label items without __name__/job/instance: value}."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return {(): float(data["result"][1])}
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("__name__", "job", "instance"))):
                float(r["value"][1]) for r in data["result"]}

    def wait_for(self, expr: str, expected: Any, timeout: float = 30.0) -> dict[tuple, float]:
        """Poll `expr` until its result equals `expected` (a dict as query() returns)."""
        deadline = time.monotonic() + timeout
        result: dict[tuple, float] = {}
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result == expected:
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: expected {expected}, Prometheus has {result}")

    def scrapes_after(self, target: str, since: float, timeout: float = 30.0) -> None:
        """Wait until Prometheus scraped `target` successfully after wall-clock time `since`."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for t in self.api("targets", state="active")["activeTargets"]:
                if t["labels"].get("instance") == target:
                    last = t
                    scraped = t.get("lastScrape", "")
                    if t["health"] == "up" and scraped and _rfc3339_seconds(scraped) > since:
                        return
            time.sleep(0.2)
        raise AssertionError(f"prometheus did not scrape {target} after {since}: {last}")


def _rfc3339_seconds(text: str) -> float:
    """'2026-11-24T10:00:01.123456789Z' (or with an offset) -> seconds since the epoch."""
    from datetime import datetime
    head, _, rest = text.partition(".")
    frac, zone = "0", "Z"
    if rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        frac, zone = rest[:digits] or "0", rest[digits:]
    else:
        head, zone = (head[:-1], "Z") if head.endswith("Z") else (head[:-6], head[-6:])
    stamp = datetime.fromisoformat(head + ("+00:00" if zone == "Z" else zone))
    return stamp.timestamp() + float("0." + frac)


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory) -> Iterator[PrometheusServer]:
    """A running Prometheus scraping every 1s; skipped only when the binary is missing."""
    if not (os.path.isfile(BINARY) and os.access(BINARY, os.X_OK)):
        pytest.skip(f"no Prometheus server binary at {BINARY} (Debian package `prometheus`)")
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
