"""The documented JSON record of a flow event (docs/record-fields.md), and
the text pieces other formats share (flags, times, the flow id).

One formatter for every sink that writes generic JSON, so field names stay
the same everywhere; change it together with docs/record-fields.md and its
reference, tests/reference/records.py.  Not a sink.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache

from .. import _jsonline
from ..flow import END_REASONS, FLAG_NAMES, KINDS, FlowEvent


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


def _labels_json(labels: dict) -> str:
    try:
        return "{" + ",".join([_STR(key) + ":" + _STR(value) for key, value in labels.items()]) + "}"
    except TypeError:   # not all text: the encoder's own conversions
        return _ENCODE(labels)


_END_REASON_JSON = {code: _STR(name) for code, name in END_REASONS.items()}
_JSON_IDENTITY = object()   # json_line's key in FlowEvent.memo

# json_line(e) -> str: the documented JSON record of the event, one line,
# "\n" included.  Compiled (conntracct/_jsonline.c): the stdout/file sink
# writes every record of a busy host with it, and in Python it was the largest
# single cost per finished flow (bench/README.md, issue 14).  It writes from
# "flow_id" to "nat" (what only the flow's identity decides) once per flow,
# kept in FlowEvent.memo under _JSON_IDENTITY, and takes the meaning of the
# flags, end reasons and odd labels from here.  Its reference, the dict
# encoded, is tests/reference/records.py (flow_record); the unit tests
# compare the two.
_jsonline.configure(FlowEvent, KINDS, _JSON_IDENTITY, _flags_json, _END_REASON_JSON, _labels_json, _STR)
json_line: Callable[[FlowEvent], str] = _jsonline.json_line
