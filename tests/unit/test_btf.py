"""Kernel BTF lookups (conntracct.probe.btf): a hand-built base + split pair,
and the running kernel's BTF against the plain index in tests/reference."""

import random
import struct
from pathlib import Path

import pytest

from conntracct.probe.btf import BTF, BTFError
from conntracct.probe.offsets import kernel_offsets
from tests.reference.btf_index import name_index

INT, STRUCT, TYPEDEF, FUNC, FUNC_PROTO = 1, 4, 8, 12, 13


def blob(types: bytes, strings: bytes) -> bytes:
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


def header(name_off: int, kind: int, vlen: int, size_or_type: int) -> bytes:
    return struct.pack("<III", name_off, kind << 24 | vlen, size_or_type)


def member(name_off: int, type_id: int, bit_offset: int) -> bytes:
    return struct.pack("<III", name_off, type_id, bit_offset)


# Base ("vmlinux"): 1 int, 2 struct conn {int a; int b;}, 3 func proto, 4 func f.
BASE_STRINGS = b"\0int\0conn\0a\0b\0f\0"
S = {name: BASE_STRINGS.index(b"\0" + name.encode() + b"\0") + 1 for name in ("int", "conn", "a", "b", "f")}
BASE = blob(header(S["int"], INT, 0, 4) + struct.pack("<I", 32)
            + header(S["conn"], STRUCT, 2, 8) + member(S["a"], 1, 0) + member(S["b"], 1, 32)
            + header(0, FUNC_PROTO, 0, 0)
            + header(S["f"], FUNC, 0, 3), BASE_STRINGS)

# Split ("nf_conntrack"), numbering on from the base: strings after the
# base's, types from 5: 5 typedef conn (same name, other kind),
# 6 struct modconn {struct conn c; int b;} (member names from the base's strings), 7 func g.
SPLIT_STRINGS = b"\0modconn\0g\0c\0"
M = {name: len(BASE_STRINGS) + SPLIT_STRINGS.index(b"\0" + name.encode() + b"\0") + 1
     for name in ("modconn", "g", "c")}
SPLIT = blob(header(S["conn"], TYPEDEF, 0, 2)
             + header(M["modconn"], STRUCT, 2, 12) + member(M["c"], 2, 0) + member(S["b"], 1, 64)
             + header(M["g"], FUNC, 0, 3), SPLIT_STRINGS)


def test_lookups_through_split_btf():
    base = BTF(BASE)
    split = BTF(SPLIT, base, origin="nf_conntrack")
    assert split.func_origin("g") == "nf_conntrack"
    assert split.func_origin("f") == "vmlinux"
    assert split.func_origin("conn") is None          # a struct and a typedef, no function
    assert base.func_origin("g") is None              # the base does not see its modules
    assert (split.func_id("f"), split.func_id("g")) == (4, 7)
    assert split.size_of("conn") == 8                 # the struct, not the typedef of that name
    assert split.size_of("modconn") == 12
    assert split.offset_of("modconn", "c.b") == 4
    assert split.offset_of("modconn", "b") == 8
    assert not split.has_struct("onn")                # a whole string, not the end of one
    with pytest.raises(BTFError, match="no type 'missing'"):
        split.size_of("missing")


def test_kernel_btf_lookups_match_the_plain_index():
    path = Path("/sys/kernel/btf/vmlinux")
    if not path.exists():
        pytest.skip("no kernel BTF here")
    data = path.read_bytes()
    btf, index = BTF(data), name_index(data)
    kernel_offsets(btf)                                # every offset the probe needs resolves
    sample = random.Random(7).sample(sorted(index.items()), 1500)
    for (kind, name), tid in sample:
        assert btf._find((kind,), name) == tid, (kind, name)
