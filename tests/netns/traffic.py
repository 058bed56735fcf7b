"""Deterministic, bounded traffic from client to server through the router.

Each generator starts its server side in the server namespace, waits for it
to listen, runs the client side in the client namespace and returns what both
sides saw.  One flow per call (ping: one ICMP echo "connection" per ident).
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENDPOINT = Path(__file__).with_name("endpoint.py")
_IDENTS = itertools.count((os.getpid() * 7) % 30000 + 1000)


@dataclass
class TcpTransfer:
    family: int
    src: str            # client address (original tuple source)
    dst: str            # server address
    sport: int          # client source port: identifies the flow
    dport: int
    sent: int           # payload bytes client -> server
    received: int       # payload bytes server -> client
    server_received: int
    server_sent: int
    peer: tuple[str, int]  # the client as the server saw it (after NAT)
    retransmitted: int = 0  # payload bytes the client sent more than once (TCP_INFO)


@dataclass
class UdpExchange:
    family: int
    src: str
    dst: str
    sport: int
    dport: int
    count: int
    size: int
    reply_size: int
    sent: int           # datagrams client -> server
    received: int       # datagrams server -> client
    server_received: int
    peer: tuple[str, int] | None


@dataclass
class Ping:
    family: int
    src: str
    dst: str
    ident: int          # ICMP echo identifier (conntrack's icmp id)
    sent: int
    received: int
    size: int
    rtts: list[float] = field(default_factory=list)


def _python(*args: Any) -> list[str]:
    return [sys.executable, str(ENDPOINT), *map(str, args)]


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON result in output: {text!r}")


def start_server(topo: Any, args: list[str], timeout: float = 15.0) -> subprocess.Popen[str]:
    """Start ``args`` in the server namespace and wait for its READY line."""
    proc = topo.popen("server", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "READY":
        topo._stop_proc(proc)
        topo._forget(proc)
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"server {args} did not start: {line!r} {err}")
    return proc


def finish_server(topo: Any, proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        topo._stop_proc(proc)
        topo._forget(proc)
        raise
    topo._forget(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"server exited {proc.returncode}: {err}")
    return _last_json(out)


def tcp_transfer(topo: Any, nbytes: int, reply_bytes: int = 0, *, family: int = 4,
                 port: int | None = None, sport: int | None = None,
                 timeout: float = 30.0) -> TcpTransfer:
    """One TCP connection: ``nbytes`` client->server, then ``reply_bytes`` back.

    The client sends, half-closes, reads the reply until the server closes.
    """
    port = port or topo.next_port()
    dst = topo.addr("server", family)
    server = start_server(topo, _python("tcp-server", "--bind", dst, "--port", port,
                                        "--reply", reply_bytes, "--timeout", timeout))
    try:
        res = _last_json(topo.run(
            "client", *_python("tcp-client", "--dst", dst, "--port", port, "--send", nbytes,
                               "--sport", sport or 0, "--timeout", timeout),
            timeout=timeout + 10).stdout)
    except BaseException:
        topo._stop_proc(server)
        topo._forget(server)
        raise
    srv = finish_server(topo, server, timeout + 5)
    return TcpTransfer(family=family, src=topo.addr("client", family), dst=dst,
                       sport=res["sport"], dport=port, sent=res["sent"],
                       received=res["received"], server_received=srv["received"],
                       server_sent=srv["sent"], peer=tuple(srv["peer"]),
                       retransmitted=res["retransmitted"])


def udp_exchange(topo: Any, count: int = 3, size: int = 64, *, reply_size: int | None = None,
                 family: int = 4, port: int | None = None, sport: int | None = None,
                 timeout: float = 10.0) -> UdpExchange:
    """``count`` request/response rounds of UDP from one client source port.

    ``sport`` defaults to a port picked by the kernel; either way it is
    returned.  ``reply_size`` defaults to echoing the request size.
    """
    port = port or topo.next_port()
    dst = topo.addr("server", family)
    rsize = size if reply_size is None else reply_size
    server = start_server(topo, _python("udp-server", "--bind", dst, "--port", port,
                                        "--count", count, "--reply-size", rsize,
                                        "--timeout", timeout))
    try:
        res = _last_json(topo.run(
            "client", *_python("udp-client", "--dst", dst, "--port", port, "--count", count,
                               "--size", size, "--sport", sport or 0, "--timeout", 2),
            timeout=timeout + 2 * count + 10).stdout)
    except BaseException:
        topo._stop_proc(server)
        topo._forget(server)
        raise
    srv = finish_server(topo, server, timeout + 5)
    peer = srv.get("peer")
    return UdpExchange(family=family, src=topo.addr("client", family), dst=dst,
                       sport=res["sport"], dport=port, count=count, size=size,
                       reply_size=rsize, sent=res["sent"], received=res["received"],
                       server_received=srv["received"], peer=tuple(peer) if peer else None)


def ping(topo: Any, count: int = 3, *, family: int = 4, ident: int | None = None,
         size: int = 56, interval: float = 0.01, target: str | None = None,
         timeout: float = 2.0) -> Ping:
    """``count`` ICMP / ICMPv6 echo requests with identifier ``ident``.

    Raw sockets in Python rather than ping(8): fixed identifier, no iputils
    dependency.  ``target`` defaults to the server address.
    """
    ident = ident if ident is not None else next(_IDENTS) % 65536
    dst = target or topo.addr("server", family)
    res = _last_json(topo.run(
        "client", *_python("ping", "--dst", dst, "--count", count, "--ident", ident,
                           "--size", size, "--interval", interval, "--timeout", timeout),
        timeout=count * (timeout + interval) + 10).stdout)
    return Ping(family=family, src=topo.addr("client", family), dst=dst, ident=ident,
                sent=res["sent"], received=res["received"], size=size, rtts=res["rtts"])
