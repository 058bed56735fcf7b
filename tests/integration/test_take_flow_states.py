"""Netfilter mode's flow ends take the probe's per-flow state out of its map
a batch at a time (bpf/conntracct.c take_flow_states, a syscall program over
two mapped arrays): the same states as the one-syscall-per-flow lookup and
delete, nothing left behind, across batch boundaries."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from conntracct import netns
from conntracct.config import ProbeConfig
from conntracct.probe import bpfsys, loader
from conntracct.probe.layout import DEFINES
from conntracct.probe.loader import Probe, ProbeSettings
from conntracct.probe.modes import try_netfilter
from conntracct.probe.record import FLOW_STATE, FlowState, flow_key, pack_tuple
from tests.netns import Topology

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF (CI runs as root)")]

BATCH = DEFINES["TAKE_BATCH"]


@pytest.fixture
def probe():
    if not try_netfilter().ok:
        pytest.skip(f"this kernel has no BPF netfilter programs: {try_netfilter().detail}")
    with Topology() as topo, netns.entered(topo.ns_path("router")):
        p = Probe("netfilter", ProbeSettings.from_config(ProbeConfig(max_flows=4096, ringbuf_pages=8)),
                  lambda raw: None, False)
        try:
            yield p
        finally:
            p.close()


def key(n: int) -> bytes:
    orig = pack_tuple(socket.AF_INET6, 6, socket.inet_pton(socket.AF_INET6, f"2001:db8::{n:x}"),
                      socket.inet_pton(socket.AF_INET6, "2001:db8:2::1"), 40000 + n % 20000, 443)
    return flow_key(orig, 4026531840, n % 3, 10**18 + n)


def put(probe: Probe, states: dict[bytes, FlowState]) -> None:
    flows = probe._loaded.maps["flows"]     # the test plays the probe's part: its writes
    for k, st in states.items():
        bpfsys.update_elem(flows, k, FLOW_STATE.pack(st.first_seen, st.next_emit, *st.packets, *st.bytes, st.flags))


def test_batches_take_what_one_at_a_time_takes(probe):
    assert probe.takes_in_batches      # netfilter mode: Linux 6.4+, syscall programs since 5.14
    keys = [key(n) for n in range(2 * BATCH + 37)]
    # Every third flow has no state (a flow the probe never saw)
    states = {k: FlowState(n, n + 1, (n * 3, n * 5), (n * 7, 2**64 - 1 - n), n % 64)
              for n, k in enumerate(keys) if n % 3}
    put(probe, states)
    taken = probe.take_flow_states(keys)
    assert taken == [states.get(k) for k in keys]
    assert probe.flow_keys() == []
    assert probe.take_flow_states(keys[:5]) == [None] * 5    # gone: taken once
    put(probe, states)
    assert [probe.take_flow_state(k) for k in keys] == taken
    assert probe.take_flow_states([]) == []


def test_a_kernel_refusing_the_batch_program_takes_one_at_a_time(monkeypatch, caplog):
    if not try_netfilter().ok:
        pytest.skip(f"this kernel has no BPF netfilter programs: {try_netfilter().detail}")

    build = loader.compile_and_load

    def refusing(request):
        """The compiler child's answer where the kernel refused the syscall program."""
        loaded = build(request)
        os.close(loaded.programs.pop(loader.BATCH_PROGRAM))
        loaded.refused[loader.BATCH_PROGRAM] = "Invalid argument: as an older kernel would"
        return loaded
    monkeypatch.setattr(loader, "compile_and_load", refusing)
    caplog.set_level(logging.INFO, logger="conntracct.probe.loader")
    with Topology() as topo, netns.entered(topo.ns_path("router")):
        probe = Probe("netfilter", ProbeSettings.from_config(ProbeConfig(max_flows=1024, ringbuf_pages=8)),
                      lambda raw: None, False)
        try:
            assert not probe.takes_in_batches
            assert "one syscall per flow: the batch program was refused" in caplog.text
            keys = [key(n) for n in range(BATCH + 1)]
            states = {k: FlowState(n, 0, (n, 1), (n, 2), 0) for n, k in enumerate(keys)}
            put(probe, states)
            assert probe.take_flow_states(keys) == list(states.values()) and probe.flow_keys() == []
        finally:
            probe.close()
