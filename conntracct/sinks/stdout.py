"""stdout / stderr sink: one human-readable line or one JSON object per record.

Text, one line per record (shown wrapped here):

  2026-11-24T10:00:01.123Z UPDATE  tcp 192.0.2.2:40000 -> 198.51.100.2:80
      [nat reply 198.51.100.2:80 -> 198.51.100.1:40000] state=established
      pkts=3/2 (+1/+1) bytes=180/120 (+60/+40) netns=4026531840
      id=1234abcd5678ef90 labels={direction=outbound}

pkts/bytes are original/reply totals, with the gain since the flow's previous
record in parentheses.  Parts appear only when they apply: the NAT reply tuple,
TCP state, ICMP `type= code= ident=`, `dur=` once start and stop are known,
non-zero zone/mark/netns, flags, labels.  IPv6 endpoints are `[addr]:port`.
JSON: docs/record-fields.md (records.flow_record, written out by json_line).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

from ..flow import FLAG_NO_ACCT, FlowEvent, FlowTuple
from .base import PermanentSinkError, Sink, SinkConfig
from .records import flag_names, flow_id_text, rfc3339, utc_second

PORT_PROTOS = frozenset({6, 17, 33, 132, 136})   # tcp udp dccp sctp udplite


class StdoutConfig(SinkConfig):
    type: Literal["stdout", "stderr"]
    format: Literal["text", "json"] = "text"


def _endpoint(addr: str, port: int, with_port: bool) -> str:
    if not with_port:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _endpoints(t: FlowTuple, with_ports: bool) -> str:
    return f"{_endpoint(t.src, t.sport, with_ports)} -> {_endpoint(t.dst, t.dport, with_ports)}"


def text_line(e: FlowEvent) -> str:
    ports = e.proto in PORT_PROTOS
    parts = [rfc3339(e.ts_ns, 3), f"{e.kind.upper():<7}", e.proto_name, _endpoints(e.orig, ports)]
    if e.nat:
        parts.append(f"[nat reply {_endpoints(e.reply, ports)}]")
    if e.icmp is not None:
        parts.append("type={} code={} ident={}".format(*e.icmp))   # `id=` is the flow's
    if e.proto == 6:
        parts.append(f"state={e.tcp_state_name}")
    if not e.flags & FLAG_NO_ACCT:   # no accounting: counters are absent, not zero
        parts.append(f"pkts={e.packets_orig}/{e.packets_reply} "
                     f"(+{e.delta_packets_orig}/+{e.delta_packets_reply}) "
                     f"bytes={e.bytes_orig}/{e.bytes_reply} "
                     f"(+{e.delta_bytes_orig}/+{e.delta_bytes_reply})")
    if e.start_ns and e.stop_ns:
        parts.append(f"dur={(e.stop_ns - e.start_ns) / 1e9:.3f}s")
    if e.zone:
        parts.append(f"zone={e.zone}")
    if e.mark:
        parts.append(f"mark={e.mark:#x}")   # firewall rules write marks in hex
    if e.netns:
        parts.append(f"netns={e.netns}")
    if e.flags:
        parts.append("flags=" + ",".join(flag_names(e.flags)))
    parts.append("id=" + flow_id_text(e.flow_id))
    if e.labels:
        parts.append("labels={" + ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())) + "}")
    return " ".join(parts) + "\n"


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
    """_ENCODE(flow_record(e)) + newline, written out directly: the same text
    (tests/unit/test_stdout_sink.py compares them) in less than half the time,
    for the sink that writes every record of a busy host."""
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
            f'"labels":{_labels_json(e.labels) if e.labels else "{}"}')
    if e.icmp is not None:
        icmp_type, code, ident = e.icmp
        line += f',"icmp":{{"type":{icmp_type:d},"code":{code:d},"id":{ident:d}}}'
    return line + "}\n"


FORMATS: dict[str, Callable[[FlowEvent], str]] = {"text": text_line, "json": json_line}


class StdoutSink(Sink):
    """Serves both `stdout` and `stderr`: the type names the stream."""

    Config = StdoutConfig

    def __init__(self, config: StdoutConfig):
        super().__init__(config)
        self._format = FORMATS[config.format]

    def write(self, batch: list[FlowEvent]) -> None:
        # Looked up per batch, not at start: follows redirection of sys.stdout.
        stream = getattr(sys, self.config.type)
        try:
            stream.write("".join(map(self._format, batch)))
            stream.flush()
        except (BrokenPipeError, ValueError) as exc:   # reader gone / stream closed
            raise PermanentSinkError(f"{self.config.type} is closed: {exc}") from exc

    def close(self) -> None:
        try:
            getattr(sys, self.config.type).flush()
        except (OSError, ValueError):
            pass
