"""What this kernel allows, found by trying: each attach mode is detected by
loading and attaching a tiny program, never by asking (BCC's
support_kfunc() says yes on kernels where fentry fails with EPERM)."""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from .. import instance, netns, privileges
from . import bpfsys
from .btf import BTFError, kernel_btf
from .compiler import bcc_installed, bcc_version, header_tree
from .loader import DESTROY_FUNCS, MODES, REFRESH_FUNC, fentry_unreachable, refused
from .offsets import kernel_offsets

# Cheapest per packet first.
AUTO_ORDER = MODES


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def check_privileges() -> Check:
    """The capabilities the agent needs (measured: conntracct/privileges.py), not root as such."""
    lacking = privileges.problem(None)
    if lacking:
        return Check("privileges", False, lacking)
    return Check("privileges", True, privileges.describe())


def check_bcc() -> Check:
    """BCC is found, not imported: only the compiler child loads it (compiler.py)."""
    if not bcc_installed():
        return Check("bcc", False, "python3 module 'bcc' not found: install Debian's python3-bpfcc "
                                   "(./tasks.py setup does), and run from a venv with system site packages")
    return Check("bcc", True, f"BCC {bcc_version()}")


def check_headers() -> Check:
    tree = header_tree()
    if (tree / "include").is_dir():
        return Check("header tree", True, f"{tree} -> {tree.resolve()}")
    return Check("header tree", False,
                 f"{tree} is missing: BCC needs a kernel header tree. Install linux-headers-amd64 and link it "
                 "(./tasks.py setup does both); struct layouts still come from BTF")


def check_btf() -> Check:
    try:
        btf = kernel_btf()
        kernel_offsets(btf)
    except BTFError as e:
        return Check("btf", False, f"{e}: the probe reads kernel structs at offsets from BTF "
                                   "(CONFIG_DEBUG_INFO_BTF=y, /sys/kernel/btf/vmlinux)")
    modular = Path("/sys/kernel/btf/nf_conntrack").exists()
    return Check("btf", True, "/sys/kernel/btf/vmlinux" + (" + nf_conntrack (split)" if modular else "")
                 + ": conntrack offsets resolved")


@contextlib.contextmanager
def _closing():
    """A list to put file descriptors in; all closed at the end."""
    fds: list[int] = []
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


# The tries load and attach programs that return at once, with bpf(2)
# itself (bpfsys.load_trivial): through BCC each was a clang compile,
# 0.2-0.4 s apiece, most of `conntracct run`'s start-up (bench P5).

def try_fentry() -> Check:
    """fexit on the refresh function and fentry on the destructor, when both
    are vmlinux functions (the only ones BCC 0.26 can reach)."""
    try:
        btf = kernel_btf()
        # fentry attaches by BTF id: the destructor BTF describes (kallsyms,
        # which kprobes need, takes ~0.25 s to read).
        destroy = next((name for name in DESTROY_FUNCS if btf.func_origin(name)), None)
        if destroy is None:
            return Check("fentry", False, f"none of the conntrack destructors {DESTROY_FUNCS} is in kernel BTF")
        why = fentry_unreachable(destroy)
    except BTFError as e:
        return Check("fentry", False, str(e))
    if why:
        return Check("fentry", False, why)
    try:
        with _closing() as fds:
            for func, attach in ((REFRESH_FUNC, bpfsys.BPF_TRACE_FEXIT), (destroy, bpfsys.BPF_TRACE_FENTRY)):
                fds.append(bpfsys.load_trivial(bpfsys.BPF_PROG_TYPE_TRACING, 0, attach, btf.func_id(func)))
                fds.append(bpfsys.attach_tracing(fds[-1]))
    except OSError as e:
        return Check("fentry", False, f"fentry/fexit on {REFRESH_FUNC}: {refused(e)}")
    return Check("fentry", True, f"fexit {REFRESH_FUNC} + fentry {destroy} attach")


