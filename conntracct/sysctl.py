"""The conntrack sysctls the agent depends on, in its own network namespace."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc/sys/net/netfilter")
ACCT = "nf_conntrack_acct"
TIMESTAMP = "nf_conntrack_timestamp"
MANAGED = (ACCT, TIMESTAMP)


class SysctlError(Exception):
    pass


def read(name: str, proc: Path = PROC) -> int | None:
    try:
        return int((proc / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write(name: str, value: int, proc: Path = PROC) -> None:
    try:
        (proc / name).write_text(f"{value}\n")
    except OSError as e:
        raise SysctlError(f"cannot set net.netfilter.{name}={value}: {e.strerror}") from None


def ensure_conntrack_loaded(proc: Path = PROC) -> None:
    """nf_conntrack may be a module not loaded yet; its sysctls appear with it."""
    if (proc / ACCT).exists():
        return
    subprocess.run(["modprobe", "nf_conntrack"], capture_output=True, check=False)
    if not (proc / ACCT).exists():
        raise SysctlError("conntrack is not available: /proc/sys/net/netfilter/nf_conntrack_acct is missing "
                          "and `modprobe nf_conntrack` did not load it")


class ConntrackSysctls:
    """Turns accounting and timestamps on; remembers what to restore."""

    def __init__(self, proc: Path = PROC):
        self._proc = proc
        self.previous: dict[str, int | None] = {}

    def enable(self) -> dict[str, int | None]:
        ensure_conntrack_loaded(self._proc)
        for name in MANAGED:
            before = read(name, self._proc)
            self.previous[name] = before
            if before != 1:
                write(name, 1, self._proc)
                log.info("set net.netfilter.%s=1 (was %s)", name, before)
        if self.previous.get(ACCT) == 0:
            log.warning("net.netfilter.nf_conntrack_acct was off: connections opened before now carry no "
                        "counters and are reported with the no_acct flag")
        return self.previous

    def restore(self) -> None:
        for name, value in self.previous.items():
            if value is not None and value != read(name, self._proc):
                write(name, value, self._proc)
                log.info("restored net.netfilter.%s=%s", name, value)
        self.previous.clear()
