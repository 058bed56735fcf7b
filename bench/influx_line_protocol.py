#!/usr/bin/env python3
"""Line protocol for 100k flow records: conntracct's formatter vs influxdb-client's Point.

    .venv/bin/python bench/influx_line_protocol.py [--records N]

Prints records/s for each way of building the same points.  No network.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conntracct.flow import DESTROY, UPDATE, FlowEvent, FlowTuple  # noqa: E402
from conntracct.sinks.common import PORT_PROTOS  # noqa: E402
from conntracct.sinks.lineprotocol import FAMILY_NAMES, LineFormatter, PointLog  # noqa: E402


def sample_events(n: int, seed: int = 1, ts_ns: int | None = None, local: int = 16,
                  remote: int = 64) -> list[FlowEvent]:
    """n plausible UPDATE/DESTROY records: IPv4 and IPv6, TCP/UDP/ICMP, some NAT,
    the labels an enricher adds.  `local` hosts per family talk to `remote`
    servers per family, each server on one port: a few thousand series, as
    a busy host or small gateway has.  Timestamps 1 µs apart from ts_ns
    (default: now)."""
    rng = random.Random(seed)
    t0 = time.time_ns() if ts_ns is None else ts_ns
    events = []
    for i in range(n):
        v6 = rng.random() < 0.3
        proto = rng.choice((6, 6, 6, 17, 17, 1 if not v6 else 58))
        host, server = rng.randrange(local) + 1, rng.randrange(remote) + 1
        if v6:
            src, dst = f"2001:db8::{host:x}", f"2001:db8:1::{server:x}"
        else:
            src, dst = f"10.0.0.{host}", f"198.51.{server // 250}.{server % 250}"
        sport, dport = (rng.randrange(32768, 61000), (53, 80, 443, 8080)[server % 4]) if proto in PORT_PROTOS \
            else (0, 0)
        orig = FlowTuple(src, dst, sport, dport)
        nat = not v6 and host % 4 == 0
        reply = FlowTuple(dst, "192.0.2.1" if nat else src, dport, sport)
        po, pr = rng.randrange(1, 10_000), rng.randrange(1, 10_000)
        events.append(FlowEvent(
            kind=DESTROY if rng.random() < 0.3 else UPDATE, flow_id=rng.getrandbits(63),
            family=6 if v6 else 4, proto=proto, orig=orig, reply=reply,
            packets_orig=po, bytes_orig=po * 700, packets_reply=pr, bytes_reply=pr * 900,
            delta_packets_orig=po // 3, delta_bytes_orig=po // 3 * 700,
            delta_packets_reply=pr // 3, delta_bytes_reply=pr // 3 * 900,
            start_ns=t0 - 10**10, stop_ns=0, ts_ns=t0 + i * 1000, netns=4026531840,
            tcp_state=3 if proto == 6 else 0,
            icmp=(8, 0, rng.randrange(65536)) if proto in (1, 58) else None,
            labels={"direction": "forward" if nat else "outbound", "site": "fra1"}))
    return events


def point_lines(events: list[FlowEvent]) -> list[str]:
    """The same points through influxdb_client.Point."""
    from influxdb_client import Point, WritePrecision

    out = []
    for e in events:
        p = Point("ct_acct").tag("family", FAMILY_NAMES[e.family]).tag("protocol", e.proto_name) \
            .tag("src", e.orig.src).tag("dst", e.orig.dst)
        if e.proto in PORT_PROTOS:
            p.tag("dport", e.orig.dport)
        if e.nat:
            p.tag("reply_src", e.reply.src).tag("reply_dst", e.reply.dst)
        p.tag("netns", e.netns)
        for key, value in e.labels.items():
            p.tag(key, value)
        p.field("packets_orig", e.packets_orig).field("bytes_orig", e.bytes_orig) \
            .field("packets_reply", e.packets_reply).field("bytes_reply", e.bytes_reply) \
            .field("delta_packets_orig", e.delta_packets_orig).field("delta_bytes_orig", e.delta_bytes_orig) \
            .field("delta_packets_reply", e.delta_packets_reply).field("delta_bytes_reply", e.delta_bytes_reply) \
            .field("flow_id", e.flow_id).field("finished", e.kind == DESTROY)
        if e.proto == 6:
            p.field("tcp_state", e.tcp_state_name)
        elif e.icmp is not None:
            p.field("icmp_type", e.icmp[0]).field("icmp_code", e.icmp[1]).field("icmp_id", e.icmp[2])
        p.time(e.ts_ns, WritePrecision.NS)
        out.append(p.to_line_protocol())
    return out


def rate(name: str, n: int, fn) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    print(f"{name:<44} {n / best:>12,.0f} records/s")
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    n = parser.parse_args().records
    events = sample_events(n)
    formatter = LineFormatter()
    point = formatter.point
    rate("conntracct LineFormatter.point", n,
         lambda: [f"{s} {fields} {e.ts_ns}\n" for e in events for s, fields in (point(e),)])
    rate("conntracct sink batch (unique points, join)", n,
         lambda: PointLog().lines(formatter, events))
    rate("influxdb_client Point.to_line_protocol", n, lambda: point_lines(events))


if __name__ == "__main__":
    main()
