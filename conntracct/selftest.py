"""`conntracct test`: a self-test a user runs on their own host.

It builds three private network namespaces,

    client  192.0.2.2      --  router  192.0.2.1 | 198.51.100.1      --  server  198.51.100.2
            2001:db8:1::2              2001:db8:1::1 | 2001:db8:2::1             2001:db8:2::2

where only the router tracks connections (an nftables `inet` table with a
`ct state` rule, so IPv4 and IPv6 both) and masquerades towards the server,
with conntrack accounting and timestamps on in the router alone.  It attaches
the agent's flow source in the chosen mode (netfilter: in the router;
kprobe/fentry see every namespace, so records are kept by the router's
namespace inode), sends known traffic (TCP transfers, UDP exchanges, ICMP
echo; IPv4 and IPv6) from sockets opened inside the namespaces, reads the
kernel's counters with a ctnetlink dump, flushes the router's table and checks
that every flow was reported exactly: one NEW and one DESTROY, DESTROY totals
equal to the kernel's, payload bytes accounted, NAT visible.

Nothing outside the three namespaces is touched: every sysctl is written from
inside the router.  The namespaces are removed at the end, on Ctrl-C and on
SIGTERM; ones left by a killed run are removed by the next.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import sysctl
from .agent import EnvironmentProblem, probe_settings
from .check import render
from .config import Config
from .flow import (
    DESTROY,
    FLAG_END_UNSEEN,
    FLAG_FIRST_SIGHT,
    FLAG_NAMES,
    FLAG_NO_ACCT,
    FLAG_NO_TSTAMP,
    ICMP_PROTOS,
    NEW,
    UPDATE,
    FlowEvent,
)
from .lab import ADDRESSES, icmp
from .lab import network as lab
from .probe import ctnetlink
from .probe.loader import ProbeError
from .probe.modes import Check, choose_mode

PREFIX = "conntracct-test-"
_NAME_RE = re.compile(r"^conntracct-test-(\d+)-(client|router|server)$")

CLIENT = ADDRESSES["client"]
ROUTER_SERVER_SIDE = ADDRESSES["router_server"]   # the masquerade address
SERVER = ADDRESSES["server"]
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
_L4_HEADER = {TCP: 20, UDP: 8, ICMP: 8, ICMPV6: 8}
_PROTO_NAME = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmp"}

# Short conntrack timeouts in the router (net.netfilter.nf_conntrack_*): the
# test flushes the table itself, these only bound what a failed run leaves.
TIMEOUTS = {"tcp_timeout_time_wait": 2, "tcp_timeout_close": 2, "tcp_timeout_fin_wait": 2,
            "tcp_timeout_last_ack": 2, "udp_timeout": 2, "udp_timeout_stream": 2,
            "icmp_timeout": 2, "icmpv6_timeout": 2}
BAD_FLAGS = FLAG_NO_ACCT | FLAG_NO_TSTAMP | FLAG_FIRST_SIGHT | FLAG_END_UNSEEN
IO_TIMEOUT = 5.0


# -- what was sent, and the verdicts -----------------------------------------------

@dataclass
class KnownFlow:
    """One flow the self-test sent through the router, and what it carried."""
    family: int                   # 4 or 6
    proto: int
    src: str
    dst: str
    sport: int = 0                # ports; 0 for ICMP
    dport: int = 0
    icmp_id: int | None = None
    payload: tuple[int, int] = (0, 0)         # payload bytes client->server, server->client
    packets: tuple[int, int] | None = None    # exact packets each way (datagrams); None for TCP
    error: str = ""               # why sending it failed

    @property
    def name(self) -> str:
        return f"{_PROTO_NAME[self.proto]}/ipv{self.family}"

    @property
    def key(self) -> tuple:
        return self.family, self.proto, self.src, self.dst, self.sport, self.dport, self.icmp_id

    @property
    def header_bytes(self) -> int:
        """Bytes of IP + L4 header per packet, at least (conntrack counts whole IP packets)."""
        return (20 if self.family == 4 else 40) + _L4_HEADER[self.proto]


def event_key(e: FlowEvent) -> tuple:
    icmp_id = e.icmp[2] if e.icmp else None
    return e.family, e.proto, e.orig.src, e.orig.dst, e.orig.sport, e.orig.dport, icmp_id


def entry_key(e: ctnetlink.CtEntry) -> tuple:
    family, o = _FAMILY.get(e.family, 0), e.orig
    src, dst = (socket.inet_ntop(e.family, a) if family else a.hex() for a in (o.src, o.dst))
    if o.proto in ICMP_PROTOS:
        return family, o.proto, src, dst, 0, 0, o.src_u
    return family, o.proto, src, dst, o.src_u, o.dst_u, None


def _totals(e: FlowEvent) -> tuple[int, int, int, int]:
    return e.packets_orig, e.bytes_orig, e.packets_reply, e.bytes_reply


def _deltas(e: FlowEvent) -> tuple[int, int, int, int]:
    return e.delta_packets_orig, e.delta_bytes_orig, e.delta_packets_reply, e.delta_bytes_reply


def _counts(t: tuple[int, int, int, int]) -> str:
    return f"{t[0]} pkts {t[1]} B orig, {t[2]} pkts {t[3]} B reply"


def records_check(flow: KnownFlow, events: list[FlowEvent]) -> Check:
    """One NEW first, one DESTROY last, UPDATEs between, one flow id, clean
    flags, and deltas that add up to the DESTROY totals."""
    name = f"{flow.name} records"
    kinds = [e.kind for e in events]
    counts = f"{kinds.count(NEW)} new, {kinds.count(UPDATE)} update, {kinds.count(DESTROY)} destroy"
    problems = []
    if kinds.count(NEW) != 1 or kinds.count(DESTROY) != 1:
        problems.append("expected exactly one new and one destroy")
    elif kinds[0] != NEW or kinds[-1] != DESTROY:
        problems.append(f"out of order: {' '.join(kinds)}")
    if len({e.flow_id for e in events}) > 1:
        problems.append("more than one flow id")
    flags = 0
    for e in events:
        flags |= e.flags
    if flags & BAD_FLAGS:
        problems.append("flags " + ",".join(n for bit, n in FLAG_NAMES.items() if flags & bit & BAD_FLAGS))
    if not problems:
        sums = tuple(sum(d) for d in zip(*(_deltas(e) for e in events), strict=True))
        if sums != _totals(events[-1]):
            problems.append(f"deltas add up to {sums}, not the totals {_totals(events[-1])}")
    if problems:
        return Check(name, False, f"{counts}: " + "; ".join(problems))
    return Check(name, True, f"{counts}, one flow id, deltas add up")


def totals_check(flow: KnownFlow, destroy: FlowEvent | None, kernel: ctnetlink.CtEntry | None) -> Check:
    """DESTROY totals equal to the kernel's counters, read just before the flush."""
    name = f"{flow.name} totals"
    if kernel is None:
        return Check(name, False, "not in the router's conntrack table before the flush")
    if kernel.counters is None:
        return Check(name, False, "the kernel entry has no counters (accounting off?)")
    if destroy is None:
        return Check(name, False, f"no destroy record; kernel: {_counts(kernel.counters)}")
    if _totals(destroy) != kernel.counters:
        return Check(name, False, f"destroy {_counts(_totals(destroy))} != kernel {_counts(kernel.counters)}")
    return Check(name, True, f"destroy = kernel: {_counts(kernel.counters)}")


