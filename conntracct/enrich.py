"""Enrichment: drop ignored flows, add configured labels and the direction.

Runs on the reader thread for every record, so each address is classified
once and cached: hosts repeat far more than they vary.  A record that comes
unlabelled (every probe record) gets one of four label dicts made once, one
per direction, shared by every record of that direction: records are
read-only once enriched (the sinks of one record already share it).  What a
flow gets depends only on its addresses, so it is worked out once per flow
and kept in FlowEvent.memo (records from the probe decoder carry one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .config import EnrichConfig
from .configtypes import IPNetwork
from .flow import FlowEvent
from .localaddr import host_networks
from .selfmetrics import StageStats

CACHE_LIMIT = 65536   # addresses; past it the cache starts over (bounded memory)
_UNKNOWN = object()


def direction(src_local: bool, dst_local: bool) -> str:
    if src_local:
        return "local" if dst_local else "outbound"
    return "inbound" if dst_local else "forward"


class Enricher:
    """`enricher(event)` -> the event, labelled, or None if it is ignored.

    Direction: the source is the original tuple's source; the destination is
    where the flow really ends, the reply tuple's source — the same as the
    original destination unless the flow is DNATed, where it tells a
    port-forward through this host ("forward") from a redirect to a local
    service ("inbound")."""

    def __init__(self, config: EnrichConfig, stats: StageStats | None = None,
                 local: Iterable[IPNetwork] | None = None):
        if local is None:
            local = config.local_addresses if config.local_addresses is not None else host_networks()
        self._local = tuple(local)
        self._ignore = tuple(config.ignore)
        self._labels = dict(config.labels)
        self._stats = stats
        self._cache: dict[str, tuple[bool, bool]] = {}   # address -> (ignored, local)
        # (src local, end local) as 2*src + end -> the configured labels and
        # the direction, in the order update() then ["direction"] gives.
        self._label_sets = tuple({**self._labels, "direction": direction(bool(i & 2), bool(i & 1))}
                                 for i in range(4))

    @property
    def local_networks(self) -> tuple[IPNetwork, ...]:
        return self._local

    def _classify(self, address: str) -> tuple[bool, bool]:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            verdict = (False, False)
        else:
            verdict = (any(ip in net for net in self._ignore), any(ip in net for net in self._local))
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[address] = verdict
        return verdict

    def __call__(self, event: FlowEvent) -> FlowEvent | None:
        memo = event.memo
        if memo is not None and not event.labels:
            # The verdict depends only on the flow's addresses: once per flow
            # (FlowEvent.memo).
            labels = memo.get(self, _UNKNOWN)
            if labels is _UNKNOWN:
                labels = memo[self] = self._verdict(event)
        else:
            labels = self._verdict(event)
        if labels is None:
            if self._stats is not None:
                self._stats.add("ignored")
            return None
        if event.labels:    # labels of its own: the configured ones and the direction added
            event.labels.update(labels)
        else:
            event.labels = labels
        return event

    def _verdict(self, event: FlowEvent) -> dict[str, str] | None:
        """The shared label set a record of this flow gets, or None if ignored."""
        cache = self._cache
        src = cache.get(event.orig.src) or self._classify(event.orig.src)
        dst = cache.get(event.orig.dst) or self._classify(event.orig.dst)
        if src[0] or dst[0]:
            return None
        end = dst if event.reply.src == event.orig.dst else (
            cache.get(event.reply.src) or self._classify(event.reply.src))
        return self._label_sets[2 * src[1] + end[1]]
