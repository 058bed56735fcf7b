#!/usr/bin/env python3
"""What the netfilter-mode sweep costs per flow: one ctnetlink GET per swept
flow against one table dump parsed leanly (ctnetlink.Table.present), the
numbers behind probe/ends.py's choice between them.

    .venv/bin/python bench/sweep_cost.py [--flows 50000]

bench/flows.c holds N TCP flows through tests/netns's router; in the router
this script (again, with --inside) times both ways of asking "which of these
flows still exist?" for all of them and for a tenth of them.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def inside() -> None:
    from conntracct.probe import ctnetlink
    entries = [e for e in ctnetlink.dump() if e.orig.proto == socket.IPPROTO_TCP]
    keys = [ctnetlink.orig_tuple_attr(e.family, e.orig.proto, e.orig.src, e.orig.dst,
                                      e.orig.src_u.to_bytes(2, "big"), e.orig.dst_u.to_bytes(2, "big"))
            for e in entries]
    table = ctnetlink.Table()
    lookup = ctnetlink.Lookup()
    out = {"table": table.count(), "tcp_entries": len(entries)}
    for share in (1, 10, 100):
        subset = entries[::share]
        c0 = cpu()
        t0 = time.monotonic()
        alive = sum(lookup.exists(e.family, e.orig, e.zone) for e in subset)
        out[f"get_1/{share}"] = {"flows": len(subset), "alive": alive, "cpu_s": cpu() - c0,
                                 "wall_s": time.monotonic() - t0}
        wanted = dict.fromkeys(keys[::share])
        c0 = cpu()
        t0 = time.monotonic()
        table.discard_present(wanted)
        out[f"dump_1/{share}"] = {"flows": len(subset), "alive": len(subset) - len(wanted), "cpu_s": cpu() - c0,
                                  "wall_s": time.monotonic() - t0}
    c0 = cpu()
    full = len(ctnetlink.dump())
    out["full_parse_dump"] = {"entries": full, "cpu_s": cpu() - c0}
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=50_000)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside()
        return
    from common import Flows, need_root

    from tests.netns import Topology
    need_root("sweep_cost")
    with Topology(acct=True, timestamp=True, conntrack_events=2) as topo:
        flows = Flows(topo, args.flows, 20_000, 600)
        try:
            print("connected", flows.wait_connected(), flush=True)
            res = topo.run("router", sys.executable, __file__, "--inside", timeout=300)
            out = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(out, indent=1))
            for share in ("1/1", "1/10", "1/100"):
                g, d = out[f"get_{share}"], out[f"dump_{share}"]
                print(f"{share} of {out['tcp_entries']:,} swept: GET {g['cpu_s'] / g['flows'] * 1e6:.1f} µs/flow "
                      f"({g['cpu_s']:.2f} s), dump {d['cpu_s'] / out['table'] * 1e6:.2f} µs/entry "
                      f"({d['cpu_s']:.2f} s)")
        finally:
            flows.stop()


if __name__ == "__main__":
    main()
