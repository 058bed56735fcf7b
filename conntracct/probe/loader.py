"""Build the C probe (BCC, in a child: compiler.py), attach it in one mode, and read its records."""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import ATTACH_MODES, ProbeConfig
from . import bpfsys, image
from ._ring import Ring
from .btf import kernel_btf
from .compiler import Compiled, CompileError, Request, bcc_version, compile_and_load, from_image, header_tree
from .layout import DEFINES, STRUCTS
from .offsets import kernel_offsets
from .record import FLOW_KEY, FLOW_STATE, STAT_NAMES, FlowState

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


def lockdown_refusal() -> str:
    """An EPERM for root: the kernel itself refused (lockdown, or no BPF trampolines)."""
    lockdown = Path("/sys/kernel/security/lockdown")
    why = (f"lockdown: {lockdown.read_text().strip()}" if lockdown.exists()
           else "kernel lockdown or no BPF trampolines?")
    return f"the kernel refused to load it (EPERM) although running as root ({why})"


def explain(text: str) -> str:
    """BCC's words for a failure (its last line), as one line a user can act on."""
    text = (text.strip().splitlines() or ["unknown error"])[-1][:200]
    if "super-user" in text and os.geteuid() == 0:
        return lockdown_refusal()   # BCC's words for any EPERM; as root that is the kernel's refusal
    return text


def refused(err: OSError) -> str:
    """A bpf() or perf_event_open() refusal as one line a user can act on."""
    if err.errno == errno.EPERM and os.geteuid() == 0:
        return lockdown_refusal()
    return err.strerror or str(err)


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe is compiled with, in its units.  No defaults here: they
    live in the configuration (config.ProbeConfig), and every probe -- the
    agent's, the tests', the benchmarks' -- is set up from one."""
    rate_curve: list[tuple[int, int]]    # [(age_ns, interval_ns), ...]
    final_interval_ns: int
    max_flows: int
    ringbuf_pages: int
    cache_dir: str      # probe images (probe/image.py); "": none

    @classmethod
    def from_config(cls, probe: ProbeConfig | None = None) -> ProbeSettings:
        """From the configuration's probe section (its defaults without one)."""
        probe = probe if probe is not None else ProbeConfig()
        curve, final = probe.rate_curve_ns()
        return cls(rate_curve=curve, final_interval_ns=final, max_flows=probe.max_flows,
                   ringbuf_pages=probe.ringbuf_pages, cache_dir=probe.cache_dir)


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
            f"BCC {bcc_version()} cannot reach a module function with fentry/fexit "
            "(it looks targets up in vmlinux BTF only)")


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


# Each mode's programs: (function, program type, expected attach type or -1).
# fentry's are BCC's KFUNC_PROBE/KRETFUNC_PROBE, which it loads and attaches as it compiles.
MODE_PROGRAMS = {
    "netfilter": [("netfilter_hook", bpfsys.BPF_PROG_TYPE_NETFILTER, bpfsys.BPF_NETFILTER)],
    "kprobe": [(name, bpfsys.BPF_PROG_TYPE_KPROBE, -1) for name in ("refresh_enter", "refresh_return", "flow_destroy")],
    "fentry": [],
}
# netfilter mode's flow ends: the syscall program that takes flow states in batches, and its arrays.
BATCH_PROGRAM = "take_flow_states"
MAPS = {mode: ["records", "flows", "stats", "settings"] + (["take_keys", "take_slots"] if mode == "netfilter" else [])
        for mode in MODES}
RING_TAKE_LIMIT = 4096     # records per Ring.take(): bounds the list a backlog makes at once


def kprobe_targets(destroy: str) -> dict[str, tuple[str, bool]]:
    """kprobe mode: each program's kernel function, and whether it runs at its return."""
    return {"refresh_enter": (REFRESH_FUNC, False), "refresh_return": (REFRESH_FUNC, True),
            "flow_destroy": (destroy, False)}


