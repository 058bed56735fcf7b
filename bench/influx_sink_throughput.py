#!/usr/bin/env python3
"""Sink throughput to real servers: records/s the influxdb sink writes.

    .venv/bin/python bench/influx_sink_throughput.py [--records N] [--batch N]

Starts Debian's InfluxDB 1.6 (api v1) and VictoriaMetrics (api v2 through
influxdb-client) on 127.0.0.1 with the test suite's server code
(tests/servers/influx.py), writes the records with sink.write() in batches,
with and without gzip, prints records/s, and stops and deletes the servers.
The rate includes formatting the line protocol and the server's answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from influx_line_protocol import sample_events  # noqa: E402

from conntracct.config import parse_config  # noqa: E402
from conntracct.sinks import create_sink  # noqa: E402
from conntracct.sinks.lineprotocol import LineFormatter  # noqa: E402
from tests.servers.influx import Influxd, VictoriaMetrics  # noqa: E402


def sink_for(yaml_keys: str):
    return create_sink(parse_config("sinks:\n  - type: influxdb\n" + yaml_keys).sinks[0])


def measure(name: str, sink, events, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(events), batch):
        sink.write(events[i:i + batch])
    elapsed = time.perf_counter() - start
    sink.close()
    rate = len(events) / elapsed
    print(f"{name:<52} {len(events):>8} records  {elapsed:6.2f} s  {rate:>10,.0f} records/s", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    missing = [s.binary for s in (Influxd, VictoriaMetrics) if not s.available()]
    if missing:
        sys.exit(f"not installed: {', '.join(missing)} (./tasks.py setup installs them)")
    t0 = time.time_ns()
    series = len({LineFormatter().point(e)[0] for e in sample_events(args.records, ts_ns=t0)})
    print(f"{args.records} records in batches of {args.batch}, {series} series; 'new series': the first "
          "write of each series, 'known series': the same series again", flush=True)
    with Influxd() as influxd, VictoriaMetrics() as vm:
        for gzip in (False, True):
            db = f"bench{int(gzip)}"
            influxd.create_database(db)
            sink = f"    url: {influxd.url}\n    api: v1\n    database: {db}\n    gzip: {str(gzip).lower()}\n"
            for n, what in enumerate(("new series", "known series")):
                measure(f"InfluxDB 1.6 api v1{' gzip' if gzip else ''}, {what}", sink_for(sink),
                        sample_events(args.records, ts_ns=t0 + n * 10**9), args.batch)
            count = influxd.rows("SELECT count(flow_id) FROM ct_acct", db)[0]["count"]
            assert count == 2 * args.records, f"influxd stored {count} of {2 * args.records} points"
        for gzip in (False, True):
            sink = (f"    url: {vm.url}\n    bucket: bench\n    measurement: bench{int(gzip)}\n"
                    f"    gzip: {str(gzip).lower()}\n")
            for n, what in enumerate(("new series", "known series")):
                measure(f"VictoriaMetrics api v2{' gzip' if gzip else ''}, {what}", sink_for(sink),
                        sample_events(args.records, ts_ns=t0 + n * 10**9), args.batch)

if __name__ == "__main__":
    main()
