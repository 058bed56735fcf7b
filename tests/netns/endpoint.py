"""Traffic endpoints run inside a network namespace (stdlib only).

Run as a script by tests/netns/traffic.py and tests/netns/churn.py:

    ip netns exec NS python endpoint.py COMMAND [options]

Servers print ``READY`` once bound, then one JSON line with what they did.
Clients print one JSON line.  Everything is bounded by counts and timeouts.

Commands: tcp-server, tcp-client, udp-server, udp-client, ping,
churn-server, churn-client (pure-Python fallback for churn.c).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

from conntracct.lab import icmp


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _any(addr: str) -> str:
    return "::" if ":" in addr else "0.0.0.0"


def _ready() -> None:
    print("READY", flush=True)


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _payload(n: int) -> bytes:
    return (b"conntracct-" * (n // 11 + 1))[:n]


# --------------------------------------------------------------------- TCP
def _read_to_eof(sock: socket.socket) -> int:
    """Bytes read until the peer closes its side."""
    received = 0
    while chunk := sock.recv(65536):
        received += len(chunk)
    return received


def tcp_server(a: argparse.Namespace) -> None:
    ls = socket.socket(_family(a.bind), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.bind, a.port))
    ls.listen(16)
    ls.settimeout(a.timeout)
    _ready()
    conn, peer = ls.accept()
    conn.settimeout(a.timeout)
    received = _read_to_eof(conn)
    if a.reply:
        conn.sendall(_payload(a.reply))
    conn.close()
    ls.close()
    _emit({"received": received, "sent": a.reply, "peer": [peer[0], peer[1]]})


# struct tcp_info (linux/tcp.h): tcpi_bytes_retrans, a __u64 at offset 208 (Linux 4.19+).
_TCPI_BYTES_RETRANS = 208


def _bytes_retransmitted(s: socket.socket) -> int:
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < _TCPI_BYTES_RETRANS + 8:
        return 0
    return struct.unpack_from("=Q", info, _TCPI_BYTES_RETRANS)[0]


def tcp_client(a: argparse.Namespace) -> None:
    s = socket.socket(_family(a.dst), socket.SOCK_STREAM)
    s.settimeout(a.timeout)
    if a.sport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((_any(a.dst), a.sport))
    t0 = time.monotonic()
    s.connect((a.dst, a.port))
    sport = s.getsockname()[1]
    if a.send:
        s.sendall(_payload(a.send))
    s.shutdown(socket.SHUT_WR)
    received = _read_to_eof(s)
    retransmitted = _bytes_retransmitted(s)
    s.close()
    _emit({"sport": sport, "sent": a.send, "received": received,
           "retransmitted": retransmitted, "duration": time.monotonic() - t0})


# --------------------------------------------------------------------- UDP
def udp_server(a: argparse.Namespace) -> None:
    s = socket.socket(_family(a.bind), socket.SOCK_DGRAM)
    s.bind((a.bind, a.port))
    s.settimeout(a.timeout)
    _ready()
    received = sent = 0
    peer = None
    while received < a.count:
        try:
            data, peer = s.recvfrom(65536)
        except TimeoutError:
            break
        received += 1
        size = len(data) if a.reply_size < 0 else a.reply_size
        s.sendto(_payload(size), peer)
        sent += 1
    s.close()
    _emit({"received": received, "sent": sent,
           "peer": [peer[0], peer[1]] if peer else None})


def udp_client(a: argparse.Namespace) -> None:
    s = socket.socket(_family(a.dst), socket.SOCK_DGRAM)
    s.bind((_any(a.dst), a.sport))
    s.settimeout(a.timeout)
    sport = s.getsockname()[1]
    sent = received = 0
    for _ in range(a.count):
        s.sendto(_payload(a.size), (a.dst, a.port))
        sent += 1
        try:
            s.recvfrom(65536)
            received += 1
        except TimeoutError:
            pass
    s.close()
    _emit({"sport": sport, "sent": sent, "received": received})


# -------------------------------------------------------------------- ICMP
def ping(a: argparse.Namespace) -> None:
    """Echo requests with a fixed identifier (raw socket, needs root)."""
    family = 6 if ":" in a.dst else 4
    if family == 6:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    payload = _payload(a.size)
    sent = received = 0
    rtts = []
    for seq in range(1, a.count + 1):
        t0 = time.monotonic()
        s.sendto(icmp.echo_request(family, a.ident, seq, payload), (a.dst, 0))
        sent += 1
        deadline = t0 + a.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            s.settimeout(remaining)
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if icmp.is_echo_reply(family, data, a.ident, seq):
                received += 1
                rtts.append(time.monotonic() - t0)
                break
        if seq < a.count:
            time.sleep(a.interval)
    s.close()
    _emit({"ident": a.ident, "sent": sent, "received": received, "rtts": rtts})


# ------------------------------------------------------- churn (fallback)
_stop = False


def _on_term(*_: object) -> None:
    global _stop
    _stop = True


def churn_server(a: argparse.Namespace) -> None:
    """Accept, read what the client sent, close (the server closes first)."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    fam = _family(a.bind)
    ls = socket.socket(fam, socket.SOCK_DGRAM if a.udp else socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.bind, a.port))
    ls.setblocking(False)
    if not a.udp:
        ls.listen(65535)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    _ready()
    accepted = closed = nbytes = 0
    while not _stop:
        for key, _ev in sel.select(0.2):
            if key.data is None and a.udp:
                while True:
                    try:
                        data, peer = ls.recvfrom(65536)
                    except BlockingIOError:
                        break
                    accepted += 1
                    ls.sendto(data, peer)
                    closed += 1
            elif key.data is None:
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    accepted += 1
                    sel.register(c, selectors.EVENT_READ, True)
            else:
                c = key.fileobj
                try:
                    data = c.recv(65536)
                    nbytes += len(data)
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                sel.unregister(c)
                c.close()
                closed += 1
    if a.udp:
        _emit({"received": accepted, "sent": closed, "errors": {}})
    else:
        _emit({"accepted": accepted, "closed": closed, "bytes": nbytes, "errors": {}})


