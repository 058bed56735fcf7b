"""A lean ctnetlink client: conntrack DESTROY events, table dumps and flushes.

Hand-written rather than pyroute2: pyroute2 0.9.7 parsed conntrack messages
20-60x slower than `conntrack -L` and its event reader lost most of a 50k
burst (ENOBUFS); that comparison was measured once and is not kept.
bench/sweep_cost.py times this client's table dump and GETs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass
from operator import itemgetter

from ._ctends import parse_ends

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_CONNTRACK_DESTROY = 3
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLA_F_NESTED = 0x8000

# enum ctattr_type and its nested enums (include/uapi/linux/netfilter/nfnetlink_conntrack.h)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID, CTA_ZONE, CTA_TIMESTAMP = 8, 9, 10, 12, 18, 20
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1

_NLMSGHDR = struct.Struct("=IHHII")
_NLMSG_LEN_TYPE = struct.Struct("=IH")
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_U16BE, _U32BE, _U64BE = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_NLA_TYPE_MASK = 0x3FFF   # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

RECV_BUFFER = 1 << 20


class CtnetlinkError(OSError):
    pass


@dataclass(slots=True)
class CtTuple:
    src: bytes = b""
    dst: bytes = b""
    proto: int = 0
    src_u: int = 0      # port, or ICMP id
    dst_u: int = 0      # port, or ICMP type << 8 | code


@dataclass(slots=True)
class CtEntry:
    """One conntrack entry as ctnetlink reports it."""
    family: int          # AF_INET or AF_INET6
    orig: CtTuple
    reply: CtTuple
    status: int = 0
    mark: int = 0
    zone: int = 0
    ct_id: int = 0
    tcp_state: int = 0
    counters: tuple[int, int, int, int] | None = None   # orig pkts, orig bytes, reply pkts, reply bytes
    start_ns: int = 0
    stop_ns: int = 0


def _attrs(buf: memoryview, pos: int, end: int):
    """Yield (type, payload offset, payload end) of the netlink attributes in buf[pos:end]."""
    unpack = _NLA.unpack_from
    while pos + 4 <= end:
        length, kind = unpack(buf, pos)
        if length < 4:
            break
        yield kind & _NLA_TYPE_MASK, pos + 4, pos + length
        pos += (length + 3) & ~3


def _parse_tuple(buf: memoryview, pos: int, end: int) -> CtTuple:
    t = CtTuple()
    for kind, a, b in _attrs(buf, pos, end):
        if kind == CTA_TUPLE_IP:
            for ip_kind, c, d in _attrs(buf, a, b):
                if ip_kind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    t.src = bytes(buf[c:d])
                elif ip_kind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    t.dst = bytes(buf[c:d])
        elif kind == CTA_TUPLE_PROTO:
            for p_kind, c, _ in _attrs(buf, a, b):
                if p_kind == CTA_PROTO_NUM:
                    t.proto = buf[c]
                elif p_kind in (CTA_PROTO_SRC_PORT, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                    t.src_u = _U16BE.unpack_from(buf, c)[0]
                elif p_kind in (CTA_PROTO_DST_PORT,):
                    t.dst_u = _U16BE.unpack_from(buf, c)[0]
                elif p_kind in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    t.dst_u = (buf[c] << 8) | (t.dst_u & 0xFF)
                elif p_kind in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE):
                    t.dst_u = (t.dst_u & 0xFF00) | buf[c]
    return t


def _parse_counters(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    packets = nbytes = 0
    for kind, a, _ in _attrs(buf, pos, end):
        if kind == CTA_COUNTERS_PACKETS:
            packets = _U64BE.unpack_from(buf, a)[0]
        elif kind == CTA_COUNTERS_BYTES:
            nbytes = _U64BE.unpack_from(buf, a)[0]
    return packets, nbytes


def walk_entry(buf: memoryview, pos: int, end: int, family: int) -> CtEntry:
    """The attributes of one IPCTNL_MSG_CT_* message body (after nfgenmsg), one by one."""
    e = CtEntry(family, CtTuple(), CtTuple())
    orig_c = reply_c = None
    for kind, a, b in _attrs(buf, pos, end):
        if kind == CTA_TUPLE_ORIG:
            e.orig = _parse_tuple(buf, a, b)
        elif kind == CTA_TUPLE_REPLY:
            e.reply = _parse_tuple(buf, a, b)
        elif kind == CTA_STATUS:
            e.status = _U32BE.unpack_from(buf, a)[0]
        elif kind == CTA_MARK:
            e.mark = _U32BE.unpack_from(buf, a)[0]
        elif kind == CTA_ZONE:
            e.zone = _U16BE.unpack_from(buf, a)[0]
        elif kind == CTA_ID:
            e.ct_id = _U32BE.unpack_from(buf, a)[0]
        elif kind == CTA_COUNTERS_ORIG:
            orig_c = _parse_counters(buf, a, b)
        elif kind == CTA_COUNTERS_REPLY:
            reply_c = _parse_counters(buf, a, b)
        elif kind == CTA_TIMESTAMP:
            for t_kind, c, _ in _attrs(buf, a, b):
                if t_kind == CTA_TIMESTAMP_START:
                    e.start_ns = _U64BE.unpack_from(buf, c)[0]
                elif t_kind == CTA_TIMESTAMP_STOP:
                    e.stop_ns = _U64BE.unpack_from(buf, c)[0]
        elif kind == CTA_PROTOINFO:
            for p_kind, c, d in _attrs(buf, a, b):
                if p_kind == CTA_PROTOINFO_TCP:
                    for tcp_kind, f, _ in _attrs(buf, c, d):
                        if tcp_kind == CTA_PROTOINFO_TCP_STATE:
                            e.tcp_state = buf[f]
    if orig_c and reply_c:
        e.counters = (orig_c[0], orig_c[1], reply_c[0], reply_c[1])
    return e


# -- reading messages by their layout ----------------------------------------------------
#
# Walking a message's attributes one by one (walk_entry) costs ~12 µs in
# Python: the agent's largest cost per finished flow after the JSON encoding
# (bench/p6_profile.py).  The kernel lays out every message of one kind alike
# (the same attributes, in the same order, of the same sizes), so the
# messages of one length and family nearly always share one layout.  The
# first of them is walked once to learn it: where each attribute header sits
# and where the wanted values are.  Any later message of that length and
# family is then read with two struct unpacks: its attribute headers
# (length and type, which tile the message) are checked against the
# learnt ones; when they are the same, the layout is the same, and the
# values are read in one go.  When they differ, or the layout holds what
# the walk composes (ICMP type and code) or repeats, the message is walked.

_LEAVES: dict[tuple[int, ...], tuple[str, str]] = {}
for _side, _top in (("o", CTA_TUPLE_ORIG), ("r", CTA_TUPLE_REPLY)):
    for _v4, _v6, _name in ((CTA_IP_V4_SRC, CTA_IP_V6_SRC, "src"), (CTA_IP_V4_DST, CTA_IP_V6_DST, "dst")):
        _LEAVES[(_top, CTA_TUPLE_IP, _v4)] = ("4s", _side + _name)
        _LEAVES[(_top, CTA_TUPLE_IP, _v6)] = ("16s", _side + _name)
    _LEAVES[(_top, CTA_TUPLE_PROTO, CTA_PROTO_NUM)] = ("B", _side + "proto")
    _LEAVES[(_top, CTA_TUPLE_PROTO, CTA_PROTO_SRC_PORT)] = ("H", _side + "src_u")
    _LEAVES[(_top, CTA_TUPLE_PROTO, CTA_PROTO_DST_PORT)] = ("H", _side + "dst_u")
_LEAVES.update({
    (CTA_STATUS,): ("I", "status"), (CTA_MARK,): ("I", "mark"), (CTA_ZONE,): ("H", "zone"), (CTA_ID,): ("I", "ct_id"),
    (CTA_COUNTERS_ORIG, CTA_COUNTERS_PACKETS): ("Q", "opackets"),
    (CTA_COUNTERS_ORIG, CTA_COUNTERS_BYTES): ("Q", "obytes"),
    (CTA_COUNTERS_REPLY, CTA_COUNTERS_PACKETS): ("Q", "rpackets"),
    (CTA_COUNTERS_REPLY, CTA_COUNTERS_BYTES): ("Q", "rbytes"),
    (CTA_TIMESTAMP, CTA_TIMESTAMP_START): ("Q", "start_ns"),
    (CTA_TIMESTAMP, CTA_TIMESTAMP_STOP): ("Q", "stop_ns"),
    (CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE): ("B", "tcp_state"),
})
# Containers walked into; the counters' own presence decides CtEntry.counters.
_NESTS = {(CTA_TUPLE_ORIG,), (CTA_TUPLE_REPLY,), (CTA_TUPLE_ORIG, CTA_TUPLE_IP), (CTA_TUPLE_ORIG, CTA_TUPLE_PROTO),
          (CTA_TUPLE_REPLY, CTA_TUPLE_IP), (CTA_TUPLE_REPLY, CTA_TUPLE_PROTO), (CTA_COUNTERS_ORIG,),
          (CTA_COUNTERS_REPLY,), (CTA_TIMESTAMP,), (CTA_PROTOINFO,), (CTA_PROTOINFO, CTA_PROTOINFO_TCP)}
# What walk_entry composes from several attributes: those layouts are walked.
_COMPOSED = {(top, CTA_TUPLE_PROTO, kind) for top in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY)
             for kind in (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE,
                          CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)}
# The values a CtEntry is made of, in the order _Layout.entry() takes them.
_FIELDS = ("osrc", "odst", "oproto", "osrc_u", "odst_u", "rsrc", "rdst", "rproto", "rsrc_u", "rdst_u",
           "status", "mark", "zone", "ct_id", "tcp_state", "opackets", "obytes", "rpackets", "rbytes",
           "start_ns", "stop_ns")
_ADDRESSES = frozenset(("osrc", "odst", "rsrc", "rdst"))
_ABSENT = (0, b"")       # appended to the values: what an absent number / address reads as
LAYOUTS_MAX = 256


class _Unlearnable(Exception):
    """A layout the shape reader does not take: such messages are walked."""


def _learn_layout(buf, pos: int, end: int, path: tuple[int, ...], items: list[tuple[str, str | None]],
                  counters: set) -> None:
    """Append (struct format, value name / "header" / None) for buf[pos:end]'s attributes."""
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(buf, pos)
        if length < 4 or pos + length > end:
            raise _Unlearnable
        at = path + (kind & _NLA_TYPE_MASK,)
        if at in _COMPOSED:
            raise _Unlearnable
        items.append(("I", "header"))
        if at in _NESTS:
            if not kind & NLA_F_NESTED:
                raise _Unlearnable
            if at in ((CTA_COUNTERS_ORIG,), (CTA_COUNTERS_REPLY,)):
                counters.add(at)
            _learn_layout(buf, pos + 4, pos + length, at, items, counters)
        elif at in _LEAVES:
            fmt, name = _LEAVES[at]
            if struct.calcsize(">" + fmt) != length - 4 or any(name == n for _, n in items):
                raise _Unlearnable
            items.append((fmt, name))
        elif length > 4:
            items.append((f"{length - 4}x", None))
        step = min((length + 3) & ~3, end - pos)
        if step > length:
            items.append((f"{step - length}x", None))
        pos += step
    if pos < end:
        items.append((f"{end - pos}x", None))


