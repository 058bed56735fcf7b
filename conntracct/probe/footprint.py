"""Giving back the memory BCC's compiler used, once the probe is attached.

BCC compiles the probe with clang/LLVM inside the agent's process.  That
leaves about 80 MB of LLVM and clang library pages resident (mapped from
disk, never executed again) and some tens of MB of freed but untrimmed heap:
more than everything else the agent holds (bench/README.md, P4).  After the
attach neither is needed, so:

- malloc_trim(0) returns the free heap to the kernel (glibc; skipped elsewhere);
- madvise(MADV_PAGEOUT) (Linux 5.4+) on the LLVM/clang mappings lets the
  kernel drop their clean file pages.  It is a hint: contents never change,
  and a page used again (another compile) is read back from the file.

Best effort: any failure only leaves the memory where it was.
"""

from __future__ import annotations

import ctypes
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21
_COMPILER_LIBRARY = re.compile(r"/lib(LLVM|clang)[^/]*\.so[^/]*$")


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def compiler_mappings(maps: str) -> list[tuple[int, int]]:
    """(start, end) of the LLVM/clang library mappings in /proc/PID/maps text."""
    out = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and _COMPILER_LIBRARY.search(fields[5]):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def release_compiler_memory() -> int:
    """Trim the heap and page out the compiler's libraries; kB of RSS released."""
    try:
        before = _rss_kb()
        libc = ctypes.CDLL(None, use_errno=True)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for start, end in compiler_mappings(Path("/proc/self/maps").read_text()):
            libc.madvise(start, end - start, MADV_PAGEOUT)   # EINVAL before 5.4: nothing happens
        released = max(before - _rss_kb(), 0)
    except (OSError, AttributeError, ValueError) as e:
        log.debug("compiler memory not released: %s", e)
        return 0
    log.debug("released %d MB of BCC compiler memory", released // 1024)
    return released
