"""Compile the C probe with BCC, attach it in one mode, and read its records."""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ATTACH_MODES, ProbeConfig
from . import bpfsys
from .btf import kernel_btf
from .layout import DEFINES, STRUCTS
from .offsets import kernel_offsets
from .record import FLOW_KEY, FLOW_STATE, RECORD, STAT_NAMES, FlowState

log = logging.getLogger(__name__)

PROBE_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "conntracct.c"
MODES = ATTACH_MODES
REFRESH_FUNC = "__nf_ct_refresh_acct"
# The flow-end hook: the conntrack destructor, called exactly once per entry
# when its last reference goes, whatever ended it (timeout, gc, flush, early
# drop, an unconfirmed entry's packet dropped).  nf_ct_put() calls it directly;
# only a last reference held by an skb goes through the vmlinux wrapper
# nf_conntrack_destroy() (nf_conntrack_put -> nf_ct_hook->destroy), so hooking
# that wrapper would miss the entries the table itself frees.  Measured on
# Debian's 6.1 by tests/integration/test_flow_end_hook.py (./tasks.py vm-test):
# confirmed entries ended by flush, timeout and early drop reach nf_ct_destroy
# and not the wrapper; unconfirmed entries dropped in FORWARD reach both.
# account() ignores unconfirmed entries at both ends, so NEW and DESTROY stay
# paired.  destroy_conntrack is the destructor's name before Linux 5.19.
DESTROY_FUNCS = ("nf_ct_destroy", "destroy_conntrack")

# Indexes of the probe's `settings` array (bpf/record.h).
SET_WALL_OFFSET, SET_AGENT_START, SET_STAMPED_SINCE_START, SET_QUIET_KINDS = (
    DEFINES["SET_WALL_OFFSET"], DEFINES["SET_AGENT_START"], DEFINES["SET_STAMPED_SINCE_START"],
    DEFINES["SET_QUIET_KINDS"])


class ProbeError(Exception):
    """The probe could not be compiled, loaded or attached; the message says why."""


def explain(e: BaseException) -> str:
    """BCC's error as one line a user can act on."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    if "super-user" in text and os.geteuid() == 0:
        # BCC's words for any EPERM; as root that is the kernel's refusal.
        lockdown = Path("/sys/kernel/security/lockdown")
        why = (f"lockdown: {lockdown.read_text().strip()}" if lockdown.exists()
               else "kernel lockdown or no BPF trampolines?")
        text = f"the kernel refused to load it (EPERM) although running as root ({why})"
    return text


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe is compiled with, in its units.  No defaults here: they
    live in the configuration (config.ProbeConfig), and every probe -- the
    agent's, the tests', the benchmarks' -- is set up from one."""
    rate_curve: list[tuple[int, int]]    # [(age_ns, interval_ns), ...]
    final_interval_ns: int
    max_flows: int
    ringbuf_pages: int

    @classmethod
    def from_config(cls, probe: ProbeConfig | None = None) -> ProbeSettings:
        """From the configuration's probe section (its defaults without one)."""
        probe = probe if probe is not None else ProbeConfig()
        curve, final = probe.rate_curve_ns()
        return cls(rate_curve=curve, final_interval_ns=final, max_flows=probe.max_flows,
                   ringbuf_pages=probe.ringbuf_pages)


def rate_curve_macro(curve: list[tuple[int, int]], final_ns: int) -> str:
    """RATE_CURVE(age) as nested conditionals, e.g. age < 60s ? 20s : ... : 300s."""
    expr = f"{final_ns}ULL"
    for age_ns, every_ns in reversed(curve):
        expr = f"((age) < {age_ns}ULL ? {every_ns}ULL : {expr})"
    return f"RATE_CURVE(age)={expr}"


def destroy_func() -> str:
    """The conntrack destructor this kernel has (named by /proc/kallsyms).
    Read here rather than with BPF.ksymname(): /proc/kallsyms lists names to
    every user, but BCC only reads it as uid 0, so an agent running with
    capabilities instead of root would find no destructor."""
    wanted = set(DESTROY_FUNCS)
    with open("/proc/kallsyms") as kallsyms:
        found = {name for name in (line.split(maxsplit=3)[2] for line in kallsyms) if name in wanted}
    for name in DESTROY_FUNCS:
        if name in found:
            return name
    raise ProbeError(f"none of the conntrack destructors {DESTROY_FUNCS} is in /proc/kallsyms")


def fentry_unreachable(destroy: str) -> str | None:
    """Why BCC cannot attach fentry/fexit to the probe's targets here, or None.

    BCC's KFUNC_PROBE/KRETFUNC_PROBE (0.26, Debian 12's) resolve their target
    in vmlinux BTF only; a function of a module (nf_conntrack built as one, its
    functions described by split BTF) needs BCC's MODULE_KFUNC_PROBE
    (iovisor/bcc#4597, 2023), which this probe does not use."""
    import bcc
    btf = kernel_btf()
    homes = {name: btf.func_origin(name) for name in (REFRESH_FUNC, destroy)}
    missing = [name for name, home in homes.items() if home is None]
    if missing:
        return (f"{' and '.join(missing)} not in kernel BTF (inlined or renamed?): "
                "fentry/fexit need a BTF-described function")
    in_modules = sorted({home for home in homes.values() if home != "vmlinux"})
    if not in_modules:
        return None
    names = " and ".join(name for name, home in homes.items() if home != "vmlinux")
    return (f"{names} {'are' if ' and ' in names else 'is'} in module {', '.join(in_modules)}, not vmlinux: "
            f"BCC {getattr(bcc, '__version__', '?')} cannot reach a module function with fentry/fexit "
            "(it looks targets up in vmlinux BTF only)")


