"""bpf(2) calls BCC 0.26 has no API for: netfilter links (Linux 6.4+) and
single-syscall lookup-and-delete of a hash map entry (5.14+).

A netfilter link lives in the network namespace of the thread that creates
it and is removed when its file descriptor is closed.
"""

from __future__ import annotations

import ctypes
import os
import socket

BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45
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
