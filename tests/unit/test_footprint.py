"""Giving back start-up memory once the probe is attached (conntracct.probe.footprint)."""

import os

import pytest

from conntracct.probe.footprint import release_startup_memory


def test_release_is_harmless_when_there_is_nothing_to_give_back():
    assert release_startup_memory() >= 0


def test_the_parsed_kernel_btf_is_dropped():
    """Start-up parses the kernel's BTF once (~24 MB of objects); the release drops it."""
    from conntracct.probe import btf
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("no kernel BTF here")
    first = btf.kernel_btf()
    assert btf.kernel_btf() is first                      # parsed once
    assert btf._load_kernel_btf.cache_info().currsize == 1
    release_startup_memory()
    assert btf._load_kernel_btf.cache_info().currsize == 0
    assert btf.kernel_btf() is not first                  # parsed again when asked
