#!/usr/bin/env python3
"""Spool throughput: FlowEvents into a sink's disk spool and back out, on one core.

    .venv/bin/python bench/spool_throughput.py [--smoke] [--records N] [--json PATH]

The real path of conntracct/spool.py, not the backend alone
(bench/spool_backend.py has that): in = encode each FlowEvent (JSON row
body) and insert a batch in one transaction (Spool.append); out = read a
batch, decode every row back into a FlowEvent and delete the batch once
"acknowledged" (Spool.read + Spool.ack).  The records are realistic: IPv4
(70%) and IPv6, TCP/UDP/ICMP, SNAT on some, an enrichment label, 30% NEW,
40% UPDATE, 30% DESTROY; batches of 500 (a sink's default batch_size).

Then the same records through a SpoolingWorker (conntracct/pipeline.py), as
the agent runs it: the sink is down while they are offered (all but the
memory queue's go to disk through the spool writer thread), then up, and
the worker delivers memory, then the spool, to a sink that only counts.
Process CPU time (both threads), so it is one core's worth of work.

Target (issue 13): at least 50,000 records/s in and out.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, arguments, fmt_rate  # noqa: E402

from conntracct.flow import DESTROY, NEW, UPDATE, FlowEvent, FlowTuple  # noqa: E402
from conntracct.pipeline import SpoolingWorker  # noqa: E402
from conntracct.selfmetrics import Stats  # noqa: E402
from conntracct.sinks.base import Sink, SinkConfig, TransientSinkError  # noqa: E402
from conntracct.spool import Spool, encode  # noqa: E402

TARGET = 50_000
BATCH = 500
T0 = 1_795_000_000_000_000_000


def events(n: int, seed: int = 1) -> list[FlowEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v6 = rng.random() < 0.3
        if v6:
            src, dst = f"2001:db8:1::{rng.randrange(1, 200):x}", f"2001:db8:ff::{rng.randrange(1, 5000):x}"
        else:
            src, dst = f"10.0.{rng.randrange(4)}.{rng.randrange(1, 60)}", \
                f"198.51.{rng.randrange(100)}.{rng.randrange(1, 255)}"
        proto = rng.choices((6, 17, 1 if not v6 else 58), (6, 3, 1))[0]
        sport, dport = (rng.randrange(32768, 61000), rng.choice((80, 443, 53, 8080))) if proto in (6, 17) else (0, 0)
        orig = FlowTuple(src, dst, sport, dport)
        reply = FlowTuple(dst, "203.0.113.7", dport, sport) if not v6 and rng.random() < 0.4 \
            else FlowTuple(dst, src, dport, sport)
        kind = rng.choices((NEW, UPDATE, DESTROY), (3, 4, 3))[0]
        p, b = rng.randrange(1, 10**5), rng.randrange(60, 10**8)
        out.append(FlowEvent(
            kind=kind, flow_id=rng.getrandbits(63), family=6 if v6 else 4, proto=proto, orig=orig, reply=reply,
            packets_orig=p, bytes_orig=b, packets_reply=p // 2, bytes_reply=b * 3,
            delta_packets_orig=rng.randrange(100), delta_bytes_orig=rng.randrange(10**5),
            delta_packets_reply=rng.randrange(100), delta_bytes_reply=rng.randrange(10**6),
            start_ns=T0 - rng.randrange(10**11), stop_ns=T0 + i if kind == DESTROY else 0, ts_ns=T0 + i,
            netns=4026531840, status=0x18E, tcp_state=3 if proto == 6 else 0, flags=0,
            icmp=(8, 0, rng.randrange(65536)) if proto in (1, 58) else None,
            labels={"direction": rng.choice(("in", "out"))}))
    return out


def spool_path(records: list[FlowEvent], directory: Path) -> tuple[float, float, int]:
    """(in/s, out/s, bytes per row) through Spool.append / read + ack."""
    spool = Spool(directory, 10**12, "bench")
    spool.open()
    start = time.process_time()
    for i in range(0, len(records), BATCH):
        spool.append(records[i:i + BATCH])
    cpu_in = time.process_time() - start
    size = spool.bytes // len(records)
    got = 0
    start = time.process_time()
    while batch := spool.read(BATCH):
        got += len(batch)
        spool.ack()
    cpu_out = time.process_time() - start
    spool.close()
    assert got == len(records), got
    return len(records) / cpu_in, len(records) / cpu_out, size


class CountingSink(Sink):
    """Down until `up` is set; then counts what it is given."""

    def __init__(self) -> None:
        super().__init__(SinkConfig(type="bench"))
        self.up = threading.Event()
        self.count = 0

    def write(self, batch: list[FlowEvent]) -> None:
        if not self.up.is_set():
            raise TransientSinkError("down")
        self.count += len(batch)


def worker_path(records: list[FlowEvent], directory: Path) -> tuple[float, float]:
    """(in/s, out/s) through a SpoolingWorker: offer -> spool writer -> disk
    while the sink is down; then memory and disk -> sink."""
    sink, stats = CountingSink(), Stats()
    config = SinkConfig(type="bench", name="bench", batch_size=BATCH, queue_size=10_000, flush_interval=0.2,
                        retry={"backoff": "50ms", "max_backoff": "100ms"},
                        spool={"path": str(directory), "max_size": 10**12})
    worker = SpoolingWorker("bench", sink, config, stats.sink("bench"))
    worker.start()
    start = time.process_time()
    for i in range(0, len(records), BATCH):
        # The probe's reader makes ~100k records/s at most: wait (no CPU) when
        # the spool writer is 10 batches behind rather than overflow its list.
        while len(worker._overflow) > 10 * BATCH:
            time.sleep(0.001)
        for event in records[i:i + BATCH]:
            worker.offer(event)
    assert stats.snapshot()["sinks"]["bench"]["dropped"] == 0
    while worker.spool.records + worker.depth() + len(worker._inflight) < len(records):
        time.sleep(0.01)
    cpu_in = time.process_time() - start
    start = time.process_time()
    sink.up.set()
    while sink.count < len(records):
        time.sleep(0.01)
    cpu_out = time.process_time() - start
    worker.close(time.monotonic() + 5)
    worker.join(10)
    return len(records) / cpu_in, len(records) / cpu_out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    n = 20_000 if args.smoke else args.records
    records = events(n)
    sample = sum(len(encode(e)) for e in records[:1000]) / 1000
    report = Report("SPOOL", "disk spool throughput, one core",
                    "FlowEvents encoded, stored in batches of 500, read back, decoded and acknowledged; "
                    "process CPU time; a directory in /var/tmp", smoke=args.smoke)
    best: dict[str, float] = {}
    for _ in range(1 if args.smoke else 3):
        for name, run in (("spool", spool_path), ("worker", worker_path)):
            directory = Path(tempfile.mkdtemp(prefix="spool-bench-", dir="/var/tmp"))
            try:
                rates = run(records, directory)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            best[f"{name} in"] = max(best.get(f"{name} in", 0), rates[0])
            best[f"{name} out"] = max(best.get(f"{name} out", 0), rates[1])
    for key, label in (("spool in", "Spool.append: encode + insert (records/s)"),
                       ("spool out", "Spool.read + ack: select + decode + delete (records/s)"),
                       ("worker in", "SpoolingWorker, sink down: offer -> disk (records/s)"),
                       ("worker out", "SpoolingWorker, sink up: memory + disk -> sink (records/s)")):
        rate = best[key]
        report.row(label, fmt_rate(rate), f">= {TARGET:,}", rate >= TARGET)
    report.row("row body (JSON), mean bytes", f"{sample:.0f}")
    report.details = {"records": n, **best, "row_bytes": sample}
    report.save(args.json)


if __name__ == "__main__":
    main()
