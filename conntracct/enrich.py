"""Enrichment: drop ignored flows, add configured labels and the direction.

Runs on the reader thread for every record, so each address is classified
once and cached: hosts repeat far more than they vary.
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
        cache = self._cache
        src = cache.get(event.orig.src) or self._classify(event.orig.src)
        dst = cache.get(event.orig.dst) or self._classify(event.orig.dst)
        if src[0] or dst[0]:
            if self._stats is not None:
                self._stats.add("ignored")
            return None
        end = dst if event.reply.src == event.orig.dst else (
            cache.get(event.reply.src) or self._classify(event.reply.src))
        labels = event.labels
        if self._labels:
            labels.update(self._labels)
        labels["direction"] = direction(src[1], end[1])
        return event