def bytes_check(flow: KnownFlow, destroy: FlowEvent | None) -> Check:
    """The payload is in the byte counts: exactly for datagrams (known packet
    count and size), at least payload + headers per packet for TCP."""
    name = f"{flow.name} bytes"
    if destroy is None:
        return Check(name, False, "no destroy record")
    po, bo, pr, br = _totals(destroy)
    h = flow.header_bytes
    (pay_o, pay_r) = flow.payload
    if flow.packets is not None:
        want = (flow.packets[0], pay_o + flow.packets[0] * h, flow.packets[1], pay_r + flow.packets[1] * h)
        detail = (f"{flow.packets[0]} + {flow.packets[1]} packets of {pay_o // max(flow.packets[0], 1)}"
                  f"/{pay_r // max(flow.packets[1], 1)} B payload + {h} B headers")
        if (po, bo, pr, br) != want:
            return Check(name, False, f"{detail}: expected {_counts(want)}, got {_counts((po, bo, pr, br))}")
        return Check(name, True, f"{detail}: exact")
    ok = po > 0 and pr > 0 and bo >= pay_o + po * h and br >= pay_r + pr * h
    detail = f"{pay_o} B payload in {bo} B orig, {pay_r} B in {br} B reply (>= payload + {h} B/packet)"
    return Check(name, ok, detail)


