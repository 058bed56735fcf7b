"""Is conntrack tracking traffic in the namespace being accounted?  Per address family.

conntrack only tracks a family in a network namespace once something there
asked for it: an nftables or iptables rule using conntrack (ct state, NAT),
Docker, a firewall.  A bare host or namespace tracks nothing, and the agent,
which reads conntrack's counters, then sees no flow at all.

How it is found, the same way in every attach mode and on every kernel:
the agent sends one UDP datagram to itself over loopback (127.0.0.1, ::1)
and asks ctnetlink to delete the conntrack entry that datagram would have
made.  The entry exists exactly when conntrack's hooks are registered for
that family in that namespace, whatever registered them; deleting it leaves
nothing behind (the probe is not attached yet, or sees one short flow).  About
0.1 ms per family.  The other way, listing the registered netfilter hooks
(`nft list hooks`, NFNL_SUBSYS_HOOK), needs CONFIG_NETFILTER_NETLINK_HOOK,
which this project's CI kernel (6.18) lacks: it prints nothing there.

What it cannot see: a `notrack` rule for loopback alone (rare) makes a family
look untracked; loopback down or without an address (a namespace nobody set
up) means "unknown" for that family.

Traffic is counted from the kernel's SNMP counters of the namespace
(/proc/net/snmp, /proc/net/snmp6: IP packets received, including forwarded
ones, plus packets sent), minus ICMPv6 neighbour discovery and MLD, which
conntrack never tracks.  Packets counted while a family is not tracked are the
"untracked packets" figure.

Sockets and /proc files are opened in the accounted namespace and keep it, so
later polls need no setns (and no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass

from .probe import ctnetlink as ct

log = logging.getLogger(__name__)

# family name -> (address family, loopback address)
FAMILIES = {"ipv4": (socket.AF_INET, "127.0.0.1"), "ipv6": (socket.AF_INET6, "::1")}
LABEL = {"ipv4": "IPv4", "ipv6": "IPv6"}

# ICMPv6 messages conntrack never tracks (neighbour discovery, MLD) are taken
# out of the IPv6 traffic count; echo requests and replies are kept.
_ICMP6_KEPT = ("Icmp6InEchos", "Icmp6InEchoReplies", "Icmp6OutEchos", "Icmp6OutEchoReplies")

FIX = ("set conntrack.ensure_tracking: true (or run `conntracct run --ensure-tracking`): the agent then "
       "adds an accept-only nftables table `inet conntracct` while it runs; or use conntrack in your "
       "own ruleset (any rule matching `ct state`, or NAT)")


@dataclass
class FamilyState:
    family: str           # "ipv4" / "ipv6"
    tracking: bool | None  # None: cannot tell
    detail: str


class Tracker:
    """Tracking probes and traffic counters of one namespace.  Create it while
    in that namespace (netns.entered); use it from anywhere afterwards."""

    def __init__(self):
        self._socks: dict[str, socket.socket | None] = {}
        self._why_unknown: dict[str, str] = {}
        for name, (af, addr) in FAMILIES.items():
            try:
                sock = socket.socket(af, socket.SOCK_DGRAM)
            except OSError as e:
                self._socks[name], self._why_unknown[name] = None, f"no {LABEL[name]} sockets: {e.strerror}"
                continue
            try:
                sock.bind((addr, 0))
            except OSError as e:
                sock.close()
                self._socks[name] = None
                self._why_unknown[name] = f"cannot tell: loopback has no {addr} here ({e.strerror}; is lo up?)"
                continue
            sock.setblocking(False)
            self._socks[name] = sock
        self._nl = ct._socket(1 << 16)
        self._seq = 0
        self._snmp = open("/proc/thread-self/net/snmp", "rb", buffering=0)
        self._snmp6 = open("/proc/thread-self/net/snmp6", "rb", buffering=0) \
            if os.path.exists("/proc/thread-self/net/snmp6") else None

    # -- is the family tracked? ------------------------------------------

    def probe(self, family: str) -> FamilyState:
        sock = self._socks[family]
        if sock is None:
            return FamilyState(family, None, self._why_unknown[family])
        af, addr = FAMILIES[family]
        port = sock.getsockname()[1]
        try:
            sock.sendto(b"conntracct tracking probe", (addr, port))
        except OSError as e:
            return FamilyState(family, None, f"cannot tell: loopback send failed ({e.strerror})")
        self._drain(sock)
        raw = socket.inet_pton(af, addr)
        try:
            tracked = self._delete(af, ct.CtTuple(raw, raw, socket.IPPROTO_UDP, port, port))
        except OSError as e:     # e.g. EPERM without CAP_NET_ADMIN
            return FamilyState(family, None, f"cannot tell: {e}")
        if tracked:
            return FamilyState(family, True, "tracking")
        return FamilyState(family, False, f"not tracking: no rule in this network namespace makes conntrack "
                                          f"track {LABEL[family]}, so the agent sees no {LABEL[family]} flow")

    def probe_all(self) -> dict[str, FamilyState]:
        return {family: self.probe(family) for family in FAMILIES}

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        # loopback delivery is asynchronous (softirq); the datagram is ours
        for _ in range(50):
            try:
                sock.recv(64)
                return
            except BlockingIOError:
                time.sleep(0.001)

    def _delete(self, af: int, orig: ct.CtTuple) -> bool:
        """Delete the entry with this original tuple: True if it existed."""
        self._seq += 1
        body = ct._NFGENMSG.pack(af, 0, 0) + ct._nla(ct.CTA_TUPLE_ORIG | ct.NLA_F_NESTED, ct._tuple_attrs(af, orig))
        msg_type = (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_DELETE
        self._nl.send(ct._NLMSGHDR.pack(ct._NLMSGHDR.size + len(body), msg_type,
                                        ct.NLM_F_REQUEST | ct.NLM_F_ACK, self._seq, 0) + body)
        buf = self._nl.recv(4096)
        try:
            ct.raise_netlink_error(buf, 0, "ctnetlink delete")
        except ct.CtnetlinkError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    # -- traffic ---------------------------------------------------------

    def traffic(self) -> dict[str, int]:
        """Packets (received, forwarded or sent) per family so far, in the namespace."""
        self._snmp.seek(0)
        lines = [line.split() for line in self._snmp.read().decode().splitlines() if line.startswith("Ip:")]
        ip = dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=True)) if len(lines) >= 2 else {}
        out = {"ipv4": ip.get("InReceives", 0) + ip.get("OutRequests", 0), "ipv6": 0}
        if self._snmp6 is not None:
            self._snmp6.seek(0)
            v6 = {k: int(v) for k, v in (line.split() for line in self._snmp6.read().decode().splitlines()
                                         if line.strip())}
            out["ipv6"] = (v6.get("Ip6InReceives", 0) + v6.get("Ip6OutRequests", 0)
                           - v6.get("Icmp6InMsgs", 0) - v6.get("Icmp6OutMsgs", 0)
                           + sum(v6.get(k, 0) for k in _ICMP6_KEPT))
        return out

    def close(self) -> None:
        for sock in self._socks.values():
            if sock is not None:
                sock.close()
        self._nl.close()
        self._snmp.close()
        if self._snmp6 is not None:
            self._snmp6.close()


class TrackingWatch:
    """The running agent's view: per family, tracked or not, and the packets
    that passed while not.  poll() is called about once a second; it reads
    the traffic counters every `interval` and, while a family is not tracked,
    probes it again at most every `reprobe` seconds (to notice a rule added
    later).  One warning, with the fix, per family and untracked spell, once
    traffic passes."""

    def __init__(self, tracker: Tracker, states: dict[str, FamilyState],
                 interval: float = 2.0, reprobe: float = 10.0):
        self._tracker = tracker
        self.states = states
        self.untracked_packets = dict.fromkeys(FAMILIES, 0)
        self._interval, self._reprobe = interval, reprobe
        self._last = tracker.traffic()
        now = time.monotonic()
        self._next_poll = now + interval
        self._next_probe = now + reprobe
        self._warned: set[str] = set()

    def poll(self) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self._interval
        current = self._tracker.traffic()
        passed = {f: current[f] - self._last.get(f, 0) for f in FAMILIES}
        self._last = current
        untracked = [f for f in FAMILIES if self.states[f].tracking is False and passed[f] > 0]
        for family in untracked:
            self.untracked_packets[family] += passed[family]
        new = [f for f in untracked if f not in self._warned]
        if new:
            self._warned.update(new)
            log.warning("%s traffic passes untracked: %d packets in %.0f s, and conntrack does not track %s in "
                        "this network namespace, so the agent reports none of it. Fix: %s",
                        " and ".join(LABEL[f] for f in new), sum(passed[f] for f in new), self._interval,
                        " and ".join(LABEL[f] for f in new), FIX)
        if now >= self._next_probe and any(s.tracking is False for s in self.states.values()):
            self._next_probe = now + self._reprobe
            self._probe_again()

    def _probe_again(self) -> None:
        for family, state in self.states.items():
            if state.tracking is False:
                fresh = self._tracker.probe(family)
                if fresh.tracking:
                    log.info("conntrack now tracks %s in this network namespace", LABEL[family])
                    self._warned.discard(family)
                self.states[family] = fresh
        self._last = self._tracker.traffic()   # the probe's own two packets are not traffic

    def figures(self) -> dict[str, dict[str, int]]:
        """Per family: tracking (1, 0, or -1 for unknown) and untracked packets so far."""
        return {f: {"tracking": {True: 1, False: 0, None: -1}[self.states[f].tracking],
                    "untracked_packets": self.untracked_packets[f]} for f in FAMILIES}
