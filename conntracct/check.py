"""`conntracct check`: what this kernel allows, as a table, and the mode `auto` picks."""

from __future__ import annotations

import platform

from . import sysctl
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


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
    for c in checks:
        lines.append(f"{c.name.ljust(width)}  {'ok' if c.ok else 'no':6}  {c.detail}")
    return "\n".join(lines)


def report(requested_mode: str = "auto") -> tuple[str, bool]:
    """(text, a mode is usable)."""
    mode, checks, why = choose_mode(requested_mode)
    if requested_mode == "auto" and mode is not None:
        # Show every mode's verdict, not only the ones tried before the pick.
        tried = {c.name for c in checks}
        from .probe.modes import MODE_TRIES
        checks += [MODE_TRIES[m]() for m in MODE_TRIES if m not in tried]
    checks += sysctl_checks()
    head = f"kernel {platform.release()} ({platform.machine()})"
    verdict = (f"mode {requested_mode} -> {mode}: {why}" if mode
               else f"mode {requested_mode}: unusable: {why}")
    return f"{head}\n\n{render(checks)}\n\n{verdict}", mode is not None