def _churn_client_one(a: argparse.Namespace, rate: float, sport_lo: int, sport_hi: int) -> dict:
    fam = _family(a.dst)
    dst = (a.dst, a.port)
    payload = _payload(max(a.payload, 1 if a.udp else 0))
    sel = selectors.DefaultSelector()
    errors: dict[str, int] = {}
    attempted = completed = failed = timeouts = 0
    inflight: dict[socket.socket, float] = {}
    next_port = sport_lo
    t0 = time.monotonic()
    gen_end = t0 + a.duration
    hard_end = gen_end + a.timeout / 1000 + 1
    last_done = t0

    def err(e: int) -> None:
        name = errno.errorcode.get(e, "OTHER")
        errors[name] = errors.get(name, 0) + 1

    def finish(s: socket.socket, ok: bool) -> None:
        nonlocal completed, failed, last_done
        sel.unregister(s)
        s.close()
        del inflight[s]
        if ok:
            completed += 1
            last_done = time.monotonic()
        else:
            failed += 1

    while True:
        t = time.monotonic()
        generating = t < gen_end
        if _stop or t >= hard_end or (not generating and not inflight):
            break
        if generating:
            due = (t - t0) * rate if rate > 0 else float("inf")
            while attempted < due and len(inflight) < a.concurrency:
                attempted += 1
                s = socket.socket(fam, socket.SOCK_DGRAM if a.udp else socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    if a.udp:
                        for _ in range(sport_hi - sport_lo + 1):
                            p, next_port = next_port, (sport_lo if next_port >= sport_hi else next_port + 1)
                            try:
                                s.bind((_any(a.dst), p))
                                break
                            except OSError:
                                continue
                        s.sendto(payload, dst)
                        sel.register(s, selectors.EVENT_READ, "reply")
                    else:
                        rc = s.connect_ex(dst)
                        if rc not in (0, errno.EINPROGRESS):
                            raise OSError(rc, os.strerror(rc))
                        sel.register(s, selectors.EVENT_WRITE, "connect")
                except OSError as e:
                    err(e.errno or 0)
                    s.close()
                    failed += 1
                    continue
                inflight[s] = t + a.timeout / 1000
        wait = 0.1
        if generating and len(inflight) < a.concurrency:
            wait = max(0.0, min(0.1, t0 + (attempted + 1) / rate - time.monotonic())) if rate > 0 else 0
        for key, _ev in sel.select(wait):
            s = key.fileobj
            if key.data == "connect":
                e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if e:
                    err(e)
                    finish(s, False)
                    continue
                try:
                    if payload:
                        s.send(payload)
                except OSError as ex:
                    err(ex.errno or 0)
                    finish(s, False)
                    continue
                sel.modify(s, selectors.EVENT_READ, "eof")
            else:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as ex:
                    err(ex.errno or 0)
                    finish(s, False)
                    continue
                if key.data == "reply" or not data:
                    finish(s, True)
        now = time.monotonic()
        for s, deadline in list(inflight.items()):
            if deadline <= now:
                timeouts += 1
                finish(s, False)
    for s in list(inflight):
        timeouts += 1
        finish(s, False)
    end = time.monotonic()
    return {"attempted": attempted, "completed": completed, "failed": failed,
            "timeouts": timeouts, "errors": errors, "elapsed": end - t0,
            "active": max(a.duration, last_done - t0)}


def churn_client(a: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, _on_term)
    procs = max(1, a.procs)
    span = (a.sport_hi - a.sport_lo + 1) // procs
    children = []
    for i in range(procs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            lo = a.sport_lo + i * span
            res = _churn_client_one(a, a.rate / procs if a.rate > 0 else 0, lo, lo + span - 1)
            os.write(w, json.dumps(res).encode())
            os._exit(0)
        os.close(w)
        children.append((pid, r))
    total: dict = {"proto": "udp" if a.udp else "tcp", "attempted": 0, "completed": 0,
                   "failed": 0, "timeouts": 0, "port_skips": 0, "duration": a.duration,
                   "elapsed": 0.0, "active": 0.0, "errors": {}}
    for pid, r in children:
        chunks = []
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        os.waitpid(pid, 0)
        res = json.loads(b"".join(chunks) or b"{}")
        for k in ("attempted", "completed", "failed", "timeouts"):
            total[k] += res.get(k, 0)
        total["elapsed"] = max(total["elapsed"], res.get("elapsed", 0))
        total["active"] = max(total["active"], res.get("active", 0))
        for k, v in res.get("errors", {}).items():
            total["errors"][k] = total["errors"].get(k, 0) + v
    total["rate"] = total["completed"] / total["active"] if total["active"] else 0.0
    _emit(total)


# command -> (function, required options, optional options with their defaults).
# Required --bind/--dst are addresses, the rest integers; an option's type is
# its default's (False: a flag).  churn-client's --timeout is per flow, in ms.
_COMMANDS: dict[str, tuple[Any, tuple[str, ...], dict[str, Any]]] = {
    "tcp-server": (tcp_server, ("bind", "port"), {"reply": 0, "timeout": 30.0}),
    "tcp-client": (tcp_client, ("dst", "port"), {"send": 0, "sport": 0, "timeout": 30.0}),
    "udp-server": (udp_server, ("bind", "port"), {"count": 1, "reply-size": -1, "timeout": 10.0}),
    "udp-client": (udp_client, ("dst", "port"), {"count": 1, "size": 64, "sport": 0, "timeout": 2.0}),
    "ping": (ping, ("dst", "ident"), {"count": 3, "size": 56, "interval": 0.01, "timeout": 2.0}),
    "churn-server": (churn_server, ("bind", "port"), {"udp": False}),
    "churn-client": (churn_client, ("dst", "port"),
                     {"udp": False, "rate": 5000.0, "duration": 10.0, "concurrency": 256, "payload": 16,
                      "timeout": 3000.0, "sport-lo": 1024, "sport-hi": 65535, "procs": 1}),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (fn, required, optional) in _COMMANDS.items():
        sp = sub.add_parser(name)
        for opt in required:
            sp.add_argument(f"--{opt}", required=True, type=str if opt in ("bind", "dst") else int)
        for opt, default in optional.items():
            if default is False:
                sp.add_argument(f"--{opt}", action="store_true")
            else:
                sp.add_argument(f"--{opt}", type=type(default), default=default)
        sp.set_defaults(fn=fn)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
