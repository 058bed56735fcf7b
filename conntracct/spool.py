"""A sink's disk spool: the records its memory queue could not hold, kept in
SQLite until the sink has acknowledged them (`spool:` in a sink's config).

Why SQLite (the standard library's sqlite3, WAL mode, one transaction per
batch): bench/spool_backend.py measured it at ~430k records/s in and ~710k
out; persist-queue's per-record acknowledged queue was 50-1000x slower, and
queuelib's file queue has no acknowledgement and no crash safety.  A
committed transaction survives the agent's SIGKILL or crash (it is in the
WAL file); synchronous=NORMAL means a power cut can lose the last
transactions, never corrupt what came before.

One file per sink, `<path>/spool.db`, one table of rows in delivery order:

    q(id INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER, ts INTEGER, body BLOB)

`id` is the order (records put back at shutdown take ids below the first
one, so they come out first); `kind` lets a full spool drop NEW/UPDATE rows
before DESTROYs; `ts` is the record's time (the oldest record's age);
`body` is the record (encode()/decode(), exact for every FlowEvent field but
the sinks' scratch `memo`).

The spool is opened with locking_mode=EXCLUSIVE: one agent at a time (a
second one is refused at start) and no -shm file, so a full file system
cannot fault a memory-mapped page.  A file that fails its integrity check
at open is moved aside, what can still be read is copied into a new one,
and one log line names the file kept aside.

Thread-safe: the sink's worker reads and acknowledges, its spool writer
appends, the metrics reader asks for figures; one lock serialises them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .flow import DESTROY, KINDS, FlowEvent, FlowTuple

log = logging.getLogger(__name__)

FILE_NAME = "spool.db"
FORMAT = 1                      # PRAGMA user_version of the file: its row format
ROW_OVERHEAD = 24               # bytes a row costs beyond its body (id, kind, ts, b-tree cell)
RECORD_BYTES = 256              # a typical spooled record (IPv4 ~190 B, IPv6 ~260 B, +labels)
JOURNAL_LIMIT = 4 * 1024 * 1024   # the WAL is truncated to this after a checkpoint
# WAL pages (4 KiB) before SQLite copies them into the file (SQLite's default):
# each checkpoint syncs the file, so fewer of them keep the writer ahead at
# thousands of records/s on a busy disk; the WAL stays at ~4 MiB.
CHECKPOINT_PAGES = 1000
RESERVE_NAME = "spool.reserve"
RESERVE_BYTES = 8 * 1024 * 1024  # above the largest WAL: enough for a checkpoint on a full file system
SALVAGE_SKIPS = 200             # unreadable spots a damaged file's scan steps over before it gives up

_KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}
_DESTROY_CODE = _KIND_CODE[DESTROY]
_KIND_CODES = frozenset(_KIND_CODE.values())
_NO_ID = -(1 << 63)   # below every row id

# Every FlowEvent field but memo (the sinks' per-flow scratch, not part of
# the record), in declaration order: a field added to FlowEvent is spooled
# without a change here.  The file stores the names it was written with.
FIELDS = tuple(f.name for f in dataclasses.fields(FlowEvent) if f.name != "memo")
_TUPLES = ("orig", "reply")


class SpoolError(Exception):
    """The spool cannot be opened or used (the message names the file)."""


class DiskFull(SpoolError):
    """The spool's file system is full: nothing of the batch was stored."""


def _values(event: FlowEvent) -> list:
    return [getattr(event, name) for name in FIELDS]


def encode(event: FlowEvent) -> bytes:
    """One record as a row body: a JSON array of FIELDS (tuples as arrays).
    JSON, not pickle: reading a spool file must never run code."""
    return json.dumps(_values(event), separators=(",", ":"), ensure_ascii=False).encode()


def _event(values: dict) -> FlowEvent:
    for name in _TUPLES:
        values[name] = FlowTuple(*values[name])
    if values.get("icmp") is not None:
        values["icmp"] = tuple(values["icmp"])
    return FlowEvent(**values)


class Decoder:
    """Row bodies -> FlowEvents, for the field names a file was written with
    (a later version may add fields: missing ones take their defaults)."""

    def __init__(self, fields: Sequence[str] = FIELDS):
        self._fields = tuple(fields)
        known = set(FIELDS)
        self._keep = [i for i, name in enumerate(self._fields) if name in known]

    def __call__(self, body: bytes) -> FlowEvent:
        values = json.loads(body)
        if self._fields == FIELDS:
            orig, reply = values[4], values[5]
            values[4], values[5] = FlowTuple(*orig), FlowTuple(*reply)
            icmp = values[23]
            if icmp is not None:
                values[23] = tuple(icmp)
            return FlowEvent(*values)
        return _event({self._fields[i]: values[i] for i in self._keep})


