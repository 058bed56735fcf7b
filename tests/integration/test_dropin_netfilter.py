"""stdout `format: netfilter` against conntrack-tools itself: the agent runs in
the lab's NAT router with accounting and timestamps on, `conntrack -E -o
extended` runs beside it, real TCP, UDP and ICMP flows (IPv4 and IPv6) go
through and end on their own (the lab's short timeouts).  Each flow's DESTROY
line from the agent must be the line conntrack printed for it, field by field
(parsed by tests/netns/conntrack.py) and as text.  The same flows through
`format: conntrack_exporter` (on stderr) carry its keys and states."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.integration.running_agent import RunningAgent
from tests.netns import Topology
from tests.netns.conntrack import parse_flow_line

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

# Fields conntrack prints and a record cannot (docs/migrating.md): the
# timeout of NEW/UPDATE events; `line` is the text itself.
NOT_COMPARED = {"timeout", "line", "event_time", "id", "use", "start", "stop"}


def conntrack_text(flow: dict) -> str:
    """conntrack's line without what a record has not: the timeout (printed
    on a DESTROY when userspace deleted the entry) and [USERSPACE] ...."""
    text = flow["line"].split(" [USERSPACE]")[0].rstrip()
    if flow["timeout"] is not None:
        text = re.sub(rf"^(\[DESTROY\] \S+\s+\d+ \S+\s+\d+) {flow['timeout']} ", r"\1 ", text)
    return text


def flow_key(flow: dict) -> tuple:
    o = flow["orig"]
    return (flow["protonum"], o["src"], o["dst"], o.get("sport"), o.get("dport"), o.get("id"))


def wait_destroys(topo, path, count: int, timeout: float = 30.0) -> list[str]:
    """The agent's DESTROY lines once `count` are there.  Listing the table
    reaps expired entries (the kernel's GC worker alone takes seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in path.read_text().splitlines() if line.startswith("[DESTROY]")]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        topo.run("router", "conntrack", "-L", check=False)
        time.sleep(0.5)


def test_netfilter_lines_are_conntrack_e_lines():
    with Topology() as topo:
        agent = RunningAgent(topo, config={"sinks": [
            {"type": "stdout", "format": "netfilter", "flush_interval": "100ms"},
            {"type": "stderr", "format": "conntrack_exporter", "flush_interval": "100ms"}]})
        # after the agent turned accounting and timestamps on
        conntrack = topo.popen("router", "conntrack", "-E", "-o", "extended", stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        try:
            time.sleep(0.5)
            transfers = [topo.tcp_transfer(20_000, reply_bytes=3000), topo.tcp_transfer(5000, family=6)]
            exchanges = [topo.udp_exchange(3, 200), topo.udp_exchange(2, 100, family=6)]
            pings = [topo.ping(2), topo.ping(3, family=6)]
            flows = len(transfers) + len(exchanges) + len(pings)
            ours = wait_destroys(topo, agent.stdout_path, flows)    # they end on the lab's 1-2 s timeouts
            time.sleep(0.5)
        finally:
            conntrack.terminate()
            theirs_text, _ = conntrack.communicate(timeout=10)
            assert agent.stop() == 0, agent.stderr
    theirs = {flow_key(f): f for f in map(parse_flow_line, theirs_text.splitlines())
              if f is not None and f["event"] == "DESTROY"}
    assert len(ours) == flows, (ours, theirs_text)
    for line in ours:
        mine = parse_flow_line(line)
        assert mine is not None, line
        other = theirs.get(flow_key(mine))
        assert other is not None, f"no conntrack -E DESTROY for {line}\n{theirs_text}"
        fields = sorted((set(mine) | set(other)) - NOT_COMPARED)
        assert {k: mine[k] for k in fields} == {k: other[k] for k in fields}, (line, other["line"])
        assert mine["orig"].get("packets") and mine["delta_time"] is not None    # counters, timestamps
        assert line == conntrack_text(other)                                    # and the very text

    exporter = [json.loads(line) for line in agent.stderr.splitlines() if line.startswith('{"event_type"')]
    keys = ["event_type", "original_source_host", "original_destination_host", "reply_source_host",
            "reply_destination_host", "remote_host", "state", "labels"]
    assert exporter and all(list(r) == keys for r in exporter)
    tcp = [r for r in exporter if r["original_destination_host"].endswith(f":{transfers[0].dport}")]
    assert tcp[-1]["event_type"] == "destroy" and tcp[-1]["state"] == "Closed"
    assert tcp[0]["original_source_host"] == f"{transfers[0].src}:{transfers[0].sport}"
    assert {r["state"] for r in tcp} <= {"Opening", "Open", "Closing", "Closed"}
    assert tcp[-1]["remote_host"] == f"{transfers[0].dst}:{transfers[0].dport}"    # forwarded: the server
