"""The Linux capabilities the agent needs, checked against its effective set.

Measured by dropping each one (README, "Least privilege"): the agent runs as
an unprivileged user holding, as ambient capabilities,

- CAP_BPF: create the probe's maps and load its programs;
- CAP_PERFMON: the probe reads kernel memory (bpf_probe_read_kernel), and
  kprobe/fentry programs are tracing programs; without it the tiny detection
  program loads but the probe is refused;
- CAP_NET_ADMIN: BPF netfilter links, ctnetlink (events, lookups, the
  tracking probe), the conntrack sysctls of its namespace, nftables
  (conntrack.ensure_tracking);
- CAP_SYS_ADMIN to enter another namespace (probe.netns: setns), and in
  kprobe mode: perf_event_open of the kprobe PMU where
  kernel.perf_event_paranoid is 3 (Debian's default) wants it, not
  CAP_PERFMON (measured in the 6.1 guest).

CAP_SYS_ADMIN also satisfies the kernel's CAP_BPF and CAP_PERFMON checks
(bpf_capable(), perfmon_capable()); kernels before 5.8 know neither and ask
for CAP_SYS_ADMIN instead.  CAP_SYS_RESOURCE is not needed: since 5.11 BPF
memory is charged to the memory cgroup, not RLIMIT_MEMLOCK.
"""

from __future__ import annotations

import os
from pathlib import Path

CAP_NUMBERS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
WHY = {
    "CAP_BPF": "load the probe's BPF programs and maps",
    "CAP_PERFMON": "the probe reads kernel memory (bpf_probe_read_kernel) and traces kernel functions",
    "CAP_NET_ADMIN": "ctnetlink, BPF netfilter links, the conntrack sysctls and nftables",
    "CAP_SYS_ADMIN": "enter the namespace given as probe.netns (setns)",
}


def effective(status: str | None = None) -> int:
    """The calling thread's effective capability mask (CapEff)."""
    text = status if status is not None else Path("/proc/thread-self/status").read_text()
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


KPROBE_NEEDS = ("create its kprobes: perf_event_open of the kernel's kprobe PMU asks for CAP_SYS_ADMIN where "
                "kernel.perf_event_paranoid is 3 (Debian's default; measured on its 6.1), CAP_PERFMON is refused")


def required(netns: str | None, mode: str = "auto") -> dict[str, str]:
    """Capability name -> why, for this configuration (probe.netns, probe.mode)."""
    need = {name: WHY[name] for name in ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")}
    if last_cap() < CAP_NUMBERS["CAP_BPF"]:
        # before 5.8 CAP_SYS_ADMIN stands for both
        need.pop("CAP_BPF")
        need.pop("CAP_PERFMON")
        need["CAP_SYS_ADMIN"] = "load and attach BPF programs (this kernel predates CAP_BPF and CAP_PERFMON)"
    if netns is not None:
        need["CAP_SYS_ADMIN"] = WHY["CAP_SYS_ADMIN"]
    if mode == "kprobe":
        # CAP_SYS_ADMIN also passes the kernel's CAP_BPF and CAP_PERFMON checks
        need.pop("CAP_BPF", None)
        need.pop("CAP_PERFMON", None)
        need["CAP_SYS_ADMIN"] = KPROBE_NEEDS
    return need


def _held(mask: int, name: str) -> bool:
    if mask >> CAP_NUMBERS[name] & 1:
        return True
    # the kernel's bpf_capable() / perfmon_capable() accept CAP_SYS_ADMIN too
    return name in ("CAP_BPF", "CAP_PERFMON") and bool(mask >> CAP_NUMBERS["CAP_SYS_ADMIN"] & 1)


def missing(netns: str | None, mask: int | None = None, mode: str = "auto") -> dict[str, str]:
    mask = effective() if mask is None else mask
    return {name: why for name, why in required(netns, mode).items() if not _held(mask, name)}


def describe(mask: int | None = None) -> str:
    mask = effective() if mask is None else mask
    held = [name for name in CAP_NUMBERS if mask >> CAP_NUMBERS[name] & 1]
    who = "root" if os.geteuid() == 0 else f"not root (uid {os.geteuid()})"
    return f"{who}, holding {', '.join(held) if held else 'none of ' + ', '.join(CAP_NUMBERS)}"


def problem(netns: str | None, mode: str = "auto") -> str | None:
    """A message naming the missing capabilities, or None."""
    lacking = missing(netns, mode=mode)
    if not lacking:
        return None
    names = ", ".join(lacking)
    reasons = "; ".join(f"{name}: {why}" for name, why in lacking.items())
    return (f"missing capabilit{'y' if len(lacking) == 1 else 'ies'} {names} ({describe()}): {reasons}. "
            "Run as root, or grant them, e.g. systemd AmbientCapabilities= (dist/conntracct.service) or "
            f"`setpriv --inh-caps +{',+'.join(n[4:].lower() for n in required(netns, mode))} "
            f"--ambient-caps +{',+'.join(n[4:].lower() for n in required(netns, mode))} ...`")