TRACEFS = Path("/sys/kernel/tracing")


def has_kprobe_events() -> bool:
    """Whether tracefs offers kprobe_events.  Tracefs is root's (mode 0700): an agent
    running with capabilities instead of root cannot look in, so a refusal means
    it is there (the attach goes through the kprobe PMU anyway)."""
    for path in (TRACEFS / "kprobe_events", Path("/sys/kernel/debug/tracing/kprobe_events")):
        try:
            if path.exists():
                return True
        except PermissionError:
            return True
    return False


def ensure_tracefs() -> None:
    """BCC attaches kprobes through the perf PMU but detaches them through
    tracefs (kprobe_events), and fails without it.  `ip netns exec` remounts
    /sys for the namespace, leaving /sys/kernel/tracing empty: mount tracefs
    there (in the caller's mount namespace, private under `ip netns exec`)."""
    if has_kprobe_events():
        return
    if not TRACEFS.is_dir() or os.path.ismount(TRACEFS):
        return      # no tracefs, or one without kprobes: the attach error says so
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", str(TRACEFS).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        log.warning("cannot mount tracefs at %s (%s): kprobes cannot be detached", TRACEFS, os.strerror(err))
    else:
        log.info("mounted tracefs at %s (BCC needs it for kprobes)", TRACEFS)


def wall_offset_ns() -> int:
    """Wall clock minus CLOCK_MONOTONIC (bpf_ktime_get_ns), in ns."""
    return time.time_ns() - time.monotonic_ns()


def cflags(mode: str, settings: ProbeSettings, destroy: str = DESTROY_FUNCS[0]) -> list[str]:
    offsets = kernel_offsets(kernel_btf())
    flags = [f"-D{name}={value}" for name, value in sorted(offsets.items())]
    # -I: bpf/conntracct.c includes the record layout, bpf/record.h.
    flags += [f"-I{PROBE_SOURCE.parent}", f"-DMODE_{mode.upper()}", f"-DMAX_FLOWS={settings.max_flows}",
              f"-DRINGBUF_PAGES={settings.ringbuf_pages}", f"-DDESTROY_FUNC={destroy}",
              "-D" + rate_curve_macro(settings.rate_curve, settings.final_interval_ns)]
    return flags


def compile_probe(mode: str, settings: ProbeSettings, destroy: str = DESTROY_FUNCS[0]):
    """BCC-compile the probe for one mode (fentry programs attach on load)."""
    from bcc import BPF
    if mode == "fentry":
        why = fentry_unreachable(destroy)
        if why:
            raise ProbeError(f"fentry probe: {why}")
    try:
        return BPF(src_file=str(PROBE_SOURCE).encode(), cflags=cflags(mode, settings, destroy))
    except Exception as e:   # BCC raises bare Exception for compile and attach failures
        raise ProbeError(f"{mode} probe: {explain(e)}") from None


