"""The bpf(2) and perf_event_open(2) calls the agent makes itself, BCC
being only its compiler (probe/compiler.py): map reads and writes,
netfilter links (Linux 6.4+), kprobe attachment, single-syscall
lookup-and-delete of a hash map entry (5.14+) and syscall programs run
over mapped arrays (5.14+).

A netfilter link lives in the network namespace of the thread that creates
it and is removed when its file descriptor is closed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import socket
import struct
from pathlib import Path

BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45
_BPF_MAP_CREATE, _BPF_MAP_LOOKUP_ELEM, _BPF_MAP_UPDATE_ELEM, _BPF_MAP_GET_NEXT_KEY = 0, 1, 2, 4
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
_BPF_LINK_CREATE = 28
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)

NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_OUT = 3

# NF_IP_PRI_CONNTRACK and NF_IP6_PRI_CONNTRACK are both -200.
PRIORITY_AFTER_CONNTRACK = -199

# Where the probe sees every tracked packet once: conntrack runs at
# PRE_ROUTING (received and forwarded) and LOCAL_OUT (locally generated).
PROBE_HOOKS = [(family, hook) for family in (socket.AF_INET, socket.AF_INET6)
               for hook in (NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT)]


class _LinkCreateAttr(ctypes.Structure):
    # union bpf_attr, link_create member with its netfilter options.
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pf", ctypes.c_uint32),
        ("hooknum", ctypes.c_uint32),
        ("priority", ctypes.c_int32),
        ("nf_flags", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 96),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("_rest", ctypes.c_uint8 * 96),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64),
                ("_rest", ctypes.c_uint8 * 96)]


# struct bpf_prog_info: run_time_ns and run_cnt sit at fixed offsets of the
# stable UAPI struct (since Linux 5.1); the rest is not needed.
_PROG_INFO_SIZE = 232
_RUN_TIME_AT, _RUN_CNT_AT = 192, 200
# struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name, ...
_MAP_INFO_SIZE = 80

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def link_netfilter(prog_fd: int, family: int, hook: int,
                   priority: int = PRIORITY_AFTER_CONNTRACK) -> int:
    """Link a loaded netfilter program to one hook; returns the link fd."""
    attr = _LinkCreateAttr(prog_fd=prog_fd, attach_type=BPF_NETFILTER,
                           pf=family, hooknum=hook, priority=priority)
    fd, err = _bpf(_BPF_LINK_CREATE, attr)
    if fd < 0:
        family_name = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}.get(family, family)
        raise OSError(err, f"BPF netfilter link ({family_name} hook {hook}): {os.strerror(err)}")
    return fd


class MapEntryTaker:
    """Looks up and deletes hash-map entries by raw key bytes in one syscall."""

    def __init__(self, map_fd: int, key_size: int, value_size: int):
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)
        self._key_size = key_size
        self._attr = _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(self._key),
                                  value=ctypes.addressof(self._value))

    def take(self, key: bytes) -> bytes | None:
        """The entry's value, removed from the map; None if there was none."""
        ctypes.memmove(self._key, key, self._key_size)
        ret, err = _bpf(_BPF_MAP_LOOKUP_AND_DELETE_ELEM, self._attr)
        if ret < 0:
            if err == 2:   # ENOENT
                return None
            raise OSError(err, f"bpf map lookup-and-delete: {os.strerror(err)}")
        return self._value.raw


def update_elem(map_fd: int, key: bytes, value: bytes) -> None:
    """Set one map element (BPF_ANY)."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    ret, err = _bpf(_BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(k),
                                                       value=ctypes.addressof(v)))
    if ret < 0:
        raise OSError(err, f"bpf map update: {os.strerror(err)}")


def lookup_elem(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """One map element's value (value_size: per-CPU maps return one per possible CPU); None if absent."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    ret, err = _bpf(_BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(k),
                                                       value=ctypes.addressof(v)))
    if ret < 0:
        if err == 2:   # ENOENT
            return None
        raise OSError(err, f"bpf map lookup: {os.strerror(err)}")
    return v.raw


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map, walked with BPF_MAP_GET_NEXT_KEY."""
    key, next_key = ctypes.create_string_buffer(key_size), ctypes.create_string_buffer(key_size)
    attr = _MapElemAttr(map_fd=map_fd, key=0, value=ctypes.addressof(next_key))   # key 0: the first
    out: list[bytes] = []
    while True:
        ret, err = _bpf(_BPF_MAP_GET_NEXT_KEY, attr)
        if ret < 0:
            if err == 2:   # ENOENT: past the last
                return out
            raise OSError(err, f"bpf map get next key: {os.strerror(err)}")
        out.append(next_key.raw)
        ctypes.memmove(key, next_key, key_size)
        attr.key = ctypes.addressof(key)


def possible_cpus() -> int:
    """How many values a per-CPU map element has: the possible CPUs (e.g. "0-3"), as the kernel counts them."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


