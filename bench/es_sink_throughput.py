#!/usr/bin/env python3
"""Elasticsearch sink throughput: records/s for bulk batches against the
wire-level double (tests/servers/es_double.py), and encode-only records/s.

    .venv/bin/python bench/es_sink_throughput.py [--records N] [--batch 500 5000]

For each batch size it prints:
  encode     building the NDJSON bulk body (documents + action lines), no I/O
  double     the double's own cost: parsing and storing that body in-process
  sink       ElasticsearchSink.write() end to end over HTTP to the double
             (gzip on and off): client, helper, HTTP, and the double's cost too;
             also the CPU time of the writing thread alone (the agent's cost:
             encoding, gzip, client, response parsing), which excludes the double

No real Elasticsearch can run here, so `sink` is a lower bound for what the
agent can push: a real cluster parses faster than the Python double but adds
indexing work of its own.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conntracct.config import parse_config  # noqa: E402
from conntracct.flow import DESTROY, FlowEvent, FlowTuple  # noqa: E402
from conntracct.sinks import create_sink  # noqa: E402
from conntracct.sinks.elasticsearch import BulkBody  # noqa: E402
from tests.servers.es_double import EsDouble  # noqa: E402

PORT_PROTOS = (6, 17)


def finished_flows(n: int, seed: int = 1) -> list[FlowEvent]:
    """n plausible DESTROY records: IPv4/IPv6, TCP/UDP/ICMP, some NAT, labels."""
    rng = random.Random(seed)
    t0 = time.time_ns()
    events = []
    for i in range(n):
        v6 = rng.random() < 0.3
        proto = rng.choice((6, 6, 6, 17, 17, 58 if v6 else 1))
        if v6:
            src, dst = f"2001:db8::{rng.randrange(1, 200):x}", f"2001:db8:1::{rng.randrange(1, 50):x}"
        else:
            src, dst = f"10.0.{rng.randrange(4)}.{rng.randrange(1, 250)}", f"198.51.100.{rng.randrange(1, 50)}"
        sport, dport = ((rng.randrange(32768, 61000), rng.choice((53, 80, 443))) if proto in PORT_PROTOS
                        else (0, 0))
        nat = not v6 and rng.random() < 0.2
        po, pr = rng.randrange(1, 10_000), rng.randrange(1, 10_000)
        events.append(FlowEvent(
            kind=DESTROY, flow_id=rng.getrandbits(63), family=6 if v6 else 4, proto=proto,
            orig=FlowTuple(src, dst, sport, dport), reply=FlowTuple(dst, "192.0.2.1" if nat else src, dport, sport),
            packets_orig=po, bytes_orig=po * 700, packets_reply=pr, bytes_reply=pr * 900,
            delta_packets_orig=0, delta_bytes_orig=0, delta_packets_reply=0, delta_bytes_reply=0,
            start_ns=t0 - 10**10, stop_ns=t0 + i * 1000, ts_ns=t0 + i * 1000, netns=4026531840,
            status=0x18E, tcp_state=7 if proto == 6 else 0,
            icmp=(8, 0, rng.randrange(65536)) if proto in (1, 58) else None,
            labels={"direction": rng.choice(("outbound", "inbound", "forward")), "site": "fra1"}))
    return events


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} records/s"


def bench(records: int, batch_size: int) -> None:
    events = finished_flows(records)
    batches = [events[i:i + batch_size] for i in range(0, len(events), batch_size)]
    body = BulkBody("conntracct-flows", "daily", False, "bench-host")

    started = time.perf_counter()
    bodies = [body.ndjson(b) for b in batches]
    encode = time.perf_counter() - started
    size = sum(map(len, bodies)) / records
    print(f"batch {batch_size:>5}  encode         {rate(records, encode)}   ({size:.0f} bytes/record)")

    double = EsDouble()
    started = time.perf_counter()
    for b in bodies:
        double.bulk(b, None)
    print(f"batch {batch_size:>5}  double alone   {rate(records, time.perf_counter() - started)}")

    for gzip in (True, False):
        with EsDouble() as es:
            config = parse_config(f"sinks: [{{type: elasticsearch, hosts: ['{es.url}'], gzip: {str(gzip).lower()},"
                                  f" batch_size: {batch_size}, queue_size: {max(batch_size, 10000)}}}]").sinks[0]
            sink = create_sink(config)
            sink.write(batches[0][:1])   # template, connection, product check: not measured
            started, cpu = time.perf_counter(), time.thread_time()
            for b in batches:
                sink.write(b)
            elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
            sink.close()
            assert len(es.docs()) == records, len(es.docs())
        print(f"batch {batch_size:>5}  sink gzip={'on ' if gzip else 'off'}  {rate(records, elapsed)}"
              f"   (wall clock, the double's cost included; the sink's own thread: {rate(records, cpu)} of CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[500, 5000])
    args = parser.parse_args()
    print(f"{args.records} finished flows, Python {sys.version.split()[0]}")
    for batch_size in args.batch:
        bench(args.records, batch_size)


if __name__ == "__main__":
    main()
