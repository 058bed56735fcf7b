"""The real agent (`python -m conntracct run`) started in a test namespace,
with its JSON-lines stdout collected as records."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

# The attach mode the agent tests run in: netfilter on this project's CI host;
# ./tasks.py vm-test runs them again in a Debian 6.1 guest with
# CONNTRACCT_TEST_MODE=kprobe.
TEST_MODE = os.environ.get("CONNTRACCT_TEST_MODE", "netfilter")
# Set by tests/vm/guest.sh: a disposable kernel whose global conntrack
# settings (e.g. the initial namespace's table size) tests may change.
IN_GUEST = os.environ.get("CONNTRACCT_TEST_GUEST") == "1"

# A fast rate curve so tests see several UPDATEs within seconds.
FAST_CURVE = [{"below": "3s", "every": "1s"}, {"then": "2s"}]
FAST_CURVE_NS = [(3_000_000_000, 1_000_000_000)], 2_000_000_000


def curve_interval_ns(age_ns: int) -> int:
    steps, final = FAST_CURVE_NS
    for below, every in steps:
        if age_ns < below:
            return every
    return final


class RunningAgent:
    """ns: the namespace to run the agent in (None: this one, e.g. with
    probe.netns pointing at the namespace to account)."""

    def __init__(self, topo: Any, ns: str | None = "router", config: dict | None = None,
                 ready_timeout: float | None = None):
        # Under TCG emulation (the vm-test guest) BCC's compile alone takes ~10 s.
        ready_timeout = ready_timeout or (240 if IN_GUEST else 60)
        self._dir = Path(tempfile.mkdtemp(prefix="conntracct-agent-"))
        cfg = {
            "probe": {"mode": TEST_MODE, "rate_curve": FAST_CURVE},
            "sysctl": {"manage": True, "restore": True},
            "sinks": [{"type": "stdout", "format": "json", "flush_interval": "100ms"}],
        }
        cfg.update(config or {})
        self.config_path = self._dir / "conntracct.yml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.stdout_path, self.stderr_path = self._dir / "stdout", self._dir / "stderr"
        cmd = [sys.executable, "-m", "conntracct", "run", "-c", str(self.config_path)]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = (topo.popen(ns, *cmd, stdout=out, stderr=err) if ns
                         else subprocess.Popen(cmd, stdout=out, stderr=err))
        self._wait_for("conntracct running", ready_timeout)
        self.exit_code: int | None = None

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def _wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode} before '{text}':\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent not '{text}' within {timeout}s:\n{self.stderr}")
            time.sleep(0.05)

    def records(self) -> list[dict]:
        out = []
        for line in self.stdout_path.read_text().splitlines():
            out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.exit_code

    def wait_for_records(self, predicate, timeout: float = 20) -> list[dict]:
        """Records once `predicate(records)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if predicate(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.1)


def exit_summary(stderr: str, line: str = "probe") -> dict[str, int]:
    """The counters of one line of the agent's exit summary
    (conntracct.selfmetrics.summary_lines): `probe (<mode>): name=value ...`
    for line="probe", `sink <name>: name=value ...` for line="sink <name>"."""
    head = r"probe \(\w+\)" if line == "probe" else re.escape(line)
    summary = stderr[stderr.rfind("conntracct stopped"):]   # not the warnings before it
    match = re.search(rf"(?<!lost: ){head}: (.*)", summary)
    assert match, stderr
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def probe_summary(stderr: str) -> dict[str, int]:
    return exit_summary(stderr, "probe")


def by_flow(records: list[dict]) -> dict[str, list[dict]]:
    flows: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        flows[r["flow_id"]].append(r)
    return flows


def find(flows: dict[str, list[dict]], **want) -> list[list[dict]]:
    """Flows whose first record's orig tuple / protocol match, e.g. proto="tcp", sport=40000."""
    out = []
    for recs in flows.values():
        first = recs[0]
        orig = first["orig"]
        fields = {"proto": first["protocol"], "family": first["family"], "src": orig["src"], "dst": orig["dst"],
                  "sport": orig["sport"], "dport": orig["dport"],
                  "icmp_id": (first.get("icmp") or {}).get("id")}
        if all(fields[k] == v for k, v in want.items()):
            out.append(recs)
    return out
