"""Range labels and port/protocol ignore rules on real traffic: the agent in
the lab's NAT router, stdout JSON lines.  UDP to one port of the server is
ignored by a rule (the other UDP port and TCP are not); the server's range
labels every record of its flows, the client's (a source range) none by the
default remote endpoint."""

from __future__ import annotations

import os

import pytest

from tests.integration.running_agent import RunningAgent, by_flow, exit_summary
from tests.netns import Topology

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]


def test_range_labels_and_port_rules_on_real_flows():
    with Topology() as topo:
        server = topo.addr("server")
        ignored_port, kept_port = topo.next_port(), topo.next_port()
        agent = RunningAgent(topo, config={"enrich": {
            "ignore": [f"udp/{ignored_port} to {server}/32", "tcp 1-1023 from 2001:db8::/32"],
            "ranges": [{"range": f"{server}-{server}", "labels": {"customer": "acme"}},
                       {"range": f"{topo.addr('client')}/32", "labels": {"customer": "client-side"}}]}})
        topo.udp_exchange(3, 100, port=ignored_port)
        topo.udp_exchange(2, 100, port=kept_port)
        transfer = topo.tcp_transfer(10_000)
        topo.flush()
        records = agent.wait_for_records(lambda rs: sum(r["kind"] == "destroy" for r in rs) >= 2)
        assert agent.stop() == 0, agent.stderr
    flows = by_flow(records)
    dports = {recs[0]["orig"]["dport"] for recs in flows.values()}
    assert ignored_port not in dports and {kept_port, transfer.dport} <= dports
    for recs in flows.values():
        if recs[0]["orig"]["dst"] == server:
            assert all(r["labels"].get("customer") == "acme" for r in recs), recs
    assert not any(r["labels"].get("customer") == "client-side" for r in records)   # not the remote end
    assert exit_summary(agent.stderr, "stage enrich")["ignored"] >= 2    # the ignored flow's records
