"""The probe's BPF ring buffer, read through mappings of our own.

A BPF_MAP_TYPE_RINGBUF map is mmap()ed in three parts (kernel/bpf/ringbuf.c):
the consumer page (offset 0, the only writable one: the reader's position),
the producer page (offset one page: the writer's position), then the data
area, which the kernel lays out twice in a row so a record that wraps round
the end reads as one piece.  Each record is an 8-byte header (length, with
a busy bit while the probe is still writing it and a discard bit) and its
bytes, padded to 8.

BCC's reader (libbpf's ring_buffer__consume) keeps the whole area mapped,
twice: with the default 16 MiB ring, 32 MB of the agent's RSS from the start.
This reader maps only the part that holds the records of one consume() and
unmaps it again, so the ring costs RSS only while it is being read.  Mapping
n pages costs about what reading a few of their records does; at 20k
records/s in 10 ms batches that is ~10 pages per call.

Memory order: the producer position is read before the records it covers
and the consumer position is written after they were copied; on x86-64
loads are not reordered with loads, nor stores with earlier loads, which is
the acquire/release pairing libbpf spells out.  Elsewhere the loader keeps
BCC's reader (RingBuffer.supported()).
"""

from __future__ import annotations

import mmap
import platform
import struct
from collections.abc import Callable

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8
PAGE = mmap.PAGESIZE
# Records handled between two updates of the consumer position (libbpf
# updates it after every record; one store per 16 is enough to keep freeing
# the ring while a long batch is handled).
RELEASE_EVERY = 16


class RingBuffer:
    """Reads a ring buffer map (its fd) whose data area is `data_size` bytes."""

    @staticmethod
    def supported() -> bool:
        """Whether plain loads and stores give the ordering the ring needs here."""
        return platform.machine() in ("x86_64", "AMD64", "i686", "i386")

    def __init__(self, map_fd: int, data_size: int):
        if data_size <= 0 or data_size & (data_size - 1) or data_size % PAGE:
            raise ValueError(f"ring buffer size {data_size} is not a power of two of whole pages")
        self._fd, self._size = map_fd, data_size
        self._consumer = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)

    def consume(self, on_record: Callable[[bytes], None]) -> int:
        """Hand every committed record to `on_record`, in order; how many."""
        count = 0
        consumer = _U64.unpack_from(self._consumer)[0]
        while True:
            producer = _U64.unpack_from(self._producer)[0]
            if producer <= consumer:
                return count
            n, consumer, busy = self._read(consumer, producer, on_record)
            count += n
            _U64.pack_into(self._consumer, 0, consumer)
            if busy:
                return count

    def _read(self, consumer: int, producer: int, on_record: Callable[[bytes], None]) -> tuple[int, int, bool]:
        """Records from `consumer` up to `producer`: (count, new consumer position, stopped at a busy one)."""
        at = consumer & (self._size - 1)
        first_page = at - at % PAGE
        length = -(-(at - first_page + producer - consumer) // PAGE) * PAGE
        # Data starts after the consumer and producer pages; the second copy
        # of the data area lets a window run past its end.
        area = mmap.mmap(self._fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=2 * PAGE + first_page)
        view = memoryview(area)
        unpack, release = _U32.unpack_from, _U64.pack_into
        base = consumer - (at - first_page)       # ring position of the window's first byte
        pos, end, count, busy = at - first_page, at - first_page + producer - consumer, 0, False
        try:
            while pos < end:
                header = unpack(view, pos)[0]
                if header & BUSY_BIT:
                    busy = True
                    break
                size = header & ~(BUSY_BIT | DISCARD_BIT)
                if not header & DISCARD_BIT:
                    on_record(view[pos + HEADER:pos + HEADER + size].tobytes())
                    count += 1
                pos += (size + HEADER + 7) & ~7
                if not count % RELEASE_EVERY:
                    # The probe may reuse what was read while the rest is
                    # handled: a burst of 80k records takes ~1 s to handle.
                    release(self._consumer, 0, base + pos)
        finally:
            view.release()
            area.close()
        return count, base + pos, busy

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
