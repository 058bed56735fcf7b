"""What the benchmarks share: results, the machine, process meters, BPF run
statistics, the C traffic helper, and the agent run in a test namespace.

Every benchmark is one script with `--smoke` (seconds, proves it still runs)
and `--json PATH` (its results, for bench/run.py's table).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conntracct.probe import compiler  # noqa: E402  (after the path above)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- results -------------------------------------------------------------------

@dataclass
class Row:
    """One line of the results table."""
    bench: str            # "P1"...
    metric: str
    target: str           # e.g. "<= 80 ns" ("" when informational)
    measured: str
    ok: bool | None       # None: informational, no target
    note: str = ""


@dataclass
class Report:
    bench: str
    title: str
    method: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    smoke: bool = False

    def row(self, metric: str, measured: str, target: str = "", ok: bool | None = None, note: str = "") -> None:
        self.rows.append(Row(self.bench, metric, target, measured, ok, note))

    def show(self) -> None:
        print(f"\n{self.bench} {self.title}{' (smoke)' if self.smoke else ''}")
        for r in self.rows:
            verdict = "" if r.ok is None else ("PASS" if r.ok else "MISS")
            print(f"  {r.metric:<58} {r.measured:>22}  {r.target:<12} {verdict:<4} {r.note}")

    def save(self, path: str | None) -> None:
        self.show()
        if path:
            Path(path).write_text(json.dumps(asdict(self), indent=1, default=str))


def arguments(doc: str, **defaults: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds: only proves the benchmark runs")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return parser


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        sys.exit(f"{what}: needs root (network namespaces, BPF)")


# -- the machine -----------------------------------------------------------------

def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    bcc_version = compiler.bcc_version() if compiler.bcc_installed() else "not installed"
    return {
        "cpu": f"{model}, {os.cpu_count()} cores",
        "memory": f"{mem_kb / 1048576:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bcc": bcc_version,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# -- processes -------------------------------------------------------------------

class ProcessMeter:
    """CPU seconds (user+system, the process's threads and its waited-for
    children) and memory of one process, from /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        self.rss_peak_kb = 0
        self._start = self.cpu_seconds()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # after the comm: state=0 ... utime=11 stime=12 cutime=13 cstime=14
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK

    def status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def sample(self) -> int:
        rss = self.status_kb("VmRSS")
        self.rss_peak_kb = max(self.rss_peak_kb, rss)
        return rss

    def restart(self) -> None:
        self._start = self.cpu_seconds()
        self.rss_peak_kb = 0

    def used(self) -> float:
        return self.cpu_seconds() - self._start


# -- BPF run statistics ----------------------------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_BPF_ENABLE_STATS = 32
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@contextlib.contextmanager
def bpf_run_stats() -> Iterator[str]:
    """Per-program run_cnt/run_time_ns on for the block, then back as they were.

    BPF_ENABLE_STATS (Linux 5.8+) turns on the same switch as
    kernel.bpf_stats_enabled=1 but through a file descriptor: the kernel turns
    it off again when the descriptor closes, even if this process dies, and the
    sysctl's value is never touched.  Without it, the sysctl is set for the
    block and its previous value restored."""
    attr = (ctypes.c_uint32 * 4)(0)   # union bpf_attr { u32 type = BPF_STATS_RUN_TIME (0) }
    fd = _libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        try:
            yield "BPF_ENABLE_STATS (fd-scoped, kernel.bpf_stats_enabled untouched)"
        finally:
            os.close(fd)
        return
    before = BPF_STATS_SYSCTL.read_text().strip()
    BPF_STATS_SYSCTL.write_text("1\n")
    try:
        yield f"kernel.bpf_stats_enabled=1 (was {before}, restored)"
    finally:
        BPF_STATS_SYSCTL.write_text(before + "\n")


