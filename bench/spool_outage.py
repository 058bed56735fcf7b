#!/usr/bin/env python3
"""Spool outage: a 5-minute InfluxDB outage at 3,000 flows/s, nothing lost.

    sudo .venv/bin/python bench/spool_outage.py [--smoke] [--outage 300] [--rate 3000] [--json PATH]

The agent (netfilter mode) accounts the NAT lab's router while churn
(tests/netns/churn.c) makes `--rate` short TCP connections per second through
it for the whole run: 15 s before the outage, `--outage` seconds with
InfluxDB 1.6 (tests/servers/influx.py) stopped, 15 s after its restart.  The
agent's InfluxDB sink has the default memory queue (10,000 records) and a
disk spool in /var/tmp; its Prometheus sink is scraped twice a second for the
spool's own metrics (conntracct_spool_records / _bytes / _oldest_record_age)
and the spool's files are measured on disk.

Reported: the spool's peak (records, record bytes, bytes on disk), the
catch-up time (InfluxDB restarted -> spool empty and every record written),
and the loss check: InfluxDB's point count equals the records the sink
received, the sink dropped none, the probe lost none.  Needs root (network
namespaces, BPF).  Not run in CI (minutes); one command.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, arguments, need_root  # noqa: E402

METRICS = ("conntracct_spool_records", "conntracct_spool_bytes", "conntracct_spool_oldest_record_age_seconds")


def scrape(port: int) -> dict[str, float]:
    """The spool gauges of the influx sink from the agent's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        for name in METRICS:
            if line.startswith(name + '{sink="influx"}'):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("spool.db*"))


class Sampler(threading.Thread):
    """Twice a second: the spool's gauges and its files' size; keeps the peaks."""

    def __init__(self, port: int, directory: Path):
        super().__init__(daemon=True)
        self.port, self.directory = port, directory
        self.peak: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.when = 0.0   # monotonic time of `last`
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                self.last = {**scrape(self.port), "disk": disk_bytes(self.directory)}
                self.when = time.monotonic()
            except OSError:
                continue
            for key, value in self.last.items():
                self.peak[key] = max(self.peak.get(key, 0), value)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--outage", type=float, default=300.0, help="seconds InfluxDB is down")
    parser.add_argument("--rate", type=float, default=3000.0, help="new flows per second")
    args = parser.parse_args()
    need_root("spool_outage")
    outage, rate = (10.0, 500.0) if args.smoke else (args.outage, args.rate)
    before = after = 15.0

    from tests.integration.running_agent import FAST_CURVE, RunningAgent, exit_summary
    from tests.netns import Topology
    from tests.servers.influx import Influxd, free_port

    report = Report("SPOOL-OUTAGE", f"{outage:g} s InfluxDB outage at {rate:g} flows/s",
                    __doc__.split("\n\n")[1], smoke=args.smoke)
    spool_dir = Path(tempfile.mkdtemp(prefix="conntracct-spool-outage-", dir="/var/tmp"))
    server = Influxd()
    server.start()
    server.create_database("flows")
    prom = free_port()
    try:
        with Topology(acct=True, timestamp=True) as topo:
            config = {
                "probe": {"mode": "netfilter", "netns": topo.ns_path("router"), "rate_curve": FAST_CURVE},
                "sinks": [
                    {"type": "influxdb", "name": "influx", "url": server.url, "api": "v1", "database": "flows",
                     "timeout": "5s", "retry": {"backoff": "500ms", "max_backoff": "5s"},
                     "spool": {"path": str(spool_dir), "max_size": "4GiB"}},
                    {"type": "prometheus", "listen": f"127.0.0.1:{prom}"},
                ],
                "shutdown": {"drain_timeout": "10s"},
            }
            agent = RunningAgent(topo, ns=None, config=config)
            sampler = Sampler(prom, spool_dir)
            sampler.start()
            result: dict = {}
            churn = threading.Thread(target=lambda: result.update(
                churn=topo.churn(duration=before + outage + after, rate=rate)))
            try:
                churn.start()
                time.sleep(before)
                server.stop()
                print(f"InfluxDB stopped for {outage:g} s", flush=True)
                time.sleep(outage)
                server.start()
                restarted = time.monotonic()
                print("InfluxDB restarted", flush=True)
                drained = None
                while drained is None or churn.is_alive():
                    if drained is None and sampler.when > restarted \
                            and sampler.last.get("conntracct_spool_records", 1) == 0:
                        drained = sampler.when - restarted
                    time.sleep(0.2)
                    if time.monotonic() - restarted > 1800:
                        break
                churn.join()
                topo.wait_conntrack_empty(timeout=60)
                time.sleep(3)
            finally:
                sampler.done.set()
                code = agent.stop(timeout=120)
        summary = exit_summary(agent.stderr, "sink influx")
        probe = exit_summary(agent.stderr, "probe")
        [[points]] = [[r["count"]] for r in server.rows("SELECT count(finished) FROM ct_acct", "flows")]
        churned = result["churn"]
        print(churned.summary())
        lost = summary["received"] - points
        report.row("flows made (churn)", f"{churned.completed:,}", note=f"{churned.rate:,.0f}/s")
        report.row("records received by the influx sink", f"{summary['received']:,}")
        report.row("spool peak: records", f"{sampler.peak.get('conntracct_spool_records', 0):,.0f}")
        report.row("spool peak: record bytes (max_size bounds)",
                   f"{sampler.peak.get('conntracct_spool_bytes', 0) / 2**20:,.1f} MiB")
        report.row("spool peak: files on disk (db + WAL)", f"{sampler.peak.get('disk', 0) / 2**20:,.1f} MiB")
        report.row("spool peak: oldest record age",
                   f"{sampler.peak.get('conntracct_spool_oldest_record_age_seconds', 0):,.0f} s")
        report.row("catch-up: InfluxDB back -> spool empty", f"{drained:,.1f} s" if drained else "not drained")
        report.row("records spooled / replayed", f"{summary['spooled']:,} / {summary['replayed']:,}")
        report.row("points in InfluxDB = records received", f"{points:,} (lost {lost:,})", "lost 0",
                   lost == 0 and summary["dropped"] == 0)
        report.row("sink dropped / probe records lost", f"{summary['dropped']:,} / {probe['probe_records_lost']:,}",
                   "0 / 0", summary["dropped"] == 0 and probe["probe_records_lost"] == 0)
        report.details = {"outage_s": outage, "rate": rate, "peak": sampler.peak, "catch_up_s": drained,
                          "summary": summary, "points": points, "exit_code": code, "churn": churned.summary()}
        report.save(args.json)
    finally:
        server.destroy()
        shutil.rmtree(spool_dir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