def nat_check(flows: list[KnownFlow], destroys: dict[tuple, FlowEvent],
              kernel: dict[tuple, ctnetlink.CtEntry]) -> Check:
    """Every flow's reply tuple shows the router's masquerade, as the kernel's does."""
    wrong = []
    for flow in flows:
        d, k = destroys.get(flow.key), kernel.get(flow.key)
        if d is None or k is None:
            wrong.append(f"{flow.name}: no destroy record or kernel entry")
            continue
        kernel_reply = (socket.inet_ntop(k.family, k.reply.src), socket.inet_ntop(k.family, k.reply.dst))
        if not d.nat or d.reply.dst != ROUTER_SERVER_SIDE[flow.family] or (d.reply.src, d.reply.dst) != kernel_reply:
            wrong.append(f"{flow.name}: reply {d.reply.src} -> {d.reply.dst}, kernel {kernel_reply[0]} -> "
                         f"{kernel_reply[1]}")
    if not flows:
        return Check("nat", False, "no flows were sent")
    if wrong:
        return Check("nat", False, "; ".join(wrong))
    return Check("nat", True, f"reply tuples to {ROUTER_SERVER_SIDE[4]} and {ROUTER_SERVER_SIDE[6]} "
                              "(masquerade), as the kernel's")


def losses_check(stats: dict) -> Check:
    counters = {k: stats.get(k, 0) for k in ("probe_records_lost", "probe_state_full", "decode_errors",
                                              "ctnetlink_overruns", "ends_unseen")}
    grown = {k: v for k, v in counters.items() if v}
    if grown:
        return Check("losses", False, ", ".join(f"{k} {v}" for k, v in grown.items()))
    return Check("losses", True, "no lost records, full flow map, decode errors or ctnetlink overruns")


def flow_checks(flows: list[KnownFlow], events: list[FlowEvent],
                kernel: dict[tuple, ctnetlink.CtEntry]) -> list[Check]:
    """The verdict on every flow sent, from the records the source reported
    about the router's namespace and the kernel's entries, by original tuple."""
    by_flow: dict[tuple, list[FlowEvent]] = {}
    for e in events:
        by_flow.setdefault(event_key(e), []).append(e)
    checks, sent, destroys = [], [], {}
    for flow in flows:
        if flow.error:
            checks.append(Check(f"{flow.name} traffic", False, flow.error))
            continue
        sent.append(flow)
        mine = by_flow.get(flow.key, [])
        destroy = next((e for e in reversed(mine) if e.kind == DESTROY), None)
        if destroy is not None:
            destroys[flow.key] = destroy
        checks += [records_check(flow, mine), totals_check(flow, destroy, kernel.get(flow.key)),
                   bytes_check(flow, destroy)]
    checks.append(nat_check(sent, destroys, kernel))
    return checks


def verdict(checks: list[Check]) -> tuple[str, bool]:
    failed = sum(not c.ok for c in checks)
    if failed:
        return f"self-test FAILED: {failed} of {len(checks)} checks failed", False
    return f"self-test passed: {len(checks)} of {len(checks)} checks", True


# -- the namespaces ----------------------------------------------------------------

def remove_stale() -> None:
    """Namespaces of a self-test that was killed (its pid is gone)."""
    lab.remove_stale(_NAME_RE)