class _Layout:
    """One message layout: its attribute headers, checked with one unpack,
    and its values, read with another."""

    __slots__ = ("headers", "expected", "values", "pick", "complete", "counters")

    def __init__(self, buf, pos: int, end: int):
        items: list[tuple[str, str | None]] = []
        counters: set = set()
        _learn_layout(buf, pos, end, (), items, counters)
        # Headers in native order (as the kernel writes them), values big-endian (network order).
        headers = struct.Struct("=" + "".join(fmt if name == "header" else _skip(fmt) for fmt, name in items))
        values = struct.Struct(">" + "".join(_skip("I") if name == "header" else fmt for fmt, name in items))
        names = [name for _, name in items if name not in (None, "header")]
        self.headers, self.values = headers.unpack_from, values.unpack_from
        self.expected = headers.unpack_from(buf, pos)
        self.complete = all(name in names for name in _FIELDS)
        absent_number, absent_address = len(names), len(names) + 1
        self.pick = itemgetter(*(names.index(name) if name in names
                                 else absent_address if name in _ADDRESSES else absent_number
                                 for name in _FIELDS))
        self.counters = len(counters) == 2

    def entry(self, buf, pos: int, family: int) -> CtEntry:
        values = self.values(buf, pos)
        if not self.complete:
            values += _ABSENT
        (osrc, odst, oproto, osrc_u, odst_u, rsrc, rdst, rproto, rsrc_u, rdst_u, status, mark, zone, ct_id,
         tcp_state, opackets, obytes, rpackets, rbytes, start_ns, stop_ns) = self.pick(values)
        return CtEntry(family, CtTuple(osrc, odst, oproto, osrc_u, odst_u), CtTuple(rsrc, rdst, rproto, rsrc_u, rdst_u),
                       status, mark, zone, ct_id, tcp_state,
                       (opackets, obytes, rpackets, rbytes) if self.counters else None, start_ns, stop_ns)


