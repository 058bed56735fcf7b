"""What the agent does in the namespace it accounts, around the probe's life:
one agent per namespace (instance.py), its own nftables table when
conntrack.ensure_tracking asks for it (nftable.py), and the check that
conntrack tracks IPv4 and IPv6 there at all (tracking.py).

enter() and leave() run with the calling thread in that namespace
(netns.entered); poll() and figures() run anywhere.
"""

from __future__ import annotations

import logging
import os

from . import instance, netns, nftable
from .tracking import FIX, LABEL, Tracker, TrackingWatch

log = logging.getLogger("conntracct")


class SetupError(Exception):
    """The namespace cannot be accounted as configured; the message says why."""


class NamespaceSetup:
    def __init__(self, ensure_tracking: bool):
        self.ensure_tracking = ensure_tracking
        self.lock: instance.InstanceLock | None = None
        self.table_added = False
        self.tracker: Tracker | None = None
        self.watch: TrackingWatch | None = None

    def enter(self) -> None:
        self.lock = instance.InstanceLock(netns.inode())
        try:
            self.lock.acquire()
        except instance.AlreadyRunning as e:
            self.lock = None
            raise SetupError(str(e)) from None
        if self.ensure_tracking:
            self._add_table()
        self.tracker = Tracker()
        states = self.tracker.probe_all()
        self.watch = TrackingWatch(self.tracker, states)
        tracked = [LABEL[f] for f, s in states.items() if s.tracking]
        untracked = [LABEL[f] for f, s in states.items() if s.tracking is False]
        unknown = [f"{LABEL[f]} ({s.detail})" for f, s in states.items() if s.tracking is None]
        parts = ([f"tracks {' and '.join(tracked)}"] if tracked else []) + \
                ([f"does not track {' and '.join(untracked)}"] if untracked else [])
        log.info("conntrack %s in this network namespace%s", ", ".join(parts) or "state unknown",
                 f"; unknown: {', '.join(unknown)}" if unknown else "")
        if untracked:
            log.info("flows of %s will not be reported (a warning follows if such traffic passes). Fix: %s",
                     " and ".join(untracked), FIX)

    def _add_table(self) -> None:
        try:
            done = nftable.install(os.getpid())
        except nftable.NftError as e:
            raise SetupError(f"conntrack.ensure_tracking: {e}") from None
        if done == "kept":
            log.info("conntrack.ensure_tracking: nftables table %s is already there, added by the conntracct "
                     "with pid %s, which still runs: left to it", nftable.SPEC, nftable.owner())
            return
        self.table_added = True
        log.info("conntrack.ensure_tracking: added nftables table %s (one accept-only `ct state` rule in a chain "
                 "hooked nowhere, no policy) so that conntrack tracks IPv4 and IPv6 in this network namespace; "
                 "it is deleted when the agent exits%s", nftable.SPEC,
                 " (replaced one left by an agent that did not exit cleanly)" if done == "replaced" else "")

    def poll(self) -> None:
        if self.watch is not None:
            self.watch.poll()

    def figures(self) -> dict[str, dict[str, int]]:
        return self.watch.figures() if self.watch is not None else {}

    @property
    def active(self) -> bool:
        """enter() left something for leave() to undo."""
        return self.lock is not None or self.table_added or self.tracker is not None

    def leave(self) -> None:
        """Undo enter(); safe to call twice and after a partial enter()."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.table_added:
            nftable.remove()
            self.table_added = False
            log.info("deleted nftables table %s", nftable.SPEC)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
