"""InfluxDB line protocol: a flow record as one point (docs/influxdb.md).

Shared by every sink that writes line protocol (InfluxDB over HTTP, or
over UDP): not a sink itself.  Built by hand, once per record: making
influxdb-client Point objects costs about three times as much
(bench/influx_line_protocol.py).  The reference it is tested against, written
plainly, is tests/reference/line_protocol.py.

    <measurement>,<tags> <fields> <ts_ns>

The schema (tags, fields) is in conntracct/sinks/influxdb.py's docstring and
docs/influxdb.md; point identity and why PointLog moves points by 1 ns there too.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..flow import DESTROY, FLAG_NO_ACCT, ICMP_PROTOS, IPPROTO_NAMES, TCP_STATES, FlowEvent
from .common import PORT_PROTOS
from .records import flow_id_text

FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}

# Names the schema uses; an enrichment label with one of them is written as
# `label_<name>` so it can neither duplicate a tag (the server would reject
# the point) nor shadow a field.  `direction` is the enricher's own label.
SCHEMA_TAGS = frozenset({"family", "protocol", "src", "dst", "sport", "dport", "reply_src", "reply_dst",
                         "direction", "zone", "netns", "mark", "flow_id"})
SCHEMA_FIELDS = frozenset({"packets_orig", "bytes_orig", "packets_reply", "bytes_reply",
                           "delta_packets_orig", "delta_bytes_orig", "delta_packets_reply",
                           "delta_bytes_reply", "flow_id", "finished", "duration_ms", "tcp_state",
                           "icmp_type", "icmp_code", "icmp_id"})

# Line-protocol escaping (the same rules as influxdb-client's Point).
_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})


def escape_measurement(name: str) -> str:
    return name.translate(_ESCAPE_MEASUREMENT)


def escape_key(key: str) -> str:
    """A tag key, tag value or field key."""
    return key.translate(_ESCAPE_KEY)


def escape_tag_value(value: str) -> str:
    escaped = value.translate(_ESCAPE_KEY)
    # A trailing backslash would escape the separator after it; line protocol
    # has no escape for a backslash in tags, so (like influxdb-client) a space
    # follows it.
    return escaped + " " if escaped.endswith("\\") else escaped


def escape_string(value: str) -> str:
    """A string field value, without its quotes."""
    return value.translate(_ESCAPE_STRING)


# -- line protocol -----------------------------------------------------------

RECENT_POINTS = 65536   # (series, timestamp) pairs remembered across batches, per generation

# Tags and fields that depend on one small number, formatted once.
_FAMILY_TAGS = {number: f"family={name}" for number, name in FAMILY_NAMES.items()}
_PROTOCOL_TAGS = {number: f"protocol={name}" for number, name in IPPROTO_NAMES.items()}
_TCP_STATE_FIELDS = tuple(f',tcp_state="{name}"' for name in TCP_STATES)
_TCP_STATES = len(_TCP_STATE_FIELDS)


def _protocol_fields(e: FlowEvent) -> str:
    """The fields after `finished`: TCP state or ICMP type/code/id."""
    proto = e.proto
    if proto == 6:
        state = e.tcp_state
        return _TCP_STATE_FIELDS[state] if state < _TCP_STATES else f',tcp_state="{state}"'
    if proto in ICMP_PROTOS and e.icmp is not None:
        icmp_type, code, ident = e.icmp
        return f",icmp_type={icmp_type}i,icmp_code={code}i,icmp_id={ident}i"
    return ""


class LineFormatter:
    """FlowEvent -> line-protocol point, split as (series, fields): the series
    (measurement and sorted tags) is the point's identity with its timestamp.

    A flow's records repeat its tag set, so the series is built once per flow
    and kept in the record's FlowEvent.memo, which the probe decoder shares
    between the records of one flow identity: tuples, family, protocol, zone,
    netns, mark (a CONNMARK change makes a new identity) and flow id.  The
    labels come from enrichment, not from the identity: a record whose labels
    differ from the memo's builds its series anew.  TCP state and ICMP values
    are fields, formatted for every record."""

    def __init__(self, measurement: str = "ct_acct", source_ports: bool = False, flow_id_tag: bool = False):
        self._measurement = escape_measurement(measurement)
        self._series_prefix = self._measurement + ","
        self._source_ports = source_ports
        self._flow_id_tag = flow_id_tag
        self._labels: dict[tuple[str, str], str] = {}   # (key, value) -> 'key=value', escaped
        # The labels of the last series memoised, a copy: shared by the memo
        # entries of flows with equal labels (they come in a few combinations).
        self._last_labels: dict[str, str] = {}

    def _label(self, key: str, value: str) -> str:
        tag = self._labels.get((key, value))
        if tag is None:
            name = key if key == "direction" or (key not in SCHEMA_TAGS and key not in SCHEMA_FIELDS) \
                else "label_" + key
            tag = f"{escape_key(name)}={escape_tag_value(value)}" if name and value else ""
            if len(self._labels) >= 65536:   # bounded: label values are few, but not trusted to be
                self._labels.clear()
            self._labels[(key, value)] = tag
        return tag

    def _flow_text(self, e: FlowEvent) -> tuple[dict[str, str], str, str]:
        """(labels, series, 'flow_id=<id>i,finished='): the flow's memo entry,
        made if missing or made for other labels."""
        memo = e.memo
        if memo is not None:
            known = memo.get(self)
            if known is not None and known[0] == e.labels:
                return known
        labels = e.labels
        if labels != self._last_labels:
            self._last_labels = dict(labels)
        known = (self._last_labels, self.build_series(e), f"flow_id={e.flow_id}i,finished=")
        if memo is not None:
            memo[self] = known
        return known

    def build_series(self, e: FlowEvent) -> str:
        """The series, built from the event (no memo)."""
        o = e.orig
        proto = e.proto
        # Sorted by key, as InfluxDB keys series: one canonical string per tag set.
        tags = [f"dst={o.dst}", _FAMILY_TAGS.get(e.family) or f"family={e.family}",
                _PROTOCOL_TAGS.get(proto) or f"protocol={proto}", f"src={o.src}"]
        if proto in PORT_PROTOS:
            tags.append(f"dport={o.dport}")
            if self._source_ports:
                tags.append(f"sport={o.sport}")
        r = e.reply
        if o.src != r.dst or o.dst != r.src or o.sport != r.dport or o.dport != r.sport:   # e.nat
            tags.append(f"reply_dst={r.dst}")
            tags.append(f"reply_src={r.src}")
        if e.zone:
            tags.append(f"zone={e.zone}")
        if e.netns:
            tags.append(f"netns={e.netns}")
        if e.mark:
            tags.append(f"mark={e.mark:#x}")
        if self._flow_id_tag:
            tags.append("flow_id=" + flow_id_text(e.flow_id))
        if e.labels:
            known = self._labels
            for item in e.labels.items():
                tag = known.get(item)
                if tag is None:
                    tag = self._label(*item)
                if tag:
                    tags.append(tag)
        tags.sort()
        return self._series_prefix + ",".join(tags)

    def point(self, e: FlowEvent) -> tuple[str, str]:
        """(series, fields): the series is the measurement and sorted tags
        (memoised per flow, with the flow id field); the line is
        f"{series} {fields} {timestamp}\\n" (PointLog picks the timestamp)."""
        _, series, flow_id = self._flow_text(e)
        tail = _protocol_fields(e)
        if e.kind == DESTROY:
            finished = "true"
            start, stop = e.start_ns, e.stop_ns
            # conntrack's own timestamps (0 where unknown: no timestamp
            # extension, an end not seen); whole milliseconds, truncated.
            if start and stop >= start:
                tail = f",duration_ms={(stop - start) // 1_000_000}i{tail}"
        else:
            finished = "false"
        if e.flags & FLAG_NO_ACCT:   # no accounting: counters are absent, not zero
            return series, f"{flow_id}{finished}{tail}"
        return series, (f"packets_orig={e.packets_orig}i,bytes_orig={e.bytes_orig}i,"
                        f"packets_reply={e.packets_reply}i,bytes_reply={e.bytes_reply}i,"
                        f"delta_packets_orig={e.delta_packets_orig}i,delta_bytes_orig={e.delta_bytes_orig}i,"
                        f"delta_packets_reply={e.delta_packets_reply}i,delta_bytes_reply={e.delta_bytes_reply}i,"
                        f"{flow_id}{finished}{tail}")


class PointLog:
    """The (series, timestamp) pairs written lately, to keep points unique.

    Two generations of hashed pairs, bounded in memory; records of one
    timestamp arrive close together, so a collision with a pair older than
    both generations cannot happen in practice.  A hash collision only moves a
    point by 1 ns.  Both generations are also kept as one set, so a point
    costs one look-up there (nearly every look-up misses, in a large set)."""

    def __init__(self, generation: int = RECENT_POINTS):
        self._generation = generation
        self._new: set[int] = set()
        self._old: set[int] = set()
        self._seen: set[int] = set()   # _new | _old

    def lines(self, formatter: LineFormatter, batch: Iterable[FlowEvent]) -> tuple[str, set[int]]:
        """The batch's lines, each point unique, and the pairs they use
        (pass them to commit() once written: a failed batch resent gives the
        same lines)."""
        seen = self._seen
        taken: set[int] = set()
        take = taken.add
        out = []
        point = formatter.point
        for e in batch:
            s, fields = point(e)
            ts = e.ts_ns
            key = hash((s, ts))
            while key in taken or key in seen:
                ts += 1
                key = hash((s, ts))
            take(key)
            out.append(f"{s} {fields} {ts}\n")
        return "".join(out), taken

    def commit(self, taken: set[int]) -> None:
        self._new |= taken
        self._seen |= taken
        if len(self._new) >= self._generation:
            self._old, self._new = self._new, set()
            self._seen = set(self._old)
