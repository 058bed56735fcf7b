"""The agent's own nftables table, `table inet conntracct` (conntrack.ensure_tracking).

conntrack tracks a family in a network namespace only while something there
uses it (conntracct/tracking.py).  A rule with a `ct state` expression is
enough: adding it makes the kernel register conntrack's hooks for the rule's
family (an `inet` table: IPv4 and IPv6), at conntrack's own fixed priorities.

The table holds one regular chain, hooked nowhere, with one accept-only rule:

    table inet conntracct {
        chain ensure_tracking {
            ct state new,established,related accept
        }
    }

No packet ever traverses that chain, so it cannot change a verdict, the order
of anyone's chains, or a policy, and costs nothing per packet; it exists only
so that its rule holds conntrack's registration.  A base chain (at
prerouting/output, priority -300 say) would do the same at the price of one
more chain evaluation per packet, and still be one more place where a ruleset
could interact with ours.

The table is replaced atomically at start (one nft transaction: add, delete,
add), which also removes a copy left by an agent killed with SIGKILL, and
deleted on exit.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

FAMILY, TABLE, CHAIN = "inet", "conntracct", "ensure_tracking"
SPEC = f"{FAMILY} {TABLE}"


class NftError(Exception):
    pass


def _nft(script: str | None = None, *args: str) -> subprocess.CompletedProcess:
    cmd = ["nft", *(["-f", "-"] if script is not None else args)]
    try:
        return subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NftError("nft not found: install nftables (conntrack.ensure_tracking uses it)") from None


def ruleset(pid: int) -> str:
    comment = f"added by conntracct (pid {pid}, conntrack.ensure_tracking); removed when it exits"
    return (f"table {SPEC}\n"
            f"delete table {SPEC}\n"
            f"table {SPEC} {{\n"
            f"    comment \"{comment}\"\n"
            f"    chain {CHAIN} {{\n"
            f"        comment \"hooked nowhere: its ct state rule only makes conntrack track IPv4 and IPv6\"\n"
            f"        ct state new,established,related accept\n"
            f"    }}\n"
            f"}}\n")


def present() -> bool:
    return owner() is not None


def owner() -> int | None:
    """The pid in the comment of the table there now (0: no pid), None: no table."""
    proc = _nft(None, "list", "table", FAMILY, TABLE)
    if proc.returncode != 0:
        return None
    m = re.search(r"added by conntracct \(pid (\d+)", proc.stdout)
    return int(m[1]) if m else 0


def _alive_agent(pid: int) -> bool:
    try:
        return b"conntracct" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def install(pid: int) -> str:
    """Add the table in the calling thread's namespace.  Returns "added";
    "replaced" when one was left by an agent that is gone (SIGKILL, crash);
    or "kept" when another running agent added it (it stays that agent's)."""
    before = owner()
    if before and before != pid and _alive_agent(before):
        return "kept"
    proc = _nft(ruleset(pid))
    if proc.returncode != 0:
        raise NftError(f"cannot add nftables table {SPEC}: {proc.stderr.strip() or proc.returncode}")
    return "added" if before is None else "replaced"


def remove() -> None:
    proc = _nft(None, "delete", "table", FAMILY, TABLE)
    if proc.returncode != 0 and "No such file or directory" not in proc.stderr:
        log.warning("could not delete nftables table %s: %s", SPEC, proc.stderr.strip())
