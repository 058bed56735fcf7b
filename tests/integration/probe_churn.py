"""A probe read on a thread while UDP churn crosses the router, and the
kernel's own NEW events beside it: what the probe tests compare."""

from __future__ import annotations

import threading
import time
from collections import Counter

from conntracct.flow import NEW
from conntracct.probe.record import decode


def read_during_churn(probe, topo, duration: float, rate: int):
    """Consume `probe` every 2 ms while `rate` UDP flows/s cross the router
    for `duration` s; (the churn's result, the conntrack -E NEW capture)."""
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            probe.consume()
            time.sleep(0.002)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        with topo.conntrack_events(("NEW",)) as cap:
            result = topo.churn(duration=duration, rate=rate, proto="udp")
    finally:
        stop.set()
        reader.join()
        probe.consume()
    return result, cap


def new_flows(records: list[bytes], cap, port: int) -> tuple[Counter, Counter]:
    """Source ports of the flows to `port`: (the probe's NEW records, the kernel's NEW events)."""
    ours = Counter(e.orig.sport for e in map(lambda raw: decode(raw, 0), records)
                   if e.kind == NEW and e.orig.dport == port)
    kernel = Counter(e["orig"]["sport"] for e in cap.events if e["orig"].get("dport") == port)
    return ours, kernel
