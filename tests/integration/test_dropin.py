"""conntracct (Go)'s example configuration, run unchanged but for its
addresses, which point at the test servers: InfluxDB 1.6 over HTTP and over
its [[udp]] listener, and the Elasticsearch double.  The agent runs in the
host namespace and accounts the lab's NAT router (`--mode`, `--netns` on the
command line: the file stays as it is); real TCP, UDP and ICMP flows go
through, and the exact totals conntrack -E reports for each flow are read
back from every server in conntracct's schemas."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.running_agent import TEST_MODE, exit_summary
from tests.netns import Topology
from tests.servers.es_double import EsDouble
from tests.servers.influx import Influxd, _serve

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

EXAMPLE = Path(__file__).resolve().parent / "data" / "conntracct.yml"
UDP_DATABASE = "conntracct_udp"
HTTP_DATABASE = "conntracct_http"      # the example's own database name


@pytest.fixture(scope="module")
def influxd_udp():
    yield from _serve(Influxd, udp_database=UDP_DATABASE)


def pointed_at(influxd: Influxd, es: EsDouble) -> str:
    """The example's text with its three addresses replaced, nothing else."""
    text = EXAMPLE.read_text()
    for old, new in (('"localhost:8089"', f'"127.0.0.1:{influxd.udp_port}"'),
                     ('"http://localhost:8086"', f'"{influxd.url}"'),
                     ('"http://localhost:9200"', f'"{es.url}"')):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


class Agent:
    """`python -m conntracct run -c FILE --mode M --netns PATH`, outputs in files."""

    def __init__(self, topo: Topology, config: Path, workdir: Path):
        self.stdout_path, self.stderr_path = workdir / "stdout", workdir / "stderr"
        cmd = [sys.executable, "-m", "conntracct", "run", "-c", str(config), "--mode", TEST_MODE,
               "--netns", topo.ns_path("router")]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        deadline = time.monotonic() + 60
        while "conntracct running" not in self.stderr:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr
            time.sleep(0.05)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def wait_until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_conntracct_example_runs_unchanged(tmp_path, influxd_udp):
    influxd_udp.create_database(HTTP_DATABASE)
    es = EsDouble().start()
    config = tmp_path / "conntracct.yml"
    config.write_text(pointed_at(influxd_udp, es))
    try:
        with Topology() as topo:
            agent = Agent(topo, config, tmp_path)
            try:
                with topo.conntrack_events() as capture:
                    topo.tcp_transfer(40_000, reply_bytes=2000)
                    topo.tcp_transfer(8000, reply_bytes=100, family=6)
                    topo.udp_exchange(4, 300)
                    topo.ping(3)
                    time.sleep(0.5)
                    topo.flush()
                    truth = capture.wait_for(count=4, timeout=20)
            finally:
                code = agent.stop()
        stderr = agent.stderr
        assert code == 0, stderr
        # the options we leave out are named, one line each
        for key in ("api_enabled", "api_endpoint", "pprof_enabled", "pprof_endpoint", "sinks.clickhouse"):
            assert sum(f"warning: {config}: {key}" in line for line in stderr.splitlines()) == 1, stderr
        expected = {(f["orig"]["src"], f["orig"]["dst"], f["orig"].get("dport", 0) if f["proto"] in ("tcp", "udp")
                     else 0): f for f in truth}
        assert len(expected) == len(truth) >= 4

        def last_points(database: str) -> dict:
            rows = influxd_udp.rows("SELECT last(bytes_orig) AS bytes_orig, last(bytes_ret) AS bytes_ret, "
                                    "last(packets_orig) AS packets_orig, last(packets_ret) AS packets_ret "
                                    "FROM ct_acct GROUP BY *", database)
            return {(r["src_addr"], r["dst_addr"], int(r["dst_port"])): r for r in rows}

        def totals(point: dict) -> tuple:
            return point["bytes_orig"], point["packets_orig"], point["bytes_ret"], point["packets_ret"]

        want = {key: (f["orig"]["bytes"], f["orig"]["packets"], f["reply"]["bytes"], f["reply"]["packets"])
                for key, f in expected.items()}
        for database in (HTTP_DATABASE, UDP_DATABASE):
            # Until every flow's last point is its DESTROY's: InfluxDB's [[udp]]
            # listener stores datagrams in batches, a little after they arrive
            points = wait_until(lambda db=database: (p := last_points(db)) and all(
                key in p and totals(p[key]) == totals_ for key, totals_ in want.items()) and p) or last_points(database)
            for key, flow in expected.items():
                assert totals(points[key]) == want[key], (database, key)
                assert points[key]["proto"] == flow["proto"]
        docs = wait_until(lambda: len(d := es.docs("conntracct*")) >= len(expected) and d)
        by_tuple = {(d["src_addr"], d["dst_addr"], d["dst_port"]): d for d in docs.values()}
        for key, flow in expected.items():
            doc = by_tuple[key]
            assert doc["event_type"] == "destroy" and doc["hostname"]
            assert (doc["bytes_orig"], doc["packets_orig"], doc["bytes_ret"], doc["packets_ret"]) == (
                flow["orig"]["bytes"], flow["orig"]["packets"], flow["reply"]["bytes"], flow["reply"]["packets"])
        # stdout: text lines; dummy: counted, nothing else
        assert any(" DESTROY " in line for line in agent.stdout_path.read_text().splitlines())
        dummy = exit_summary(stderr, "sink dummy")
        assert dummy["received"] >= len(expected) and dummy.get("dropped", 0) == 0, stderr
    finally:
        es.stop()
