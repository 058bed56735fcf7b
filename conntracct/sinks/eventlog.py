"""Event-log lines other tools print, for their users' log pipelines (the
stdout sink's `format: netfilter` and `format: conntrack_exporter`).  Not a
sink.

netfilter: the line `conntrack -E -o extended` prints (conntrack-tools,
libnetfilter_conntrack's default format), e.g.

    [DESTROY] ipv4     2 tcp      6 TIME_WAIT src=192.0.2.2 dst=198.51.100.2 sport=31082
        dport=20000 packets=6 bytes=5320 src=198.51.100.2 dst=198.51.100.1 sport=20000
        dport=31082 packets=4 bytes=516 [ASSURED] delta-time=1

(one line).  What conntrack prints and a record has not: the entry's
timeout (NEW/UPDATE events; a record knows no timeout), GRE keys, helper,
secctx and connlabels; `[USERSPACE] portid=...`, which conntrack appends to
events a program caused.  Counters appear when accounting is on, delta-time
on DESTROY with timestamps, mark and zone when not 0, as conntrack does.
tests/integration/test_dropin_netfilter.py compares the lines field by
field with conntrack -E's own for the same flows.

conntrack_exporter: its --log-events-format=json object,

    {"event_type":"new","original_source_host":"10.0.1.65:40806",
     "original_destination_host":"151.101.2.49:443","reply_source_host":"151.101.2.49:443",
     "reply_destination_host":"10.0.1.65:40806","remote_host":"151.101.2.49:443",
     "state":"Open","labels":{...}}

state: TCP states as conntrack_exporter names them (SYN_SENT/SYN_RECV
Opening, ESTABLISHED Open, FIN_WAIT/CLOSE_WAIT/LAST_ACK/TIME_WAIT Closing,
CLOSE Closed); a DESTROY is Closed; other protocols are Open until then.
remote_host: the remote endpoint as the Prometheus sink's host label has it
(common.remote_endpoint).  `labels` (the enricher's) is this agent's addition.
"""

from __future__ import annotations

import json

from ..flow import DESTROY, FLAG_NO_ACCT, FLAG_NO_TSTAMP, ICMP_PROTOS, IPPROTO_NAMES, FlowEvent, FlowTuple
from .common import PORT_PROTOS, endpoint, remote_endpoint

# libnetfilter_conntrack's names (src/conntrack/snprintf_default.c): index 9
# is the kernel's SYN_SENT2, printed LISTEN for historical reasons.
NETFILTER_TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                        "LAST_ACK", "TIME_WAIT", "CLOSE", "LISTEN")
_FAMILY = {4: "ipv4     2 ", 6: "ipv6     10 "}     # "%-8s %u "
_KIND = {kind: f"{'[' + kind.upper() + ']':>9} " for kind in ("new", "update", "destroy")}   # "%9s "
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15
# The reply an ICMP query expects (the kernel's invert maps, nf_conntrack_proto_icmp*.c).
ICMP_REPLY = {1: {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17},
              58: {128: 129, 129: 128, 139: 140, 140: 139}}


def _tuple(t: FlowTuple, e: FlowEvent, reply: bool) -> str:
    text = f"src={t.src} dst={t.dst} "
    if e.proto in PORT_PROTOS:
        text += f"sport={t.sport} dport={t.dport} "
    elif e.proto in ICMP_PROTOS and e.icmp is not None:
        icmp_type, code, ident = e.icmp
        if reply:
            icmp_type = ICMP_REPLY[e.proto].get(icmp_type, icmp_type)
        text += f"type={icmp_type} code={code} id={ident} "
    if not e.flags & FLAG_NO_ACCT:
        packets, nbytes = (e.packets_reply, e.bytes_reply) if reply else (e.packets_orig, e.bytes_orig)
        text += f"packets={packets} bytes={nbytes} "
    return text


def netfilter_line(e: FlowEvent) -> str:
    """The `conntrack -E -o extended` line of a record (module docstring)."""
    parts = [_KIND.get(e.kind, f"[{e.kind.upper()}] "), _FAMILY.get(e.family, f"unknown  {e.family} "),
             f"{IPPROTO_NAMES.get(e.proto, 'unknown'):<8} {e.proto} "]
    if e.proto == 6:
        state = e.tcp_state
        parts.append((NETFILTER_TCP_STATES[state] if state < len(NETFILTER_TCP_STATES) else "NONE") + " ")
    parts.append(_tuple(e.orig, e, False))
    if not e.status & IPS_SEEN_REPLY:
        parts.append("[UNREPLIED] ")
    parts.append(_tuple(e.reply, e, True))
    if e.status & IPS_OFFLOAD:
        parts.append("[OFFLOAD] ")
    elif e.status & IPS_HW_OFFLOAD:
        parts.append("[HW_OFFLOAD] ")
    elif e.status & IPS_ASSURED:
        parts.append("[ASSURED] ")
    if e.mark:
        parts.append(f"mark={e.mark} ")
    if e.zone:
        parts.append(f"zone={e.zone} ")
    if e.kind == DESTROY and not e.flags & FLAG_NO_TSTAMP and e.start_ns and e.stop_ns:
        # As libnetfilter_conntrack counts it: whole seconds of stop minus
        # whole seconds of start (0.9 s -> 1.1 s is 1), not the duration.
        parts.append(f"delta-time={e.stop_ns // 1_000_000_000 - e.start_ns // 1_000_000_000} ")
    return "".join(parts).rstrip() + "\n"


# -- conntrack_exporter --------------------------------------------------------

EXPORTER_STATES = {1: "Opening", 2: "Opening", 9: "Opening", 3: "Open", 4: "Closing", 5: "Closing",
                   6: "Closing", 7: "Closing", 8: "Closed"}
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def exporter_state(e: FlowEvent) -> str:
    if e.kind == DESTROY:
        return "Closed"
    if e.proto == 6:
        return EXPORTER_STATES.get(e.tcp_state, "Closed")
    return "Open"


def conntrack_exporter_line(e: FlowEvent) -> str:
    """conntrack_exporter's --log-events-format=json line (module docstring)."""
    o, r = e.orig, e.reply
    ports = e.proto in PORT_PROTOS
    addr, port = remote_endpoint(e)
    record = {
        "event_type": e.kind,
        "original_source_host": endpoint(o.src, o.sport if ports else None),
        "original_destination_host": endpoint(o.dst, o.dport if ports else None),
        "reply_source_host": endpoint(r.src, r.sport if ports else None),
        "reply_destination_host": endpoint(r.dst, r.dport if ports else None),
        "remote_host": endpoint(addr, port if ports else None),
        "state": exporter_state(e),
    }
    if e.labels:
        record["labels"] = e.labels
    return _ENCODE(record) + "\n"
