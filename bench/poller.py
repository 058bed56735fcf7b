#!/usr/bin/env python3
"""A conntrack-polling exporter, the way Antrea's flow exporter or
conntrack_exporter gather flows: read the whole table every INTERVAL seconds
and turn it into per-remote-host metrics.  bench/p4_steady_state.py runs it
beside the agent on the same table, to compare their cost.

    poller.py conntrack INTERVAL DURATION   `conntrack -L -o extended` (with
                                            counters), its text parsed
    poller.py ctnetlink INTERVAL DURATION   conntracct.probe.ctnetlink.dump()

Each poll rebuilds {(protocol, state, remote address): [flows, packets,
bytes]}, as an exporter's gauges.  Prints one JSON line at the end: polls,
flows per poll, time per poll, its own and its children's CPU seconds.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
              "TIME_WAIT", "CLOSE", "SYN_SENT2")


def from_conntrack_text(text: str) -> dict:
    """conntrack -L -o extended lines, e.g.
    ipv4 2 tcp 6 431999 ESTABLISHED src=A dst=B sport=1 dport=2 packets=3 bytes=4 src=B dst=C ... [ASSURED] ..."""
    gauges: dict = defaultdict(lambda: [0, 0, 0])
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 6:
            continue
        proto = tokens[2]
        state = tokens[5] if "=" not in tokens[5] else ""
        orig: dict[str, str] = {}
        reply: dict[str, str] = {}
        for token in tokens[5:]:
            key, sep, value = token.partition("=")
            if not sep:
                continue
            side = reply if key in orig else orig
            if key in side:      # past the reply tuple: mark=, use=, ...
                break
            side[key] = value
        g = gauges[(proto, state, orig.get("dst", ""))]
        g[0] += 1
        g[1] += int(orig.get("packets", 0)) + int(reply.get("packets", 0))
        g[2] += int(orig.get("bytes", 0)) + int(reply.get("bytes", 0))
    return gauges


def from_ctnetlink(entries: list) -> dict:
    gauges: dict = defaultdict(lambda: [0, 0, 0])
    for e in entries:
        state = TCP_STATES[e.tcp_state] if e.orig.proto == 6 and e.tcp_state < len(TCP_STATES) else ""
        g = gauges[(e.orig.proto, state, socket.inet_ntop(e.family, e.orig.dst))]
        g[0] += 1
        if e.counters:
            g[1] += e.counters[0] + e.counters[2]
            g[2] += e.counters[1] + e.counters[3]
    return gauges


def main() -> None:
    how, interval, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    if how == "ctnetlink":
        from conntracct.probe.ctnetlink import dump
    polls = flows = 0
    poll_seconds: list[float] = []
    end = time.monotonic() + duration
    next_poll = time.monotonic()
    print("READY", flush=True)
    while time.monotonic() < end:
        started = time.monotonic()
        if how == "conntrack":
            text = subprocess.run(["conntrack", "-L", "-o", "extended"], capture_output=True, text=True).stdout
            gauges = from_conntrack_text(text)
        else:
            gauges = from_ctnetlink(dump())
        polls += 1
        flows += sum(g[0] for g in gauges.values())
        poll_seconds.append(time.monotonic() - started)
        next_poll += interval
        time.sleep(max(0.0, min(next_poll, end) - time.monotonic()))
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)    # the conntrack runs
    print(json.dumps({"how": how, "polls": polls, "flows_per_poll": flows / max(polls, 1),
                      "cpu_s": own.ru_utime + own.ru_stime, "children_cpu_s": children.ru_utime + children.ru_stime,
                      "maxrss_mb": own.ru_maxrss / 1024, "children_maxrss_mb": children.ru_maxrss / 1024,
                      "poll_seconds_max": max(poll_seconds, default=0),
                      "poll_seconds_mean": sum(poll_seconds) / max(len(poll_seconds), 1)}), flush=True)


if __name__ == "__main__":
    main()