def prog_stats_of_pid(pid: int, prog_type: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) summed over the distinct BPF programs of one type
    that process `pid` holds open (from /proc/PID/fdinfo: this bpftool lists no
    holders, and other agents may run the same program on this host)."""
    seen: dict[int, tuple[int, int]] = {}
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        if "prog_id:" not in text:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields.get("prog_type", -1)) != prog_type:
            continue
        seen[int(fields["prog_id"])] = (int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0)))
    return sum(r for r, _ in seen.values()), sum(t for _, t in seen.values())


# -- C helpers ---------------------------------------------------------------------

def compile_helper(source: str) -> Path:
    """bench/<source> compiled with gcc -O2, as the tests' C helpers are."""
    from tests.netns.build import compile_c
    binary = compile_c(str(BENCH / source))
    if binary is None:
        sys.exit("gcc is needed for the benchmark traffic helpers (apt-get install gcc)")
    return binary


class Flows:
    """bench/flows.c: servers in the server namespace and clients holding N
    established TCP connections through the router, with steady light traffic.

    A process may hold at most RLIMIT_NOFILE descriptors (20,000 here, and no
    CAP_SYS_RESOURCE to raise it), so the flows are spread over as many
    client/server pairs as needed, each pair on its own ports."""

    PER_PROCESS = 18_000
    FIRST_PORT = 7001

    def __init__(self, topo: Any, n: int, interval_ms: float, duration_s: float, size: int = 32,
                 families: tuple[int, ...] = (4, 6)):
        self.topo = topo
        binary = compile_helper("flows.c")
        self.servers: list[subprocess.Popen] = []
        self.clients: list[subprocess.Popen] = []
        pairs = max(1, -(-n // self.PER_PROCESS))
        for i in range(pairs):
            ports = (self.FIRST_PORT + 2 * i, self.FIRST_PORT + 2 * i + 1)
            dests = [f"{topo.addr('server', fam)},{port}" for fam in families for port in ports]
            server = topo.popen("server", binary, "server", *dests, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
            self.servers.append(server)
            line = server.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"flows server did not start: {line!r} {server.stderr.read()}")
            share = n // pairs + (1 if i < n % pairs else 0)
            self.clients.append(topo.popen("client", binary, "client", share, interval_ms, duration_s, size, *dests,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        self.connected: dict[str, Any] = {}
        self.result: dict[str, Any] = {}

    def wait_connected(self, timeout: float = 300) -> dict[str, Any]:
        """Once every client has opened its connections: {"up", "failed", "seconds"}."""
        deadline = time.monotonic() + timeout
        total = {"up": 0, "failed": 0, "seconds": 0.0}
        for client in self.clients:
            while True:
                if time.monotonic() > deadline:
                    raise RuntimeError("flows clients did not connect in time")
                line = client.stdout.readline()
                if not line:
                    raise RuntimeError(f"flows client ended: {client.stderr.read()}")
                if line.startswith("CONNECTED "):
                    part = json.loads(line.split(" ", 1)[1])
                    total["up"] += part["up"]
                    total["failed"] += part["failed"]
                    total["seconds"] = max(total["seconds"], part["seconds"])
                    break
        self.connected = total
        return total

    def stop(self) -> dict[str, Any]:
        """Stop the clients (their summed counters) and the servers."""
        for proc in self.clients + self.servers:
            if proc.poll() is None:
                proc.terminate()
        total: dict[str, Any] = {}
        for proc in self.clients:
            out, _ = proc.communicate(timeout=60)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            for key, value in (json.loads(lines[-1]) if lines else {}).items():
                total[key] = max(total.get(key, 0), value) if key.endswith("seconds") else total.get(key, 0) + value
        for proc in self.servers:
            proc.communicate(timeout=30)
        for proc in self.clients + self.servers:
            self.topo._forget(proc)
        self.result = total
        return total


# -- the agent ----------------------------------------------------------------------

def agent_config(sink_batch: int = 5000, flush: str = "200ms", queue: int = 200000, **probe: Any) -> dict:
    """A netfilter-mode agent with one JSON stdout sink; `probe` keys override."""
    return {
        "probe": {"mode": "netfilter", **probe},
        "sysctl": {"manage": True, "restore": True},
        "sinks": [{"type": "stdout", "format": "json", "queue_size": queue, "batch_size": sink_batch,
                   "flush_interval": flush}],
    }


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"