def _skip(fmt: str) -> str:
    return fmt if fmt.endswith("x") else f"{struct.calcsize('>' + fmt)}x"


_layouts: dict[tuple[int, int], _Layout | None] = {}


def parse_entry(buf, pos: int, end: int, family: int) -> CtEntry:
    """The attributes of one IPCTNL_MSG_CT_* message body (after nfgenmsg):
    by its layout when it has a learnt one, else walked (walk_entry)."""
    key = (end - pos, family)
    layout = _layouts.get(key, False)
    if layout is False:
        try:
            layout = _Layout(buf, pos, end)
        except _Unlearnable:
            layout = None
        if len(_layouts) >= LAYOUTS_MAX:
            _layouts.clear()
        _layouts[key] = layout
    if layout is not None and layout.headers(buf, pos) == layout.expected:
        return layout.entry(buf, pos, family)
    return walk_entry(buf, pos, end, family)


def raise_netlink_error(buf, pos: int, what: str) -> None:
    """Raise CtnetlinkError for the NLMSG_ERROR message at buf[pos:] unless it is an ack (code 0)."""
    code = -struct.unpack_from("=i", buf, pos + _NLMSGHDR.size)[0]
    if code:
        raise CtnetlinkError(code, f"{what}: {os.strerror(code)}")


