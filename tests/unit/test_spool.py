"""The disk spool (conntracct.spool): exact records, order, acknowledgement,
the DESTROY-last policy when full, damaged files, one owner per file."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading

import pytest
from sample_flows import T0, flow

from conntracct.flow import DESTROY, FLAG_END_UNSEEN, FLAG_NO_ACCT, KINDS, NEW, UPDATE, FlowEvent, FlowTuple
from conntracct.spool import (
    FIELDS,
    FILE_NAME,
    RESERVE_BYTES,
    ROW_OVERHEAD,
    Decoder,
    DiskFull,
    Spool,
    SpoolError,
    decode,
    encode,
)


def random_event(rng: random.Random, kind: str | None = None) -> FlowEvent:
    v6 = rng.random() < 0.4
    addr = (lambda: f"2001:db8::{rng.randrange(1, 0xffff):x}") if v6 else \
        (lambda: f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
    proto = rng.choice((6, 17, 1, 58, 132))
    orig = (addr(), addr(), rng.randrange(65536), rng.randrange(65536))
    reply = (addr(), orig[0], orig[3], rng.randrange(65536)) if rng.random() < 0.4 else None
    labels = {f"k{i}": rng.choice(("in", "out", "é ünï", 'q"uote', "")) for i in range(rng.randrange(4))}
    big = 1 << 63
    return flow(kind or rng.choice(KINDS), orig=orig, reply=reply, proto=proto,
                flow_id=rng.randrange(big), packets_orig=rng.randrange(big), bytes_orig=rng.randrange(big),
                packets_reply=rng.randrange(1 << 32), bytes_reply=rng.randrange(1 << 40),
                delta_packets_orig=rng.randrange(100), delta_bytes_orig=rng.randrange(10**6),
                delta_packets_reply=rng.randrange(100), delta_bytes_reply=rng.randrange(10**6),
                start_ns=T0 - rng.randrange(10**12), stop_ns=rng.choice((0, T0 + 5)), ts_ns=T0 + rng.randrange(10**9),
                zone=rng.randrange(65536), mark=rng.randrange(1 << 32), netns=rng.randrange(1 << 32),
                status=rng.randrange(1 << 16), tcp_state=rng.randrange(10),
                flags=rng.choice((0, FLAG_NO_ACCT, FLAG_END_UNSEEN | 1)),
                icmp=(rng.randrange(256), rng.randrange(256), rng.randrange(65536)) if proto in (1, 58) else None,
                labels=labels)


def test_encode_decode_is_exact_for_every_field():
    rng = random.Random(7)
    for _ in range(2000):
        event = random_event(rng)
        event.memo = {"scratch": 1}
        back = decode(encode(event))
        assert back == event
        # == skips memo; compare every spooled field by name, with its type
        for name in FIELDS:
            assert getattr(back, name) == getattr(event, name), name
            assert type(getattr(back, name)) is type(getattr(event, name)), name
        assert isinstance(back.orig, FlowTuple) and back.memo is None


def test_every_flow_event_field_but_memo_is_spooled():
    assert set(FIELDS) == set(FlowEvent.__dataclass_fields__) - {"memo"}


def test_a_file_written_with_other_fields_is_read_by_name():
    event = flow(UPDATE, labels={"direction": "out"}, zone=3)
    old_fields = [f for f in FIELDS if f != "zone"] + ["gone"]
    values = dict(zip(FIELDS, json.loads(encode(event)), strict=True))
    body = json.dumps([values.get(f, 42) for f in old_fields]).encode()
    back = Decoder(old_fields)(body)
    assert back.zone == 0 and back.labels == {"direction": "out"} and back.orig == event.orig


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "sp", 10**9, "test")
    s.open()
    yield s
    s.close()


def test_order_acknowledgement_and_reopen(tmp_path, spool):
    events = [flow(UPDATE, flow_id=i) for i in range(10)]
    assert spool.append(events[:6]) == []
    assert spool.append(events[6:]) == []
    assert spool.records == 10 and spool.bytes == sum(len(encode(e)) + ROW_OVERHEAD for e in events)
    first = spool.read(4)
    assert first == events[:4]
    assert spool.read(4) == events[:4]        # not acknowledged: read again
    spool.ack()
    assert spool.records == 6
    spool.read(2)                               # read, never acknowledged (e.g. SIGKILL)
    spool.close()

    again = Spool(tmp_path / "sp", 10**9, "test")
    again.open()
    assert again.records == 6 and again.read(100) == events[4:]
    assert again.oldest_ts() == events[4].ts_ns
    again.close()


def test_prepend_goes_before_every_row(spool):
    spool.append([flow(UPDATE, flow_id=i) for i in (5, 6)])
    spool.prepend([flow(NEW, flow_id=i) for i in (3, 4)])
    spool.prepend([flow(NEW, flow_id=i) for i in (1, 2)])
    assert [e.flow_id for e in spool.read(10)] == [1, 2, 3, 4, 5, 6]


def fill(kinds: str) -> list[FlowEvent]:
    """One event per letter (n: NEW, u: UPDATE, d: DESTROY), flow ids in
    order, each the same size on disk (a label pads the kind's name)."""
    by_letter = {"n": NEW, "u": UPDATE, "d": DESTROY}
    return [flow(by_letter[c], flow_id=i, labels={"pad": "x" * (7 - len(by_letter[c]))})
            for i, c in enumerate(kinds)]


def row_size(event: FlowEvent) -> int:
    return len(encode(event)) + ROW_OVERHEAD


def test_full_spool_refuses_new_and_update_and_makes_room_for_destroy(tmp_path):
    events = fill("nudundd")
    size = row_size(events[0])
    assert all(row_size(e) == size for e in events)   # same length: sizes are counted in rows
    spool = Spool(tmp_path, 4 * size, "full")
    spool.open()
    assert spool.append(events[:4]) == []            # n u d u: full
    assert spool.append([events[4]]) == [events[4]]  # a NEW: refused
    # A DESTROY: the oldest NEW/UPDATE (flow 0) makes room.
    assert spool.append([events[5]]) == [events[0]]
    assert [e.flow_id for e in spool.read(10)] == [1, 2, 3, 5]
    # Rows being delivered (1 u, 3 u) are not evicted: no room for a DESTROY.
    assert spool.append([events[6]]) == [events[6]]
    spool.release()
    assert [e.flow_id for e in spool.read(1)] == [1]
    assert spool.append([events[6]]) == [events[3]]    # 1 in flight: 3 makes room
    spool.ack()
    assert [e.flow_id for e in spool.read(10)] == [2, 5, 6]
    assert spool.records == 3 and spool.bytes == 3 * size
    spool.close()


def test_full_spool_of_destroys_refuses_destroys(tmp_path):
    events = fill("ddddd")
    spool = Spool(tmp_path, 3 * row_size(events[0]), "full")
    spool.open()
    assert spool.append(events) == events[3:]
    # A batch mixing kinds: its own NEW makes room for its DESTROY.
    spool.read(3)
    spool.ack()
    d9, d8, new, destroy = fill("ddnd")[:4]
    d9.flow_id, d8.flow_id, new.flow_id, destroy.flow_id = 9, 8, 6, 7   # one digit: the same size
    assert spool.append([d9, d8, new, destroy]) == [new]
    assert [e.flow_id for e in spool.read(10)] == [9, 8, 7]
    spool.close()


def test_bytes_stay_within_max_size_under_random_load(tmp_path):
    rng = random.Random(3)
    spool = Spool(tmp_path, 40_000, "random")
    spool.open()
    offered = dropped = delivered = 0
    for _ in range(300):
        batch = [random_event(rng) for _ in range(rng.randrange(1, 60))]
        offered += len(batch)
        dropped += len(spool.append(batch))
        assert spool.bytes <= spool.max_size
        if rng.random() < 0.3:
            delivered += len(spool.read(rng.randrange(1, 80)))
            spool.ack()
    assert offered == dropped + delivered + spool.records
    count, size = spool._db.execute(f"SELECT count(*), sum(length(body)) + count(*) * {ROW_OVERHEAD} FROM q").fetchone()
    assert (count, size) == (spool.records, spool.bytes)
    spool.close()


def test_a_second_owner_is_refused(tmp_path, spool):
    other = Spool(tmp_path / "sp", 10**9, "other")
    with pytest.raises(SpoolError, match="locked"):
        other.open()


def test_truncated_file_keeps_what_can_be_read(tmp_path, caplog):
    directory = tmp_path / "sp"
    spool = Spool(directory, 10**9, "cut")
    spool.open()
    events = [flow(UPDATE, flow_id=i, labels={"pad": "x" * 300}) for i in range(3000)]
    for start in range(0, len(events), 500):
        spool.append(events[start:start + 500])
    spool._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    spool.close()
    path = directory / FILE_NAME
    size = path.stat().st_size
    with open(path, "r+b") as f:        # a power cut mid-write: the end of the file is gone
        f.truncate(size // 2)

    with caplog.at_level(logging.ERROR, "conntracct.spool"):
        again = Spool(directory, 10**9, "cut")
        again.open()
    kept, aside = again.salvaged
    assert aside.exists() and aside.name.startswith(f"{FILE_NAME}.corrupt-")
    assert 0 < kept < len(events)
    back = again.read(len(events))
    # What was readable, exact and in order (rows of the page cut in half are
    # garbage and left out): most of the first half.
    assert len(back) + len(again.undecodable) == kept and len(back) > len(events) * 0.4
    by_id = {e.flow_id: e for e in events}
    assert [e.flow_id for e in back] == sorted(e.flow_id for e in back)
    assert all(by_id[e.flow_id] == e for e in back)
    assert str(aside) in caplog.text and f"{kept} records recovered" in caplog.text
    again.append([flow(DESTROY, flow_id=99999)])   # and the new file works
    assert again.records == kept + 1
    again.close()


def test_garbage_file_is_moved_aside(tmp_path, caplog):
    (tmp_path / FILE_NAME).write_bytes(b"not a database" * 100)
    spool = Spool(tmp_path, 10**9, "junk")
    with caplog.at_level(logging.ERROR, "conntracct.spool"):
        spool.open()
    assert spool.records == 0 and spool.salvaged[0] == 0
    assert spool.salvaged[1].read_bytes().startswith(b"not a database")
    assert "0 records recovered" in caplog.text
    spool.close()


def test_undecodable_rows_are_reported_by_kind(spool):
    spool.append([flow(NEW, flow_id=1), flow(DESTROY, flow_id=2)])
    spool._db.execute("UPDATE q SET body = x'00ff' WHERE kind = 2")
    assert [e.flow_id for e in spool.read(10)] == [1]
    assert spool.undecodable == [DESTROY]


def test_threads_append_read_and_ack_without_losing_rows(spool):
    events = [flow(UPDATE, flow_id=i) for i in range(5000)]
    got: list[FlowEvent] = []

    def writer():
        for start in range(0, len(events), 100):
            spool.append(events[start:start + 100])

    thread = threading.Thread(target=writer)
    thread.start()
    while len(got) < len(events):
        got += spool.read(250)
        spool.ack()
    thread.join()
    assert got == events and spool.records == 0


def test_disk_full_raises_sqlite_full(tmp_path, monkeypatch, spool):
    spool.append([flow(NEW)])

    real = spool._db

    class Full:
        def __getattr__(self, name):
            return getattr(real, name)

        def executemany(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

    spool._db = Full()
    with pytest.raises(DiskFull, match="ENOSPC"):
        spool.append([flow(UPDATE)])
    spool._db = real
    assert spool.records == 1 and not real.in_transaction
    assert spool.out_of_space and not spool.reserve.exists()   # its space handed to SQLite
    with pytest.raises(DiskFull, match="wait until the spool has drained"):
        spool.append([flow(UPDATE)])
    spool.read(10)
    spool.ack()
    assert not spool.out_of_space and spool.reserve.stat().st_size == RESERVE_BYTES
    spool.append([flow(UPDATE)])
    assert spool.records == 1
