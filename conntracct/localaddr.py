"""The host's own addresses, read from /proc (no subprocess, no extra package).

/proc/net is per network namespace, so this is the set of addresses of the
namespace the agent runs in — the one whose conntrack table it watches.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from .configtypes import IPNetwork

log = logging.getLogger(__name__)

PROC_NET = Path("/proc/net")
# Used when /proc gives nothing (not Linux, /proc not mounted): loopback only.
FALLBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def ipv4_local(fib_trie: str) -> list[IPNetwork]:
    """Local IPv4 addresses from /proc/net/fib_trie: every prefix marked
    "host LOCAL" (all addresses, secondary ones too — SIOCGIFADDR sees only the
    primary).  127.0.0.0/8 shows up as a whole, as the kernel treats it."""
    found: list[IPNetwork] = []
    address = None
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith(("|--", "+--")):
            address = text[3:].split()[0]
        elif text.endswith("host LOCAL") and address and text.startswith("/"):
            found.append(ipaddress.ip_network(f"{address}{text.split()[0]}", strict=False))
    return found


def ipv6_local(if_inet6: str) -> list[IPNetwork]:
    """Local IPv6 addresses from /proc/net/if_inet6 (32 hex digits first on each line)."""
    found: list[IPNetwork] = []
    for line in if_inet6.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.append(ipaddress.IPv6Network((int(fields[0], 16), 128)))
    return found


def host_networks(proc_net: Path = PROC_NET) -> list[IPNetwork]:
    """Every local address of this network namespace, as /32 and /128
    networks (127.0.0.0/8 as a whole), without duplicates."""
    found: list[IPNetwork] = []
    for name, parse in (("fib_trie", ipv4_local), ("if_inet6", ipv6_local)):
        try:
            found += parse((proc_net / name).read_text())
        except OSError as exc:   # IPv6 disabled, /proc not mounted...
            log.debug("cannot read %s: %s", proc_net / name, exc)
    if not found:
        log.warning("no local addresses found in %s; treating only loopback as local", proc_net)
        return list(FALLBACK)
    return list(dict.fromkeys(found))
