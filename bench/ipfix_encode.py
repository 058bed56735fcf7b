#!/usr/bin/env python3
"""IPFIX encoding of flow records: conntracct's struct encoder vs the `ipfix`
library (Debian's python3-ipfix 0.9.7, the PyPI `ipfix` package), one core.

    .venv/bin/python bench/ipfix_encode.py [--records N] [--smoke]

Both turn the same FlowEvents into the same 1,472-byte messages (MTU 1500
over UDP/IPv4) with the same 16 templates: records per second from FlowEvent
to message bytes, deltas and template choice included.  Two workloads:

- `4 records/flow`: flows send UPDATEs and a DESTROY, the records of one flow
  share FlowEvent.memo (as the probe decoder gives them), so the encoder
  packs a flow's keys once;
- `1 record/flow`: every record is a flow of its own (worst case: DESTROY
  only, short flows).

Target: 100k records/s on one core.  No network.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from datetime import datetime
from ipaddress import ip_address
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from influx_line_protocol import sample_events  # noqa: E402

from conntracct.flow import FlowEvent  # noqa: E402
from conntracct.ipfix_encoding import (  # noqa: E402
    DEFAULT_PEN,
    ENTERPRISE,
    TEMPLATES,
    RecordEncoder,
    Session,
    TemplateKey,
    pack_records,
)
from conntracct.sinks.ipfix import FlowDeltas  # noqa: E402

MAX_MESSAGE = 1500 - 20 - 8
TARGET = 100_000


def workload(n: int, per_flow: int) -> list[FlowEvent]:
    """n records, `per_flow` consecutive records per flow sharing one memo."""
    events = sample_events(n)
    for i in range(0, n, per_flow):
        first, memo = events[i], {}
        for k, e in enumerate(events[i:i + per_flow], 1):
            e.flow_id, e.family, e.proto, e.orig, e.reply = first.flow_id, first.family, first.proto, \
                first.orig, first.reply
            e.icmp, e.labels, e.memo = first.icmp, first.labels, memo
            # Totals grow from record to record, as a flow's do.
            e.packets_orig, e.bytes_orig = first.packets_orig * k, first.bytes_orig * k
            e.packets_reply, e.bytes_reply = first.packets_reply * k, first.bytes_reply * k
    return events


def conntracct_encode(events: list[FlowEvent]) -> int:
    """FlowEvents -> messages with conntracct.ipfix_encoding, as the sink does."""
    encoder, deltas, session = RecordEncoder(), FlowDeltas(), Session(1)
    encode = encoder.encode
    records = [(template.id, record) for template, record in
               (encode(e, d, e.end_reason) for e, d in zip(events, deltas.bases(events), strict=True))]
    size = 0
    for body in pack_records(records, MAX_MESSAGE):
        size += len(session.seal(body, 0))
        session.sent(body)
    deltas.sent(events)
    return size


def library_encode(events: list[FlowEvent]) -> int:
    """The same messages with the `ipfix` library: its value types (ip_address,
    datetime) and its MessageBuffer, templates made from the same IES."""
    import ipfix.ie
    import ipfix.message
    import ipfix.template

    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    message = ipfix.message.MessageBuffer()
    message.mtu = MAX_MESSAGE
    message.begin_export(1)
    for template in TEMPLATES.values():
        specs = [f"{ie.name}({DEFAULT_PEN if ie.pen == ENTERPRISE else ie.pen}/{ie.number})<{ie.type}>"
                 f"[{ie.length}]" for ie in template.ies]
        message.add_template(ipfix.template.from_ielist(template.id, ipfix.ie.spec_list(specs)),
                             export=False)
    deltas = FlowDeltas()
    size = 0
    for e, base in zip(events, deltas.bases(events), strict=True):
        o, r = e.orig, e.reply
        icmp = e.icmp is not None and e.proto in (1, 58)
        nat = (o.src, o.dst, o.sport, o.dport) != (r.dst, r.src, r.dport, r.sport)
        direction = {"inbound": 0, "outbound": 1}.get(e.labels.get("direction", ""))
        template = TEMPLATES[TemplateKey(e.family, icmp, nat, direction is not None)]
        values = [ip_address(o.src), ip_address(o.dst)]
        values += [e.icmp[0] << 8 | e.icmp[1]] if icmp else [o.sport, o.dport]
        values.append(e.proto)
        if nat:
            values += [ip_address(r.dst), ip_address(r.src)]
            if not icmp:
                values += [r.dport, r.sport]
        values += [datetime.utcfromtimestamp((e.start_ns or e.ts_ns) / 1e9),
                   datetime.utcfromtimestamp((e.stop_ns or e.ts_ns) / 1e9),
                   e.bytes_orig, e.packets_orig, e.bytes_orig - base[0], e.packets_orig - base[1],
                   e.bytes_reply, e.packets_reply, e.bytes_reply - base[2], e.packets_reply - base[3],
                   e.end_reason]
        if direction is not None:
            values.append(direction)
        values += [e.zone, e.mark]
        try:
            message.export_ensure_set(template.id)
            message.export_tuple(values)
        except ipfix.message.EndOfMessage:
            size += len(message.to_bytes())
            message.begin_export(1)
            message.export_ensure_set(template.id)
            message.export_tuple(values)
    deltas.sent(events)
    return size + len(message.to_bytes())


def rate(encode, events: list[FlowEvent], rounds: int) -> tuple[float, int]:
    """Best records/s of `rounds` runs (memos emptied before each) and bytes."""
    best, size = 0.0, 0
    for _ in range(rounds):
        for e in events:
            if e.memo is not None:
                e.memo.clear()
        started = time.perf_counter()
        size = encode(events)
        best = max(best, len(events) / (time.perf_counter() - started))
    return best, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few thousand records, one round")
    args = parser.parse_args()
    n, rounds = (2_000, 1) if args.smoke else (args.records, args.rounds)
    import warnings
    warnings.simplefilter("ignore", DeprecationWarning)   # the library's datetime.utcnow()
    print(f"| encoder | workload | records/s | bytes/record | target {TARGET:,}/s |")
    print("|---|---|---|---|---|")
    for per_flow in (4, 1):
        events = workload(n, per_flow)
        for name, encode in (("conntracct (struct)", conntracct_encode), ("ipfix library 0.9.7", library_encode)):
            if encode is library_encode and importlib.util.find_spec("ipfix") is None:
                print(f"| {name} | {per_flow} record(s)/flow | not installed (apt python3-ipfix) | | |")
                continue
            records_s, size = rate(encode, events, rounds)
            verdict = "pass" if records_s >= TARGET else "miss"
            print(f"| {name} | {per_flow} record{'s' if per_flow > 1 else ''}/flow | {records_s:,.0f} "
                  f"| {size / n:.0f} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