class Probe:
    """The attached probe, in typed calls: consume() hands each raw record
    to `on_record`; the per-flow state map, the counters and the programs
    are read through the methods below (nobody else touches BCC's tables)."""

    def __init__(self, mode: str, settings: ProbeSettings, on_record, stamped_since_start: bool,
                 quiet_kinds: bytes = b""):
        if mode not in MODES:
            raise ProbeError(f"unknown probe mode '{mode}'")
        self.mode = mode
        self._links: list[int] = []
        self._batch_taker: bpfsys.BatchTaker | None = None
        self.wall_offset_ns = wall_offset_ns()
        self._bpf = None
        destroy = destroy_func() if mode != "netfilter" else DESTROY_FUNCS[0]
        self._bpf = compile_probe(mode, settings, destroy)
        try:
            self._configure(stamped_since_start, quiet_kinds)
            self._attach(destroy)
            self._records = self._bpf["records"]
            self.ring_fd = self._records.map_fd
            self._records.open_ring_buffer(self._callback_for(on_record))
        except Exception:
            self.close()
            raise
        self._stats = self._bpf["stats"]
        self._flows = self._bpf["flows"]
        self._taker = bpfsys.MapEntryTaker(self._flows.map_fd, FLOW_KEY.size, FLOW_STATE.size)
        self._batch_taker = self._load_batch_taker() if mode == "netfilter" else None

    # -- set-up ---------------------------------------------------------------
    def _configure(self, stamped_since_start: bool, quiet_kinds: bytes) -> None:
        """quiet_kinds: the kind codes (NEW, UPDATE) no sink wants, of which the probe writes no record."""
        settings = self._bpf["settings"]
        settings[ctypes.c_int(SET_QUIET_KINDS)] = ctypes.c_uint64(sum(1 << k for k in set(quiet_kinds)))
        settings[ctypes.c_int(SET_WALL_OFFSET)] = ctypes.c_uint64(self.wall_offset_ns)
        settings[ctypes.c_int(SET_AGENT_START)] = ctypes.c_uint64(time.time_ns())
        settings[ctypes.c_int(SET_STAMPED_SINCE_START)] = ctypes.c_uint64(int(stamped_since_start))

    def _attach(self, destroy: str) -> None:
        b = self._bpf
        try:
            if self.mode == "netfilter":
                fn = b.load_func(b"netfilter_hook", bpfsys.BPF_PROG_TYPE_NETFILTER,
                                 attach_type=bpfsys.BPF_NETFILTER)
                for family, hook in bpfsys.PROBE_HOOKS:
                    self._links.append(bpfsys.link_netfilter(fn.fd, family, hook))
            elif self.mode == "kprobe" and bpfsys.has_kprobe_pmu():
                for function, program, retprobe in ((REFRESH_FUNC, b"refresh_enter", False),
                                                    (REFRESH_FUNC, b"refresh_return", True),
                                                    (destroy, b"flow_destroy", False)):
                    fn = b.load_func(program, bpfsys.BPF_PROG_TYPE_KPROBE)
                    self._links.append(bpfsys.attach_kprobe(fn.fd, function, retprobe))
            elif self.mode == "kprobe":     # no kprobe PMU (before 4.17): BCC's tracefs path
                ensure_tracefs()
                b.attach_kprobe(event=REFRESH_FUNC.encode(), fn_name=b"refresh_enter")
                b.attach_kretprobe(event=REFRESH_FUNC.encode(), fn_name=b"refresh_return")
                b.attach_kprobe(event=destroy.encode(), fn_name=b"flow_destroy")
            # fentry programs were attached by BCC when it loaded them.
        except Exception as e:
            raise ProbeError(f"{self.mode} probe: attach failed: {explain(e)}") from None

    def _load_batch_taker(self) -> bpfsys.BatchTaker | None:
        """The take_flow_states program and its arrays (netfilter mode: the
        agent ends flows); None, and a flow at a time, if the kernel refuses it."""
        slot = STRUCTS["take_slot"]
        try:
            fd = bpfsys.load_program(bpfsys.BPF_PROG_TYPE_SYSCALL, self._bpf.dump_func(b"take_flow_states"),
                                     b"take_flow_states", bpfsys.BPF_F_SLEEPABLE)
        except OSError as e:
            log.info("flow states taken one syscall per flow: the batch program was refused (%s)", e)
            return None
        self._links.append(fd)    # closed with the probe
        return bpfsys.BatchTaker(fd, self._bpf["take_keys"].map_fd, self._bpf["take_slots"].map_fd,
                                 DEFINES["TAKE_BATCH"], FLOW_KEY.size, FLOW_STATE.size,
                                 slot.offset("found"), slot.size)

    @staticmethod
    def _callback_for(on_record):
        size = RECORD.size

        def callback(_ctx, data, _size):
            on_record(ctypes.string_at(data, size))
            return 0
        return callback

    # -- running --------------------------------------------------------------
    def consume(self) -> None:
        """Hand over every record queued now, without waiting."""
        self._bpf.ring_buffer_consume()

    def take_flow_state(self, key: bytes) -> FlowState | None:
        """Remove a flow's kernel-side state (key: a struct flow_key) and return it."""
        raw = self._taker.take(key)
        return FlowState.unpack(raw) if raw is not None else None

    @property
    def takes_in_batches(self) -> bool:
        """True when take_flow_states() needs a syscall per batch, not per flow."""
        return self._batch_taker is not None

    def take_flow_states(self, keys: list[bytes]) -> list[FlowState | None]:
        """take_flow_state() of many flows, in a syscall per TAKE_BATCH where the kernel allows."""
        if self._batch_taker is None:
            return [self.take_flow_state(key) for key in keys]
        unpack = FlowState.unpack
        return [unpack(raw) if raw is not None else None for raw in self._batch_taker.take(keys)]

    def flow_keys(self) -> list[bytes]:
        """The keys (struct flow_key) of every flow the probe holds state for."""
        return [bytes(k) for k in self._flows.keys()]

    def stats(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(STAT_NAMES):
            out[name] = int(sum(self._stats[ctypes.c_int(i)]))
        return out

    def program_stats(self) -> dict[str, dict[str, int]]:
        """Per attached program: run count and run time (kernel.bpf_stats_enabled=1)."""
        out = {}
        for name, fn in self._bpf.funcs.items():
            runs, ns = bpfsys.prog_run_stats(fn.fd)
            out[name.decode() if isinstance(name, bytes) else name] = {"run_cnt": runs, "run_time_ns": ns}
        return out

    def close(self) -> None:
        if self._batch_taker is not None:
            self._batch_taker.close()
            self._batch_taker = None
        for fd in self._links:
            os.close(fd)
        self._links.clear()
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
