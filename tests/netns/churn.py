"""Connection churn: many short flows per second, client -> router -> server.

The generator is churn.c, compiled with gcc on first use into a private
temporary directory (removed at interpreter exit).  Without gcc a pure-Python
fallback (endpoint.py churn-client/-server, several processes) is used; it is
several times slower.

TCP flow: connect, send ``payload`` bytes, the server reads them and closes
first, the client reads EOF and closes.  TIME_WAIT therefore lives in the
server namespace; client ports are free at once, and the client namespace has
1024-65535 as its ephemeral range.  The router sees a complete handshake and
FIN exchange for every flow, so its entries end in TIME_WAIT (1 s timeout with
the default Topology timeouts).

UDP flow: one datagram from a fresh socket bound to the next source port in
``sport_range``, one echo back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build import compile_c
from .traffic import ENDPOINT, start_server

_STAT_KEYS = ("drop", "early_drop", "insert_failed", "error", "invalid",
              "chaintoolong", "clash_resolve", "search_restart")


@dataclass
class ChurnResult:
    proto: str
    family: int
    dst: str                 # server address
    port: int                # server port: every churn flow has this dport
    engine: str              # "c" or "python"
    target_rate: float       # flows/s asked for (0 = unlimited)
    duration: float          # seconds of generation asked for
    attempted: int
    completed: int
    failed: int
    timeouts: int
    errors: dict[str, int]   # errno name -> count
    rate: float              # completed / max(duration, time of last completion)
    elapsed: float           # client run time including the drain
    server: dict[str, Any]   # the server's own counters
    conntrack_stats: dict[str, int] = field(default_factory=dict)  # router conntrack -S delta
    conntrack_peak: int = 0  # highest nf_conntrack_count sampled in the router
    conntrack_max: int = 0
    invalid_packets: int = 0  # router ct state invalid counter delta

    @property
    def table_full_drops(self) -> int:
        """Packets conntrack dropped for lack of room or failed inserts."""
        s = self.conntrack_stats
        return s.get("drop", 0) + s.get("early_drop", 0) + s.get("insert_failed", 0)

    def summary(self) -> str:
        return (f"{self.proto}/v{self.family} churn [{self.engine}]: {self.completed} ok, "
                f"{self.failed} failed ({self.timeouts} timeouts) of {self.attempted} in "
                f"{self.duration:g}s -> {self.rate:.0f}/s (target {self.target_rate:g}/s); "
                f"router conntrack peak {self.conntrack_peak}/{self.conntrack_max}, "
                f"drops {self.table_full_drops}, invalid pkts {self.invalid_packets}, "
                f"errors {self.errors}")


def build_churn(cc: str = "gcc") -> Path | None:
    """Compile churn.c once per process; None when no compiler is available."""
    return compile_c("churn.c", cc=cc)


class _CountSampler(threading.Thread):
    """Samples the router's nf_conntrack_count every ``interval`` seconds."""

    def __init__(self, topo: Any, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.topo, self.interval = topo, interval
        self.peak = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            try:
                self.peak = max(self.peak, self.topo.conntrack_count())
            except Exception:  # namespace going away; sampling is best effort
                pass
            self._stop_evt.wait(self.interval)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join(timeout=5)
        return self.peak


def churn(topo: Any, duration: float = 10.0, rate: float = 5000.0, *, proto: str = "tcp",
          family: int = 4, concurrency: int = 512, payload: int = 16,
          port: int | None = None, timeout_ms: int = 3000, engine: str = "auto",
          procs: int = 2, sport_range: tuple[int, int] = (1024, 65535),
          sample: bool = True) -> ChurnResult:
    """Run short flows client -> server at ``rate``/s for ``duration`` s.

    ``rate`` <= 0 means as fast as possible (bounded by ``concurrency``
    flows in flight).  ``engine`` is "c", "python" or "auto" (C when gcc is
    there).  ``procs`` is used by the Python engine only.
    """
    if proto not in ("tcp", "udp"):
        raise ValueError(f"proto must be tcp or udp, not {proto!r}")
    binary = build_churn() if engine in ("auto", "c") else None
    if engine == "c" and binary is None:
        raise RuntimeError("engine='c' needs gcc")
    used = "c" if binary is not None else "python"
    port = port or topo.next_port()
    dst = topo.addr("server", family)
    bind = dst

    if used == "c":
        server_cmd = [str(binary), f"{proto}-server", bind, str(port)]
        client_cmd = [str(binary), f"{proto}-client", dst, str(port), str(rate), str(duration),
                      str(concurrency), str(payload), str(timeout_ms)]
        if proto == "udp":
            client_cmd += [str(sport_range[0]), str(sport_range[1])]
    else:
        udp = ["--udp"] if proto == "udp" else []
        server_cmd = [sys.executable, str(ENDPOINT), "churn-server", "--bind", bind,
                      "--port", str(port), *udp]
        client_cmd = [sys.executable, str(ENDPOINT), "churn-client", "--dst", dst,
                      "--port", str(port), "--rate", str(rate), "--duration", str(duration),
                      "--concurrency", str(concurrency), "--payload", str(payload),
                      "--timeout", str(timeout_ms), "--sport-lo", str(sport_range[0]),
                      "--sport-hi", str(sport_range[1]), "--procs", str(procs), *udp]

    stats_before = topo.conntrack_stats()
    invalid_before = topo.invalid_packets()
    ct_max = int(topo.sysctl("router", "net.netfilter.nf_conntrack_max"))
    server = start_server(topo, server_cmd)
    sampler = _CountSampler(topo) if sample else None
    if sampler:
        sampler.start()
    try:
        out = topo.run("client", *client_cmd,
                       timeout=duration + timeout_ms / 1000 + 60).stdout
    finally:
        peak = sampler.stop() if sampler else 0
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
    try:
        srv_out, _ = server.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        topo._stop_proc(server)
        srv_out = ""
    topo._forget(server)
    res = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    srv_lines = [line for line in (srv_out or "").splitlines() if line.startswith("{")]
    stats_after = topo.conntrack_stats()
    delta = {k: stats_after.get(k, 0) - stats_before.get(k, 0) for k in _STAT_KEYS}
    return ChurnResult(
        proto=proto, family=family, dst=dst, port=port, engine=used, target_rate=rate, duration=duration,
        attempted=res["attempted"], completed=res["completed"], failed=res["failed"],
        timeouts=res["timeouts"], errors=res.get("errors", {}), rate=res["rate"],
        elapsed=res["elapsed"], server=json.loads(srv_lines[-1]) if srv_lines else {},
        conntrack_stats=delta, conntrack_peak=peak, conntrack_max=ct_max,
        invalid_packets=topo.invalid_packets() - invalid_before)
