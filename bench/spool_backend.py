#!/usr/bin/env python3
"""Spool backends compared: what the disk spool (conntracct/spool.py) stores in.

    .venv/bin/python bench/spool_backend.py [--smoke] [--records N] [--json PATH]

The same 300-byte records go in and come out of each candidate, on one core
(process CPU time, so other load on the machine does not count), each in a
fresh directory under /var/tmp (a disk, not tmpfs):

  sqlite WAL        the standard library's sqlite3 as the spool uses it: WAL,
                    synchronous=NORMAL, 1,000 rows per transaction
                    (executemany); read `ORDER BY id LIMIT 1000`, then delete
                    `id <= last` (the acknowledgement)
  persist-queue     persist-queue 1.1.0's SQLiteAckQueue, through its own
                    per-record API (put / get / ack): the maintained
                    disk queue with acknowledgements
  queuelib          queuelib's FifoDiskQueue (push / pop): no acknowledgement
                    and no crash safety (a pop is gone), for scale only

persist-queue runs on 1/10th of the records (it is that much slower).
First measured by the project lead (00:00 UTC 2026-12-01): sqlite WAL in 430k/s,
out 711k/s; persist-queue in 8.7k/s, out 591/s; queuelib in 504k/s, out 472k/s.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, arguments, fmt_rate  # noqa: E402

BATCH = 1000
RECORD = os.urandom(150).hex().encode()   # 300 bytes, about a spooled FlowEvent


def cpu(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def sqlite_wal(directory: Path, n: int) -> tuple[float, float]:
    db = sqlite3.connect(directory / "s.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE q(id INTEGER PRIMARY KEY, kind INTEGER, body BLOB)")

    def put() -> None:
        for _ in range(0, n, BATCH):
            db.execute("BEGIN")
            db.executemany("INSERT INTO q(kind, body) VALUES (?, ?)", ((2, RECORD) for _ in range(BATCH)))
            db.execute("COMMIT")

    def take() -> None:
        got = 0
        while rows := db.execute("SELECT id, body FROM q ORDER BY id LIMIT ?", (BATCH,)).fetchall():
            got += len(rows)
            db.execute("DELETE FROM q WHERE id <= ?", (rows[-1][0],))
        assert got == n, got

    result = n / cpu(put), n / cpu(take)
    db.close()
    return result


def persist_queue(directory: Path, n: int) -> tuple[float, float]:
    import persistqueue

    q = persistqueue.SQLiteAckQueue(str(directory / "pq"), multithreading=True, auto_commit=True)

    def put() -> None:
        for _ in range(n):
            q.put(RECORD)

    def take() -> None:
        for _ in range(n):
            q.ack(q.get())

    return n / cpu(put), n / cpu(take)


def queuelib_fifo(directory: Path, n: int) -> tuple[float, float]:
    from queuelib import FifoDiskQueue

    q = FifoDiskQueue(str(directory / "fifo"))

    def put() -> None:
        for _ in range(n):
            q.push(RECORD)

    def take() -> None:
        for _ in range(n):
            q.pop()

    result = n / cpu(put), n / cpu(take)
    q.close()
    return result


CANDIDATES = (("sqlite WAL (stdlib, batched)", sqlite_wal, 1),
              ("persist-queue 1.1.0 SQLiteAckQueue", persist_queue, 10),
              ("queuelib FifoDiskQueue (no ack)", queuelib_fifo, 1))


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    n = 20_000 if args.smoke else args.records
    report = Report("SPOOL-BACKEND", "spool backends, 300-byte records, one core",
                    "records in then out, process CPU time, fresh directory in /var/tmp", smoke=args.smoke)
    for name, run, divisor in CANDIDATES:
        directory = Path(tempfile.mkdtemp(prefix="spool-backend-", dir="/var/tmp"))
        try:
            count = max(n // divisor, BATCH)
            rate_in, rate_out = run(directory, count)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        report.row(f"{name}: in", fmt_rate(rate_in), note=f"{count:,} records")
        report.row(f"{name}: out (read + acknowledge)", fmt_rate(rate_out))
        report.details[name] = {"records": count, "in_per_s": rate_in, "out_per_s": rate_out}
    report.save(args.json)


if __name__ == "__main__":
    main()
