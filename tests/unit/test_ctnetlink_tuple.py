"""orig_tuple_attr (what the sweep matches a table dump against) encodes a
tuple exactly as the GET request's CTA_TUPLE_ORIG does; the kernel's own
encoding is checked in tests/integration/test_sweep.py."""

from __future__ import annotations

import random
import socket

from conntracct.probe import ctnetlink


def test_orig_tuple_attr_equals_the_request_encoding():
    rng = random.Random(5)
    for _ in range(5000):
        family = rng.choice((socket.AF_INET, socket.AF_INET6))
        width = 4 if family == socket.AF_INET else 16
        proto = rng.choice((6, 17, 1 if family == socket.AF_INET else 58))
        src, dst = rng.randbytes(width), rng.randbytes(width)
        src_u, dst_u = rng.randbytes(2), rng.randbytes(2)
        want = ctnetlink._tuple_attrs(family, ctnetlink.CtTuple(src, dst, proto, int.from_bytes(src_u, "big"),
                                                                int.from_bytes(dst_u, "big")))
        assert ctnetlink.orig_tuple_attr(family, proto, src, dst, src_u, dst_u) == want


def test_discard_present_on_a_canned_dump():
    """Two entries dumped (one of zone 5); a third tuple is absent."""
    def tuple_attr(port: int) -> bytes:
        return ctnetlink.orig_tuple_attr(socket.AF_INET, 6, b"\x0a\0\0\x01", b"\x0a\0\0\x02",
                                         port.to_bytes(2, "big"), b"\x00\x50")

    def message(port: int, zone: int = 0) -> bytes:
        body = ctnetlink._NFGENMSG.pack(socket.AF_INET, 0, 0)
        body += ctnetlink._nla(ctnetlink.CTA_TUPLE_ORIG | ctnetlink.NLA_F_NESTED, tuple_attr(port))
        body += ctnetlink._nla(ctnetlink.CTA_TUPLE_REPLY | ctnetlink.NLA_F_NESTED, tuple_attr(port + 1))
        if zone:
            body += ctnetlink._nla(ctnetlink.CTA_ZONE, zone.to_bytes(2, "big"))
        body += ctnetlink._nla(ctnetlink.CTA_STATUS, (8).to_bytes(4, "big"))
        msg_type = (ctnetlink.NFNL_SUBSYS_CTNETLINK << 8) | ctnetlink.IPCTNL_MSG_CT_NEW
        return ctnetlink._NLMSGHDR.pack(16 + len(body), msg_type, 2, 1, 0) + body

    done = ctnetlink._NLMSGHDR.pack(20, ctnetlink.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    chunks = [message(1000) + message(2000, zone=5), done]

    class FakeSocket:
        def send(self, data):
            return len(data)

        def recv_into(self, buf):
            data = chunks.pop(0)
            buf[:len(data)] = data
            return len(data)

        def close(self):
            pass

    table = ctnetlink.Table.__new__(ctnetlink.Table)
    table._sock, table._buf, table._seq, table._count_fd = FakeSocket(), bytearray(65536), 0, -1
    wanted = {tuple_attr(1000): "a", tuple_attr(2000): "b", tuple_attr(3000): "c"}
    table.discard_present(wanted)
    assert sorted(wanted.values()) == ["b", "c"]      # zone 5 is not zone 0's flow
    chunks[:] = [message(1000) + message(2000, zone=5), done]
    hashed = {hash(tuple_attr(1000)): "a", hash(tuple_attr(2000)): "b", hash(tuple_attr(3000)): "c"}
    table.discard_present(hashed, hashed=True)
    assert sorted(hashed.values()) == ["b", "c"]
