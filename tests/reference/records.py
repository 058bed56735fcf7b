"""The documented JSON record as a dict, encoded by the json module: the
reference conntracct.sinks.records.json_line is tested against
(tests/unit/test_stdout_sink.py).  Plain and slow on purpose."""

from __future__ import annotations

from typing import Any

from conntracct.flow import FlowEvent, FlowTuple
from conntracct.sinks.records import flag_names, flow_id_text, rfc3339


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
        "end_reason": event.end_reason_name or None,
        "labels": event.labels,
    }
    if event.icmp is not None:
        icmp_type, code, ident = event.icmp
        record["icmp"] = {"type": icmp_type, "code": code, "id": ident}
    return record