class Network(lab.Lab):
    """client -- router (conntrack, masquerade) -- server: the lab, named
    conntracct-test-<pid>-<role>, with accounting, timestamps and DESTROY
    events on in the router alone."""

    def __init__(self) -> None:
        super().__init__(f"{PREFIX}{os.getpid()}-")

    def build(self) -> None:
        router = {f"net.netfilter.{name}": 1 for name in (*sysctl.MANAGED, "nf_conntrack_events")}
        router |= {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
        router |= {f"net.netfilter.nf_conntrack_{key}": seconds for key, seconds in TIMEOUTS.items()}
        try:
            super().build(sysctls={"router": router})
        except (lab.CommandError, OSError, RuntimeError) as e:
            raise EnvironmentProblem(f"cannot set up the test namespaces: {e}") from None


# -- known traffic, from sockets opened inside the namespaces ---------------------------

class Traffic:
    """Sends one flow per call from the client to the server; sockets are
    created in the namespaces (setns on this thread) and closed at the end."""

    def __init__(self, network: Network):
        self._net = network
        self._sockets: list[socket.socket] = []

    def _socket(self, role: str, family: int, kind: int, proto: int = 0) -> socket.socket:
        with self._net.entered(role):
            sock = socket.socket(_AF[family], kind, proto)
        self._sockets.append(sock)
        sock.settimeout(IO_TIMEOUT)
        return sock

    def tcp(self, family: int, send: int, reply: int) -> KnownFlow:
        flow = KnownFlow(family, TCP, CLIENT[family], SERVER[family], payload=(send, reply))
        listener = self._socket("server", family, socket.SOCK_STREAM)
        listener.bind((SERVER[family], 0))
        listener.listen(1)
        flow.dport = listener.getsockname()[1]
        received: list[int] = []

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(IO_TIMEOUT)
                    received.append(_read_all(conn))
                    conn.sendall(b"r" * reply)

        server = threading.Thread(target=serve, name="selftest-tcp-server", daemon=True)
        server.start()
        client = self._socket("client", family, socket.SOCK_STREAM)
        try:
            client.connect((SERVER[family], flow.dport))
            flow.sport = client.getsockname()[1]
            client.sendall(b"s" * send)
            client.shutdown(socket.SHUT_WR)
            got = _read_all(client)
        except OSError as e:
            flow.error = f"TCP to {SERVER[family]}: {e}"
            return flow
        finally:
            client.close()
            server.join(IO_TIMEOUT)
        if received != [send] or got != reply:
            flow.error = f"sent {send}/{reply} B, the other ends read {received or '?'}/{got}"
        return flow

    def udp(self, family: int, count: int, size: int, reply_size: int) -> KnownFlow:
        flow = KnownFlow(family, UDP, CLIENT[family], SERVER[family],
                         payload=(count * size, count * reply_size), packets=(count, count))
        server = self._socket("server", family, socket.SOCK_DGRAM)
        server.bind((SERVER[family], 0))
        client = self._socket("client", family, socket.SOCK_DGRAM)
        try:
            client.connect(server.getsockname()[:2])
            flow.sport, flow.dport = client.getsockname()[1], server.getsockname()[1]
            for _ in range(count):
                client.send(b"q" * size)
                data, peer = server.recvfrom(65536)
                server.sendto(b"a" * reply_size, peer)
                if len(data) != size or len(client.recv(65536)) != reply_size:
                    flow.error = "a datagram arrived with the wrong size"
        except OSError as e:
            flow.error = f"UDP to {SERVER[family]}: {e}"
        return flow

    def ping(self, family: int, count: int, size: int, ident: int) -> KnownFlow:
        """ICMP echo with a fixed identifier, over a raw socket."""
        proto = ICMP if family == 4 else ICMPV6
        flow = KnownFlow(family, proto, CLIENT[family], SERVER[family], icmp_id=ident,
                         payload=(count * size, count * size), packets=(count, count))
        sock = self._socket("client", family, socket.SOCK_RAW, proto)
        try:
            for seq in range(count):
                sock.sendto(icmp.echo_request(family, ident, seq, bytes(size)), (SERVER[family], 0))
                _await_echo_reply(sock, family, ident, seq)
        except OSError as e:
            flow.error = f"ICMP echo to {SERVER[family]}: {e}"
        return flow

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


def _read_all(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
    return total


def _await_echo_reply(sock: socket.socket, family: int, ident: int, seq: int) -> None:
    deadline = time.monotonic() + IO_TIMEOUT
    while time.monotonic() < deadline:
        if icmp.is_echo_reply(family, sock.recv(65536), ident, seq):
            return
    raise TimeoutError(f"no echo reply {seq} within {IO_TIMEOUT:g} s")


# -- the run -------------------------------------------------------------------------

class Recorder:
    """The agent's flow source in one mode, keeping the router's records."""

    def __init__(self, mode: str, config: Config, network: Network):
        self.router = network.inode("router")
        self.events: list[FlowEvent] = []
        self.elsewhere = 0          # records about other namespaces (kprobe/fentry see them all)
        self.failure = ""
        # netfilter mode attaches in the namespace it accounts; the others are global.
        from .probe.source import FlowSource
        self.source = FlowSource(mode, probe_settings(config), self._emit, stamped_since_start=True,
                                 netlink_rcvbuf=int(config.probe.netlink_rcvbuf),
                                 sweep_interval_s=config.probe.sweep_interval,
                                 netns_path=network.path("router") if mode == "netfilter" else None)
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="selftest-flow-reader", daemon=True)
        self._reader.start()

    def _emit(self, event: FlowEvent) -> None:
        if event.netns == self.router:
            self.events.append(event)
        else:
            self.elsewhere += 1

    def _read(self) -> None:
        try:
            self.source.run(self._stop)
        except Exception as e:   # reported as a failed check, not a traceback
            self.failure = f"{type(e).__name__}: {e}"

    def wait_for(self, done: Callable[[list[FlowEvent]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done(list(self.events)):
            if time.monotonic() > deadline or not self._reader.is_alive():
                return False
            time.sleep(0.05)
        return True

    def close(self) -> dict:
        """Stop reading; the source's counters."""
        self._stop.set()
        self._reader.join(5)
        stats = self.source.stats()
        self.source.close()
        return stats


def _have(flows: list[KnownFlow], kind: str) -> Callable[[list[FlowEvent]], bool]:
    def done(events: list[FlowEvent]) -> bool:
        seen = {event_key(e) for e in events if e.kind == kind}
        return all(f.key in seen for f in flows)
    return done


def _kernel_entries(network: Network, flows: list[KnownFlow]) -> dict[tuple, ctnetlink.CtEntry]:
    """The router's entries for our flows once their counters stop moving
    (the last ACKs of a TCP close may still be on their way)."""
    wanted = {f.key for f in flows}
    previous: dict | None = None
    deadline = time.monotonic() + 2.0
    while True:
        with network.entered("router"):
            entries = {entry_key(e): e for e in ctnetlink.dump() if entry_key(e) in wanted}
        current = {k: e.counters for k, e in entries.items()}
        if current == previous or time.monotonic() > deadline:
            return entries
        previous = current
        time.sleep(0.1)


def _send_known_traffic(traffic: Traffic) -> list[KnownFlow]:
    ident = os.getpid() & 0xFFFF
    return [traffic.tcp(4, 100_000, 10_000), traffic.tcp(6, 50_000, 5_000),
            traffic.udp(4, 3, 100, 50), traffic.udp(6, 3, 100, 50),
            traffic.ping(4, 3, 56, ident), traffic.ping(6, 3, 56, ident)]


def _exercise(network: Network, config: Config, checks: list[Check]) -> str:
    """Choose the mode, attach, send, flush, judge; appends to `checks`; the mode line."""
    requested = config.probe.mode
    with network.entered("router"):
        mode, _tried, why = choose_mode(requested)
    if mode is None:
        raise EnvironmentProblem(
            f"conntracct cannot attach its probe (probe.mode: {requested}): {why}. "
            "Run `conntracct check` for the full table; as root on a fresh Debian host, "
            "`./tasks.py setup` installs BCC and a kernel header tree.")
    try:
        recorder = Recorder(mode, config, network)
    except ProbeError as e:
        raise EnvironmentProblem(f"{e}. `conntracct check` shows what this kernel allows.") from None
    traffic = Traffic(network)
    try:
        flows = _send_known_traffic(traffic)
        sent = [f for f in flows if not f.error]
        recorder.wait_for(_have(sent, NEW), 5.0)
        kernel = _kernel_entries(network, sent)
        with network.entered("router"):
            ctnetlink.flush()
        recorder.wait_for(_have(sent, DESTROY), 5.0)
    finally:
        traffic.close()
        stats = recorder.close()
    scope = ("attached in the router's namespace" if mode == "netfilter"
             else f"sees every namespace; {recorder.elsewhere} records about others ignored")
    checks.append(Check("mode", True, f"{why}; {scope}"))
    if recorder.failure:
        checks.append(Check("flow reader", False, recorder.failure))
    checks += flow_checks(flows, recorder.events, kernel)
    checks.append(losses_check(stats))
    return f"mode {requested} -> {mode}"


@contextlib.contextmanager
def _interrupts_end_the_run() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C, so the namespaces are removed either way."""
    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Removing the namespaces is quick; a second Ctrl-C must not cut it short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def preflight() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem("conntracct test needs root: it creates network namespaces, sets conntrack "
                                 "sysctls inside them and loads BPF programs. Run it as root "
                                 "(e.g. `sudo conntracct test`).")
    for tool, package in (("ip", "iproute2 (iproute on Fedora)"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise EnvironmentProblem(f"conntracct test needs the `{tool}` command to build its test namespaces: "
                                     f"install {package}.")


def run_selftest(config: Config) -> tuple[str, bool]:
    """(report text, every check passed).  Raises EnvironmentProblem when the
    host cannot run the test (not root, no usable mode, no namespaces)."""
    preflight()
    remove_stale()
    network = Network()
    checks: list[Check] = []
    with _interrupts_end_the_run():
        try:
            network.build()
            mode_line = _exercise(network, config, checks)
        finally:
            with _uninterrupted():
                left = network.remove()
    checks.append(Check("cleanup", not left, f"namespaces left: {', '.join(left)}" if left
                        else f"namespaces {PREFIX}{os.getpid()}-{{{','.join(lab.ROLES)}}} removed"))
    summary, passed = verdict(checks)
    head = (f"conntracct self-test: kernel {platform.release()} ({platform.machine()}), {mode_line}\n"
            f"client {CLIENT[4]} {CLIENT[6]} -> router (conntrack, masquerade) -> "
            f"server {SERVER[4]} {SERVER[6]}")
    return f"{head}\n\n{render(checks)}\n\n{summary}", passed