def parse_messages(buf: memoryview, size: int, want_type: int):
    """Yield CtEntry for each ctnetlink message of `want_type` in buf[:size].

    Raises CtnetlinkError for a netlink error message; stops at NLMSG_DONE.
    """
    pos = 0
    while pos + _NLMSGHDR.size <= size:
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, pos)
        if length < _NLMSGHDR.size:
            break
        if msg_type == NLMSG_DONE:
            return
        if msg_type == NLMSG_ERROR:
            raise_netlink_error(buf, pos, "ctnetlink")
        elif msg_type == (NFNL_SUBSYS_CTNETLINK << 8) | want_type:
            family = buf[pos + _NLMSGHDR.size]
            body = pos + _NLMSGHDR.size + _NFGENMSG.size
            yield parse_entry(buf, body, pos + length, family)
        pos += (length + 3) & ~3


# -- many events per syscall -------------------------------------------------------------
#
# The kernel sends each conntrack event as a datagram of its own: one recv
# per finished flow was ~7% of the agent's CPU under churn
# (bench/p6_profile.py).  recvmmsg(2) takes up to SLOTS of them per call.

class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint32)]


_MSG_DONTWAIT, _MSG_TRUNC = 0x40, 0x20
_FLAGS_LEN = struct.Struct("=i4xI")       # msg_hdr.msg_flags, (padding), msg_len
_FLAGS_AT = _MMsgHdr.hdr.offset + _MsgHdr.flags.offset
assert _FLAGS_AT + _FLAGS_LEN.size == _MMsgHdr.len.offset + 4


