"""With sinks that want only DESTROYs the probe writes no NEW or UPDATE
records (SET_QUIET_KINDS), while its per-flow state moves on as if it had:
every flow still ends once, with the kernel's totals and the same deltas."""

from __future__ import annotations

import os

import pytest

from tests.integration.running_agent import FAST_CURVE, RunningAgent, probe_summary
from tests.netns import Topology, find_flows

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]


def run(kinds: list[str] | None) -> tuple[dict, list[dict], list]:
    """(probe counters, DESTROY records, the kernel's DESTROY events) of 20 TCP flows."""
    with Topology(acct=True, timestamp=True) as topo:
        sink = {"type": "stdout", "format": "json", "flush_interval": "100ms"}
        if kinds:
            sink["kinds"] = kinds
        agent = RunningAgent(topo, config={"probe": {"mode": "netfilter", "rate_curve": FAST_CURVE},
                                           "sinks": [sink]})
        with topo.conntrack_events() as cap:
            transfers = [topo.tcp_transfer(20_000 + 1000 * i, reply_bytes=500) for i in range(20)]
            topo.flush()
            topo.wait_conntrack_empty()
        records = agent.wait_for_records(lambda rs: sum(r["kind"] == "destroy" for r in rs) >= 20)
        assert agent.stop() == 0
        # By both ports: two transfers to different ports may get the same source port
        ports = {(t.sport, t.dport) for t in transfers}
        destroys = [r for r in records if r["kind"] == "destroy" and (r["orig"]["sport"], r["orig"]["dport"]) in ports]
        kernel = [e for t in transfers
                  for e in find_flows(cap.events, proto="tcp", orig_sport=t.sport, orig_dport=t.dport)]
        return probe_summary(agent.stderr), destroys, kernel


def test_destroy_only_sinks_get_no_new_records_from_the_probe():
    stats, destroys, kernel = run(["destroy"])
    # The only NEWs are those made from DESTROYs of flows the probe never saw
    # (the capture's own marker entries): none came from the ring.
    assert stats["received_new"] == stats["received_destroy"] - stats["state_deletes"], stats
    assert stats["received_update"] == 0 and stats["probe_records_lost"] == 0, stats
    assert stats["state_deletes"] >= 20, stats
    assert len(destroys) == 20 == len(kernel)
    totals = sorted((r["orig"]["sport"], r["packets_orig"], r["bytes_orig"], r["packets_reply"], r["bytes_reply"])
                    for r in destroys)
    assert totals == sorted((e["orig"]["sport"], e["orig"]["packets"], e["orig"]["bytes"], e["reply"]["packets"],
                             e["reply"]["bytes"]) for e in kernel)
    # The flow's state counted from its first packet, as when the NEW is written:
    # the DESTROY's deltas are the totals less the first packet's.
    for r in destroys:
        assert 0 < r["delta_packets_orig"] < r["packets_orig"] and "first_sight" not in r["flags"], r


def test_every_kind_still_comes_when_a_sink_wants_it():
    stats, destroys, _ = run(None)
    assert stats["received_new"] >= 20 and len(destroys) == 20, stats
