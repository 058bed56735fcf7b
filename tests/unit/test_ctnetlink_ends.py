"""DESTROY events read into the probe's flow keys and DESTROY records in C
(conntracct/probe/_ctends.c) are what the Python reader and packers make of
them (tests/reference/ctends.py), whatever the attributes: every protocol
and family, with and without counters, timestamps, zone, mark, TCP state,
unknown attributes, several messages in one datagram; and with the
probe's state of the flow (with_state).  The kernel's own events:
tests/integration/test_ctnetlink_events.py."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from conntracct.probe import ctnetlink as ct
from conntracct.probe._ctends import parse_ends, with_state
from conntracct.probe.record import FLOW_STATE, FlowState
from tests.reference.ctends import reference_end, reference_ends, walked_entries
from tests.unit.test_ctnetlink_layout import PARTS, message, random_entry

NETNS = 4026531840
OFFSET, NOW = 1_700_000_000 * 10**9, 1_800_000_000 * 10**9   # wall minus probe clock; the time read


def parsed(buffer: bytes, offset: int = 0, length: int | None = None) -> list[tuple]:
    out: list[tuple] = []
    parse_ends(buffer, offset, len(buffer) - offset if length is None else length, NETNS, OFFSET, NOW, out)
    return out


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("proto", [6, 17, 1, 58, 132])
@pytest.mark.parametrize("parts", PARTS, ids=lambda p: "+".join(sorted(p)) or "bare")
def test_c_reader_is_the_reference(family, proto, parts):
    rnd = random.Random(hash((family, proto, tuple(sorted(parts)), "ends")))
    for _ in range(30):
        msg = bytes(message(family, random_entry(rnd, family, proto, parts)))
        assert parsed(msg) == reference_ends(msg, NETNS, OFFSET, NOW)
        (_, record), = parsed(msg)
        entry, = walked_entries(msg)
        for state in (FlowState(rnd.randrange(1 << 60), 0, (rnd.randrange(1 << 30), rnd.randrange(1 << 30)),
                                (rnd.randrange(1 << 40), rnd.randrange(1 << 40)), rnd.choice((0, 1, 32))),
                      FlowState(7, 0, (2**64 - 1, 0), (5, 2**64 - 2), 1)):    # deltas wrap as u64
            raw_state = FLOW_STATE.pack(state.first_seen, state.next_emit, *state.packets, *state.bytes, state.flags)
            assert with_state(record, raw_state) == reference_end(entry, NETNS, OFFSET, NOW, state)[1]


def test_several_messages_in_one_datagram_at_an_offset_and_other_families_skipped():
    rnd = random.Random(7)
    msgs = [bytes(message(f, random_entry(rnd, f, 6, {"counters", "timestamp"})))
            for f in (socket.AF_INET, socket.AF_INET6, socket.AF_INET)]
    other = bytes(message(7, random_entry(rnd, socket.AF_INET, 6, set())))     # AF_BRIDGE: not ours
    datagram = msgs[0] + other + msgs[1] + msgs[2]
    buffer = bytes(100) + datagram + bytes(50)
    assert parsed(buffer, 100, len(datagram)) == reference_ends(datagram, NETNS, OFFSET, NOW)
    assert len(parsed(buffer, 100, len(datagram))) == 3


def test_a_netlink_error_raises_and_done_stops():
    error = struct.pack("=IHHII", 36, ct.NLMSG_ERROR, 0, 0, 0) + struct.pack("=i", -105) + bytes(16)
    with pytest.raises(OSError) as err:
        parsed(error)
    assert err.value.errno == 105
    ack = struct.pack("=IHHII", 36, ct.NLMSG_ERROR, 0, 0, 0) + bytes(20)
    done = struct.pack("=IHHII", 16, ct.NLMSG_DONE, 0, 0, 0)
    msg = bytes(message(socket.AF_INET, random_entry(random.Random(3), socket.AF_INET, 17, {"counters"})))
    assert len(parsed(ack + msg + done + msg)) == 1
    with pytest.raises(ValueError):
        parsed(msg, 8, len(msg))
    with pytest.raises(ValueError, match="struct flow_record"):
        with_state(b"short", bytes(FLOW_STATE.size))