class BatchReceiver:
    """Datagrams of one socket, SLOTS per recvmmsg(2) call, each into a slot
    of SLOT bytes of one buffer (`buffer`)."""

    SLOTS, SLOT = 128, 8192

    def __init__(self, fd: int):
        self._fd = fd
        self.buffer = bytearray(self.SLOTS * self.SLOT)
        base = ctypes.addressof((ctypes.c_char * len(self.buffer)).from_buffer(self.buffer))
        self._iov = (_IoVec * self.SLOTS)(*[_IoVec(base + i * self.SLOT, self.SLOT) for i in range(self.SLOTS)])
        self._msgs = (_MMsgHdr * self.SLOTS)()
        for i in range(self.SLOTS):
            self._msgs[i].hdr.iov = ctypes.addressof(self._iov[i])
            self._msgs[i].hdr.iovlen = 1
        self._msgs_view = memoryview(self._msgs).cast("B")
        self._recvmmsg = ctypes.CDLL(None, use_errno=True).recvmmsg
        self._recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
        self._msgs_at = ctypes.addressof(self._msgs)

    def receive(self) -> list[tuple[int, int, bool]]:
        """(offset in `view`, length, truncated) of the datagrams queued now
        (at most SLOTS); BlockingIOError when there are none, OSError as the
        socket reports it (ENOBUFS: an overrun)."""
        n = self._recvmmsg(self._fd, self._msgs_at, self.SLOTS, _MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise BlockingIOError(err, os.strerror(err))
            raise OSError(err, os.strerror(err))
        size, unpack, view = ctypes.sizeof(_MMsgHdr), _FLAGS_LEN.unpack_from, self._msgs_view
        out = []
        for i in range(n):
            flags, length = unpack(view, i * size + _FLAGS_AT)
            out.append((i * self.SLOT, length, bool(flags & _MSG_TRUNC)))
        return out


def _socket(rcvbuf: int) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as e:
        raise CtnetlinkError(e.errno, f"ctnetlink socket: {e.strerror}") from None
    try:
        # SO_RCVBUFFORCE exceeds rmem_max (needs CAP_NET_ADMIN): a burst of
        # destroys must fit while the agent is busy.
        sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((0, 0))
    return sock


class DestroyEvents:
    """Subscription to the conntrack DESTROY events of this network namespace."""

    def __init__(self, rcvbuf: int = 64 << 20):
        self._sock = _socket(rcvbuf)
        try:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)
        except OSError as e:
            self._sock.close()
            raise CtnetlinkError(e.errno, f"ctnetlink destroy events: {e.strerror} "
                                          "(is nf_conntrack_netlink available?)") from None
        self._sock.setblocking(False)
        self._receiver = BatchReceiver(self._sock.fileno())
        self.overruns = 0    # ENOBUFS: the kernel dropped events for us

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, netns: int, wall_offset_ns: int) -> list[tuple[bytes, bytes]]:
        """All IPv4/IPv6 DESTROY events queued now (non-blocking), read
        straight into the probe's structs (conntracct/probe/_ctends.c): a
        (struct flow_key, DESTROY struct flow_record) pair each; netns: the
        namespace's inode (part of both), wall_offset_ns: the probe's clock
        to the wall clock."""
        out: list[tuple[bytes, bytes]] = []
        buffer, now = self._receiver.buffer, time.time_ns()
        while True:
            try:
                datagrams = self._receiver.receive()
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            for offset, length, truncated in datagrams:
                if truncated:      # an event cut short is an event lost
                    self.overruns += 1
                    continue
                parse_ends(buffer, offset, length, netns, wall_offset_ns, now, out)

    def close(self) -> None:
        self._sock.close()


def dump(family: int = socket.AF_UNSPEC) -> list[CtEntry]:
    """The whole conntrack table of this network namespace."""
    sock = _socket(8 << 20)
    try:
        hdr_len = _NLMSGHDR.size + _NFGENMSG.size
        msg = _NLMSGHDR.pack(hdr_len, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                             NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + _NFGENMSG.pack(family, 0, 0)
        sock.send(msg)
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        out: list[CtEntry] = []
        while True:
            n = sock.recv_into(buf)
            before = len(out)
            done = _dump_chunk(view, n, out)
            if done or (n == 0 and len(out) == before):
                return out
    finally:
        sock.close()


def flush(family: int = socket.AF_UNSPEC) -> None:
    """Delete every conntrack entry of this network namespace (`conntrack -F`),
    of one family or (AF_UNSPEC) all; each deletion sends a DESTROY event."""
    sock = _socket(1 << 20)
    try:
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + _NFGENMSG.size, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                             NLM_F_REQUEST | NLM_F_ACK, 1, 0) + _NFGENMSG.pack(family, 0, 0)
        sock.send(msg)
        buf = bytearray(65536)
        n = sock.recv_into(buf)
        for _ in parse_messages(memoryview(buf), n, IPCTNL_MSG_CT_DELETE):   # raises on a netlink error
            pass
    finally:
        sock.close()

