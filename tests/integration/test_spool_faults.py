"""The disk spool's faults, for real: a spool on a small file system that fills
up, a truncated spool file (a power cut mid-write), a spool directory the
agent cannot write, and the other configuration mistakes refused at start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conntracct.flow import DESTROY, UPDATE, FlowEvent, FlowTuple
from conntracct.sinks.records import flow_id_text
from conntracct.spool import FILE_NAME, Spool
from tests.integration.running_agent import FAST_CURVE, TEST_MODE, RunningAgent, exit_summary
from tests.netns import Topology
from tests.servers.influx import free_port

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, namespaces and BPF (CI runs as root)")]

STDOUT = {"type": "stdout", "format": "json", "queue_size": 200_000, "batch_size": 5000, "flush_interval": "100ms"}


class Mount:
    """A tmpfs mounted on a new directory for one test, unmounted after."""

    def __init__(self, options: str):
        self.path = Path(tempfile.mkdtemp(prefix="conntracct-spool-fs-"))
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)], check=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.path)], check=True)
        self.path.rmdir()


def run_agent_cli(tmp_path: Path, sinks: list[dict]) -> subprocess.CompletedProcess:
    config = tmp_path / "conntracct.yml"
    config.write_text(yaml.safe_dump({"sinks": sinks}))
    return subprocess.run([sys.executable, "-m", "conntracct", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_a_spool_directory_the_agent_cannot_write_stops_the_start(tmp_path):
    with Mount("ro,size=1m") as readonly:
        done = run_agent_cli(tmp_path, [{"type": "stdout", "spool": {"path": str(readonly / "spool")}},
                                        {"type": "stdout", "name": "b", "spool": {"path": str(readonly)}}])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"sinks\[0\]\.spool\.path: does not exist and the agent cannot create it in "
                     + re.escape(str(readonly)), done.stderr), done.stderr
    assert re.search(r"sinks\[1\]\.spool\.path: the agent cannot write in this directory", done.stderr), done.stderr


def test_a_shared_spool_or_one_smaller_than_a_batch_stops_the_start(tmp_path):
    done = run_agent_cli(tmp_path, [{"type": "stdout", "spool": {"path": str(tmp_path / "s")}},
                                    {"type": "stdout", "name": "b", "spool": {"path": str(tmp_path / "s/")}}])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "sinks[1].spool.path: also the spool of sinks[0]" in done.stderr, done.stderr
    done = run_agent_cli(tmp_path, [{"type": "stdout", "batch_size": 1000,
                                     "spool": {"path": str(tmp_path / "c"), "max_size": "100KiB"}}])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "sinks[0].spool.max_size: expected at least one batch: batch_size (1000) x 256 bytes" in done.stderr


def agent_config(topo: Topology, *sinks: dict) -> dict:
    return {"probe": {"mode": TEST_MODE, "netns": topo.ns_path("router"), "rate_curve": FAST_CURVE},
            "sinks": [STDOUT, *sinks], "shutdown": {"drain_timeout": "2s"}}


def test_a_spool_on_a_tiny_file_system_fills_up_and_the_agent_goes_on(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"   # nothing listens: every batch is retried, then spooled
    with Mount("size=10m") as fs:   # 8 MiB of it the spool's reserve
        sink = {"type": "influxdb", "name": "influx", "url": dead, "api": "v1", "database": "x",
                "queue_size": 300, "batch_size": 100, "timeout": "1s",
                "retry": {"backoff": "200ms", "max_backoff": "1s"},
                "spool": {"path": str(fs / "spool"), "max_size": "1GiB"}}
        with Topology(acct=True, timestamp=True) as topo:
            agent = RunningAgent(topo, ns=None, config=agent_config(topo, sink))
            try:
                result = topo.churn(duration=12, rate=600)
                topo.wait_conntrack_empty(timeout=30)
                wanted = 2 * result.completed
                records = agent.wait_for_records(
                    lambda rs: sum(r["orig"]["dport"] == result.port for r in rs) >= wanted, timeout=60)
                assert agent.proc.poll() is None            # still running
            finally:
                assert agent.stop() == 0
    assert "Traceback" not in agent.stderr
    # The stdout sink beside it got every record.
    assert sum(r["orig"]["dport"] == result.port for r in records) >= wanted
    # One clear line for the full file system, however many batches it cost.
    full = [line for line in agent.stderr.splitlines() if "ENOSPC" in line]
    assert len(full) == 1 and "no space left on the file system" in full[0] and "records dropped" in full[0], full
    # ...and the drops counted by reason.
    line = agent.stderr[agent.stderr.rfind("conntracct stopped"):]
    line = next(x for x in line.splitlines() if "sink influx:" in x)
    disk_full = sum(int(n) for n in re.findall(r"disk_full/\w+=(\d+)", line))
    summary = exit_summary(agent.stderr, "sink influx")
    print("influx sink:", summary, "disk_full drops:", disk_full)
    assert disk_full > 0 and summary["spooled"] > 1000
    assert summary["received"] == summary["spooled"] + summary["dropped"] + summary["emitted"]


def synthetic(n: int) -> list[FlowEvent]:
    """Records of flows the lab never makes (documentation addresses)."""
    return [FlowEvent(kind=DESTROY if i % 2 else UPDATE, flow_id=0x5EED_0000_0000 + i, family=4, proto=6,
                      orig=FlowTuple("192.0.2.77", "198.51.100.77", 10000 + i % 50000, 443),
                      reply=FlowTuple("198.51.100.77", "192.0.2.77", 443, 10000 + i % 50000),
                      packets_orig=i, bytes_orig=100 * i, packets_reply=i, bytes_reply=1000 * i,
                      delta_packets_orig=1, delta_bytes_orig=i, delta_packets_reply=1, delta_bytes_reply=2 * i,
                      start_ns=1_795_000_000_000_000_000, stop_ns=0, ts_ns=1_795_000_000_000_000_000 + i,
                      labels={"direction": "outbound", "pad": "x" * 200})
            for i in range(n)]


def test_a_truncated_spool_file_keeps_what_can_be_read(tmp_path):
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, 10**9, "prepared")
    spool.open()
    events = synthetic(4000)
    for start in range(0, len(events), 500):
        spool.append(events[start:start + 500])
    spool.close()   # closing the last connection checkpoints the WAL into the file
    path = spool_dir / FILE_NAME
    with open(path, "r+b") as f:   # a power cut: the second half never reached the disk
        f.truncate(path.stat().st_size // 2)

    by_id = {flow_id_text(e.flow_id): e for e in events}
    with Topology() as topo:
        agent = RunningAgent(topo, config={"probe": {"mode": TEST_MODE, "rate_curve": FAST_CURVE},
                                           "sinks": [{**STDOUT, "spool": {"path": str(spool_dir)}}]})
        try:
            match = re.search(r"spool stdout: (\S+) is damaged \((.+)\): (\d+) records recovered from it; "
                              r"the file is kept as (\S+)", agent.stderr)
            assert match, agent.stderr
            kept, aside = int(match.group(3)), Path(match.group(4))
            assert 1000 < kept < len(events) and aside.exists() and aside.stat().st_size > 0
            records = agent.wait_for_records(lambda rs: sum(r["flow_id"] in by_id for r in rs) >= kept - 5,
                                             timeout=30)
            topo.ping(2)   # and the agent goes on accounting
            records = agent.wait_for_records(lambda rs: any(r["protocol"] == "icmp" for r in rs), timeout=20)
        finally:
            assert agent.stop() == 0
    assert "Traceback" not in agent.stderr
    replayed = [r for r in records if r["flow_id"] in by_id]
    assert len(replayed) >= kept - 5          # a few rows of the page cut in half may be garbage: dropped
    for r in replayed:                          # exactly the records written, in order
        e = by_id[r["flow_id"]]
        assert (r["kind"], r["delta_bytes_orig"], r["bytes_reply"], r["timestamp_ns"]) == \
            (e.kind, e.delta_bytes_orig, e.bytes_reply, e.ts_ns)
    assert [r["timestamp_ns"] for r in replayed] == sorted(r["timestamp_ns"] for r in replayed)
