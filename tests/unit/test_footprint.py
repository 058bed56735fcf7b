"""Releasing BCC's compiler memory after the attach (conntracct.probe.footprint)."""

from conntracct.probe.footprint import compiler_mappings, release_compiler_memory

MAPS = """\
55d0c0a00000-55d0c0a2e000 r--p 00000000 fe:00 1 /usr/bin/python3.11
7f1a00000000-7f1a03000000 r-xp 00a00000 fe:00 2 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f1a04000000-7f1a05000000 r--p 00000000 fe:00 3 /usr/lib/llvm-14/lib/libclang-cpp.so.14
7f1a06000000-7f1a06100000 r-xp 00000000 fe:00 4 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f1a07000000-7f1a07001000 rw-p 00000000 00:00 0
7f1a08000000-7f1a08001000 rw-p 00000000 00:00 0 [heap]
"""


def test_only_llvm_and_clang_libraries_are_paged_out():
    assert compiler_mappings(MAPS) == [(0x7F1A00000000, 0x7F1A03000000), (0x7F1A04000000, 0x7F1A05000000)]


def test_release_is_harmless_without_a_compiler_loaded():
    assert release_compiler_memory() >= 0