def compile_probe(mode: str, settings: ProbeSettings, destroy: str = DESTROY_FUNCS[0]) -> Compiled:
    """BCC-compile the probe for one mode and load its programs (fentry's
    attach as they load), or load the image a previous compile kept."""
    if mode == "fentry":
        why = fentry_unreachable(destroy)
        if why:
            raise ProbeError(f"fentry probe: {why}")
    request = Request(source=str(PROBE_SOURCE), cflags=cflags(mode, settings, destroy),
                      programs=MODE_PROGRAMS[mode], maps=MAPS[mode], autoattached=mode == "fentry",
                      sleepable=[(BATCH_PROGRAM, bpfsys.BPF_PROG_TYPE_SYSCALL)] if mode == "netfilter" else [])
    if settings.cache_dir and not request.autoattached:
        sources = [*PROBE_SOURCE.parent.glob("*.c"), *PROBE_SOURCE.parent.glob("*.h")]
        image_key = image.key(request.__dict__, sources, header_tree(), bcc_version())
        kept = image.read(settings.cache_dir, image_key)
        if kept is not None:
            try:
                return from_image(kept, request)
            except (OSError, ValueError) as e:
                log.warning("%s probe: the kept image was not loaded (%s): compiling", mode, e)
        request = replace(request, image_dir=settings.cache_dir, image_key=image_key)
    try:
        return compile_and_load(request)
    except (CompileError, OSError) as e:
        raise ProbeError(f"{mode} probe: {explain(str(e))}") from None


