"""FlowSource skips the records of kinds no sink wants without decoding
them (counted all the same), except where the sweep needs them, and never
skips a DESTROY.  Records are packed by field name (record.pack_record)."""

from __future__ import annotations

import socket
from collections import Counter

from conntracct.flow import FLAG_FIRST_SIGHT, FLAG_NO_EVENTS
from conntracct.probe import source
from conntracct.probe.record import pack_record, pack_tuple

ORIG = pack_tuple(socket.AF_INET, 6, bytes([192, 0, 2, 2]), bytes([198, 51, 100, 2]), 40000, 443)
REPLY = pack_tuple(socket.AF_INET, 6, bytes([198, 51, 100, 2]), bytes([198, 51, 100, 1]), 443, 40000)


def raw(kind: str, flags: int = 0) -> bytes:
    return pack_record(kind=kind, orig=ORIG, reply=REPLY, netns=1, zone=0, start_ns=10**18, ts=5,
                       packets=(1, 1), bytes=(60, 60), flags=flags)


class FakeProbe:
    wall_offset_ns = 0


class FakeEnds:
    def __init__(self):
        self.noted = []

    def note(self, raw_record, event):
        self.noted.append(event.kind)


def flow_source(kinds, ends=None) -> tuple[source.FlowSource, list]:
    """A FlowSource around a fake probe, as __init__ sets it up (no BPF)."""
    emitted: list = []
    src = source.FlowSource.__new__(source.FlowSource)
    src._unwanted = source.unwanted_kind_codes(kinds)
    src._emit, src._ends, src.probe = emitted.append, ends, FakeProbe()
    src.counts = Counter(dict.fromkeys(source.COUNTERS, 0))
    return src, emitted


def test_unwanted_kinds_are_counted_not_delivered():
    src, emitted = flow_source(frozenset({"destroy"}))
    for kind in ("new", "update", "destroy"):
        src._on_record(raw(kind))
    assert [e.kind for e in emitted] == ["destroy"]
    assert (src.counts["received_new"], src.counts["received_update"], src.counts["received_destroy"]) == (1, 1, 1)


def test_a_destroy_seen_first_still_makes_its_new():
    src, emitted = flow_source(frozenset({"destroy"}))
    src._on_record(raw("destroy", FLAG_FIRST_SIGHT))
    assert [e.kind for e in emitted] == ["new", "destroy"]


def test_every_kind_is_delivered_when_all_are_wanted_or_unknown():
    for kinds in (None, frozenset({"new", "update", "destroy"})):
        src, emitted = flow_source(kinds)
        for kind in ("new", "update", "destroy"):
            src._on_record(raw(kind))
        assert [e.kind for e in emitted] == ["new", "update", "destroy"]


def test_records_of_flows_without_end_events_still_reach_the_sweep():
    ends = FakeEnds()
    src, emitted = flow_source(frozenset({"destroy"}), ends)
    src._on_record(raw("new", FLAG_NO_EVENTS))
    src._on_record(raw("new"))
    assert ends.noted == ["new"]
