"""Losses are counted, never silent, and the agent recovers from them:
a full flow-state map, a full ring buffer, and ctnetlink overruns (ENOBUFS)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.integration.running_agent import RunningAgent, by_flow, probe_summary
from tests.netns import Topology

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]


def probe_stats(agent: RunningAgent) -> dict:
    return probe_summary(agent.stderr)


def test_a_full_flow_map_is_counted():
    with Topology(acct=True, timestamp=True) as topo:
        agent = RunningAgent(topo, config={"probe": {"mode": "netfilter", "max_flows": 1024}})
        result = topo.churn(duration=1, rate=3000, proto="udp")
        assert result.completed >= 2500, result.summary()
        assert agent.stop() == 0
        stats = probe_stats(agent)
        assert stats["probe_state_full"] > 0
        assert stats["probe_state_inserts"] <= 1024 + stats["state_deletes"]


def test_ring_buffer_and_netlink_overruns_are_counted_and_state_is_reclaimed():
    """The agent is frozen (SIGSTOP) while thousands of flows start and end:
    its 1-page ring buffer overflows and its small netlink buffer overruns.
    Both are counted; after it resumes it reconciles with the table, so every
    flow it tracked ends (end_unseen) and no kernel-side state is left."""
    with Topology(acct=True, timestamp=True) as topo:
        agent = RunningAgent(topo, config={"probe": {"mode": "netfilter", "ringbuf_pages": 1,
                                                     "netlink_rcvbuf": 65536}})
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            result = topo.churn(duration=1, rate=4000, proto="udp")
            topo.flush()
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        assert result.completed >= 3000, result.summary()
        time.sleep(2)
        assert agent.stop() == 0
        stats = probe_stats(agent)
        assert stats["probe_records_lost"] > 0
        assert stats["ctnetlink_overruns"] > 0
        assert stats["ends_unseen"] > 0
        # Every flow the probe inserted was removed again: nothing leaks.
        assert stats["probe_state_inserts"] == stats["state_deletes"] + stats["ends_unseen"]
        flows = by_flow(agent.records())
        for recs in flows.values():
            assert recs[-1]["kind"] == "destroy", recs
        unseen = [recs[-1] for recs in flows.values() if "end_unseen" in recs[-1]["flags"]]
        assert len(unseen) == stats["ends_unseen"]