class Probe:
    """The attached probe, in typed calls: consume() hands each raw record
    to `on_record`; the per-flow state map, the counters and the programs
    are read through the methods below (nobody else touches its maps)."""

    def __init__(self, mode: str, settings: ProbeSettings, on_record, stamped_since_start: bool,
                 quiet_kinds: bytes = b""):
        if mode not in MODES:
            raise ProbeError(f"unknown probe mode '{mode}'")
        self.mode = mode
        self._links: list[int] = []
        self._ring: Ring | None = None
        self._batch_taker: bpfsys.BatchTaker | None = None
        self._on_record = on_record
        self.wall_offset_ns = wall_offset_ns()
        destroy = destroy_func() if mode != "netfilter" else DESTROY_FUNCS[0]
        self._loaded = compile_probe(mode, settings, destroy)
        maps = self._loaded.maps
        try:
            self._configure(stamped_since_start, quiet_kinds)
            self._attach(destroy)
            self.ring_fd = maps["records"]
            self._ring = Ring(self.ring_fd, bpfsys.map_max_entries(self.ring_fd))
        except Exception:
            self.close()
            raise
        self._stats_size = 8 * bpfsys.possible_cpus()
        self._taker = bpfsys.MapEntryTaker(maps["flows"], FLOW_KEY.size, FLOW_STATE.size)
        self._batch_taker = self._load_batch_taker() if mode == "netfilter" else None

    # -- set-up ---------------------------------------------------------------
    def _configure(self, stamped_since_start: bool, quiet_kinds: bytes) -> None:
        """quiet_kinds: the kind codes (NEW, UPDATE) no sink wants, of which the probe writes no record."""
        values = {SET_QUIET_KINDS: sum(1 << k for k in set(quiet_kinds)), SET_WALL_OFFSET: self.wall_offset_ns,
                  SET_AGENT_START: time.time_ns(), SET_STAMPED_SINCE_START: int(stamped_since_start)}
        for index, value in values.items():
            bpfsys.update_elem(self._loaded.maps["settings"], struct.pack("<I", index), struct.pack("<Q", value))

    def _attach(self, destroy: str) -> None:
        programs = self._loaded.programs
        try:
            if self.mode == "netfilter":
                for family, hook in bpfsys.PROBE_HOOKS:
                    self._links.append(bpfsys.link_netfilter(programs["netfilter_hook"], family, hook))
            elif self.mode == "kprobe":
                if not bpfsys.has_kprobe_pmu():
                    raise OSError(errno.ENOTSUP, "no kprobe PMU (Linux 4.17+)")
                for program, (function, retprobe) in kprobe_targets(destroy).items():
                    self._links.append(bpfsys.attach_kprobe(programs[program], function, retprobe))
            # fentry programs were attached by BCC when it loaded them.
        except OSError as e:
            raise ProbeError(f"{self.mode} probe: attach failed: {refused(e)}") from None

    def _load_batch_taker(self) -> bpfsys.BatchTaker | None:
        """The take_flow_states program and its arrays (netfilter mode: the
        agent ends flows); None, and a flow at a time, if the kernel refused it."""
        if BATCH_PROGRAM in self._loaded.refused:
            log.info("flow states taken one syscall per flow: the batch program was refused (%s)",
                     self._loaded.refused[BATCH_PROGRAM])
            return None
        slot, maps = STRUCTS["take_slot"], self._loaded.maps
        return bpfsys.BatchTaker(self._loaded.programs[BATCH_PROGRAM], maps["take_keys"], maps["take_slots"],
                                 DEFINES["TAKE_BATCH"], FLOW_KEY.size, FLOW_STATE.size,
                                 slot.offset("found"), slot.size)

    # -- running --------------------------------------------------------------
    def consume(self) -> None:
        """Hand over every record queued now, without waiting."""
        take, on_record = self._ring.take, self._on_record
        while True:
            batch = take(RING_TAKE_LIMIT)
            for raw in batch:
                on_record(raw)
            if len(batch) < RING_TAKE_LIMIT:
                return

    def take_flow_state(self, key: bytes) -> FlowState | None:
        """Remove a flow's kernel-side state (key: a struct flow_key) and return it."""
        raw = self._taker.take(key)
        return FlowState.unpack(raw) if raw is not None else None

    @property
    def takes_in_batches(self) -> bool:
        """True when take_flow_states() needs a syscall per batch, not per flow."""
        return self._batch_taker is not None

    def take_raw_states(self, keys: list[bytes]) -> list[bytes | None]:
        """Many flows' states (struct flow_state, or None), removed, in a syscall per TAKE_BATCH
        where the kernel allows."""
        if self._batch_taker is None:
            return [self._taker.take(key) for key in keys]
        return self._batch_taker.take(keys)

    def take_flow_states(self, keys: list[bytes]) -> list[FlowState | None]:
        """take_flow_state() of many flows."""
        unpack = FlowState.unpack
        return [unpack(raw) if raw is not None else None for raw in self.take_raw_states(keys)]

    def flow_keys(self) -> list[bytes]:
        """The keys (struct flow_key) of every flow the probe holds state for."""
        return bpfsys.map_keys(self._loaded.maps["flows"], FLOW_KEY.size)

    def stats(self) -> dict[str, int]:
        """The probe's counters (a per-CPU array: each summed over the CPUs)."""
        out = {}
        for i, name in enumerate(STAT_NAMES):
            raw = bpfsys.lookup_elem(self._loaded.maps["stats"], struct.pack("<I", i), self._stats_size) or b""
            out[name] = sum(v for (v,) in struct.iter_unpack("<Q", raw))
        return out

    def program_stats(self) -> dict[str, dict[str, int]]:
        """Per attached program: run count and run time (kernel.bpf_stats_enabled=1)."""
        out = {}
        for name, fd in self._loaded.programs.items():
            if name != BATCH_PROGRAM:
                runs, ns = bpfsys.prog_run_stats(fd)
                out[name] = {"run_cnt": runs, "run_time_ns": ns}
        return out

    def close(self) -> None:
        if self._batch_taker is not None:
            self._batch_taker.close()
            self._batch_taker = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for fd in self._links:
            os.close(fd)
        self._links.clear()
        self._loaded.close()
