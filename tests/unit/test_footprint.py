"""Giving back start-up memory once the probe is attached (conntracct.probe.footprint)."""

import os
import subprocess
import sys

import pytest

from conntracct.probe.footprint import release_startup_memory


def test_release_is_harmless_when_there_is_nothing_to_give_back():
    assert release_startup_memory() >= 0


def test_the_parsed_kernel_btf_is_dropped():
    """Start-up parses the kernel's BTF once (~7 MB: blob and arrays); the release drops it."""
    from conntracct.probe import btf
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("no kernel BTF here")
    first = btf.kernel_btf()
    assert btf.kernel_btf() is first                      # parsed once
    assert btf._load_kernel_btf.cache_info().currsize == 1
    release_startup_memory()
    assert btf._load_kernel_btf.cache_info().currsize == 0
    assert btf.kernel_btf() is not first                  # parsed again when asked


ARENAS_AFTER_THREADS = """
import ctypes, sys, tempfile, threading
from conntracct.probe.footprint import single_arena
if sys.argv[1] == "single":
    single_arena()
def work():
    held = [bytearray(4096) for _ in range(200)]     # > 512 bytes: malloc, not pymalloc
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
with tempfile.NamedTemporaryFile() as f:
    out = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, out)
    libc.fclose(out)
    print(open(f.name).read().count("<heap nr="))
"""


def test_threads_share_one_malloc_arena():
    """glibc's malloc_info lists one heap per arena: threads that malloc get their own unless single_arena()."""
    counts = {how: int(subprocess.run([sys.executable, "-c", ARENAS_AFTER_THREADS, how], capture_output=True,
                                      text=True, check=True).stdout) for how in ("default", "single")}
    assert counts["single"] == 1 and counts["default"] > 1, counts
