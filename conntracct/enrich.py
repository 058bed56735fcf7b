"""Enrichment: drop ignored flows, add configured labels, range labels and
the direction.

Runs on the reader thread for every record, so each address is classified
once and cached: hosts repeat far more than they vary.  A record that comes
unlabelled (every probe record) gets one of four label dicts made once, one
per direction, shared by every record of that direction: records are
read-only once enriched (the sinks of one record already share it).  What a
flow gets depends only on its addresses, so it is worked out once per flow
and kept in FlowEvent.memo (records from the probe decoder carry one).

Range labels (enrich.ranges) are looked up in a RangeTable: the ranges cut
into disjoint segments, their starts sorted per address family, one bisect
per address (bench/enrich_ranges.py measures it with up to 10,000 ranges).
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable, Sequence

from .config import EnrichConfig
from .configtypes import IPNetwork
from .enrichconfig import IgnoreRule, RangeLabels
from .flow import FlowEvent
from .localaddr import host_networks
from .selfmetrics import StageStats
from .sinks.common import PORT_PROTOS

CACHE_LIMIT = 65536   # addresses; past it the cache starts over (bounded memory)
_UNKNOWN = object()
NO_RANGE = -1


class RangeTable:
    """Address ranges with labels -> the labels of an address, by bisect.

    Overlapping ranges are cut into disjoint segments at build time; a
    segment carries the labels of every range covering it, a narrower range's
    over a wider one's (equal widths: the later range wins)."""

    def __init__(self, ranges: Sequence[RangeLabels]):
        self.labels: list[dict[str, str]] = []      # segment id -> labels
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        self._ids: dict[int, list[int]] = {4: [], 6: []}
        shared: dict[frozenset[int], int] = {}     # covering ranges -> segment id (one dict each)
        for family in (4, 6):
            items = [(int(r.range[0]), int(r.range[1]), i, r.labels)
                     for i, r in enumerate(ranges) if r.range[0].version == family]
            self._build(family, items, shared)

    def __len__(self) -> int:
        return sum(len(starts) for starts in self._starts.values())

    def _build(self, family: int, items: list, shared: dict) -> None:
        items.sort()
        cuts = sorted({first for first, *_ in items} | {last + 1 for _, last, *_ in items})
        active: dict[int, tuple] = {}    # range order -> item
        nxt = 0
        for k, point in enumerate(cuts[:-1]):
            while nxt < len(items) and items[nxt][0] == point:
                active[items[nxt][2]] = items[nxt]
                nxt += 1
            for order in [o for o, item in active.items() if item[1] < point]:
                del active[order]
            if not active:
                continue
            key = frozenset(active)
            seg = shared.get(key)
            if seg is None:
                # wider first, so narrower ranges (and later equal ones) win
                merged: dict[str, str] = {}
                for item in sorted(active.values(), key=lambda it: (-(it[1] - it[0]), it[2])):
                    merged.update(item[3])
                seg = shared[key] = len(self.labels)
                self.labels.append(merged)
            ids, ends = self._ids[family], self._ends[family]
            if ids and ids[-1] == seg and ends[-1] == point - 1:
                ends[-1] = cuts[k + 1] - 1    # contiguous, same labels: one segment
            else:
                self._starts[family].append(point)
                ends.append(cuts[k + 1] - 1)
                ids.append(seg)

    def find(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        """The segment id of the address (index into .labels), or NO_RANGE."""
        family = ip.version
        value = int(ip)
        i = bisect_right(self._starts[family], value) - 1
        if i >= 0 and value <= self._ends[family][i]:
            return self._ids[family][i]
        return NO_RANGE


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
        # Plain CIDRs are judged per address (cached); rules with ports,
        # protocols or one side per flow (memoised).
        self._ignore = tuple(n for n in config.ignore if not isinstance(n, IgnoreRule))
        self._rules = tuple(n for n in config.ignore if isinstance(n, IgnoreRule))
        self._labels = dict(config.labels)
        self._stats = stats
        # address -> (ignored, local, range segment id, ip or None)
        self._cache: dict[str, tuple] = {}
        # (src local, end local) as 2*src + end -> the configured labels and
        # the direction, in the order update() then ["direction"] gives.
        self._label_sets = tuple({**self._labels, "direction": direction(bool(i & 2), bool(i & 1))}
                                 for i in range(4))
        self._ranges = RangeTable(config.ranges) if config.ranges else None
        self._range_endpoint = config.range_endpoint
        # (direction index, source segment, destination segment) -> shared label set
        self._ranged_sets: dict[tuple[int, int, int], dict[str, str]] = {}

    @property
    def local_networks(self) -> tuple[IPNetwork, ...]:
        return self._local

    def _classify(self, address: str) -> tuple:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            verdict = (False, False, NO_RANGE, None)
        else:
            verdict = (any(ip in net for net in self._ignore), any(ip in net for net in self._local),
                       self._ranges.find(ip) if self._ranges is not None else NO_RANGE, ip)
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
        if self._rules and self._ruled_out(event, src[3], dst[3]):
            return None
        end = dst if event.reply.src == event.orig.dst else (
            cache.get(event.reply.src) or self._classify(event.reply.src))
        which = 2 * src[1] + end[1]
        if self._ranges is None:
            return self._label_sets[which]
        return self._ranged(which, src[2], end[2])

    def _ruled_out(self, event: FlowEvent, src, dst) -> bool:
        o = event.orig
        has_ports = event.proto in PORT_PROTOS    # ignore rules with ports match only these
        return any(rule.matches(event.proto, src, dst, o.sport, o.dport, has_ports) for rule in self._rules)

    def _ranged(self, which: int, src_seg: int, end_seg: int) -> dict[str, str]:
        """The label set with the range labels of the configured endpoint:
        remote is the source for inbound flows, else where the flow ends
        (as the Prometheus sink's per-host series)."""
        mode = self._range_endpoint
        if mode == "remote":
            segs = (src_seg,) if which == 1 else (end_seg,)    # 1: inbound (end local, source not)
        elif mode == "source":
            segs = (src_seg,)
        elif mode == "destination":
            segs = (end_seg,)
        else:
            segs = (src_seg, end_seg)
        segs = tuple(seg for seg in segs if seg != NO_RANGE)
        if not segs:
            return self._label_sets[which]
        key = (which, *segs)
        labels = self._ranged_sets.get(key)
        if labels is None:
            labels = dict(self._labels)
            for seg in segs:
                labels.update(self._ranges.labels[seg])
            labels["direction"] = self._label_sets[which]["direction"]
            if len(self._ranged_sets) >= CACHE_LIMIT:
                self._ranged_sets.clear()
            self._ranged_sets[key] = labels
        return labels
