#!/usr/bin/env python3
"""Range labels (enrich.ranges): records/s through the enricher with 0, 10,
1,000 and 10,000 ranges.

    .venv/bin/python bench/enrich_ranges.py [--records N] [--smoke] [--json PATH]

Three figures per range count:
- `flows`: records of flows with their FlowEvent.memo (five records a flow,
  as the probe decoder gives them): the verdict is made once per flow;
- `cold`: every record a new flow from a new remote address, no memo: every
  record classifies its addresses (parse, ignore/local networks, one bisect);
- `lookup`: RangeTable.find alone, per address.
Addresses: half IPv4, half IPv6, about half of them inside some range.  No
network, no kernel.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conntracct.enrich import Enricher, RangeTable  # noqa: E402
from conntracct.enrichconfig import EnrichConfig  # noqa: E402
from conntracct.flow import UPDATE, FlowEvent, FlowTuple  # noqa: E402

V4_BASE = int(ipaddress.ip_address("100.64.0.0"))
V6_BASE = int(ipaddress.ip_address("2001:db8::"))
SPAN = 1 << 22   # addresses per family the ranges and remotes are spread over
LOCAL = ("192.0.2.2", "2001:db8:ffff::2")


def make_ranges(n: int, rng: random.Random) -> list[dict]:
    """n disjoint-ish ranges (some overlap: CIDRs and start-end mixed)."""
    out = []
    step = SPAN // max(n, 1)
    for i in range(n):
        v6 = i % 2
        base = V6_BASE if v6 else V4_BASE
        first = base + i * step + rng.randrange(max(step // 4, 1))
        last = first + rng.randrange(max(step // 2, 1))
        text = f"{ipaddress.ip_address(first)}-{ipaddress.ip_address(last)}"
        out.append({"range": text, "labels": {"customer": f"c{i}", "env": "prod" if i % 3 else "dev"}})
    return out


def remote_address(rng: random.Random, v6: bool) -> str:
    return str(ipaddress.ip_address((V6_BASE if v6 else V4_BASE) + rng.randrange(SPAN)))


def event(remote: str, sport: int, memo: dict | None) -> FlowEvent:
    local = LOCAL[":" in remote]
    o = FlowTuple(local, remote, sport, 443)
    return FlowEvent(UPDATE, sport, 6 if ":" in remote else 4, 6, o, FlowTuple(remote, local, 443, sport),
                     10, 1000, 8, 900, 1, 100, 1, 90, 1, 0, 2, memo=memo)


def enricher(n_ranges: int, rng: random.Random) -> Enricher:
    config = EnrichConfig.model_validate({
        "labels": {"site": "fra1"}, "local_addresses": list(LOCAL),
        "ignore": ["10.0.0.0/8", "udp/53 to 198.51.100.0/24"], "ranges": make_ranges(n_ranges, rng)})
    return Enricher(config)


def rate(count: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def measure(n_ranges: int, records: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    enrich = enricher(n_ranges, rng)
    # flows: five records each, memo shared by a flow's records
    flows = [(remote_address(rng, i % 2 == 1), 1024 + i % 60000) for i in range(records // 5)]
    memos = [{} for _ in flows]
    batch = [event(remote, sport, memo) for (remote, sport), memo in zip(flows, memos, strict=True)
             for _ in range(5)]
    labelled = 0

    def run_flows() -> None:
        nonlocal labelled
        for e in batch:
            e.labels = {}
            out = enrich(e)
            labelled += "customer" in out.labels

    flows_rate = rate(len(batch), run_flows)
    # cold: new remote addresses, no memo
    cold_batch = [event(remote_address(rng, i % 2 == 1), 1024 + i % 60000, None) for i in range(records)]
    cold_rate = rate(len(cold_batch), lambda: [enrich(e) for e in cold_batch])
    table = RangeTable(EnrichConfig.model_validate({"ranges": make_ranges(n_ranges, random.Random(seed))}).ranges)
    ips = [ipaddress.ip_address(remote_address(rng, i % 2 == 1)) for i in range(records)]
    find = table.find
    lookup_rate = rate(len(ips), lambda: [find(ip) for ip in ips])
    return {"ranges": n_ranges, "segments": len(table), "records": len(batch),
            "labelled_share": round(labelled / len(batch), 3),
            "flows_rps": round(flows_rate), "cold_rps": round(cold_rate), "lookup_per_s": round(lookup_rate)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--smoke", action="store_true", help="a few thousand records: proves it runs")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    records = 5000 if args.smoke else args.records
    results = [measure(n, records) for n in (0, 10, 1000, 10000)]
    print(f"{'ranges':>7} {'segments':>8} {'labelled':>8} {'flows rec/s':>12} {'cold rec/s':>11} {'find/s':>11}")
    for r in results:
        print(f"{r['ranges']:>7} {r['segments']:>8} {r['labelled_share']:>8} {r['flows_rps']:>12,} "
              f"{r['cold_rps']:>11,} {r['lookup_per_s']:>11,}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
