"""`conntracct test` on this host: it passes in the mode `auto` picks here
(netfilter), a forced mode this kernel lacks fails with the reason, and
neither a run nor an interrupted run leaves a namespace or a changed host
sysctl behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conntracct.selftest import PREFIX

CLI = [sys.executable, "-m", "conntracct"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")
# What the self-test sets inside its router; the host's values must not move.
HOST_SYSCTLS = ("net/netfilter/nf_conntrack_acct", "net/netfilter/nf_conntrack_timestamp",
                "net/netfilter/nf_conntrack_events", "net/netfilter/nf_conntrack_udp_timeout",
                "net/netfilter/nf_conntrack_tcp_timeout_time_wait", "net/ipv4/ip_forward",
                "net/ipv6/conf/all/forwarding")
FLOWS = ("tcp/ipv4", "tcp/ipv6", "udp/ipv4", "udp/ipv6", "icmp/ipv4", "icmp/ipv6")


def conntracct(*args, timeout=180):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)


def host_sysctls() -> dict:
    out = {}
    for key in HOST_SYSCTLS:
        path = Path("/proc/sys", key)
        out[key] = path.read_text().strip() if path.exists() else None
    return out


def our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def table_rows(text: str) -> dict[str, tuple[str, str]]:
    """check -> (result, detail), from the rows between the dashes and the blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-----")) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        name, rest = line[:line.index("  ")], line[line.index("  "):].strip()
        result, _, detail = rest.partition(" ")
        rows[name] = (result, detail.strip())
    return rows


def test_help():
    out = conntracct("test", "--help", timeout=60)
    assert out.returncode == 0 and "Usage: " in out.stdout and "--mode" in out.stdout


@pytest.mark.root
@needs_root
def test_selftest_passes_here_in_netfilter_mode():
    before = host_sysctls()
    started = time.monotonic()
    out = conntracct("test")
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "mode auto -> netfilter" in out.stdout
    rows = table_rows(out.stdout)
    expected = {"mode", "nat", "losses", "cleanup"} | {f"{f} {what}" for f in FLOWS
                                                       for what in ("records", "totals", "bytes")}
    assert set(rows) == expected, rows
    failed = {name: row for name, row in rows.items() if row[0] != "ok"}
    assert not failed, out.stdout
    assert rows["tcp/ipv4 records"][1].startswith("1 new, 0 update, 1 destroy")
    assert f"self-test passed: {len(expected)} of {len(expected)} checks" in out.stdout
    assert our_namespaces() == []
    assert host_sysctls() == before
    assert elapsed < 60, elapsed


@pytest.mark.root
@needs_root
def test_config_mode_is_used_and_option_overrides_it(tmp_path):
    cfg = tmp_path / "conntracct.yml"
    cfg.write_text("probe:\n  mode: kprobe\n")
    out = conntracct("test", "-c", str(cfg), "--mode", "netfilter")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mode netfilter -> netfilter" in out.stdout
    out = conntracct("test", "-c", str(cfg))
    assert out.returncode == 2 and "probe.mode: kprobe" in out.stderr


@pytest.mark.root
@needs_root
def test_forcing_a_mode_this_kernel_lacks_exits_2_with_the_reason():
    out = conntracct("test", "--mode", "kprobe")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot attach its probe (probe.mode: kprobe)" in out.stderr
    assert "__nf_ct_refresh_acct" in out.stderr and "conntracct check" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert our_namespaces() == []


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("sig,delay", [(signal.SIGINT, 0.0), (signal.SIGINT, 0.5), (signal.SIGTERM, 0.3)])
def test_an_interrupted_selftest_removes_its_namespaces(sig, delay):
    before = host_sysctls()
    proc = subprocess.Popen(CLI + ["test"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mine = f"{PREFIX}{proc.pid}-"
    deadline = time.monotonic() + 60
    while not any(n.startswith(mine) for n in our_namespaces()) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 or "self-test passed" in out   # a late signal may find it finished
    assert "Traceback" not in err
    assert not [n for n in our_namespaces() if n.startswith(mine)]
    assert host_sysctls() == before


@pytest.mark.root
@needs_root
def test_stale_namespaces_of_a_killed_run_are_removed():
    dead = 2 ** 22 + 1          # above pid_max's default ceiling: no such process
    name = f"{PREFIX}{dead}-router"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        from conntracct.selftest import remove_stale
        remove_stale()
        assert name not in our_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.root
@needs_root
def test_not_root_exits_2_with_the_fix():
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *CLI]
    env = dict(os.environ, HOME="/nonexistent")
    probe = subprocess.run(nobody + ["version"], capture_output=True, text=True, timeout=60, env=env)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this checkout's Python: {probe.stderr.strip()[:200]}")
    out = subprocess.run(nobody + ["test"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out
    assert "needs root" in out.stderr and "Traceback" not in out.stderr
