"""Mode detection loads its tiny programs with bpf(2) itself
(bpfsys.load_trivial); its verdicts are the ones BCC's own load and attach
give (the way detection worked before, kept here as the reference).  On
this project's CI host only netfilter attaches; ./tasks.py vm-test runs
these in a guest where kprobes attach."""

from __future__ import annotations

import contextlib
import os

import pytest

from conntracct.probe import bpfsys
from conntracct.probe.loader import REFRESH_FUNC
from conntracct.probe.modes import try_kprobe, try_netfilter

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: BPF (CI runs as root)")]


@contextlib.contextmanager
def quiet_stderr():
    """Keep libbcc/libbpf's own messages (written to fd 2) out of the test's output."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_bpf(text: str):
    from bcc import BPF
    with quiet_stderr():
        return BPF(text=text.encode())


def bcc_kprobe_attaches() -> bool:
    try:
        b = _quiet_bpf("int probe(void *ctx) { return 0; }")
        try:
            with quiet_stderr():
                b.attach_kprobe(event=REFRESH_FUNC.encode(), fn_name=b"probe")
        finally:
            b.cleanup()
    except Exception:
        return False
    return True


def bcc_netfilter_attaches() -> bool:
    b = _quiet_bpf("int probe(void *ctx) { return 1; }")
    try:
        fn = b.load_func(b"probe", bpfsys.BPF_PROG_TYPE_NETFILTER, attach_type=bpfsys.BPF_NETFILTER)
        family, hook = bpfsys.PROBE_HOOKS[0]
        # one priority above the probe's: a running agent may hold that one
        os.close(bpfsys.link_netfilter(fn.fd, family, hook, bpfsys.PRIORITY_AFTER_CONNTRACK + 2))
        return True
    except Exception:
        return False
    finally:
        b.cleanup()


def test_netfilter_verdict_is_bccs():
    assert try_netfilter().ok == bcc_netfilter_attaches()


def test_kprobe_verdict_is_bccs():
    assert try_kprobe().ok == bcc_kprobe_attaches()


def test_trivial_kprobe_program_attaches_where_kprobes_work():
    if not try_kprobe().ok:
        pytest.skip(f"kprobes do not attach here: {try_kprobe().detail}")
    prog = bpfsys.load_trivial(bpfsys.BPF_PROG_TYPE_KPROBE)
    try:
        with quiet_stderr():
            os.close(bpfsys.attach_kprobe(prog, REFRESH_FUNC))
    finally:
        os.close(prog)


def test_a_refused_program_raises_with_the_errno():
    with pytest.raises(OSError) as err:
        bpfsys.load_trivial(9999)     # no such program type
    assert err.value.errno != 0
