"""InfluxDB line protocol written plainly: the reference the tuned
conntracct.sinks.lineprotocol.LineFormatter is tested against
(tests/unit/test_influxdb_sink.py)."""

from __future__ import annotations

from conntracct.flow import DESTROY, FLAG_NO_ACCT
from conntracct.sinks.lineprotocol import LineFormatter


def line_of(formatter, e) -> str:
    """One point, newline-terminated, at the record's own timestamp, from a
    formatter's point() (the tuned one) or series()/fields() (this one)."""
    series, fields = formatter.point(e)
    return f"{series} {fields} {e.ts_ns}\n"


class ReferenceFormatter(LineFormatter):
    """The formatter as first written (before it was tuned for throughput):
    the tuned one must give exactly the same series and fields."""

    def point(self, e):
        return self.series(e), self.fields(e)

    def line(self, e):
        return f"{self.series(e)} {self.fields(e)} {e.ts_ns}\n"

    def series(self, e):
        """Tags as a mapping, sorted by key at the end: the plain way."""
        o, r = e.orig, e.reply
        tags = {"src": o.src, "dst": o.dst, "family": {4: "ipv4", 6: "ipv6"}.get(e.family, e.family),
                "protocol": e.proto_name}
        if e.proto_name in ("tcp", "udp", "dccp", "sctp", "udplite"):
            tags["dport"] = o.dport
            if self._source_ports:
                tags["sport"] = o.sport
        if e.nat:
            tags.update(reply_src=r.src, reply_dst=r.dst)
        optional = {"zone": e.zone, "netns": e.netns, "mark": e.mark and hex(e.mark)}
        tags.update((key, value) for key, value in optional.items() if value)
        if self._flow_id_tag:
            tags["flow_id"] = format(e.flow_id, "016x")
        texts = [f"{key}={value}" for key, value in tags.items()]
        texts += [tag for key, value in e.labels.items() if (tag := self._label(key, value))]
        return ",".join([self._measurement, *sorted(texts)])

    @staticmethod
    def fields(e):
        """Fields as (name, text) pairs, in schema order."""
        pairs = []
        if not e.flags & FLAG_NO_ACCT:
            pairs += [(name, f"{getattr(e, name)}i") for name in (
                "packets_orig", "bytes_orig", "packets_reply", "bytes_reply", "delta_packets_orig",
                "delta_bytes_orig", "delta_packets_reply", "delta_bytes_reply")]
        pairs += [("flow_id", f"{e.flow_id}i"), ("finished", str(e.kind == DESTROY).lower())]
        if e.kind == DESTROY and e.start_ns and e.stop_ns and e.stop_ns >= e.start_ns:
            pairs.append(("duration_ms", f"{(e.stop_ns - e.start_ns) // 1_000_000}i"))   # whole ms, truncated
        if e.proto_name == "tcp":
            pairs.append(("tcp_state", f'"{e.tcp_state_name}"'))
        elif e.icmp is not None and e.proto_name in ("icmp", "icmpv6"):
            pairs += [(f"icmp_{name}", f"{value}i") for name, value in zip(("type", "code", "id"), e.icmp,
                                                                          strict=True)]
        return ",".join(f"{name}={text}" for name, text in pairs)
