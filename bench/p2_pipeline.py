#!/usr/bin/env python3
"""P2 pipeline throughput: raw ring-buffer record bytes -> decode -> enrich ->
sink queue -> encoded output, on one core.

    .venv/bin/python bench/p2_pipeline.py [--smoke] [--records N] [--profile] [--json PATH]

A seeded generator packs realistic records with record.RECORD.pack, the
probe's own layout: flows start (NEW), some report UPDATEs, and end
(DESTROY), interleaved, about 3,000 alive at a time; IPv4 (70%) and IPv6,
TCP/UDP/ICMP, SNAT on 40% of IPv4 TCP/UDP flows, a few thousand remote hosts
behind a few dozen local ones; records are 30% NEW, 40% UPDATE, 30% DESTROY.  Each pass runs the
reader thread's per-record work exactly as conntracct.probe.source does it
(decode, first-sight NEW, enrichment) and offers the event to a sink queue
(conntracct.pipeline.SinkWorker), then takes the queue's batches and encodes
them as that sink does, short of I/O:

  json lines   StdoutSink: one JSON object per record, joined
  influx       InfluxDBSink: LineFormatter + PointLog (unique points), encoded
  es bulk      ElasticsearchSink: the bulk body of the DESTROY records (the
               sink's default kinds; NEW/UPDATE are not queued for it)

Single thread, best of 3 passes (process CPU time, so other load on the
machine does not count).  The garbage collector is set up as the agent sets
it once started (conntracct.agent.tune_garbage_collector); the influx pass is
also measured with Python's default collector, for comparison.  `--profile`
prints cProfile's top functions for the influx pass.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import random
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, arguments, fmt_rate  # noqa: E402

from conntracct.agent import tune_garbage_collector  # noqa: E402
from conntracct.config import EnrichConfig, parse_config  # noqa: E402
from conntracct.configtypes import IPNetwork  # noqa: E402, F401
from conntracct.enrich import Enricher  # noqa: E402
from conntracct.pipeline import SinkWorker  # noqa: E402
from conntracct.probe.record import RECORD, TRACK, decode, first_sight_new, pack_tuple  # noqa: E402
from conntracct.selfmetrics import Stats  # noqa: E402
from conntracct.sinks import create_sink  # noqa: E402
from conntracct.sinks.elasticsearch import BulkBody  # noqa: E402
from conntracct.sinks.lineprotocol import LineFormatter, PointLog  # noqa: E402
from conntracct.sinks.records import json_line  # noqa: E402

TARGET_INFLUX = 200_000
KIND_NEW, KIND_UPDATE, KIND_DESTROY = 1, 2, 3
FLAG_BACKDATED, FLAG_FIRST_SIGHT = 1, 8
NETNS = 4026531840
ROUTER_V4 = socket.inet_pton(socket.AF_INET, "203.0.113.1")
LOCAL_NETS = ["192.0.2.0/24", "2001:db8:1::/64"]


def _v4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def _v6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def _new_flow(rng: random.Random, wall0: int, t0: int) -> dict:
    v6 = rng.random() < 0.3
    roll = rng.random()
    proto = 6 if roll < 0.6 else 17 if roll < 0.9 else (58 if v6 else 1)
    local, remote = rng.randrange(1, 64), rng.randrange(1, 4096)
    if v6:
        family, src, dst = socket.AF_INET6, _v6(f"2001:db8:1::{local:x}"), _v6(f"2001:db8:2::{remote:x}")
    else:
        family, src = socket.AF_INET, _v4(f"192.0.2.{local}")
        dst = _v4(f"198.51.100.{remote % 250 + 1}" if remote % 2 else f"203.0.113.{remote % 250 + 1}")
    nat = False
    if proto in (1, 58):
        ident, icmp_type = rng.randrange(65536), 8 if proto == 1 else 128
        orig = pack_tuple(family, proto, src, dst, ident, icmp_type << 8)
        reply = pack_tuple(family, proto, dst, src, ident, (0 if proto == 1 else 129) << 8)
    else:
        sport, dport = rng.randrange(32768, 61000), rng.choice((53, 80, 123, 443, 443, 443, 8080))
        nat = not v6 and rng.random() < 0.4
        orig = pack_tuple(family, proto, src, dst, sport, dport)
        reply = pack_tuple(family, proto, dst, ROUTER_V4 if nat else src, dport,
                           rng.randrange(1024, 65535) if nat else sport)
    return {"orig": orig, "reply": reply, "proto": proto, "start": wall0 - rng.randrange(10**9),
            "first_seen": t0, "status": 0x18E | (0x10 if nat else 0), "counts": [0, 0, 0, 0],
            "flags": FLAG_BACKDATED if rng.random() < 0.05 else 0}


def raw_records(n: int, seed: int = 1, kinds: tuple[int, ...] | None = None) -> list[bytes]:
    """n probe records as the ring buffer hands them over: flows start (NEW),
    some report UPDATEs, and end (DESTROY), interleaved; about 3,000 flows
    live at a time.  `kinds`: only records of these kinds (the others are
    still generated, to keep the flows' lifecycles, then left out)."""
    rng = random.Random(seed)
    t0 = time.monotonic_ns()
    wall0 = time.time_ns()
    live: list[dict] = []
    out = []
    i = 0
    while len(out) < n:
        i += 1
        ts = t0 + i * 5000
        roll = rng.random()
        if roll < 0.3 or len(live) < 100:
            flow, kind = _new_flow(rng, wall0, ts), KIND_NEW
            live.append(flow)
        else:
            j = rng.randrange(len(live))
            flow = live[j]
            if roll < 0.7 and len(live) < 5000:
                kind = KIND_UPDATE
            else:
                kind = KIND_DESTROY
                live[j] = live[-1]
                live.pop()
        counts = flow["counts"]
        packets = (rng.randrange(1, 40), rng.randrange(0, 40))
        deltas = (packets[0], packets[0] * rng.randrange(60, 1500), packets[1], packets[1] * rng.randrange(60, 1500))
        for k in range(4):
            counts[k] += deltas[k]
        flags = flow["flags"]
        if kind == KIND_DESTROY and rng.random() < 0.02:
            flags |= FLAG_FIRST_SIGHT
        if kinds and kind not in kinds:
            continue
        tcp_state = (3 if kind != KIND_DESTROY else 7) if flow["proto"] == 6 else 0
        po, bo, pr, br = counts
        out.append(RECORD.pack(
            ts, flow["start"], wall0 + i * 5000 if kind == KIND_DESTROY else 0, flow["first_seen"],
            po, pr, bo, br, deltas[0], deltas[2], deltas[1], deltas[3], flow["status"],
            flow["orig"], flow["reply"], NETNS, 0, 0, kind, tcp_state, flags))
    return out


class ReaderPath:
    """FlowSource._on_record and _deliver's per-record work, then the agent's emit()."""

    def __init__(self, worker: SinkWorker, wall_offset_ns: int):
        self.wall_offset = wall_offset_ns
        self.enrich = Enricher(EnrichConfig(labels={"site": "fra1"}, local_addresses=LOCAL_NETS))
        self.offer = worker.offer

    def feed(self, records: list[bytes]) -> None:
        wall_offset, enrich, offer = self.wall_offset, self.enrich, self.offer
        for raw in records:
            event = decode(raw, wall_offset)
            if event.kind == TRACK:
                continue
            new = first_sight_new(event)
            for e in (new, event) if new is not None else (event,):
                enriched = enrich(e)
                if enriched is not None:
                    offer(enriched)


def worker_for(sink_yaml: str) -> tuple[SinkWorker, object]:
    settings = parse_config("sinks:\n  - " + sink_yaml).sinks[0]
    sink = create_sink(settings)
    stats = Stats().sink(settings.name, settings.queue_size)
    return SinkWorker(settings.name, sink, settings, stats), sink


def drain(worker: SinkWorker, encode) -> int:
    """Take every queued batch (as the worker thread would) and encode it; bytes out."""
    out = 0
    while worker.depth():
        out += len(encode(worker._take()))
    return out


def run_format(name: str, records: list[bytes], chunk: int) -> tuple[float, int]:
    """Process CPU seconds for the whole stream through one sink's path, and bytes out."""
    wall = time.time_ns() - time.monotonic_ns()
    if name == "json":
        worker, _ = worker_for("{type: stdout, format: json, queue_size: 200000, batch_size: 500}")

        def encode(batch):
            return "".join(map(json_line, batch)).encode()
    elif name == "influx":
        worker, sink = worker_for("{type: influxdb, url: 'http://127.0.0.1:9', bucket: b, batch_size: 5000,"
                                  " queue_size: 200000}")
        formatter, points = LineFormatter(), PointLog()

        def encode(batch):
            text, taken = points.lines(formatter, batch)
            points.commit(taken)
            return text.encode()
    else:
        worker, _ = worker_for("{type: elasticsearch, hosts: ['http://127.0.0.1:9'], batch_size: 500,"
                               " queue_size: 200000, observer_hostname: bench}")
        body = BulkBody("conntracct-flows", "daily", False, "bench")
        encode = body.ndjson
    reader = ReaderPath(worker, wall)
    size = 0
    started = time.process_time()
    for i in range(0, len(records), chunk):
        reader.feed(records[i:i + chunk])
        size += drain(worker, encode)
    return time.process_time() - started, size


def run_stage(name: str, records: list[bytes]) -> float:
    wall = time.time_ns() - time.monotonic_ns()
    started = time.process_time()
    if name == "decode":
        for raw in records:
            decode(raw, wall)
    else:   # decode + enrich, no queue
        enrich = Enricher(EnrichConfig(labels={"site": "fra1"}, local_addresses=LOCAL_NETS))
        for raw in records:
            enrich(decode(raw, wall))
    return time.process_time() - started


def best_of(passes: int, fn, *args):
    results = [fn(*args) for _ in range(passes)]
    return min(results, key=lambda r: r[0] if isinstance(r, tuple) else r)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the influx pass")
    args = parser.parse_args()
    if args.smoke:
        args.records = 5000
    passes = 1 if args.smoke else 3
    mixed = raw_records(args.records)
    destroys = raw_records(args.records, seed=2, kinds=(KIND_DESTROY,))
    n = len(mixed)
    tune_garbage_collector()   # as the agent does once started
    report = Report("P2", "pipeline throughput (one core)", __doc__, smoke=args.smoke)
    rates = {}
    for stage in ("decode", "decode+enrich"):
        seconds = best_of(passes, run_stage, stage, mixed)
        rates[stage] = n / seconds
        report.row(f"{stage} only", f"{fmt_rate(n / seconds)} rec/s")
    for name, stream, label in (("json", mixed, "raw -> JSON lines (stdout sink)"),
                                ("influx", mixed, "raw -> Influx line protocol (influxdb sink)"),
                                ("es", destroys, "raw DESTROY -> ES bulk body (elasticsearch sink)")):
        seconds, size = best_of(passes, run_format, name, stream, 10_000)
        rates[name] = n / seconds
        if name != "influx":
            report.row(label, f"{fmt_rate(n / seconds)} rec/s", note=f"{size / n:.0f} bytes/record")
            continue
        report.row(label, f"{fmt_rate(n / seconds)} rec/s", f">= {TARGET_INFLUX // 1000}k/s",
                   n / seconds >= TARGET_INFLUX, f"{size / n:.0f} bytes/record")
        # The same with Python's default collector (what the agent ran with
        # before it tuned it after start-up).
        thresholds = gc.get_threshold()
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
        try:
            seconds, _ = best_of(passes, run_format, "influx", mixed, 10_000)
        finally:
            gc.freeze()
            gc.set_threshold(*thresholds)
        rates["influx_gc_default"] = n / seconds
        report.row("  same, Python's default garbage collector", f"{fmt_rate(n / seconds)} rec/s",
                   note="for comparison: the agent freezes its start-up heap, threshold 100000")
    report.details = {"records": n, "rates": rates, "passes": passes}
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run_format("influx", mixed, 10_000)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())
    report.save(args.json)


if __name__ == "__main__":
    main()
