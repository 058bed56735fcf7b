"""Attach modes on the running kernel: every mode's entry points compile
against its BTF offsets; `auto` takes the cheapest mode that attaches, found
by trying; forcing a mode either attaches the whole probe or fails with a
reason naming what is missing.

On this project's CI host only `netfilter` attaches (no kprobes, fentry
refused); in ./tasks.py vm-test's Debian 6.1 guest `kprobe` attaches, fentry
cannot reach nf_conntrack (a module) and `netfilter` needs 6.4.  The guest
sets CONNTRACCT_EXPECT_AUTO=kprobe so the pick itself is pinned there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conntracct import netns
from conntracct.config import ProbeConfig
from conntracct.probe import loader
from conntracct.probe.btf import kernel_btf
from conntracct.probe.loader import (
    BATCH_PROGRAM,
    DESTROY_FUNCS,
    MAPS,
    MODES,
    REFRESH_FUNC,
    Probe,
    ProbeError,
    ProbeSettings,
    compile_probe,
    destroy_func,
)
from conntracct.probe.modes import AUTO_ORDER, MODE_TRIES, check_ctnetlink, choose_mode, try_fentry, try_netfilter
from tests.netns import Topology

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF (CI runs as root)")]

ROOT = Path(__file__).resolve().parents[2]


def conntrack_is_a_module() -> bool:
    return kernel_btf().func_origin(REFRESH_FUNC) not in (None, "vmlinux")


def test_kprobe_entry_points_pass_the_verifier():
    loaded = compile_probe("kprobe", ProbeSettings.from_config(), DESTROY_FUNCS[0])
    try:
        assert set(loaded.programs) == {"refresh_enter", "refresh_return", "flow_destroy"}
        assert all(fd > 0 for fd in loaded.programs.values())
        assert set(loaded.maps) == set(MAPS["kprobe"]) and not loaded.links
    finally:
        loaded.close()


def test_netfilter_entry_point_loads_or_the_kernel_refusal_is_named():
    if not try_netfilter().ok:     # before 6.4: the kernel knows no netfilter programs
        with pytest.raises(ProbeError, match=r"^netfilter probe: .*netfilter_hook"):
            compile_probe("netfilter", ProbeSettings.from_config())
        return
    loaded = compile_probe("netfilter", ProbeSettings.from_config())
    try:
        assert loaded.programs["netfilter_hook"] > 0
        assert loaded.programs[BATCH_PROGRAM] > 0 and not loaded.refused      # syscall programs: 5.14+
        assert set(loaded.maps) == set(MAPS["netfilter"])
    finally:
        loaded.close()


def test_fentry_entry_points_attach_or_the_reason_is_named():
    """fentry programs attach when BCC loads them: either the whole fentry
    probe loads, or the error says why (module functions, or the kernel's
    refusal), never a compile error."""
    check = try_fentry()
    try:
        loaded = compile_probe("fentry", ProbeSettings.from_config(), destroy_func())
    except ProbeError as e:
        assert not check.ok, (check, e)
        if conntrack_is_a_module():
            assert f"{REFRESH_FUNC} and {destroy_func()} are in module nf_conntrack" in str(e)
            assert "cannot reach a module function" in str(e)
        else:
            assert "refused to load it (EPERM)" in str(e)
        return
    try:
        assert check.ok, check
        assert f"kretfunc__{REFRESH_FUNC}" in loaded.programs and f"kfunc__{destroy_func()}" in loaded.programs
        assert len(loaded.links) == 2, loaded.links
    finally:
        loaded.close()


def test_a_compile_error_is_bccs_last_line(monkeypatch, tmp_path):
    """A probe that does not compile fails with BCC's words, from the compiler child."""
    broken = tmp_path / "broken.c"
    broken.write_text("int netfilter_hook(void *ctx) { return undeclared_name; }\n")
    monkeypatch.setattr(loader, "PROBE_SOURCE", broken)
    with pytest.raises(ProbeError, match=r"^netfilter probe: .*(compile|undeclared)"):
        compile_probe("netfilter", ProbeSettings.from_config())


def test_the_agent_process_never_loads_bcc():
    """BCC and its LLVM stay in the compiler child: the probe attaches, and bcc is not imported here."""
    code = ("import sys\n"
            "from conntracct.probe.loader import Probe, ProbeSettings, MODES\n"
            "from conntracct.probe.modes import choose_mode\n"
            "mode, _, why = choose_mode('auto')\n"
            "assert mode, why\n"
            "p = Probe(mode, ProbeSettings.from_config(), lambda raw: None, False)\n"
            "p.close()\n"
            "maps = open('/proc/self/maps').read()\n"
            "print('bcc' in sys.modules, 'libbcc' in maps, 'libLLVM' in maps)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr


def test_fentry_detection_names_the_module():
    if not conntrack_is_a_module():
        pytest.skip("nf_conntrack's functions are in vmlinux BTF on this kernel")
    check = try_fentry()
    assert not check.ok
    assert "in module nf_conntrack, not vmlinux" in check.detail
    assert "cannot reach a module function" in check.detail


def _usable(mode: str) -> bool:
    if not MODE_TRIES[mode]().ok:
        return False
    return mode != "netfilter" or check_ctnetlink().ok


def test_auto_picks_the_cheapest_mode_that_attaches():
    usable = {mode: _usable(mode) for mode in AUTO_ORDER}
    expected = next(m for m in AUTO_ORDER if usable[m])
    mode, checks, why = choose_mode("auto")
    assert mode == expected, (usable, why)
    pinned = os.environ.get("CONNTRACCT_EXPECT_AUTO")
    if pinned:
        assert mode == pinned, why
    tried = [c.name for c in checks if c.name in MODES]
    assert tried == list(AUTO_ORDER[:AUTO_ORDER.index(mode) + 1])
    failed = [m for m in tried if not usable[m]]
    if failed:
        assert f"tried first: {', '.join(failed)}" in why


@pytest.mark.parametrize("mode", MODES)
def test_forcing_a_mode_attaches_the_whole_probe_or_says_why(mode):
    chosen, checks, why = choose_mode(mode)
    if chosen is None:
        assert why.startswith("no attach mode works here") and f"{mode}:" in why, why
        if mode == "fentry" and conntrack_is_a_module():
            assert "module nf_conntrack" in why
        return
    assert chosen == mode
    # The real probe, every entry point attached; netfilter links in a
    # private namespace (the others are global anyway).
    with Topology() as topo, netns.entered(topo.ns_path("router") if mode == "netfilter" else None):
        settings = ProbeSettings.from_config(ProbeConfig(max_flows=1024, ringbuf_pages=8))
        probe = Probe(mode, settings, lambda raw: None, False)
        try:
            assert probe.program_stats()
        finally:
            probe.close()


def test_check_explains_the_pick():
    mode, checks, _why = choose_mode("auto")
    out = subprocess.run([sys.executable, "-m", "conntracct", "check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert f"mode auto -> {mode}" in out.stdout, out.stdout + out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    for name in MODES:
        assert name in rows, out.stdout
    if conntrack_is_a_module():
        assert "cannot reach a module function" in rows["fentry"], rows["fentry"]