def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _tuple_attrs(family: int, t: CtTuple) -> bytes:
    v6 = family == socket.AF_INET6
    ip = (_nla(CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC, t.src)
          + _nla(CTA_IP_V6_DST if v6 else CTA_IP_V4_DST, t.dst))
    proto = _nla(CTA_PROTO_NUM, bytes([t.proto]))
    if t.proto in (1, 58):
        icmp_id, icmp_type, icmp_code = ((CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)
                                         if v6 else (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE))
        proto += (_nla(icmp_id, _U16BE.pack(t.src_u)) + _nla(icmp_type, bytes([t.dst_u >> 8]))
                  + _nla(icmp_code, bytes([t.dst_u & 0xFF])))
    else:
        proto += _nla(CTA_PROTO_SRC_PORT, _U16BE.pack(t.src_u)) + _nla(CTA_PROTO_DST_PORT, _U16BE.pack(t.dst_u))
    return _nla(CTA_TUPLE_IP | NLA_F_NESTED, ip) + _nla(CTA_TUPLE_PROTO | NLA_F_NESTED, proto)


class Lookup:
    """Asks the kernel whether single conntrack entries still exist."""

    def __init__(self):
        self._sock = _socket(1 << 20)
        self._buf = bytearray(65536)
        self._seq = 0

    def exists(self, family: int, orig: CtTuple, zone: int = 0) -> bool:
        self._seq += 1
        body = _NFGENMSG.pack(family, 0, 0) + _nla(CTA_TUPLE_ORIG | NLA_F_NESTED, _tuple_attrs(family, orig))
        if zone:
            body += _nla(CTA_ZONE, _U16BE.pack(zone))
        msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST, self._seq, 0) + body)
        n = self._sock.recv_into(self._buf)
        try:
            return any(True for _ in parse_messages(memoryview(self._buf), n, IPCTNL_MSG_CT_NEW))
        except CtnetlinkError as e:
            if e.errno == errno.ENOENT:
                return False
            raise

    def close(self) -> None:
        self._sock.close()


# -- which flows are still in the table: one dump, parsed leanly ----------------------
#
# The sweep for flows conntrack sends no DESTROY event for asks "which of
# these still exist?".  One GET per flow costs ~15 µs (two syscalls and the
# Python around them); a dump costs ~1.5 µs per table entry when only each
# entry's CTA_TUPLE_ORIG is looked at: its payload bytes are compared, as
# they are, with the same attribute encoded for each swept flow
# (orig_tuple_attr; the kernel's encoding, ctnetlink_dump_tuples(), for TCP,
# UDP, ICMP and ICMPv6 without a directional zone).

# Protocols whose tuple attributes are ports (ICMP: id, type, code) as
# orig_tuple_attr encodes them; others (GRE keys, protocols without ports)
# are asked one by one.
DUMP_MATCHED_PROTOS = frozenset((socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6))
_F = NLA_F_NESTED
_V4_PORTS = struct.Struct("=HHHH4sHH4s" "HH" "HHB3x" "HH2s2x" "HH2s2x")
_V6_PORTS = struct.Struct("=HHHH16sHH16s" "HH" "HHB3x" "HH2s2x" "HH2s2x")
_V4_ICMP = struct.Struct("=HHHH4sHH4s" "HH" "HHB3x" "HH2s2x" "HHB3x" "HHB3x")
_V6_ICMP = struct.Struct("=HHHH16sHH16s" "HH" "HHB3x" "HH2s2x" "HHB3x" "HHB3x")


