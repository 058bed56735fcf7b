"""Giving back what start-up used and running does not need.

The kernel's BTF, parsed once at start-up for the checks, mode detection
and the probe's offsets (~24 MB of Python objects), is dropped, and
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
