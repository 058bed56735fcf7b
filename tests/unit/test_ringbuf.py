"""The ring buffer reader (conntracct.probe.ringbuf) against a ring laid out
as the kernel lays out a BPF ring buffer map: consumer page, producer page,
the data area twice.  A memfd stands in for the map's fd (mmap() at page
offsets works the same); the kernel's own ring is read by the agent tests
(test_churn, test_losses)."""

from __future__ import annotations

import mmap
import os
import random
import struct

import pytest

from conntracct.probe.ringbuf import BUSY_BIT, DISCARD_BIT, HEADER, PAGE, RELEASE_EVERY, RingBuffer

SIZE = 4 * PAGE


class FakeRing:
    """What the probe would write: records at the producer position."""

    def __init__(self, size: int = SIZE):
        self.size = size
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * size)
        self.map = mmap.mmap(self.fd, 2 * PAGE + 2 * size)
        self.producer = 0

    @property
    def consumer(self) -> int:
        return struct.unpack_from("<Q", self.map, 0)[0]

    def _put(self, at: int, data: bytes) -> None:
        # The data area appears twice: write both copies, wrapping round.
        for i, b in enumerate(data):
            pos = (at + i) % self.size
            self.map[2 * PAGE + pos] = b
            self.map[2 * PAGE + self.size + pos] = b

    def write(self, payload: bytes, flags: int = 0) -> None:
        total = (len(payload) + HEADER + 7) & ~7
        assert self.producer + total - self.consumer <= self.size, "ring full"
        self._put(self.producer % self.size, struct.pack("<II", len(payload) | flags, 0) + payload)
        self.producer += total
        struct.pack_into("<Q", self.map, PAGE, self.producer)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def ring():
    r = FakeRing()
    yield r
    r.close()


def test_records_come_out_in_order_and_the_consumer_position_follows(ring):
    reader = RingBuffer(ring.fd, ring.size)
    records = [bytes([i]) * 200 for i in range(10)]
    for r in records:
        ring.write(r)
    got: list[bytes] = []
    assert reader.consume(got.append) == 10
    assert got == records and ring.consumer == ring.producer
    assert reader.consume(got.append) == 0
    reader.close()


def test_records_wrapping_round_the_end_read_whole(ring):
    """Thousands of records of odd sizes through a 16 KiB ring: every one
    read once, whole, including those that straddle the end."""
    reader = RingBuffer(ring.fd, ring.size)
    rnd = random.Random(5)
    sent, got = [], []
    for _ in range(3000):
        payload = rnd.randbytes(rnd.randint(1, 700))
        while True:
            try:
                ring.write(payload)
                break
            except AssertionError:
                reader.consume(got.append)
        sent.append(payload)
        if rnd.random() < 0.1:
            reader.consume(got.append)
    reader.consume(got.append)
    assert got == sent and ring.consumer == ring.producer
    reader.close()


def test_discarded_records_are_skipped_and_a_busy_one_stops_the_read(ring):
    reader = RingBuffer(ring.fd, ring.size)
    ring.write(b"a" * 16)
    ring.write(b"b" * 16, DISCARD_BIT)
    ring.write(b"c" * 16)
    busy_at = ring.producer
    ring.write(b"d" * 16, BUSY_BIT)      # reserved, not yet committed
    got: list[bytes] = []
    assert reader.consume(got.append) == 2
    assert got == [b"a" * 16, b"c" * 16] and ring.consumer == busy_at
    # committed: the header's busy bit cleared
    struct.pack_into("<I", ring.map, 2 * PAGE + busy_at % ring.size, 16)
    struct.pack_into("<I", ring.map, 2 * PAGE + ring.size + busy_at % ring.size, 16)
    assert reader.consume(got.append) == 1 and got[-1] == b"d" * 16
    reader.close()


def test_nothing_of_the_data_area_stays_mapped(ring):
    """Only the consumer and producer pages are mapped between reads."""
    reader = RingBuffer(ring.fd, ring.size)
    ring.write(b"x" * 100)
    reader.consume(lambda raw: None)
    maps = open(f"/proc/{os.getpid()}/maps").read()
    assert maps.count("memfd:ring") == 1 + 2, maps   # the fake's own mapping, consumer page, producer page
    reader.close()


def test_sizes_that_are_no_ring_are_refused(ring):
    with pytest.raises(ValueError):
        RingBuffer(ring.fd, 3 * PAGE)


def test_space_is_released_while_a_long_batch_is_handled(ring):
    """The consumer position moves during one consume(), not only at its end
    (as libbpf's reader does), so the probe can reuse the space of records
    already handled while the rest of a burst is."""
    reader = RingBuffer(ring.fd, ring.size)
    for i in range(60):
        ring.write(bytes([i]) * 200)
    seen = []
    reader.consume(lambda raw: seen.append(ring.consumer))
    assert seen[0] == 0 and seen[RELEASE_EVERY] > 0 and seen[-1] > seen[RELEASE_EVERY]
    assert ring.consumer == ring.producer
    reader.close()
