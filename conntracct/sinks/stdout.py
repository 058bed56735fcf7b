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
JSON: docs/record-fields.md (records.json_line, shared with other sinks).
`format: netfilter` / `conntrack_exporter`: the event-log lines of conntrack
-E and of conntrack_exporter (sinks/eventlog.py, docs/migrating.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Literal

from ..flow import FLAG_NO_ACCT, FlowEvent, FlowTuple
from .base import PermanentSinkError, Sink, SinkConfig
from .common import PORT_PROTOS, endpoint
from .eventlog import conntrack_exporter_line, netfilter_line
from .records import flag_names, flow_id_text, json_line, rfc3339


class StdoutConfig(SinkConfig):
    type: Literal["stdout", "stderr"]
    # netfilter / conntrack_exporter: other tools' event logs (sinks/eventlog.py)
    format: Literal["text", "json", "netfilter", "conntrack_exporter"] = "text"


def _endpoints(t: FlowTuple, with_ports: bool) -> str:
    if not with_ports:
        return f"{t.src} -> {t.dst}"
    return f"{endpoint(t.src, t.sport)} -> {endpoint(t.dst, t.dport)}"


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


FORMATS: dict[str, Callable[[FlowEvent], str]] = {"text": text_line, "json": json_line,
                                                   "netfilter": netfilter_line,
                                                   "conntrack_exporter": conntrack_exporter_line}


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
