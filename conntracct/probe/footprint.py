"""Keeping the agent's memory small: one malloc arena, and giving back
what start-up used and running does not need.

glibc gives each thread that calls malloc an arena of its own, and keeps
the pages a burst touched there: the reader's and the sinks' threads held
~7 MB more after a churn of 10,000 flows/s (bench P6) than with one arena.
Python's threads take turns under the GIL (and small objects come from
pymalloc, not malloc), so one arena costs no contention: single_arena()
asks for it, before the agent starts its threads.

The kernel's BTF, parsed once at start-up for the checks, mode detection
and the probe's offsets (~7 MB: the blob and per-type arrays), is dropped, and
malloc_trim(0) returns the freed heap to the kernel (glibc; skipped
elsewhere).  BCC's compiler never runs in the agent's process
(compiler.py), so there is no LLVM to give back.

Best effort: any failure only leaves the memory where it was.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

from .btf import forget_kernel_btf

log = logging.getLogger(__name__)


M_ARENA_MAX = -8     # mallopt(3)


def single_arena() -> None:
    """One malloc arena for every thread (glibc; elsewhere nothing happens)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_ARENA_MAX, 1)


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def release_startup_memory() -> int:
    """Drop the parsed BTF and trim the heap; kB of RSS released."""
    try:
        before = _rss_kb()
        forget_kernel_btf()
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)
        released = max(before - _rss_kb(), 0)
    except (OSError, AttributeError, ValueError) as e:
        log.debug("start-up memory not released: %s", e)
        return 0
    log.debug("released %d MB of start-up memory", released // 1024)
    return released
