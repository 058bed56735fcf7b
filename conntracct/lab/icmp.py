"""ICMP and ICMPv6 echo packets for raw sockets: the lab's one copy of the
Internet checksum and of the echo header layout (RFC 792, RFC 4443)."""

from __future__ import annotations

import struct

#: (request type, reply type) by IP version.
ECHO = {4: (8, 0), 6: (128, 129)}
_HEADER = struct.Struct("!BBHHH")      # type, code, checksum, identifier, sequence


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): 0 over a packet that carries a valid one."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(family: int, ident: int, seq: int, payload: bytes) -> bytes:
    """An echo request; for ICMPv6 the checksum is left 0, the kernel fills it in
    (it covers a pseudo-header the raw socket's sender does not build)."""
    kind = ECHO[family][0]
    packet = _HEADER.pack(kind, 0, 0, ident, seq) + payload
    if family == 6:
        return packet
    return _HEADER.pack(kind, 0, checksum(packet), ident, seq) + payload


def is_echo_reply(family: int, data: bytes, ident: int, seq: int) -> bool:
    """`data` as a raw socket returns it (IPv4 raw sockets include the IP header)
    is the echo reply to (ident, seq)."""
    if family == 4 and data:
        data = data[(data[0] & 0x0F) * 4:]
    if len(data) < _HEADER.size:
        return False
    kind, _code, _sum, got_ident, got_seq = _HEADER.unpack_from(data)
    return kind == ECHO[family][1] and (got_ident, got_seq) == (ident, seq)
