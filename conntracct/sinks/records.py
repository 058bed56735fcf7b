"""The documented JSON record of a flow event (docs/record-fields.md), and
the text pieces other formats share (flags, times, the flow id).

One formatter for every sink that writes generic JSON, so field names stay
the same everywhere; change it together with docs/record-fields.md and its
reference, tests/reference/records.py.  Not a sink.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import lru_cache

from ..flow import END_REASONS, FLAG_NAMES, FlowEvent


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


_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# The encoder's own string escaping (ensure_ascii=False): '"', '\\' and control characters.
_STR = json.encoder.encode_basestring


@lru_cache(maxsize=256)
def _flags_json(flags: int) -> str:
    return _ENCODE(flag_names(flags))


def _time(ns: int) -> str:
    """'"<rfc3339(ns)>"', quoted (its characters need no escaping)."""
    second, frac = divmod(ns, 1_000_000_000)
    return f'"{utc_second(second)}.{frac:09d}Z"'


def _nullable_time(ns: int) -> str:
    return _time(ns) if ns else "null"


def _labels_json(labels: dict) -> str:
    try:
        return "{" + ",".join([_STR(key) + ":" + _STR(value) for key, value in labels.items()]) + "}"
    except TypeError:   # not all text: the encoder's own conversions
        return _ENCODE(labels)


_END_REASON_JSON = {code: _STR(name) for code, name in END_REASONS.items()}
_JSON_IDENTITY = object()   # json_line's key in FlowEvent.memo


def _json_identity(e: FlowEvent) -> str:
    """The part of a JSON line that only the flow's identity decides, from
    "flow_id" to "nat": made once per flow (FlowEvent.memo)."""
    o, r = e.orig, e.reply
    return (f'"flow_id":"{e.flow_id:016x}","family":{e.family:d},'
            f'"protocol":{_STR(e.proto_name)},"protocol_number":{e.proto:d},'
            f'"orig":{{"src":{_STR(o.src)},"dst":{_STR(o.dst)},"sport":{o.sport:d},"dport":{o.dport:d}}},'
            f'"reply":{{"src":{_STR(r.src)},"dst":{_STR(r.dst)},"sport":{r.sport:d},"dport":{r.dport:d}}},'
            f'"nat":{"true" if e.nat else "false"},')


def json_line(e: FlowEvent) -> str:
    """The documented JSON record of the event, one line: written out
    directly, in less than half the time of building a dict and encoding it,
    for the sinks that write every record of a busy host.  Its reference, the
    dict encoded, is tests/reference/records.py (flow_record); the unit
    tests compare the two."""
    memo = e.memo
    if memo is None:
        identity = _json_identity(e)
    else:
        identity = memo.get(_JSON_IDENTITY)
        if identity is None:
            identity = memo[_JSON_IDENTITY] = _json_identity(e)
    tcp_state = e.tcp_state_name
    line = (f'{{"kind":{_STR(e.kind)},{identity}'
            f'"packets_orig":{e.packets_orig:d},"bytes_orig":{e.bytes_orig:d},'
            f'"packets_reply":{e.packets_reply:d},"bytes_reply":{e.bytes_reply:d},'
            f'"delta_packets_orig":{e.delta_packets_orig:d},"delta_bytes_orig":{e.delta_bytes_orig:d},'
            f'"delta_packets_reply":{e.delta_packets_reply:d},"delta_bytes_reply":{e.delta_bytes_reply:d},'
            f'"start":{_nullable_time(e.start_ns)},"start_ns":{e.start_ns:d},'
            f'"stop":{_nullable_time(e.stop_ns)},"stop_ns":{e.stop_ns:d},'
            f'"timestamp":{_time(e.ts_ns)},"timestamp_ns":{e.ts_ns:d},'
            f'"zone":{e.zone:d},"mark":{e.mark:d},"netns":{e.netns:d},"status":{e.status:d},'
            f'"tcp_state":{_STR(tcp_state) if tcp_state else "null"},"flags":{_flags_json(e.flags)},'
            f'"end_reason":{_END_REASON_JSON.get(e.end_reason, "null")},'
            f'"labels":{_labels_json(e.labels) if e.labels else "{}"}')
    if e.icmp is not None:
        icmp_type, code, ident = e.icmp
        line += f',"icmp":{{"type":{icmp_type:d},"code":{code:d},"id":{ident:d}}}'
    return line + "}\n"
