"""Releasing BCC's compiler memory after the attach (conntracct.probe.footprint)."""

import mmap
import os

import pytest

from conntracct.probe.footprint import Mapping, compiler_mappings, drop_pages, mappings, release_compiler_memory


def smaps_entry(head: str, anonymous_kb: int) -> str:
    return f"{head}\nSize: 4 kB\nRss: 4 kB\nAnonymous: {anonymous_kb} kB\nVmFlags: rd mr mw me\n"


SMAPS = "".join([
    smaps_entry("55d0c0a00000-55d0c0a2e000 r--p 00000000 fe:00 1 /usr/bin/python3.11", 0),
    smaps_entry("7f1a00000000-7f1a03000000 r-xp 00a00000 fe:00 2 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", 0),
    # relocated read-only data (RELRO): private copies the file does not hold
    smaps_entry("7f1a03000000-7f1a03800000 r--p 06162000 fe:00 2 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", 7000),
    smaps_entry("7f1a03800000-7f1a03900000 rw-p 06962000 fe:00 2 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", 900),
    smaps_entry("7f1a04000000-7f1a05000000 r--p 00000000 fe:00 3 /usr/lib/llvm-14/lib/libclang-cpp.so.14", 0),
    smaps_entry("7f1a06000000-7f1a06100000 r-xp 00000000 fe:00 4 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0", 0),
    smaps_entry("7f1a07000000-7f1a07001000 rw-p 00000000 00:00 0", 4),
    smaps_entry("7f1a08000000-7f1a08001000 rw-p 00000000 00:00 0                          [heap]", 4),
])


def test_only_llvm_and_clang_libraries_are_touched():
    found = compiler_mappings(SMAPS)
    assert [(m.start, m.end) for m in found] == [(0x7F1A00000000, 0x7F1A03000000), (0x7F1A03000000, 0x7F1A03800000),
                                                (0x7F1A03800000, 0x7F1A03900000), (0x7F1A04000000, 0x7F1A05000000)]


def test_only_unwritten_file_pages_are_dropped():
    """Code and untouched read-only data are dropped outright; mappings that
    hold private copies (writable, or relocated read-only data) only get
    the page-out hint."""
    clean = {(m.perms, m.anonymous_kb): m.clean for m in compiler_mappings(SMAPS)}
    assert clean == {("r-xp", 0): True, ("r--p", 7000): False, ("rw-p", 900): False, ("r--p", 0): True}
    assert len(mappings(SMAPS)) == 8


def rss_kb_of(start: int) -> int:
    """Resident kB of this process's mapping that starts at `start`."""
    smaps = open("/proc/self/smaps").read()
    entry = smaps[smaps.index(f"\n{start:x}-"):]
    return int(entry.split("\nRss:", 1)[1].split()[0])


def test_dropped_pages_leave_rss_and_read_back_from_the_file(tmp_path):
    """A read-only private file mapping, all pages read: after drop_pages()
    they are no longer resident, and reading them again gives the file."""
    path = tmp_path / "lib.so"
    data = os.urandom(64 * mmap.PAGESIZE)
    path.write_bytes(data)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), len(data), mmap.MAP_PRIVATE, mmap.PROT_READ)
    try:
        assert m[:] == data
        maps = [x for x in mappings(open("/proc/self/smaps").read()) if x.path == str(path)]
        assert len(maps) == 1 and maps[0].clean
        start = maps[0].start
        assert rss_kb_of(start) >= 60 * mmap.PAGESIZE // 1024
        drop_pages(maps)
        assert rss_kb_of(start) == 0
        assert m[:] == data
    finally:
        m.close()


def test_written_mappings_are_not_dropped(tmp_path):
    """A private mapping someone wrote to is only advised: its contents stay."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(4 * mmap.PAGESIZE))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 4 * mmap.PAGESIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        m[:5] = b"local"
        [found] = [x for x in mappings(open("/proc/self/smaps").read()) if x.path == str(path)]
        assert not found.clean
        drop_pages([found])
        assert m[:5] == b"local"
    finally:
        m.close()


def test_release_is_harmless_without_a_compiler_loaded():
    assert release_compiler_memory() >= 0


def test_a_mapping_knows_whether_it_is_clean():
    assert Mapping(0, 4096, "r-xp", "/x", 0).clean
    assert not Mapping(0, 4096, "r-xp", "/x", 4).clean
    assert not Mapping(0, 4096, "rw-p", "/x", 0).clean


def test_the_parsed_kernel_btf_is_dropped():
    """Start-up parses the kernel's BTF once (~24 MB of objects); the release drops it."""
    from conntracct.probe import btf
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("no kernel BTF here")
    first = btf.kernel_btf()
    assert btf.kernel_btf() is first                      # parsed once
    assert btf._load_kernel_btf.cache_info().currsize == 1
    release_compiler_memory()
    assert btf._load_kernel_btf.cache_info().currsize == 0
    assert btf.kernel_btf() is not first                  # parsed again when asked
