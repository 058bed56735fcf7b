"""First run on a host where no rule uses conntrack (issue 9).

The lab's server namespace is such a place: traffic arrives there from the
client (through the router's NAT), and nothing in it makes conntrack track
anything.  The agent runs in this process's namespace and accounts the
server's (probe.netns), like the agent of a host accounting a container.

- Without conntrack.ensure_tracking: `check` says "not tracking" for IPv4 and
  IPv6, and the running agent warns, with the fix, within seconds of traffic.
- With it: the agent adds `table inet conntracct` there, flows arrive with the
  kernel's exact totals for both families, and the table is gone after
  SIGTERM, and after SIGKILL once the next agent has started and stopped.
- A second agent for the same namespace exits 2 naming the first one's pid;
  `check` beside a running agent still reports the mode as usable.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.running_agent import FAST_CURVE, TEST_MODE, RunningAgent, by_flow, find
from tests.netns import Topology, find_flows

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

TABLE = "table inet conntracct"
WARNING_WITHIN_S = 8      # the agent reads the traffic counters every 2 s


_started: list[RunningAgent] = []


@pytest.fixture
def topo():
    with Topology() as t:
        try:
            yield t
        finally:
            # agents run in this namespace, not the topology's: stop what a failed test left
            while _started:
                agent = _started.pop()
                if agent.proc.poll() is None:
                    agent.proc.kill()
                    agent.proc.wait()


def server_agent(topo: Topology, ensure_tracking: bool = False, metrics_port: int | None = None) -> RunningAgent:
    config = {"probe": {"mode": TEST_MODE, "rate_curve": FAST_CURVE, "netns": topo.ns_path("server")},
              "conntrack": {"ensure_tracking": ensure_tracking}}
    if metrics_port:
        config["sinks"] = [{"type": "stdout", "format": "json", "flush_interval": "100ms"},
                           {"type": "prometheus", "listen": f"127.0.0.1:{metrics_port}"}]
    agent = RunningAgent(topo, ns=None, config=config)
    _started.append(agent)
    return agent


def server_tables(topo: Topology) -> str:
    return topo.run("server", "nft", "list", "tables").stdout


def conntracct(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conntracct", *args], capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The agent's conntrack tracking figures from its Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^(conntracct_(?:conntrack_tracking|untracked_packets_total)\{family="ipv[46]"\}) (\S+)$', text, re.M)}


def check_rows(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(conntrack ipv[46]|netfilter|running agent|privileges)\s+(ok|no)\s+(.*)$", line)
        if m:
            rows[m[1]] = (m[2], m[3])
    return rows


def test_untracked_namespace_check_and_warning(topo, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"probe: {{netns: {topo.ns_path('server')}}}\n")
    check = conntracct("check", "-c", str(cfg))
    rows = check_rows(check.stdout)
    for family in ("ipv4", "ipv6"):
        result, detail = rows[f"conntrack {family}"]
        assert result == "no" and detail.startswith("not tracking"), check.stdout
        assert "ensure_tracking" in detail                       # the fix is named

    port = free_port()
    agent = server_agent(topo, metrics_port=port)
    started = time.monotonic()
    topo.udp_exchange(4, 100)
    topo.udp_exchange(3, 64, family=6)
    while True:
        warnings = [line for line in agent.stderr.splitlines() if "traffic passes untracked" in line]
        if any("IPv4" in w for w in warnings) and any("IPv6" in w for w in warnings):
            break
        assert time.monotonic() < started + WARNING_WITHIN_S, agent.stderr
        time.sleep(0.2)
    assert all("conntrack.ensure_tracking: true" in w for w in warnings), warnings
    assert len(warnings) <= 2                                   # once per family, not per poll
    topo.udp_exchange(2, 100)
    time.sleep(2.5)
    assert len([line for line in agent.stderr.splitlines() if "traffic passes untracked" in line]) == len(warnings)
    figures = scrape(port)        # the same, among the agent's own metrics
    assert figures['conntracct_conntrack_tracking{family="ipv4"}'] == 0
    assert figures['conntracct_conntrack_tracking{family="ipv6"}'] == 0
    assert figures['conntracct_untracked_packets_total{family="ipv4"}'] >= 2 * (4 + 2)   # datagrams and replies
    assert figures['conntracct_untracked_packets_total{family="ipv6"}'] >= 2 * 3
    assert agent.stop() == 0
    inode = topo.netns_inode("server")
    assert [r for r in agent.records() if r["netns"] == inode] == []     # nothing tracked, nothing reported
    assert TABLE not in server_tables(topo)                              # and the firewall was left alone


def test_ensure_tracking_exact_totals_and_table_lifecycle(topo):
    agent = server_agent(topo, ensure_tracking=True)
    assert TABLE in server_tables(topo)
    assert "conntrack.ensure_tracking: added nftables table inet conntracct" in agent.stderr
    with topo.conntrack_events(ns="server") as cap:
        udp = topo.udp_exchange(5, 200, reply_size=100)
        udp6 = topo.udp_exchange(3, 64, reply_size=64, family=6)
        tcp = topo.tcp_transfer(100_000, reply_bytes=2_000)
        tcp6 = topo.tcp_transfer(50_000, reply_bytes=1_000, family=6)
        time.sleep(0.5)
        topo.flush("server")
    agent.wait_for_records(lambda rs: sum(r["kind"] == "destroy" for r in rs) >= 4)
    assert agent.stop() == 0
    assert "traffic passes untracked" not in agent.stderr
    assert TABLE not in server_tables(topo)                              # deleted on SIGTERM

    flows = by_flow(agent.records())
    for proto, family, t in (("udp", 4, udp), ("udp", 6, udp6), ("tcp", 4, tcp), ("tcp", 6, tcp6)):
        [recs] = find(flows, proto=proto, family=family, sport=t.peer[1], dport=t.dport)
        kinds = [r["kind"] for r in recs]
        assert kinds[0] == "new" and kinds[-1] == "destroy" and kinds.count("destroy") == 1, kinds
        [event] = find_flows(cap.events, proto=proto, orig_sport=t.peer[1], orig_dport=t.dport)
        destroy = recs[-1]
        assert (destroy["packets_orig"], destroy["bytes_orig"]) == (event["orig"]["packets"], event["orig"]["bytes"])
        assert (destroy["packets_reply"], destroy["bytes_reply"]) == (event["reply"]["packets"],
                                                                      event["reply"]["bytes"])
    [recs] = find(flows, proto="udp", family=4, sport=udp.peer[1])
    assert recs[-1]["packets_orig"] == 5 and recs[-1]["bytes_orig"] == 5 * (20 + 8 + 200)
    [recs] = find(flows, proto="udp", family=6, sport=udp6.peer[1])
    assert recs[-1]["packets_reply"] == 3 and recs[-1]["bytes_reply"] == 3 * (40 + 8 + 64)

    # SIGKILL leaves the table; the next agent replaces it and deletes it on exit.
    killed = server_agent(topo, ensure_tracking=True)
    killed.stop(signal.SIGKILL)
    assert TABLE in server_tables(topo)
    again = server_agent(topo, ensure_tracking=True)
    assert "replaced one left by an agent that did not exit cleanly" in again.stderr
    assert server_tables(topo).count(TABLE) == 1
    assert again.stop() == 0
    assert TABLE not in server_tables(topo)


def test_second_agent_exits_2_naming_the_first(topo):
    first = server_agent(topo, ensure_tracking=True)
    second = conntracct("run", "-c", str(first.config_path), timeout=90)
    assert second.returncode == 2, second.stderr
    assert f"another conntracct (pid {first.proc.pid}) already accounts network namespace" in second.stderr
    assert "Traceback" not in second.stderr
    assert TABLE in server_tables(topo)              # the second one did not take the first one's table away
    assert first.proc.poll() is None
    assert first.stop() == 0


@pytest.mark.skipif(TEST_MODE != "netfilter", reason="EBUSY is the netfilter hooks' (kprobes can be shared)")
def test_second_agent_without_the_lock_names_the_busy_hook(topo, tmp_path):
    """A second agent whose lock directory differs (or another BPF program at
    the probe's priority) meets EBUSY: it exits 2 saying who holds the hooks,
    and leaves the first agent's table alone."""
    first = server_agent(topo, ensure_tracking=True)
    env = dict(os.environ, RUNTIME_DIRECTORY=str(tmp_path))
    second = subprocess.run([sys.executable, "-m", "conntracct", "run", "-c", str(first.config_path)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert second.returncode == 2, second.stderr
    assert "Device or resource busy" in second.stderr and "6.4" not in second.stderr, second.stderr
    assert f"held by another conntracct (pid {first.proc.pid})" in second.stderr, second.stderr
    assert "left to it" in second.stderr                       # the table stays the first agent's
    assert TABLE in server_tables(topo)
    assert first.stop() == 0
    assert TABLE not in server_tables(topo)


def test_check_beside_a_running_agent(topo):
    agent = server_agent(topo, ensure_tracking=True)
    check = conntracct("check", "-c", str(agent.config_path))
    rows = check_rows(check.stdout)
    assert check.returncode == 0, check.stdout + check.stderr
    assert rows["running agent"][1].startswith(f"conntracct pid {agent.proc.pid} accounts"), check.stdout
    assert rows["conntrack ipv4"][0] == rows["conntrack ipv6"][0] == "ok", check.stdout
    if TEST_MODE == "netfilter":
        # The agent holds the probe's hooks (EBUSY for another program at that
        # priority): check must still find the mode usable and say why.
        result, detail = rows["netfilter"]
        assert result == "ok", check.stdout
        assert f"pid {agent.proc.pid}" in detail and "6.4" not in detail, detail
    assert agent.stop() == 0
