"""`conntracct test` on this host: it passes in the mode `auto` picks (netfilter
here; kprobe or fentry on stock distribution kernels, e.g. in the Vagrant
boxes), a forced mode this kernel lacks fails with the reason, and neither a
run nor an interrupted run leaves a namespace or a changed host sysctl behind."""

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


@pytest.fixture(scope="module")
def kernel_modes() -> tuple[str, list[str]]:
    """(the mode `auto` picks, the modes this kernel lacks), as `conntracct check` says."""
    out = conntracct("check")
    assert out.returncode == 0, out.stdout + out.stderr
    picked = out.stdout.split("mode auto -> ", 1)[1].split(":", 1)[0]
    rows = table_rows(out.stdout)
    return picked, [m for m in ("kprobe", "fentry", "netfilter") if rows[m][0] != "ok"]


def test_help():
    out = conntracct("test", "--help", timeout=60)
    assert out.returncode == 0 and "Usage: " in out.stdout and "--mode" in out.stdout


@pytest.mark.root
@needs_root
def test_selftest_passes_in_the_mode_auto_picks(kernel_modes):
    picked, _ = kernel_modes
    before = host_sysctls()
    started = time.monotonic()
    out = conntracct("test")
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert f"mode auto -> {picked}" in out.stdout
    rows = table_rows(out.stdout)
    expected = {"mode", "nat", "losses", "cleanup"} | {f"{f} {what}" for f in FLOWS
                                                       for what in ("records", "totals", "bytes")}
    assert set(rows) == expected, rows
    failed = {name: row for name, row in rows.items() if row[0] != "ok"}
    assert not failed, out.stdout
    scope = "attached in the router's namespace" if picked == "netfilter" else "records about others ignored"
    assert scope in rows["mode"][1]
    assert rows["tcp/ipv4 records"][1].startswith("1 new, 0 update, 1 destroy")
    assert f"self-test passed: {len(expected)} of {len(expected)} checks" in out.stdout
    assert our_namespaces() == []
    assert host_sysctls() == before
    assert elapsed < 60, elapsed


@pytest.mark.root
@needs_root
def test_config_mode_is_used_and_option_overrides_it(tmp_path, kernel_modes):
    picked, lacking = kernel_modes
    if not lacking:
        pytest.skip("every attach mode works on this kernel")
    cfg = tmp_path / "conntracct.yml"
    cfg.write_text(f"probe:\n  mode: {lacking[0]}\n")
    out = conntracct("test", "-c", str(cfg), "--mode", picked)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"mode {picked} -> {picked}" in out.stdout
    out = conntracct("test", "-c", str(cfg))
    assert out.returncode == 2 and f"probe.mode: {lacking[0]}" in out.stderr


@pytest.mark.root
@needs_root
def test_forcing_a_mode_this_kernel_lacks_exits_2_with_the_reason(kernel_modes):
    _, lacking = kernel_modes
    if not lacking:
        pytest.skip("every attach mode works on this kernel")
    mode = lacking[0]     # kprobe here
    out = conntracct("test", "--mode", mode)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"cannot attach its probe (probe.mode: {mode})" in out.stderr
    assert "conntracct check" in out.stderr
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