assert FIELDS[4:6] == _TUPLES and FIELDS[23] == "icmp", "Decoder's fast path indexes"
decode = Decoder()


_DAMAGE = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _is_damage(exc: sqlite3.Error) -> bool:
    """A damaged file (not one locked or unreadable for other reasons)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _DAMAGE


def is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF == sqlite3.SQLITE_FULL if code is not None else "full" in str(exc)


class Spool:
    """The rows of one sink's spool file, with their count and byte size."""

    def __init__(self, directory: str | os.PathLike, max_size: int, name: str = ""):
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.max_size = max_size
        self.name = name or str(self.path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.records = 0
        self.bytes = 0               # body bytes + ROW_OVERHEAD per row: what max_size bounds
        self._reading: tuple[int, int] | None = None   # (first, last) id handed to read(), not yet acked
        # Rows up to this id are acknowledged; normally deleted too, but on a
        # full file system a DELETE (it writes to the WAL) can fail: they are
        # skipped and deleted later (or, after a restart, delivered again).
        self._acked = _NO_ID
        self._decode = decode
        self.salvaged: tuple[int, Path] | None = None  # (rows kept, file moved aside) after a bad file
        self.undecodable: list[str] = []   # kinds of rows read but not decodable (the caller counts them)
        self._inflight_rows = self._inflight_bytes = 0
        # A write failed on a full file system: new records are refused
        # (DiskFull) until the spool has drained; the reserve file's space
        # lets the acknowledgements' deletes and checkpoints go on meanwhile.
        self.out_of_space = False
        self.reserve = self.directory / RESERVE_NAME

    # -- opening -------------------------------------------------------------

    def open(self) -> None:
        """Open or create the file; a corrupt one is moved aside and salvaged."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool directory {self.directory}: {exc.strerror}") from None
        try:
            db = self._connect(self.path)
            problem = self._check(db)
        except sqlite3.Error as exc:
            if not _is_damage(exc):   # e.g. locked by another agent, a read-only file
                raise SpoolError(f"cannot open {self.path}: {exc}") from None
            db, problem = None, str(exc)
        if problem is not None:
            if db is not None:
                db.close()
            db = self._salvage(problem)
        self._db = db
        self._read_fields(db)
        self._make_reserve()
        self.records, self.bytes = db.execute(
            f"SELECT count(*), coalesce(sum(length(body)), 0) + count(*) * {ROW_OVERHEAD} FROM q").fetchone()

    def _connect(self, path: Path) -> sqlite3.Connection:
        # A short busy timeout: a spool locked by another agent fails the start at once.
        db = sqlite3.connect(path, timeout=0.2, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={JOURNAL_LIMIT}")
            db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
            db.execute("BEGIN IMMEDIATE")   # takes the exclusive lock now: a second agent fails here
            # AUTOINCREMENT: ids never reused, so a row added after the spool
            # emptied still sorts after what was acknowledged before.
            db.execute("CREATE TABLE IF NOT EXISTS q(id INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER, "
                       "ts INTEGER, body BLOB)")
            db.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('fields', ?)", (json.dumps(FIELDS),))
            db.execute("COMMIT")
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                db.execute(f"PRAGMA user_version={FORMAT}")
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _check(db: sqlite3.Connection) -> str | None:
        rows = [r[0] for r in db.execute("PRAGMA quick_check")]
        return None if rows == ["ok"] else "; ".join(rows[:3])

    def _read_fields(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT value FROM meta WHERE key='fields'").fetchone()
        fields = tuple(json.loads(row[0])) if row else FIELDS
        self._decode = decode if fields == FIELDS else Decoder(fields)

    def _salvage(self, problem: str) -> sqlite3.Connection:
        """Move the bad file (and its WAL) aside, start a new one with every
        row that can still be read from it, and say so in one line."""
        aside = self.path.with_name(f"{FILE_NAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.rename(str(aside) + suffix)
        db = self._connect(self.path)
        kept = self._copy_readable(aside, db)
        self.salvaged = (kept, aside)
        log.error("spool %s: %s is damaged (%s): %d records recovered from it; the file is kept as %s",
                  self.name, self.path, problem, kept, aside)
        return db

    @staticmethod
    def _copy_readable(source: Path, db: sqlite3.Connection) -> int:
        """Rows of `source` in id order, skipping unreadable pages: past a
        bad one, the scan starts again further on (1, 2, 4... ids later)."""
        try:
            old = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None)
            # A file shorter than its header says (truncated) is refused
            # unless the schema is "writable": then the pages present are read.
            old.execute("PRAGMA writable_schema=ON")
        except sqlite3.Error:
            return 0
        kept, after, step, tries = 0, -(1 << 63), 1, 0
        try:
            while tries < SALVAGE_SKIPS:
                rows, damaged = [], False
                try:
                    for row in old.execute("SELECT id, kind, ts, body FROM q WHERE id > ? ORDER BY id LIMIT 1000",
                                           (after,)):
                        rows.append(row)
                except sqlite3.DatabaseError:
                    damaged = True
                if rows:
                    after, step = rows[-1][0], 1
                    # A damaged page can yield rows of garbage: keep well-formed ones.
                    rows = [r for r in rows if isinstance(r[3], bytes) and r[1] in _KIND_CODES
                            and isinstance(r[2], int)]
                    db.execute("BEGIN")
                    db.executemany("INSERT OR IGNORE INTO q VALUES (?, ?, ?, ?)", rows)
                    db.execute("COMMIT")
                    kept += len(rows)
                if not damaged:
                    if not rows:
                        break
                    continue
                tries += 1
                after, step = after + step, step * 2   # step over the bad page
                if after >= (1 << 63) - 1:
                    break
        finally:
            old.close()
        return kept

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- writing ---------------------------------------------------------------

    def append(self, events: Sequence[FlowEvent]) -> list[FlowEvent]:
        """Store events after every row; a full spool keeps DESTROYs last:
        an event that does not fit is dropped, unless it is a DESTROY and an
        older NEW/UPDATE row can make room.  Returns what was dropped (the
        events refused, then the rows evicted).  Raises sqlite3.Error (e.g.
        SQLITE_FULL on a full disk): nothing of the batch was stored."""
        return self._store(events, front=False)

    def prepend(self, events: Sequence[FlowEvent]) -> list[FlowEvent]:
        """Store events before every row (records taken from memory at
        shutdown, older than what the spool holds)."""
        return self._store(events, front=True)

    def _store(self, events: Sequence[FlowEvent], front: bool) -> list[FlowEvent]:
        rows = [(_KIND_CODE[e.kind], e.ts_ns, encode(e)) for e in events]
        with self._lock:
            db = self._db
            if db is None:
                raise SpoolError(f"spool {self.name} is closed")
            if self.out_of_space and not front:
                raise DiskFull(f"{self.path}: the file system was full; new records wait until the spool "
                               "has drained")
            db.execute("BEGIN IMMEDIATE")
            try:
                size = self.bytes + sum(len(row[2]) for row in rows) + ROW_OVERHEAD * len(rows)
                if size > self.max_size:
                    rows, dropped, evict_ids, size = self._fit(db, events, rows)
                    db.executemany("DELETE FROM q WHERE id = ?", evict_ids)
                else:
                    dropped, evict_ids = [], []
                if front:
                    # Nothing read is acknowledged after this (shutdown): a
                    # late ack() must not delete the rows put in front.
                    self._reading, self._acked = None, _NO_ID
                    first = db.execute("SELECT min(id) FROM q").fetchone()[0]
                    start = (first if first is not None else 1) - len(rows)
                    db.executemany("INSERT INTO q VALUES (?, ?, ?, ?)",
                                   [(start + i, *row) for i, row in enumerate(rows)])
                else:
                    db.executemany("INSERT INTO q(kind, ts, body) VALUES (?, ?, ?)", rows)
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and is_disk_full(exc):
                    self._disk_full(db)
                    raise DiskFull(f"{self.path}: no space left on the file system (ENOSPC)") from None
                raise
            self.records += len(rows) - len(evict_ids)
            self.bytes = size
            return [e for e in dropped if e is not None]

    def _fit(self, db: sqlite3.Connection, events: Sequence[FlowEvent],
             rows: list) -> tuple[list, list[FlowEvent | None], list[tuple[int]], int]:
        """A full spool keeps DESTROYs last (as the memory queue does): a
        NEW/UPDATE that does not fit is refused; a DESTROY that does not fit
        evicts the oldest NEW/UPDATE -- rows already spooled (not those being
        delivered), then this batch's -- and is refused only when there is
        none.  Returns (rows to insert, events dropped, row ids to delete, the
        spool's bytes after)."""
        after = self._reading[1] if self._reading else self._acked
        spooled = db.execute("SELECT id, body, kind FROM q WHERE kind != ? AND id > ? ORDER BY id",
                             (_DESTROY_CODE, after))
        keep: list = []                       # rows of this batch, None once evicted
        keep_others: list[int] = []           # indexes in keep of NEW/UPDATE rows, oldest first
        dropped: list[FlowEvent | None] = []
        evict_ids: list[tuple[int]] = []
        used = self.bytes
        for event, row in zip(events, rows, strict=True):
            size = len(row[2]) + ROW_OVERHEAD
            if row[0] != _DESTROY_CODE:
                if used + size <= self.max_size:
                    keep_others.append(len(keep))
                    keep.append((event, row))
                    used += size
                else:
                    dropped.append(event)
                continue
            while used + size > self.max_size:
                candidate = spooled.fetchone()
                if candidate is not None:
                    evict_ids.append((candidate[0],))
                    used -= len(candidate[1]) + ROW_OVERHEAD
                    dropped.append(self._decode_or_none(candidate[1], candidate[2]))
                elif keep_others:
                    index = keep_others.pop(0)
                    old_event, old_row = keep[index]
                    keep[index] = None
                    used -= len(old_row[2]) + ROW_OVERHEAD
                    dropped.append(old_event)
                else:
                    break
            if used + size <= self.max_size:
                keep.append((event, row))
                used += size
            else:
                dropped.append(event)
        spooled.close()
        return [item[1] for item in keep if item is not None], dropped, evict_ids, used

    def _decode_or_none(self, body: bytes, kind: int) -> FlowEvent | None:
        try:
            return self._decode(body)
        except (ValueError, TypeError, IndexError, KeyError):
            self.undecodable.append(KINDS[kind] if kind in range(len(KINDS)) else DESTROY)
            return None

    # -- reading ---------------------------------------------------------------

    def read(self, n: int) -> list[FlowEvent]:
        """The first n records, in order; they stay until ack()."""
        with self._lock:
            if self._db is None:
                return []
            rows = self._db.execute("SELECT id, body, kind FROM q WHERE id > ? ORDER BY id LIMIT ?",
                                    (self._acked, n)).fetchall()
            if not rows:   # nothing left past what was acknowledged: the counts say so too
                self._reading = None
                self.records = self.bytes = 0
                return []
            self._reading = (rows[0][0], rows[-1][0])
            self._inflight_bytes = sum(len(body) + ROW_OVERHEAD for _, body, _ in rows)
            self._inflight_rows = len(rows)
            events = [self._decode_or_none(body, kind) for _, body, kind in rows]
        return [e for e in events if e is not None]

    def ack(self) -> None:
        """Delete the records the last read() returned: the sink has them."""
        with self._lock:
            if self._db is None or self._reading is None:
                return
            first, last = self._reading
            self._acked, self._reading = last, None
            self.records -= self._inflight_rows
            self.bytes -= self._inflight_bytes
            try:
                self._db.execute("DELETE FROM q WHERE id <= ?", (last,))
            except sqlite3.Error as exc:   # e.g. SQLITE_FULL: deleted with a later acknowledgement
                if is_disk_full(exc):
                    self._disk_full(self._db)
                return
            if self.out_of_space and self._checkpoint(self._db) and not self.records:
                self.out_of_space = False   # drained, the WAL emptied: room again
                self._make_reserve()
                log.info("spool %s: drained after the file system was full; spooling again", self.name)

    def _disk_full(self, db: sqlite3.Connection) -> None:
        """ENOSPC: give the reserve's space back to SQLite and checkpoint, so
        that acknowledgements can still delete rows (a delete writes to the
        WAL, and the WAL only starts over after a checkpoint, which copies
        it into the file: both need room)."""
        self.out_of_space = True
        try:
            self.reserve.unlink()
        except OSError:
            pass
        self._checkpoint(db)

    @staticmethod
    def _checkpoint(db: sqlite3.Connection) -> bool:
        """Copy the WAL into the file and truncate it; True if done."""
        try:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return not busy
        except sqlite3.Error:
            return False

    def _make_reserve(self) -> None:
        """RESERVE_BYTES set aside on the spool's file system for a full disk
        (see _disk_full); without room for it, the spool goes without."""
        try:
            with open(self.reserve, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
        except OSError:
            try:
                self.reserve.unlink()
            except OSError:
                pass

    def release(self) -> None:
        """Forget the last read() without deleting: its records stay for next time."""
        with self._lock:
            self._reading = None

    # -- figures -----------------------------------------------------------------

    def oldest_ts(self) -> int | None:
        """The oldest record's time (FlowEvent.ts_ns), None when empty."""
        with self._lock:
            if self._db is None or not self.records:
                return None
            row = self._db.execute("SELECT ts FROM q WHERE id > ? ORDER BY id LIMIT 1", (self._acked,)).fetchone()
        return row[0] if row else None

    def file_bytes(self) -> int:
        """What the spool takes on disk: the file and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(str(self.path) + suffix).st_size
            except OSError:
                pass
        return total