def map_max_entries(map_fd: int) -> int:
    """A map's max_entries (for a ring buffer: its data size in bytes)."""
    return map_shape(map_fd)["max_entries"]


class _MapCreateAttr(ctypes.Structure):
    # union bpf_attr, map_create member up to map_name.
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16), ("_rest", ctypes.c_uint8 * 96)]


# struct bpf_map_info's first fields, in order (all u32), then the name.
_MAP_SHAPE = ("map_type", "id", "key_size", "value_size", "max_entries", "map_flags")


def map_shape(map_fd: int) -> dict[str, int]:
    """What a map was created with: type, key and value sizes, max_entries, flags."""
    info = ctypes.create_string_buffer(_MAP_INFO_SIZE)
    attr = _InfoAttr(bpf_fd=map_fd, info_len=_MAP_INFO_SIZE, info=ctypes.addressof(info))
    ret, err = _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    if ret < 0:
        raise OSError(err, f"bpf map info: {os.strerror(err)}")
    shape = dict(zip(_MAP_SHAPE, struct.unpack_from("<6I", info.raw), strict=True))
    del shape["id"]
    return shape


def create_map(name: str, shape: dict[str, int]) -> int:
    """A new map of map_shape()'s shape; its fd."""
    attr = _MapCreateAttr(map_name=name.encode()[:15], **shape)
    fd, err = _bpf(_BPF_MAP_CREATE, attr)
    if fd < 0:
        raise OSError(err, f"bpf map {name}: {os.strerror(err)}")
    return fd


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run count, total run time ns) of a loaded program; both stay 0 unless
    kernel.bpf_stats_enabled=1."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=_PROG_INFO_SIZE, info=ctypes.addressof(info))
    ret, err = _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    if ret < 0:
        raise OSError(err, f"bpf prog info: {os.strerror(err)}")
    run_time = int.from_bytes(info.raw[_RUN_TIME_AT:_RUN_TIME_AT + 8], "little")
    run_cnt = int.from_bytes(info.raw[_RUN_CNT_AT:_RUN_CNT_AT + 8], "little")
    return run_cnt, run_time


# -- tiny programs loaded with bpf(2) itself (mode detection) ----------------------------
#
# Detection loads and attaches a program that returns at once, the way the
# probe's own programs would be: through BCC that means a clang compile per
# try (~0.2-0.4 s each, most of `conntracct run`'s start-up, bench P5);
# these few instructions need none.

BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY, BPF_TRACE_FEXIT = 24, 25
_BPF_PROG_LOAD = 5
_BPF_RAW_TRACEPOINT_OPEN = 17
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine, 298)
_PERF_FLAG_FD_CLOEXEC = 8
_PERF_EVENT_IOC_SET_BPF = 0x40042408
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe/type"


class _ProgLoadAttr(ctypes.Structure):
    # union bpf_attr, prog_load member (fields up to attach_prog_fd).
    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32), ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64), ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32), ("attach_prog_fd", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 64),
    ]


class _RawTracepointAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 116)]


class _PerfEventAttr(ctypes.Structure):
    # struct perf_event_attr up to config2 (PERF_ATTR_SIZE_VER1, 72 bytes) and zeros.
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64),
                ("_rest", ctypes.c_uint8 * 40)]


def _return(value: int) -> bytes:
    """r0 = value; exit."""
    return struct.pack("<BBhiBBhi", 0xB7, 0, 0, value, 0x95, 0, 0, 0)


def _kernel_version_code() -> int:
    """LINUX_VERSION_CODE of the running kernel (kprobe programs state it before Linux 5.0)."""
    parts = [int(p) for p in re.findall(r"\d+", os.uname().release)[:3]] + [0, 0, 0]
    return (parts[0] << 16) | (parts[1] << 8) | min(parts[2], 255)


def load_trivial(prog_type: int, value: int = 0, attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """Load a program that returns `value` at once; its fd (OSError with errno if refused)."""
    code = ctypes.create_string_buffer(_return(value), 16)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=2, insns=ctypes.addressof(code),
                         license=ctypes.addressof(license_), kern_version=_kernel_version_code(),
                         prog_name=b"conntracct_try", expected_attach_type=attach_type,
                         attach_btf_id=attach_btf_id)
    fd, err = _bpf(_BPF_PROG_LOAD, attr)
    if fd < 0:
        raise OSError(err, os.strerror(err))
    return fd


def attach_tracing(prog_fd: int) -> int:
    """Attach a loaded fentry/fexit program (BPF_RAW_TRACEPOINT_OPEN); the link fd."""
    fd, err = _bpf(_BPF_RAW_TRACEPOINT_OPEN, _RawTracepointAttr(prog_fd=prog_fd))
    if fd < 0:
        raise OSError(err, os.strerror(err))
    return fd


