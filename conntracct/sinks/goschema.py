"""conntracct (Go)'s record schemas, for its users' dashboards and queries.

Not a sink: the InfluxDB sinks (HTTP and UDP) write `schema: conntracct`
with ConntracctLineFormatter, the Elasticsearch sink `document: conntracct`
with conntracct_document().  The Go agent's own definitions are its
internal/sinks/influxdb/influxdb.go (Push) and internal/sinks/elasticsearch/
event.go + pkg/bpf/event.go.

InfluxDB, one point per record:

    ct_acct,conn_id=<id>,connmark=<hex>,dst_addr=..,dst_port=..,netns=..,proto=<name>,
            src_addr=..[,src_port=..] bytes_orig=<n>i,bytes_ret=<n>i,packets_orig=<n>i,
            packets_ret=<n>i <ts_ns>

Totals, not deltas, of the original tuple (the Go agent read no reply tuple).
Ports are those of TCP and UDP, 0 for other protocols, as the Go agent had
them.  The user's own labels (enrich.labels, enrich.ranges) follow as tags
(`label_<name>` where a name is one of the schema's); the enricher's
`direction` is not written (conntracct has no such tag).  conn_id is this
agent's 63-bit flow id in decimal (the Go agent's was a 31-bit hash).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from ..configtypes import StrictModel, config_errors
from ..flow import FLAG_NO_ACCT, IPPROTO_NAMES, NEW, FlowEvent
from .lineprotocol import LineFormatter, escape_key, escape_measurement, escape_tag_value

# `schema:` of the line-protocol sinks: this agent's (docs/influxdb.md) or conntracct's.
SCHEMAS = ("default", "conntracct")

GO_PORT_PROTOS = frozenset({6, 17})     # the Go agent extracted ports for these only
GO_TAGS = frozenset({"conn_id", "connmark", "dst_addr", "dst_port", "netns", "proto", "src_addr", "src_port"})
GO_FIELDS = frozenset({"bytes_orig", "bytes_ret", "packets_orig", "packets_ret"})
AGENT_LABELS = frozenset({"direction"})   # the enricher's own, not the user's


class ConntracctLineFormatter:
    """FlowEvent -> (series, fields) in conntracct's schema; the same
    interface as lineprotocol.LineFormatter (PointLog writes either).  The
    series is made once per flow (FlowEvent.memo) while its labels stay."""

    def __init__(self, measurement: str = "ct_acct", source_ports: bool = False):
        self._prefix = escape_measurement(measurement) + ","
        self._source_ports = source_ports

    def series(self, e: FlowEvent) -> str:
        o = e.orig
        ports = e.proto in GO_PORT_PROTOS
        tags = [f"conn_id={e.flow_id}", f"connmark={e.mark:x}", f"dst_addr={o.dst}",
                f"dst_port={o.dport if ports else 0}", f"netns={e.netns}",
                f"proto={IPPROTO_NAMES.get(e.proto, 'unknown')}", f"src_addr={o.src}"]
        if self._source_ports:
            tags.append(f"src_port={o.sport if ports else 0}")
        for key, value in e.labels.items():
            if key in AGENT_LABELS or not key or not value:
                continue
            name = "label_" + key if key in GO_TAGS or key in GO_FIELDS else key
            tags.append(f"{escape_key(name)}={escape_tag_value(str(value))}")
        tags.sort()
        return self._prefix + ",".join(tags)

    def point(self, e: FlowEvent) -> tuple[str, str]:
        memo = e.memo
        if memo is None:
            series = self.series(e)
        else:
            known = memo.get(self)
            if known is not None and known[0] == e.labels:
                series = known[1]
            else:
                series = self.series(e)
                memo[self] = (dict(e.labels), series)
        return series, (f"bytes_orig={e.bytes_orig}i,bytes_ret={e.bytes_reply}i,"
                        f"packets_orig={e.packets_orig}i,packets_ret={e.packets_reply}i")


def conntracct_document(e: FlowEvent, hostname: str) -> dict[str, Any]:
    """conntracct's Elasticsearch document: event_type and hostname beside
    the event's own fields (pkg/bpf/event.go's JSON names).  Its event types
    were update and destroy (the first record of a flow was an update), so a
    NEW record is an update here too.  `start` and `timestamp` are wall-clock
    nanoseconds (the Go agent's timestamp counted from boot)."""
    o = e.orig
    ports = e.proto in GO_PORT_PROTOS
    doc: dict[str, Any] = {
        "event_type": "update" if e.kind == NEW else e.kind,
        "hostname": hostname,
        "start": e.start_ns,
        "timestamp": e.ts_ns,
        "flow_id": e.flow_id,
        "connmark": e.mark,
        "src_addr": o.src,
        "dst_addr": o.dst,
        "packets_orig": e.packets_orig,
        "bytes_orig": e.bytes_orig,
        "packets_ret": e.packets_reply,
        "bytes_ret": e.bytes_reply,
        "src_port": o.sport if ports else 0,
        "dst_port": o.dport if ports else 0,
        "netns": e.netns,
        "proto": e.proto,
    }
    labels = {k: v for k, v in e.labels.items() if k not in AGENT_LABELS}
    if labels:
        doc["labels"] = labels
    return doc


def line_formatter(schema: str, measurement: str, source_ports: bool, flow_id_tag: bool):
    """The formatter of a line-protocol sink's `schema`."""
    if schema == "conntracct":
        return ConntracctLineFormatter(measurement, source_ports)
    return LineFormatter(measurement, source_ports, flow_id_tag)


# -- the options both line-protocol sinks (influxdb, influxdb-udp) have ----------

def _measurement(value: str) -> str:
    if not value:
        raise ValueError("expected a measurement name")
    if value.startswith("#"):
        raise ValueError("expected a name not starting with '#' (line protocol would read a comment)")
    return value


class LineOptions(StrictModel):
    """Mixed into the InfluxDB sinks' configs: which schema, measurement, tags."""

    # `schema` in the file; the attribute name avoids pydantic's BaseModel.schema()
    line_schema: Annotated[Literal[SCHEMAS], Field(alias="schema")] = "default"   # type: ignore[valid-type]
    measurement: Annotated[str, AfterValidator(_measurement)] = "ct_acct"
    source_ports: bool = False
    flow_id_tag: bool = False

    @model_validator(mode="after")
    def _schema_options(self) -> LineOptions:
        if self.line_schema == "conntracct" and self.flow_id_tag:
            raise config_errors([(("flow_id_tag",), "only for schema: default (conntracct's schema "
                                                    "always tags conn_id)", True)])
        return self

    def formatter(self) -> LineFormatter | ConntracctLineFormatter:
        return line_formatter(self.line_schema, self.measurement, self.source_ports, self.flow_id_tag)

    def writable(self, batch: list[FlowEvent]) -> tuple[list[FlowEvent], list[FlowEvent]]:
        """(records the schema can hold, records it cannot).  conntracct's schema
        cannot hold a record without counters (accounting off): it has no point
        without its fields, and zeros would claim the flow sent nothing."""
        if self.line_schema != "conntracct":
            return batch, []
        return ([e for e in batch if not e.flags & FLAG_NO_ACCT], [e for e in batch if e.flags & FLAG_NO_ACCT])


UNWRITABLE_REASON = ("record(s) without counters (accounting off): conntracct's schema has no point "
                     "without its fields")
