"""`conntracct check`: what this kernel allows, as a table, and the mode `auto` picks."""

from __future__ import annotations

import platform

from . import instance, netns, sysctl, tracking
from .probe.modes import Check, choose_mode


def sysctl_checks() -> list[Check]:
    out = []
    for name in sysctl.MANAGED:
        value = sysctl.read(name)
        if value is None:
            out.append(Check(name, False, "absent: nf_conntrack not loaded in this kernel/namespace"))
        else:
            note = "on" if value == 1 else "off (the agent turns it on with sysctl.manage: true)"
            out.append(Check(name, value == 1, f"{value}: {note}"))
    return out


def tracking_checks(ensure_tracking: bool) -> list[Check]:
    """A row per address family: does conntrack track it in this namespace?"""
    try:
        tracker = tracking.Tracker()
    except OSError as e:
        return [Check(f"conntrack {f}", False, f"cannot tell: {e}") for f in tracking.FAMILIES]
    try:
        states = tracker.probe_all()
    except OSError as e:
        return [Check(f"conntrack {f}", False, f"cannot tell: {e}") for f in tracking.FAMILIES]
    finally:
        tracker.close()
    out = []
    for family, state in states.items():
        name = f"conntrack {family}"
        if state.tracking:
            out.append(Check(name, True, "tracking"))
        elif state.tracking is None:
            out.append(Check(name, False, state.detail))
        elif ensure_tracking:
            out.append(Check(name, True, "not tracking yet: conntrack.ensure_tracking is on, so the agent adds "
                                         "its table inet conntracct when it starts"))
        else:
            out.append(Check(name, False, f"{state.detail}. Fix: {tracking.FIX}"))
    return out


def agent_check() -> Check:
    """Is an agent already accounting this namespace?"""
    inode = netns.inode()
    pid = instance.holder(inode)
    if pid is None:
        return Check("running agent", True, f"none accounts this network namespace ({inode})")
    who = f"conntracct pid {pid}" if pid > 0 else "a conntracct"
    return Check("running agent", True, f"{who} accounts this network namespace ({inode}); "
                                        "a second agent here would exit 2")


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
    for c in checks:
        lines.append(f"{c.name.ljust(width)}  {'ok' if c.ok else 'no':6}  {c.detail}")
    return "\n".join(lines)


def report(requested_mode: str = "auto", ensure_tracking: bool = False) -> tuple[str, bool]:
    """(text, a mode is usable).  Run in the namespace to account."""
    mode, checks, why = choose_mode(requested_mode)
    if requested_mode == "auto" and mode is not None:
        # Show every mode's verdict, not only the ones tried before the pick.
        tried = {c.name for c in checks}
        from .probe.modes import MODE_TRIES
        checks += [MODE_TRIES[m]() for m in MODE_TRIES if m not in tried]
    checks += sysctl_checks()
    checks += tracking_checks(ensure_tracking)
    checks.append(agent_check())
    head = f"kernel {platform.release()} ({platform.machine()})"
    verdict = (f"mode {requested_mode} -> {mode}: {why}" if mode
               else f"mode {requested_mode}: unusable: {why}")
    return f"{head}\n\n{render(checks)}\n\n{verdict}", mode is not None