def has_kprobe_pmu() -> bool:
    """Whether kprobes attach through the kprobe PMU (Linux 4.17+) rather than tracefs."""
    return Path(KPROBE_PMU).exists()


def _retprobe_config() -> int:
    """The kprobe PMU's config bit that makes a kretprobe (its format file says "config:N")."""
    with open(Path(KPROBE_PMU).parent / "format" / "retprobe") as f:
        return 1 << int(f.read().strip().split(":")[1])


def attach_kprobe(prog_fd: int, function: str, retprobe: bool = False) -> int:
    """Attach a loaded kprobe program to `function` (its return with `retprobe`) through the
    kprobe PMU (Linux 4.17+, what BCC uses when it exists); the perf event fd, which detaches
    when closed: no tracefs, so an agent holding capabilities instead of root can do it."""
    with open(KPROBE_PMU) as f:
        pmu = int(f.read())
    name = ctypes.create_string_buffer(function.encode())
    attr = _PerfEventAttr(type=pmu, size=72, config=_retprobe_config() if retprobe else 0,
                          sample_period=1, wakeup_events=1, config1=ctypes.addressof(name))
    fd = _libc.syscall(_SYS_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(kprobe {function}): {os.strerror(err)}")
    if _libc.ioctl(fd, _PERF_EVENT_IOC_SET_BPF, prog_fd) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"attach to kprobe {function}: {os.strerror(err)}")
    return fd


# -- many flows' state taken in one syscall (netfilter mode's flow ends) ---------------
BPF_PROG_TYPE_SYSCALL = 31
BPF_F_SLEEPABLE = 1 << 4     # the kernel runs syscall programs only as sleepable ones
_BPF_PROG_TEST_RUN = 10


class _TestRunAttr(ctypes.Structure):
    # union bpf_attr, test member.
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 64),
    ]


def _map_array(map_fd: int, size: int) -> mmap.mmap:
    """A BPF_F_MMAPABLE array map's values, mapped read-write (size: bytes used)."""
    return mmap.mmap(map_fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.MAP_SHARED,
                     mmap.PROT_READ | mmap.PROT_WRITE)


class BatchTaker:
    """Looks up and deletes many hash-map entries with one bpf() call each
    `batch`: a syscall program (take_flow_states in bpf/conntracct.c) runs
    over keys written into one mapped array and answers in another, each
    slot a value and a found word.  Sizes are the elements' (arrays hold
    them 8-byte aligned)."""

    def __init__(self, prog_fd: int, keys_fd: int, slots_fd: int, batch: int, key_size: int,
                 value_size: int, found_at: int, slot_size: int):
        self._key_step, self._slot_step = -(-key_size // 8) * 8, -(-slot_size // 8) * 8
        self._keys = _map_array(keys_fd, batch * self._key_step)
        self._slots = _map_array(slots_fd, batch * self._slot_step)
        self._batch, self._key_size, self._value_size, self._found_at = batch, key_size, value_size, found_at
        self._count = ctypes.c_uint32()
        self._attr = _TestRunAttr(prog_fd=prog_fd, ctx_size_in=ctypes.sizeof(self._count),
                                  ctx_in=ctypes.addressof(self._count))

    def take(self, keys: list[bytes]) -> list[bytes | None]:
        """Each key's value, removed from the map; None where there was none."""
        out: list[bytes | None] = []
        keys_area, slots, key_step, slot_step = self._keys, self._slots, self._key_step, self._slot_step
        for first in range(0, len(keys), self._batch):
            chunk = keys[first:first + self._batch]
            at = 0
            for key in chunk:
                keys_area[at:at + self._key_size] = key
                at += key_step
            self._count.value = len(chunk)
            ret, err = _bpf(_BPF_PROG_TEST_RUN, self._attr)
            if ret < 0:
                raise OSError(err, f"bpf prog test run (take flow states): {os.strerror(err)}")
            found_at, size = self._found_at, self._value_size
            for at in range(0, len(chunk) * slot_step, slot_step):
                out.append(slots[at:at + size] if slots[at + found_at] else None)
        return out

    def close(self) -> None:
        self._keys.close()
        self._slots.close()


def load_program(prog_type: int, insns: bytes, name: bytes, flags: int = 0, attach_type: int = 0) -> int:
    """Load compiled instructions (map fds already in them, as BCC leaves
    them); the program's fd, or OSError with the verifier's last words."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
                         license=ctypes.addressof(license_), prog_flags=flags, prog_name=name[:15],
                         expected_attach_type=attach_type, kern_version=_kernel_version_code())
    fd, err = _bpf(_BPF_PROG_LOAD, attr)
    if fd < 0:     # again, with the verifier's log
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
        fd, err = _bpf(_BPF_PROG_LOAD, attr)
    if fd < 0:
        last = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise OSError(err, f"{os.strerror(err)}{': ' + ' / '.join(last) if last else ''}")
    return fd
