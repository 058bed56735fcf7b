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
        o = e.orig
        tags = [f"dst={o.dst}", f"family={ {4: 'ipv4', 6: 'ipv6'}.get(e.family, e.family)}",
                f"protocol={e.proto_name}", f"src={o.src}"]
        if e.proto in (6, 17, 33, 132, 136):
            tags.append(f"dport={o.dport}")
            if self._source_ports:
                tags.append(f"sport={o.sport}")
        if e.nat:
            tags += [f"reply_dst={e.reply.dst}", f"reply_src={e.reply.src}"]
        if e.zone:
            tags.append(f"zone={e.zone}")
        if e.netns:
            tags.append(f"netns={e.netns}")
        if e.mark:
            tags.append(f"mark={e.mark:#x}")
        if self._flow_id_tag:
            tags.append(f"flow_id={e.flow_id:016x}")
        for key, value in e.labels.items():
            tag = self._label(key, value)
            if tag:
                tags.append(tag)
        tags.sort()
        return f"{self._measurement},{','.join(tags)}"

    @staticmethod
    def fields(e):
        finished = "true" if e.kind == DESTROY else "false"
        if e.flags & FLAG_NO_ACCT:
            fields = f"flow_id={e.flow_id}i,finished={finished}"
        else:
            fields = (f"packets_orig={e.packets_orig}i,bytes_orig={e.bytes_orig}i,"
                      f"packets_reply={e.packets_reply}i,bytes_reply={e.bytes_reply}i,"
                      f"delta_packets_orig={e.delta_packets_orig}i,delta_bytes_orig={e.delta_bytes_orig}i,"
                      f"delta_packets_reply={e.delta_packets_reply}i,delta_bytes_reply={e.delta_bytes_reply}i,"
                      f"flow_id={e.flow_id}i,finished={finished}")
        if e.proto == 6:
            fields += f',tcp_state="{e.tcp_state_name}"'
        elif e.icmp is not None and e.proto in (1, 58):
            fields += ",icmp_type={}i,icmp_code={}i,icmp_id={}i".format(*e.icmp)
        return fields
