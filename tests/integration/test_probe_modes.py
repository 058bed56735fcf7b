"""Every attach mode's entry points compile against this kernel's BTF offsets
and load; on this host only `netfilter` can attach (kprobes are not built in
and fentry is refused), which `auto` must detect by trying."""

from __future__ import annotations

import os

import pytest
from bcc import BPF

from conntracct.probe.loader import DESTROY_FUNCS, ProbeError, ProbeSettings, compile_probe
from conntracct.probe.modes import choose_mode, try_fentry, try_kprobe, try_netfilter

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF (CI runs as root)")]


def test_kprobe_entry_points_pass_the_verifier():
    b = compile_probe("kprobe", ProbeSettings(), DESTROY_FUNCS[0])
    try:
        for name in (b"refresh_enter", b"refresh_return", b"flow_destroy"):
            assert b.load_func(name, BPF.KPROBE).fd > 0
    finally:
        b.cleanup()


def test_netfilter_entry_point_loads():
    b = compile_probe("netfilter", ProbeSettings())
    try:
        assert b.load_func(b"netfilter_hook", 32, attach_type=45).fd > 0
    finally:
        b.cleanup()


def test_fentry_entry_points_compile_and_only_the_kernel_refuses_them():
    if try_fentry().ok:
        pytest.skip("this kernel allows fentry: nothing refuses it")
    with pytest.raises(ProbeError) as err:
        compile_probe("fentry", ProbeSettings())
    # A compile error would name the source; this is the load being refused.
    assert "refused to load it (EPERM)" in str(err.value)


def test_auto_picks_netfilter_here_after_trying_the_cheaper_modes():
    assert not try_fentry().ok and not try_kprobe().ok and try_netfilter().ok
    mode, checks, why = choose_mode("auto")
    assert mode == "netfilter"
    assert [c.name for c in checks if c.name in ("fentry", "kprobe", "netfilter")] == ["fentry", "kprobe",
                                                                                      "netfilter"]
    assert "tried first: fentry, kprobe" in why


@pytest.mark.parametrize("mode", ["kprobe", "fentry"])
def test_forcing_an_unavailable_mode_says_why(mode):
    chosen, checks, why = choose_mode(mode)
    assert chosen is None
    assert why.startswith("no attach mode works here") and mode in why