def orig_tuple_attr(family: int, proto: int, src: bytes, dst: bytes, src_u: bytes, dst_u: bytes) -> bytes:
    """The payload of CTA_TUPLE_ORIG as the kernel dumps it (zone 0), for a
    protocol in DUMP_MATCHED_PROTOS.  src/dst: 4 or 16 bytes; src_u, dst_u:
    the two bytes of each port as on the wire (ICMP: id; type, code)."""
    if family == socket.AF_INET:
        ip = (20, CTA_TUPLE_IP | _F, 8, CTA_IP_V4_SRC, src, 8, CTA_IP_V4_DST, dst)
        ports, icmp, ids = _V4_PORTS, _V4_ICMP, (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
    else:
        ip = (44, CTA_TUPLE_IP | _F, 20, CTA_IP_V6_SRC, src, 20, CTA_IP_V6_DST, dst)
        ports, icmp, ids = _V6_PORTS, _V6_ICMP, (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)
    if proto in (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6):
        return icmp.pack(*ip, 36, CTA_TUPLE_PROTO | _F, 5, CTA_PROTO_NUM, proto,
                         6, ids[0], src_u, 5, ids[1], dst_u[0], 5, ids[2], dst_u[1])
    return ports.pack(*ip, 28, CTA_TUPLE_PROTO | _F, 5, CTA_PROTO_NUM, proto,
                      6, CTA_PROTO_SRC_PORT, src_u, 6, CTA_PROTO_DST_PORT, dst_u)


class Table:
    """Dumps of this network namespace's conntrack table on one socket (made
    where it is created), and its entry count."""

    def __init__(self):
        self._sock = _socket(8 << 20)
        self._buf = bytearray(RECV_BUFFER)
        self._seq = 0
        # Opened here, read later: the sysctl stays this namespace's.
        try:
            self._count_fd = os.open("/proc/sys/net/netfilter/nf_conntrack_count", os.O_RDONLY)
        except OSError:
            self._count_fd = -1

    def count(self) -> int | None:
        """Entries in the table now (nf_conntrack_count), None if unknown."""
        if self._count_fd < 0:
            return None
        try:
            return int(os.pread(self._count_fd, 32, 0))
        except (OSError, ValueError):
            return None

    def discard_present(self, wanted: dict, hashed: bool = False, family: int = socket.AF_UNSPEC) -> None:
        """Remove from `wanted` (keyed by CTA_TUPLE_ORIG payloads,
        orig_tuple_attr, or with `hashed` by their hash()) what belongs to an
        entry of zone 0 in the table now (of one address family, or all)."""
        self._seq += 1
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + _NFGENMSG.size,
                                       (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                                       NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0)
                        + _NFGENMSG.pack(family, 0, 0))
        pop = wanted.pop
        view = memoryview(self._buf)
        header, nla = _NLMSG_LEN_TYPE.unpack_from, _NLA.unpack_from
        new_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
        first = _NLMSGHDR.size + _NFGENMSG.size
        while True:
            n = self._sock.recv_into(self._buf)
            if n == 0:
                return
            data = bytes(view[:n])     # slices of bytes are bytes: hashable, one copy
            pos = 0
            while pos + 16 <= n:
                length, msg_type = header(data, pos)
                if length < 16:
                    break
                if msg_type == new_type:
                    a = pos + first
                    alen, kind = nla(data, a)
                    if kind & _NLA_TYPE_MASK != CTA_TUPLE_ORIG:   # not where the kernel puts it
                        for kind, b, c in _attrs(view, a, pos + length):
                            if kind == CTA_TUPLE_ORIG:
                                a, alen = b - 4, c - b + 4
                                break
                        else:
                            pos += (length + 3) & ~3
                            continue
                    key = data[a + 4:a + alen]
                    if hashed:
                        key = hash(key)
                    if key in wanted:
                        # CTA_ZONE, when the zone is not 0, comes right after the reply tuple.
                        r = a + ((alen + 3) & ~3)
                        z = r + ((nla(data, r)[0] + 3) & ~3)
                        if z + 4 > pos + length or nla(data, z)[1] & _NLA_TYPE_MASK != CTA_ZONE:
                            pop(key)
                elif msg_type == NLMSG_DONE:
                    return
                elif msg_type == NLMSG_ERROR:
                    raise_netlink_error(data, pos, "ctnetlink dump")
                pos += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
        if self._count_fd >= 0:
            os.close(self._count_fd)
            self._count_fd = -1


def _dump_chunk(view: memoryview, n: int, out: list[CtEntry]) -> bool:
    """Parse one recv of a dump into out; True once NLMSG_DONE was seen."""
    pos = 0
    while pos + _NLMSGHDR.size <= n:
        length, msg_type = _NLMSGHDR.unpack_from(view, pos)[:2]
        if msg_type == NLMSG_DONE:
            return True
        pos += (length + 3) & ~3
    out.extend(parse_messages(view, n, IPCTNL_MSG_CT_NEW))
    return False
