"""Giving back the memory BCC's compiler used, once the probe is attached.

BCC compiles the probe with clang/LLVM inside the agent's process.  That
leaves about 80 MB of LLVM and clang library pages resident (mapped from
disk, never executed again) and some tens of MB of freed but untrimmed heap:
more than everything else the agent holds (bench/README.md, P4).  After the
attach neither is needed, so:

- malloc_trim(0) returns the free heap to the kernel (glibc; skipped elsewhere);
- the LLVM/clang mappings that hold only the file's own pages (code and
  read-only data no one wrote to: no private copies, smaps' Anonymous 0)
  are dropped from the agent's page tables with madvise(MADV_DONTNEED).
  Their contents are the file's, so a page used again (another compile) is
  read back from it, unchanged.  MADV_PAGEOUT alone (Linux 5.4+), used
  before, leaves every page that another process maps too (a second agent,
  any BCC tool): 80 MB stayed resident on a host running a few of them;
- the other LLVM/clang mappings (writable data, relocated read-only data,
  which hold private copies that DONTNEED would throw away) only get the
  MADV_PAGEOUT hint.

The kernel's BTF, parsed once at start-up for the checks, mode detection
and the probe's offsets (~24 MB of Python objects), is dropped first.

Best effort: any failure only leaves the memory where it was.
"""

from __future__ import annotations

import ctypes
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .btf import forget_kernel_btf

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
MADV_PAGEOUT = 21
_COMPILER_LIBRARY = re.compile(r"/lib(LLVM|clang)[^/]*\.so[^/]*$")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str          # e.g. "r-xp"
    path: str
    anonymous_kb: int   # private copies of the file's pages (written, relocated)

    @property
    def clean(self) -> bool:
        """Only the file's own pages, and no one may write them: safe to drop."""
        return "w" not in self.perms and self.anonymous_kb == 0


def mappings(smaps: str) -> list[Mapping]:
    """The mappings in /proc/PID/smaps text, with what is needed here."""
    out: list[Mapping] = []
    head: tuple[int, int, str, str] | None = None
    for line in smaps.splitlines():
        m = _MAPPING.match(line)
        if m:
            fields = line.split(maxsplit=5)
            head = (int(m.group(1), 16), int(m.group(2), 16), m.group(3), fields[5] if len(fields) == 6 else "")
        elif head is not None and line.startswith("Anonymous:"):
            out.append(Mapping(*head, int(line.split()[1])))
            head = None
    return out


def compiler_mappings(smaps: str) -> list[Mapping]:
    """The LLVM/clang library mappings."""
    return [m for m in mappings(smaps) if _COMPILER_LIBRARY.search(m.path)]


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def drop_pages(found: list[Mapping]) -> None:
    """DONTNEED for the clean mappings, the PAGEOUT hint for the others."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for m in found:
        # EINVAL (PAGEOUT before 5.4) or EAGAIN: the pages just stay.
        libc.madvise(m.start, m.end - m.start, MADV_DONTNEED if m.clean else MADV_PAGEOUT)


def release_compiler_memory() -> int:
    """Drop the parsed BTF, trim the heap and drop the compiler's library pages; kB of RSS released."""
    try:
        before = _rss_kb()
        forget_kernel_btf()
        libc = ctypes.CDLL(None, use_errno=True)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
        drop_pages(compiler_mappings(Path("/proc/self/smaps").read_text()))
        released = max(before - _rss_kb(), 0)
    except (OSError, AttributeError, ValueError) as e:
        log.debug("compiler memory not released: %s", e)
        return 0
    log.debug("released %d MB of BCC compiler memory", released // 1024)
    return released
