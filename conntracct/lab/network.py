"""Three private network namespaces, client -- router -- server.

    client                      router                         server
    eth0 192.0.2.2/24     c0 192.0.2.1/24     s0 198.51.100.1/24     eth0 198.51.100.2/24
         2001:db8:1::2/64    2001:db8:1::1/64    2001:db8:2::1/64         2001:db8:2::2/64

Documentation addresses only (RFC 5737, RFC 3849).  The router forwards both
families and has an ``inet`` filter chain with ``ct state`` rules, so only the
router tracks connections; it masquerades out of ``s0`` unless asked not to.
Every sysctl is written from inside its namespace: nothing outside the three
namespaces is touched.  Names are ``<prefix><role>``; the prefix holds the
creating process's pid, so namespaces a killed run left can be found and
removed (remove_stale).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import netns

ROLES = ("client", "router", "server")
#: Address by place and IP version.  "router_server" is also the masquerade address.
ADDRESSES: dict[str, dict[int, str]] = {
    "client": {4: "192.0.2.2", 6: "2001:db8:1::2"},
    "router_client": {4: "192.0.2.1", 6: "2001:db8:1::1"},
    "router_server": {4: "198.51.100.1", 6: "2001:db8:2::1"},
    "server": {4: "198.51.100.2", 6: "2001:db8:2::2"},
}
PREFIXLEN = {4: 24, 6: 64}
#: The four veth ends: (namespace role, device, place in ADDRESSES).
ENDS = (("client", "eth0", "client"), ("router", "c0", "router_client"),
        ("router", "s0", "router_server"), ("server", "eth0", "server"))
#: Default route of the two hosts: (role, the router's place that is their gateway).
GATEWAYS = (("client", "router_client"), ("server", "router_server"))
TABLE = "conntracct_test"          # the router's nftables table (inet)


class CommandError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return (f"{shlex.join(map(str, self.cmd))} exited {self.returncode}: "
                f"{(self.stderr or '').strip()} {(self.output or '').strip()}").strip()


def ip(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, input=stdin)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, ["ip", *args], proc.stdout, proc.stderr)
    return proc


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespace(name: str) -> None:
    """Kill what still runs inside (a lab's own processes, or a dead run's), then delete."""
    for pid in ip("netns", "pids", name, check=False).stdout.split():
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    ip("netns", "del", name, check=False)


def remove_stale(pattern: re.Pattern[str]) -> list[str]:
    """Delete the namespaces whose name matches `pattern` (group 1: the pid of
    the process that made them) and whose process is gone."""
    removed = []
    for name in list_namespaces():
        m = pattern.match(name)
        if m and not _pid_alive(int(m.group(1))):
            delete_namespace(name)
            removed.append(name)
    return removed


def ruleset(*, nat: bool = True, drop_invalid: bool = True) -> str:
    """The router's table: conntrack for both families (the ct state rule), a
    counter of invalid packets, masquerade towards the server."""
    invalid = "drop" if drop_invalid else "accept"
    masquerade = 'oifname "s0" masquerade' if nat else ""
    return f"""
table inet {TABLE} {{
    counter invalid {{ }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state invalid counter name "invalid" {invalid}
        ct state {{ new, established, related }} counter accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {masquerade}
    }}
}}
"""


def write_sysctls(values: Mapping[str, Any]) -> None:
    """Write ``net.*`` sysctls of the calling thread's network namespace."""
    for key, value in values.items():
        if not key.startswith("net."):
            raise ValueError(f"{key}: only network-namespace sysctls (net.*) are set in a lab")
        path = Path("/proc/sys", key.replace(".", "/"))
        try:
            path.write_text(f"{value}\n")
        except OSError as e:
            raise OSError(e.errno, f"cannot set {key}={value}: {e.strerror}") from None


class Lab:
    """The three namespaces, named ``<prefix><role>``."""

    def __init__(self, prefix: str) -> None:
        self.names = {role: f"{prefix}{role}" for role in ROLES}

    def path(self, role: str) -> str:
        """``/run/netns/<name>``, for setns(2), nsenter, BPF link creation."""
        return f"/run/netns/{self.names.get(role, role)}"

    def inode(self, role: str) -> int:
        """The namespace's inode number (what flow records carry as netns)."""
        return os.stat(self.path(role)).st_ino

    def entered(self, role: str):
        """Run the block on this thread inside namespace `role`."""
        return netns.entered(self.path(role))

    @staticmethod
    def address(place: str, family: int = 4) -> str:
        return ADDRESSES[place][family]

    def build(self, *, nat: bool = True, drop_invalid: bool = True,
              sysctls: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Namespaces, links, addresses, routes, the router's ruleset, then
        `sysctls` ({role: {key: value}}) written inside each namespace (the
        ruleset loads conntrack first, so its per-namespace sysctls exist)."""
        self.remove()      # same names from an earlier run under this pid (containers reuse pids)
        for name in self.names.values():
            ip("netns", "add", name)
        c, r, s = (self.names[role] for role in ROLES)
        ip("link", "add", "c0", "netns", r, "type", "veth", "peer", "name", "eth0", "netns", c)
        ip("link", "add", "s0", "netns", r, "type", "veth", "peer", "name", "eth0", "netns", s)
        for role, dev, place in ENDS:
            ns = self.names[role]
            ip("-n", ns, "addr", "add", f"{ADDRESSES[place][4]}/{PREFIXLEN[4]}", "dev", dev)
            ip("-n", ns, "-6", "addr", "add", f"{ADDRESSES[place][6]}/{PREFIXLEN[6]}", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        for role, gateway in GATEWAYS:
            ip("-n", self.names[role], "route", "add", "default", "via", ADDRESSES[gateway][4])
            ip("-n", self.names[role], "-6", "route", "add", "default", "via", ADDRESSES[gateway][6])
        ip("netns", "exec", r, "nft", "-f", "-", stdin=ruleset(nat=nat, drop_invalid=drop_invalid))
        for role, values in (sysctls or {}).items():
            self.set_sysctls(role, values)
        self.wait_links_up()

    def set_sysctls(self, role: str, values: Mapping[str, Any]) -> None:
        """Write ``net.*`` sysctls from inside namespace `role` (never the caller's)."""
        with self.entered(role):
            write_sysctls(values)

    def wait_links_up(self, timeout: float = 10.0) -> None:
        """Wait for operstate UP on all four veth ends.

        The kernel's linkwatch turns a new veth's operstate (and its qdisc)
        on asynchronously, about a second after ``link set up``; packets sent
        before that are dropped, which loses the first NDP/ARP solicitations
        and stalls the first flows for a retransmit interval.
        """
        ends = [(self.names[role], dev) for role, dev, _ in ENDS]
        deadline = time.monotonic() + timeout
        while ends:
            ns, dev = ends[0]
            out = ip("-n", ns, "-o", "link", "show", "dev", dev).stdout
            if "state UP" in out:
                ends.pop(0)
            elif time.monotonic() >= deadline:
                raise RuntimeError(f"{dev} in {ns} is not up after {timeout:g} s: {out}")
            else:
                time.sleep(0.02)

    def remove(self) -> list[str]:
        """Delete the namespaces (also one an interrupted build added); the names still listed afterwards."""
        mine = set(self.names.values())
        for name in list_namespaces():
            if name in mine:
                delete_namespace(name)
        return [n for n in list_namespaces() if n in mine]
