"""The reference for conntracct/probe/_ctends.c: a DESTROY event's entry as
the Python reader gives it (ctnetlink.walk_entry), made into the probe's
flow key and DESTROY record with record.pack_tuple, flow_key and
pack_record, field by field, as the agent did before the C reader."""

from __future__ import annotations

from conntracct.flow import DESTROY, FLAG_FIRST_SIGHT, FLAG_NO_ACCT, FLAG_NO_TSTAMP
from conntracct.probe import ctnetlink
from conntracct.probe.record import FlowState, flow_key, pack_record, pack_tuple


def reference_end(e: ctnetlink.CtEntry, netns: int, wall_offset_ns: int, now_ns: int,
                  state: FlowState | None = None) -> tuple[bytes, bytes]:
    """(flow key, DESTROY record) of one end; state: the probe's, taken, if it had one."""
    o, r = e.orig, e.reply
    orig = pack_tuple(e.family, o.proto, o.src, o.dst, o.src_u, o.dst_u)
    flags = (0 if e.counters else FLAG_NO_ACCT) | (0 if e.start_ns else FLAG_NO_TSTAMP)
    if state is None:
        flags |= FLAG_FIRST_SIGHT
        first_seen, last_packets, last_bytes = 0, (0, 0), (0, 0)
    else:
        first_seen, last_packets, last_bytes = state.first_seen, state.packets, state.bytes
        flags |= state.flags
    po, bo, pr, br = e.counters or (0, 0, 0, 0)
    record = pack_record(
        kind=DESTROY, ts=max(0, (e.stop_ns or now_ns) - wall_offset_ns), orig=orig,
        reply=pack_tuple(e.family, r.proto, r.src, r.dst, r.src_u, r.dst_u), netns=netns, zone=e.zone,
        start_ns=e.start_ns, stop_ns=e.stop_ns, first_seen=first_seen, packets=(po, pr), bytes=(bo, br),
        delta_packets=(po - last_packets[0], pr - last_packets[1]),
        delta_bytes=(bo - last_bytes[0], br - last_bytes[1]),
        status=e.status, mark=e.mark, tcp_state=e.tcp_state, flags=flags)
    return flow_key(orig, netns, e.zone, e.start_ns), record


def walked_entries(msg: bytes) -> list[ctnetlink.CtEntry]:
    """Every IPv4/IPv6 DESTROY message of one datagram, walked."""
    view, out, pos = memoryview(msg), [], 0
    while pos + 16 <= len(msg):
        length = int.from_bytes(msg[pos:pos + 4], "little")
        kind = int.from_bytes(msg[pos + 4:pos + 6], "little")
        family = msg[pos + 16]
        if kind == (ctnetlink.NFNL_SUBSYS_CTNETLINK << 8) | ctnetlink.IPCTNL_MSG_CT_DELETE and family in (2, 10):
            out.append(ctnetlink.walk_entry(view, pos + 20, pos + length, family))
        pos += (length + 3) & ~3
    return out


def reference_ends(msg: bytes, netns: int, wall_offset_ns: int, now_ns: int) -> list[tuple[bytes, bytes]]:
    return [reference_end(e, netns, wall_offset_ns, now_ns) for e in walked_entries(msg)]
