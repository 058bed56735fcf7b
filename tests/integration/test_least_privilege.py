"""The agent as an unprivileged user holding exactly the capabilities the
README lists (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN; in kprobe mode also
CAP_SYS_ADMIN), in the NAT lab's router: every flow arrives with the
kernel's exact totals.  Without one of them the kernel refuses, and the
agent's own check exits 2 naming it.

setpriv (util-linux) drops to `nobody` and raises the capabilities as
ambient ones, which survive the exec of the Python interpreter, exactly as
systemd's AmbientCapabilities= does for dist/conntracct.service.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from conntracct.privileges import CAP_NUMBERS
from tests.integration.running_agent import TEST_MODE, RunningAgent, by_flow, find
from tests.netns import Topology, find_flows

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]

MEASURED = ("bpf", "perfmon", "net_admin")
# kprobe mode needs CAP_SYS_ADMIN: with Debian's perf_event_paranoid=3 the
# kprobe PMU's perf_event_open asks for it (EACCES with CAP_BPF, CAP_PERFMON
# and CAP_NET_ADMIN, measured in the 6.1 guest); it also stands for CAP_BPF
# and CAP_PERFMON in the kernel's checks.
MODE_CAPS = ("net_admin", "sys_admin") if TEST_MODE == "kprobe" else MEASURED
NOBODY = 65534


def setpriv(caps: tuple[str, ...]) -> list[str]:
    wanted = ",".join(f"+{c}" for c in caps)
    return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
            "--inh-caps", f"-all,{wanted}", "--ambient-caps", wanted, "--"]


class Unprivileged:
    """A Topology whose popen() runs commands as nobody with `caps`;
    RunningAgent starts the agent through it."""

    def __init__(self, topo: Topology, caps: tuple[str, ...], home: Path):
        self.topo, self.caps, self.home = topo, caps, home

    def popen(self, ns: str, *cmd: Any, **kwargs: Any) -> subprocess.Popen:
        config = Path(cmd[list(cmd).index("-c") + 1])
        config.parent.chmod(0o755)     # RunningAgent's private directory: nobody must read the file
        config.chmod(0o644)
        env = dict(os.environ, HOME=str(self.home), RUNTIME_DIRECTORY=str(self.home))
        return self.topo.popen(ns, *setpriv(self.caps), *cmd, env=env, **kwargs)


@pytest.fixture
def topo():
    with Topology() as t:
        yield t


@pytest.fixture
def home():
    with tempfile.TemporaryDirectory(prefix="conntracct-nobody-") as d:
        os.chown(d, NOBODY, NOBODY)
        yield Path(d)


def status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def test_agent_as_nobody_with_the_measured_capabilities(topo, home):
    agent = RunningAgent(Unprivileged(topo, MODE_CAPS, home))
    st = status(agent.proc.pid)     # ip netns exec and setpriv exec: the agent keeps the pid
    assert st["Uid"].split()[:2] == [str(NOBODY), str(NOBODY)], st["Uid"]
    wanted = sum(1 << CAP_NUMBERS[f"CAP_{c.upper()}"] for c in MODE_CAPS)
    assert int(st["CapEff"], 16) == wanted, st["CapEff"]
    assert int(st["CapAmb"], 16) == wanted, st["CapAmb"]
    with topo.conntrack_events() as cap:
        udp = topo.udp_exchange(5, 200, reply_size=100)
        udp6 = topo.udp_exchange(3, 64, family=6)
        tcp = topo.tcp_transfer(200_000, reply_bytes=5_000)
        ping = topo.ping(3)
        time.sleep(0.5)
        topo.flush()
    agent.wait_for_records(lambda rs: sum(r["kind"] == "destroy" for r in rs) >= 4)
    assert agent.stop() == 0, agent.stderr
    assert "Traceback" not in agent.stderr
    assert "one syscall per flow" not in agent.stderr     # the batch program loads with these too
    flows = by_flow(agent.records())
    for want, kernel_want in ((dict(proto="udp", sport=udp.sport, family=4), dict(proto="udp", orig_sport=udp.sport)),
                              (dict(proto="udp", sport=udp6.sport, family=6),
                               dict(proto="udp", orig_sport=udp6.sport)),
                              (dict(proto="tcp", sport=tcp.sport, family=4), dict(proto="tcp", orig_sport=tcp.sport)),
                              (dict(proto="icmp", icmp_id=ping.ident), dict(proto="icmp", orig_id=ping.ident))):
        [recs] = find(flows, **want)
        kinds = [r["kind"] for r in recs]
        assert kinds[0] == "new" and kinds[-1] == "destroy" and kinds.count("destroy") == 1, (want, kinds)
        [event] = find_flows(cap.events, **kernel_want)
        destroy = recs[-1]
        assert (destroy["packets_orig"], destroy["bytes_orig"], destroy["packets_reply"], destroy["bytes_reply"]) == (
            event["orig"]["packets"], event["orig"]["bytes"], event["reply"]["packets"], event["reply"]["bytes"]), want
    [recs] = find(flows, proto="udp", sport=udp.sport, family=4)
    assert recs[-1]["packets_orig"] == 5 and recs[-1]["bytes_orig"] == 5 * (20 + 8 + 200)


# The agent with its own capability check switched off: what the kernel does
# without the capability (the measurement behind README "Least privilege").
UNCHECKED = ("import sys; from conntracct import privileges; privileges.problem = lambda *a, **k: None; "
             "from conntracct.probe import modes; modes.check_privileges = lambda: modes.Check('privileges', True, "
             "'not checked'); from conntracct.cli import main; sys.argv[0] = 'conntracct'; main()")


@pytest.mark.parametrize("drop", MODE_CAPS)
def test_the_kernel_refuses_without_each_capability(topo, home, drop):
    """Each of the three is needed: without it the kernel itself refuses (BPF
    load, perf event, netlink, sysctl write), in this suite's attach mode."""
    config = home / "c.yml"
    config.write_text(f"probe: {{mode: {TEST_MODE}, ringbuf_pages: 64}}\n")
    config.chmod(0o644)
    caps = tuple(c for c in MODE_CAPS if c != drop)
    env = dict(os.environ, HOME=str(home), RUNTIME_DIRECTORY=str(home))
    proc = subprocess.run(["ip", "netns", "exec", topo.router, *setpriv(caps), sys.executable, "-c", UNCHECKED,
                           "run", "-c", str(config)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, (drop, proc.returncode, proc.stderr[-2000:])
    assert "conntracct running" not in proc.stderr
    assert "missing capabilit" not in proc.stderr            # refused by the kernel, not by our check
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("drop", MODE_CAPS)
def test_without_one_capability_it_exits_2_naming_it(topo, home, drop):
    config = home / "c.yml"
    config.write_text(f"probe: {{mode: {TEST_MODE}}}\n")
    config.chmod(0o644)
    caps = tuple(c for c in MODE_CAPS if c != drop)
    env = dict(os.environ, HOME=str(home), RUNTIME_DIRECTORY=str(home))
    proc = subprocess.run(["ip", "netns", "exec", topo.router, *setpriv(caps), sys.executable, "-m", "conntracct",
                           "run", "-c", str(config)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"missing capability CAP_{drop.upper()}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
