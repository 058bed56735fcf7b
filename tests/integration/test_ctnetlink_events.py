"""The kernel's own DESTROY events as the agent reads them (DestroyEvents:
many datagrams per recvmmsg, read into the probe's structs in C) and one
recv per datagram with the Python reader (by learnt layout, and by the
attribute walk, ctnetlink.walk_entry): the same flow ends, for TCP, UDP
and ICMP over IPv4 and IPv6, with and without accounting and timestamps."""

from __future__ import annotations

import os
import time

import pytest

from conntracct.probe import ctnetlink
from tests.netns import Topology
from tests.reference.ctends import reference_ends

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces (CI runs as root)")]


NETNS = 4026532999     # any inode: the flow keys carry it
OFFSET = 1_700_000_000 * 10**9   # the probe's clock to the wall clock


def raw_events(sock) -> list[bytes]:
    out, buf = [], bytearray(ctnetlink.RECV_BUFFER)
    while True:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            return out
        out.append(bytes(buf[:n]))


@pytest.mark.parametrize("acct,timestamp", [(True, True), (False, False)])
def test_kernel_events_read_by_layout_are_the_walk(acct, timestamp):
    with Topology(acct=acct, timestamp=timestamp) as topo:
        with topo.lab.entered("router"):
            events = ctnetlink.DestroyEvents(8 << 20)
            batched = ctnetlink.DestroyEvents(8 << 20)
        try:
            for family in (4, 6):
                topo.churn(duration=0.5, rate=100, family=family)
                topo.churn(duration=0.5, rate=100, family=family, proto="udp")
                topo.ping(2, family=family)
            topo.flush()
            topo.wait_conntrack_empty()
            messages = raw_events(events._sock)
            read = batched.read(NETNS, OFFSET)
            now = time.time_ns()
        finally:
            events.close()
            batched.close()
    ctnetlink._layouts.clear()
    seen = set()
    for msg in messages:
        view = memoryview(msg)
        entries = list(ctnetlink.parse_messages(view, len(msg), ctnetlink.IPCTNL_MSG_CT_DELETE))
        walked = []
        pos = 0
        while pos + 16 <= len(msg):
            length = int.from_bytes(msg[pos:pos + 4], "little")
            walked.append(ctnetlink.walk_entry(view, pos + 20, pos + length, msg[pos + 16]))
            pos += (length + 3) & ~3
        assert entries == walked
        seen.update((e.family, e.orig.proto) for e in entries)
    assert seen >= {(2, 6), (2, 17), (2, 1), (10, 6), (10, 17), (10, 58)}, seen
    # Events without a stop time are stamped with the time of the read: compared as keys and records
    # but for that stamp (first 8 bytes), which must lie between the read and now.
    expected = [end for msg in messages for end in reference_ends(msg, NETNS, OFFSET, now)]
    assert [(k, r[8:]) for k, r in read] == [(k, r[8:]) for k, r in expected]
    for (_, got), (_, want) in zip(read, expected, strict=True):
        stamp, wanted = int.from_bytes(got[:8], "little"), int.from_bytes(want[:8], "little")
        assert stamp == wanted or (timestamp is False and wanted - 5 * 10**9 <= stamp <= wanted)
    assert batched.overruns == 0 and len(read) > ctnetlink.BatchReceiver.SLOTS   # several recvmmsg calls
    # TCP and UDP entries were read by layout (ICMP's are walked).
    assert any(layout is not None for layout in ctnetlink._layouts.values())
