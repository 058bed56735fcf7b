"""The reference for conntracct/probe/_ctends.c: a DESTROY event's entry as
the Python reader gives it (ctnetlink.walk_entry), packed into the probe's
structs with record.pack_tuple and record.flow_key, as the agent did before
the C reader."""

from __future__ import annotations

from conntracct.probe import ctnetlink
from conntracct.probe.record import flow_key, pack_tuple


def reference_end(e: ctnetlink.CtEntry, netns: int) -> tuple:
    o, r = e.orig, e.reply
    orig = pack_tuple(e.family, o.proto, o.src, o.dst, o.src_u, o.dst_u)
    reply = pack_tuple(e.family, r.proto, r.src, r.dst, r.src_u, r.dst_u)
    return (flow_key(orig, netns, e.zone, e.start_ns), orig, reply, e.zone, e.start_ns, e.stop_ns, e.counters,
            e.status, e.mark, e.tcp_state)


def reference_ends(msg: bytes, netns: int) -> list[tuple]:
    """Every IPv4/IPv6 DESTROY message of one datagram, walked."""
    view, out, pos = memoryview(msg), [], 0
    while pos + 16 <= len(msg):
        length = int.from_bytes(msg[pos:pos + 4], "little")
        kind = int.from_bytes(msg[pos + 4:pos + 6], "little")
        family = msg[pos + 16]
        if kind == (ctnetlink.NFNL_SUBSYS_CTNETLINK << 8) | ctnetlink.IPCTNL_MSG_CT_DELETE and family in (2, 10):
            out.append(reference_end(ctnetlink.walk_entry(view, pos + 20, pos + length, family), netns))
        pos += (length + 3) & ~3
    return out
