"""The tests' handle on the namespace lab (conntracct.lab): client -- router
(NAT) -- server, plus what only tests need: processes started in the
namespaces, conntrack-tools listings and events, traffic generators.

The address plan, the ruleset, link waiting and namespace removal are the
package's (conntracct/lab/network.py), shared with `conntracct test`.
Namespace names are ``cta-<pid>-<n>-<role>``.  Namespaces left behind by a
dead process (``cta-<pid>-...`` whose pid no longer exists) are removed when
a new Topology starts.  Nothing outside the three namespaces is touched:
every sysctl is written from inside its namespace.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from conntracct.lab import network as lab
from conntracct.lab.network import CommandError, list_namespaces

from . import conntrack as ct

PREFIX = "cta-"
ROLES = lab.ROLES
_NAME_RE = re.compile(r"^cta-(\d+)-(\d+)-(client|router|server)$")
_SEQ = itertools.count(1)

#: Short conntrack timeouts (seconds) so flows end quickly in the router.
#: Keys are ``net.netfilter.nf_conntrack_<key>``.
DEFAULT_TIMEOUTS: dict[str, int] = {
    "tcp_timeout_syn_sent": 5,
    "tcp_timeout_syn_recv": 5,
    "tcp_timeout_fin_wait": 2,
    "tcp_timeout_close_wait": 2,
    "tcp_timeout_last_ack": 2,
    "tcp_timeout_time_wait": 1,
    "tcp_timeout_close": 1,
    "udp_timeout": 2,
    "udp_timeout_stream": 2,
    "icmp_timeout": 2,
    "icmpv6_timeout": 2,
}

__all__ = ["DEFAULT_TIMEOUTS", "PREFIX", "CommandError", "Topology", "cleanup_stale", "list_namespaces"]


def cleanup_stale() -> list[str]:
    """Remove ``cta-<pid>-...`` namespaces whose creating process is gone
    (processes still running inside them are killed first)."""
    return lab.remove_stale(_NAME_RE)


class Topology:
    """client -- router -- server namespaces; use as a context manager.

    Parameters:
        acct, timestamp: set ``nf_conntrack_acct`` / ``nf_conntrack_timestamp``
            to 1 in the router.  Default False leaves them 0 (the kernel
            default), for tests where the agent under test turns them on.
        timeouts: conntrack timeouts for the router, merged over
            :data:`DEFAULT_TIMEOUTS`; keys as there or full sysctl names;
            a value of None keeps the kernel default for that key.
        nat: masquerade IPv4 and IPv6 out of the router's server side.
        drop_invalid: drop (and count) ``ct state invalid`` in forward.
        conntrack_events: ``nf_conntrack_events`` in the router.  1 (default
            here) gives every entry the event extension; the kernel default 2
            gives it only to entries created while an event listener exists,
            so entries created earlier never produce DESTROY events.  None
            leaves the kernel default.
        conntrack_max: ``nf_conntrack_max`` in the router (the kernel refuses
            values above the initial namespace's).  None leaves it.
        sysctls: extra ``{role: {key: value}}`` written inside the namespaces.
    """

    def __init__(self, *, acct: bool = False, timestamp: bool = False,
                 timeouts: Mapping[str, int | None] | None = None, nat: bool = True,
                 drop_invalid: bool = True, conntrack_events: int | None = 1,
                 conntrack_max: int | None = None,
                 sysctls: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.acct = acct
        self.timestamp = timestamp
        self.timeouts: dict[str, int | None] = dict(DEFAULT_TIMEOUTS)
        self.timeouts.update(timeouts or {})
        self.nat = nat
        self.drop_invalid = drop_invalid
        self.events_mode = conntrack_events
        self.ct_max = conntrack_max
        self.extra_sysctls = {k: dict(v) for k, v in (sysctls or {}).items()}
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_SEQ)}-"
        self.lab = lab.Lab(self.prefix)
        self.names = self.lab.names
        self._procs: list[subprocess.Popen[Any]] = []
        self._ports = itertools.count(20000)
        self.started = False

        # Addresses, by place and family: client_v4, router_server_v6... (the lab's plan).
        for place, by_family in lab.ADDRESSES.items():
            for family, address in by_family.items():
                setattr(self, f"{place}_v{family}", address)
        # What the server sees as the client's address (masquerade).
        self.nat_v4 = self.router_server_v4 if nat else self.client_v4
        self.nat_v6 = self.router_server_v6 if nat else self.client_v6

    # -- naming ------------------------------------------------------------
    @property
    def client(self) -> str:
        return self.names["client"]

    @property
    def router(self) -> str:
        return self.names["router"]

    @property
    def server(self) -> str:
        return self.names["server"]

    def name(self, ns: str) -> str:
        """Full namespace name for a role ("client"...) or a full name."""
        return self.names.get(ns, ns)

    def ns_path(self, ns: str) -> str:
        """``/run/netns/<name>``, for setns(2) / nsenter / BPF link creation."""
        return self.lab.path(ns)

    def netns_inode(self, ns: str) -> int:
        """The namespace's inode number (what flow records carry as netns)."""
        return self.lab.inode(ns)

    def addr(self, role: str, family: int = 4) -> str:
        """Address of ``client``/``server``/``router_client``/``router_server``/``nat``."""
        return getattr(self, f"{role}_v{family}")

    def next_port(self) -> int:
        return next(self._ports)

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> Topology:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> Topology:
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.started = True
        return self

    def _build(self) -> None:
        router: dict[str, Any] = {
            "net.ipv4.ip_forward": 1,
            "net.ipv6.conf.all.forwarding": 1,
            "net.netfilter.nf_conntrack_acct": int(self.acct),
            "net.netfilter.nf_conntrack_timestamp": int(self.timestamp),
        }
        if self.events_mode is not None:
            router["net.netfilter.nf_conntrack_events"] = self.events_mode
        if self.ct_max is not None:
            router["net.netfilter.nf_conntrack_max"] = self.ct_max
        for key, value in self.timeouts.items():
            if value is None:
                continue
            if not key.startswith("net."):
                key = f"net.netfilter.nf_conntrack_{key}"
            router[key] = value
        sysctls: dict[str, dict[str, Any]] = {
            "router": router,
            # Room for churn: 64k client ports, reuse of TIME_WAIT ports.
            "client": {"net.ipv4.ip_local_port_range": "1024 65535", "net.ipv4.tcp_tw_reuse": 1},
            "server": {"net.core.somaxconn": 65535, "net.ipv4.tcp_max_syn_backlog": 65535},
        }
        for role, extra in self.extra_sysctls.items():
            sysctls[role].update(extra)
        self.lab.build(nat=self.nat, drop_invalid=self.drop_invalid, sysctls=sysctls)

    def close(self) -> None:
        """Stop every process started here, delete the namespaces. Idempotent."""
        for proc in list(self._procs):
            self._stop_proc(proc)
        self._procs.clear()
        self.lab.remove()     # also kills what is left inside: only this Topology's processes
        self.started = False

    @staticmethod
    def _stop_proc(proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def _forget(self, proc: subprocess.Popen[Any]) -> None:
        if proc in self._procs:
            self._procs.remove(proc)

    # -- running things ----------------------------------------------------
    def _argv(self, ns: str, cmd: tuple[Any, ...]) -> list[str]:
        return ["ip", "netns", "exec", self.name(ns), *map(str, cmd)]

    def run(self, ns: str, *cmd: Any, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in namespace ``ns`` (role or full name), capture text output."""
        argv = self._argv(ns, cmd)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def popen(self, ns: str, *cmd: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in namespace ``ns``; it is stopped by :meth:`close`."""
        proc = subprocess.Popen(self._argv(ns, cmd), **kwargs)
        self._procs.append(proc)
        return proc

    def set_sysctls(self, ns: str, values: Mapping[str, Any]) -> None:
        """Write ``net.*`` sysctls from inside ``ns`` (never in the caller's namespace)."""
        self.lab.set_sysctls(ns, values)

    def sysctl(self, ns: str, key: str) -> str:
        return self.run(ns, "cat", f"/proc/sys/{key.replace('.', '/')}").stdout.strip()

    # -- conntrack in the router -------------------------------------------
    def conntrack_list(self, extended: bool = True, *, ns: str = "router",
                       args: tuple[str, ...] = ()) -> list[ct.Flow]:
        """``conntrack -L`` parsed (see :mod:`tests.netns.conntrack`).

        ``extended=True`` uses ``-o extended,id,ktimestamp``; False uses the
        default format (no family column, no id).  ``args`` are extra
        conntrack filter options, e.g. ``("-p", "tcp")``.
        """
        opts = ["-o", "extended,id,ktimestamp"] if extended else []
        out = self.run(ns, "conntrack", "-L", *opts, *args).stdout
        return ct.parse_flows(out)

    def conntrack_events(self, kinds: tuple[str, ...] = ("DESTROY",), *,
                         ns: str = "router") -> ct.EventCapture:
        """Context manager capturing ``conntrack -E`` events; see EventCapture.

            with topo.conntrack_events() as cap:
                ...
            cap.events  # parsed DESTROY events, complete once the block exits
        """
        return ct.EventCapture(self, ns, kinds).start()

    def flush(self, ns: str = "router") -> None:
        """``conntrack -F``: delete every entry (each emits a DESTROY event)."""
        self.run(ns, "conntrack", "-F")

    def conntrack_stats(self, ns: str = "router") -> dict[str, int]:
        """``conntrack -S`` summed over CPUs (drop, early_drop, insert_failed...)."""
        return ct.parse_stats(self.run(ns, "conntrack", "-S").stdout)

    def conntrack_count(self, ns: str = "router") -> int:
        return int(self.sysctl(ns, "net.netfilter.nf_conntrack_count"))

    def invalid_packets(self) -> int:
        """Packets the router's ``ct state invalid`` rule has counted."""
        out = self.run("router", "nft", "list", "counter", "inet", lab.TABLE, "invalid").stdout
        m = re.search(r"packets (\d+)", out)
        return int(m.group(1)) if m else 0

    def wait_conntrack_empty(self, timeout: float = 15.0, ns: str = "router") -> int:
        """Wait until the table is empty (listing reaps expired entries)."""
        deadline = time.monotonic() + timeout
        while True:
            self.run(ns, "conntrack", "-L", check=False)
            count = self.conntrack_count(ns)
            if count == 0 or time.monotonic() >= deadline:
                return count
            time.sleep(0.25)

    # -- traffic (see tests.netns.traffic) -----------------------------------
    def tcp_transfer(self, nbytes: int, reply_bytes: int = 0, **kw: Any) -> Any:
        from . import traffic
        return traffic.tcp_transfer(self, nbytes, reply_bytes, **kw)

    def udp_exchange(self, count: int = 3, size: int = 64, **kw: Any) -> Any:
        from . import traffic
        return traffic.udp_exchange(self, count, size, **kw)

    def ping(self, count: int = 3, **kw: Any) -> Any:
        from . import traffic
        return traffic.ping(self, count, **kw)

    def churn(self, duration: float = 10.0, rate: float = 5000.0, **kw: Any) -> Any:
        from .churn import churn
        return churn(self, duration, rate, **kw)