def try_kprobe() -> Check:
    if not bpfsys.has_kprobe_pmu():
        # Before Linux 4.17 kprobes attach through tracefs only; the probe's ring buffer needs 5.8 anyway.
        return Check("kprobe", False, f"kprobe on {REFRESH_FUNC}: no kprobe PMU "
                                      "(kernel built without CONFIG_KPROBES, or older than 4.17)")
    try:
        with _closing() as fds:
            fds.append(bpfsys.load_trivial(bpfsys.BPF_PROG_TYPE_KPROBE))
            fds.append(bpfsys.attach_kprobe(fds[0], REFRESH_FUNC))
    except OSError as e:
        return Check("kprobe", False, f"kprobe on {REFRESH_FUNC}: {refused(e)}")
    return Check("kprobe", True, f"kprobe on {REFRESH_FUNC} attaches")


def try_netfilter() -> Check:
    """The kernel allows one BPF netfilter program per hook and priority
    (EBUSY): when the probe's priority is taken, by a running agent or
    anything else, the next one is tried, so the answer is still whether the
    mode works here, and who holds the probe's priority is named."""
    ours = bpfsys.PRIORITY_AFTER_CONNTRACK
    busy = ""
    try:
        with _closing() as fds:
            fds.append(bpfsys.load_trivial(bpfsys.BPF_PROG_TYPE_NETFILTER, 1, bpfsys.BPF_NETFILTER))
            family, hook = bpfsys.PROBE_HOOKS[0]
            try:
                fds.append(bpfsys.link_netfilter(fds[0], family, hook))
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                fds.append(bpfsys.link_netfilter(fds[0], family, hook, ours + 1))
                busy = f"; priority {ours} is busy: {instance.busy_cause(netns.inode(), ours)}"
    except OSError as e:
        denied = e.errno in (errno.EPERM, errno.EACCES, errno.EBUSY)
        return Check("netfilter", False,
                     f"BPF netfilter link: {refused(e)}" + ("" if denied else " (needs Linux 6.4+)"))
    return Check("netfilter", True, f"BPF_PROG_TYPE_NETFILTER links attach (this network namespace){busy}")


def check_ctnetlink() -> Check:
    from .ctnetlink import CtnetlinkError, DestroyEvents
    try:
        DestroyEvents(1 << 20).close()
    except (CtnetlinkError, OSError) as e:
        return Check("ctnetlink events", False, f"{e} (netfilter mode needs conntrack DESTROY events)")
    return Check("ctnetlink events", True, "DESTROY event group joined")


MODE_TRIES = {"fentry": try_fentry, "kprobe": try_kprobe, "netfilter": try_netfilter}


def prerequisites() -> list[Check]:
    """Checks that every mode needs; the probe cannot start if one fails."""
    checks = [check_privileges(), check_bcc()]
    if checks[1].ok:
        checks.append(check_headers())
    checks.append(check_btf())
    return checks


def choose_mode(requested: str = "auto") -> tuple[str | None, list[Check], str]:
    """(mode or None, the checks made, why).  `auto` takes the first mode of
    AUTO_ORDER that attaches; a forced mode is only checked."""
    checks = prerequisites()
    failed = [c for c in checks if not c.ok]
    if failed:
        return None, checks, "; ".join(f"{c.name}: {c.detail}" for c in failed)
    candidates = AUTO_ORDER if requested == "auto" else (requested,)
    for mode in candidates:
        check = MODE_TRIES[mode]()
        checks.append(check)
        if check.ok and mode == "netfilter":
            events = check_ctnetlink()
            checks.append(events)
            if not events.ok:
                continue
        if check.ok:
            skipped = [c.name for c in checks if c.name in MODES and not c.ok]
            why = f"{mode}: " + check.detail
            if requested == "auto" and skipped:
                why += f" (tried first: {', '.join(skipped)})"
            return mode, checks, why
    return None, checks, "no attach mode works here: " + "; ".join(
        f"{c.name}: {c.detail}" for c in checks if c.name in MODES or c.name == "ctnetlink events")
