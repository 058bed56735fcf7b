"""The agent reads the probe's ring buffer itself (conntracct/probe/_ring.c),
with its data area mapped once: a record that wraps at the data's end is
copied in two pieces.  On a small ring that wraps many times, every record
comes out whole and exactly once: the NEWs read are the kernel's NEW events
(`conntrack -E`), flow for flow."""

from __future__ import annotations

import mmap
import os

import pytest

from conntracct import netns
from conntracct.config import ProbeConfig
from conntracct.probe import bpfsys
from conntracct.probe._ring import Ring
from conntracct.probe.loader import Probe, ProbeSettings
from conntracct.probe.modes import try_netfilter
from conntracct.probe.record import RECORD
from tests.integration.probe_churn import new_flows, read_during_churn
from tests.netns import Topology

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

PAGES = 4     # 78 records of 208 bytes: a record straddles the data's end on most laps


def test_records_wrapping_at_the_data_end_come_out_whole_and_once():
    if not try_netfilter().ok:
        pytest.skip(f"this kernel has no BPF netfilter programs: {try_netfilter().detail}")
    got: list[bytes] = []
    with Topology(acct=True, timestamp=True) as topo, netns.entered(topo.ns_path("router")):
        probe = Probe("netfilter", ProbeSettings.from_config(ProbeConfig(max_flows=65536, ringbuf_pages=PAGES)),
                      got.append, False)
        data_size = bpfsys.map_max_entries(probe.ring_fd)
        try:
            result, cap = read_during_churn(probe, topo, duration=2, rate=500)
        finally:
            stats = probe.stats()
            probe.close()
    assert data_size == PAGES * mmap.PAGESIZE
    assert stats["records_lost"] == 0, stats
    assert not cap.lost_events
    assert all(len(raw) == RECORD.size for raw in got)
    assert len(got) * (RECORD.size + 8) > 10 * data_size, "the ring did not wrap often enough to test anything"
    ours, kernel = new_flows(got, cap, result.port)
    assert sum(kernel.values()) >= 900, result.summary()
    assert ours == kernel


def test_a_ring_refuses_what_is_not_one():
    with pytest.raises(ValueError, match="power of two"):
        Ring(0, 3 * mmap.PAGESIZE)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            Ring(fd, mmap.PAGESIZE)
    finally:
        os.close(fd)
    ring = Ring.__new__(Ring)
    with pytest.raises(ValueError, match="closed"):
        ring.take(1)
