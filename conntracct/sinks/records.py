"""The documented JSON record of a flow event (docs/record-fields.md).

One mapping for every sink that writes generic JSON, so field names stay the
same everywhere; change it together with docs/record-fields.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from ..flow import FLAG_NAMES, FlowEvent, FlowTuple


def flag_names(flags: int) -> list[str]:
    """Names of the set flags in bit order; unknown bits as 'bit<N>'."""
    names = [name for bit, name in FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~sum(FLAG_NAMES)
    names += [f"bit{n}" for n in range(unknown.bit_length()) if unknown >> n & 1]
    return names


@lru_cache(maxsize=1024)
def utc_second(second: int) -> str:
    """'YYYY-MM-DDTHH:MM:SS' (UTC) of a Unix second."""
    # Records cluster within a few seconds: formatting the date once per
    # second saves most of the datetime cost.
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339(ns: int, digits: int = 9) -> str:
    """Wall-clock nanoseconds -> '2026-11-24T10:00:01.123456789Z' (digits: 3, 6 or 9)."""
    second, frac = divmod(ns, 1_000_000_000)
    frac //= 10 ** (9 - digits)
    return f"{utc_second(second)}.{frac:0{digits}d}Z"


def flow_id_text(flow_id: int) -> str:
    # Hex text, not a JSON number: 63-bit integers lose precision in
    # double-based JSON readers (JavaScript, older jq).
    return f"{flow_id:016x}"


def _tuple(t: FlowTuple) -> dict[str, Any]:
    return {"src": t.src, "dst": t.dst, "sport": t.sport, "dport": t.dport}


def flow_record(event: FlowEvent) -> dict[str, Any]:
    """The event as a JSON-ready dict with the documented, stable field names."""
    record: dict[str, Any] = {
        "kind": event.kind,
        "flow_id": flow_id_text(event.flow_id),
        "family": event.family,
        "protocol": event.proto_name,
        "protocol_number": event.proto,
        "orig": _tuple(event.orig),
        "reply": _tuple(event.reply),
        "nat": event.nat,
        "packets_orig": event.packets_orig,
        "bytes_orig": event.bytes_orig,
        "packets_reply": event.packets_reply,
        "bytes_reply": event.bytes_reply,
        "delta_packets_orig": event.delta_packets_orig,
        "delta_bytes_orig": event.delta_bytes_orig,
        "delta_packets_reply": event.delta_packets_reply,
        "delta_bytes_reply": event.delta_bytes_reply,
        "start": rfc3339(event.start_ns) if event.start_ns else None,
        "start_ns": event.start_ns,
        "stop": rfc3339(event.stop_ns) if event.stop_ns else None,
        "stop_ns": event.stop_ns,
        "timestamp": rfc3339(event.ts_ns),
        "timestamp_ns": event.ts_ns,
        "zone": event.zone,
        "mark": event.mark,
        "netns": event.netns,
        "status": event.status,
        "tcp_state": event.tcp_state_name or None,
        "flags": flag_names(event.flags),
        "labels": event.labels,
    }
    if event.icmp is not None:
        icmp_type, code, ident = event.icmp
        record["icmp"] = {"type": icmp_type, "code": code, "id": ident}
    return record
