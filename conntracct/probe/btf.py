"""Read struct member offsets and enum values from the kernel's BTF.

The probe must not trust the installed kernel headers' struct layouts (they
may belong to another kernel), so every offset it uses comes from here and
reaches the C program as a -D macro.  Split BTF (a module's types continuing
after vmlinux's, /sys/kernel/btf/<module>) is supported.
"""

from __future__ import annotations

import functools
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

BTF_MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes that follow the 12-byte common header: (fixed, per vlen item).
_TRAILER = {
    KIND_INT: (4, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12), KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8), KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0), KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BTFError(Exception):
    """BTF is missing, malformed, or lacks a type the probe needs."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


class BTF:
    """A parsed BTF blob; `base` is given for split (module) BTF."""

    def __init__(self, data: bytes, base: BTF | None = None, origin: str = "vmlinux"):
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError("not a BTF blob (bad magic)")
        self._data = data
        self._base = base
        self.origin = origin    # "vmlinux", or the module whose split BTF this is
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        self._str_base = base._str_total if base else 0
        self._str_total = self._str_base + str_len
        first_id = base._next_id if base else 1
        # Per type id (from first_id): its header's byte position, name offset
        # and kind, in flat arrays (~9 bytes a type; a dict of names took
        # ~24 MB for vmlinux's 126k types).  Names are looked up through the
        # string section instead (_find).
        self._pos, self._name_offs, self._kinds = array("I"), array("I"), bytearray()
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.Struct("<II").unpack_from
        while pos < end:
            name_off, info = unpack(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self._pos.append(pos)
            self._name_offs.append(name_off)
            self._kinds.append(kind)
            fixed, item = _TRAILER.get(kind, (0, 0))
            pos += 12 + fixed + item * vlen
        self._first_id = first_id
        self._next_id = first_id + len(self._pos)

    @classmethod
    def load(cls, path: str | Path = "/sys/kernel/btf/vmlinux", base: BTF | None = None) -> BTF:
        try:
            return cls(Path(path).read_bytes(), base, Path(path).name)
        except OSError as e:
            raise BTFError(f"cannot read BTF from {path}: {e.strerror}") from None

    # -- raw access ---------------------------------------------------------
    def _str(self, off: int) -> str:
        if off < self._str_base:
            return self._base._str(off)
        start = self._str_start + off - self._str_base
        return self._data[start:self._data.index(b"\0", start)].decode()

    def _owner(self, tid: int) -> BTF:
        btf = self
        while tid < btf._first_id:
            btf = btf._base
        return btf

    def _header(self, tid: int) -> tuple[BTF, int, int, int, int, int]:
        btf = self._owner(tid)
        pos = btf._pos[tid - btf._first_id]
        name_off, info, size_type = struct.unpack_from("<III", btf._data, pos)
        return btf, pos, name_off, (info >> 24) & 0x1F, info & 0xFFFF, size_type

    def _string_offsets(self, name: str) -> list[int]:
        """Every offset (in this BTF's numbering, base strings first) at which `name` is a whole string."""
        out = self._base._string_offsets(name) if self._base else []
        needle, start = b"\0" + name.encode() + b"\0", self._str_start
        while (at := self._data.find(needle, start, self._str_end)) >= 0:
            out.append(at + 1 - self._str_start + self._str_base)
            start = at + 1
        return out

    def _find_here(self, kind: int, offsets: list[int]) -> int | None:
        """The first type of this BTF (not its base) of `kind` named at one of `offsets`."""
        best = None
        for off in offsets:
            i = 0
            while True:
                try:
                    i = self._name_offs.index(off, i)
                except ValueError:
                    break
                if self._kinds[i] == kind:
                    best = i if best is None else min(best, i)
                    break
                i += 1
        return None if best is None else self._first_id + best

    def _find(self, kinds: tuple[int, ...], name: str) -> int | None:
        """The first type of one of `kinds` (in that order of preference) named `name`."""
        return next((tid for tid, _ in self._find_with_origin(kinds, name)), None)

    def _find_with_origin(self, kinds: tuple[int, ...], name: str):
        """(type id, origin) of each BTF in the chain that has a type of `kinds` named `name`, this one first."""
        for kind in kinds:
            btf = self
            while btf is not None:
                tid = btf._find_here(kind, btf._string_offsets(name))
                if tid is not None:
                    yield tid, btf.origin
                btf = btf._base

    # -- queries --------------------------------------------------------------
    def has_struct(self, name: str) -> bool:
        return self._find((KIND_STRUCT, KIND_UNION), name) is not None

    def func_origin(self, name: str) -> str | None:
        """Where a kernel function is described: "vmlinux", a module's name
        (split BTF), or None when no BTF here has it (e.g. it was inlined)."""
        return next((origin for _, origin in self._find_with_origin((KIND_FUNC,), name)), None)

    def func_id(self, name: str) -> int | None:
        """The BTF type id of a kernel function (what fentry/fexit attach to), or None."""
        return self._find((KIND_FUNC,), name)

    def resolve(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the underlying type id."""
        while True:
            _, _, _, kind, _, size_type = self._header(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = size_type

    def members(self, tid: int) -> list[Member]:
        btf, pos, _, kind, vlen, _ = self._header(self.resolve(tid))
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise BTFError(f"type {tid} is not a struct or union")
        kind_flag = struct.unpack_from("<I", btf._data, pos + 4)[0] >> 31
        out = []
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", btf._data, pos + 12 + 12 * i)
            out.append(Member(btf._str(name_off) if name_off else "", mtype,
                              off & 0xFFFFFF if kind_flag else off))
        return out

    def size_of(self, type_name: str) -> int:
        tid = self._require((KIND_STRUCT, KIND_UNION), type_name)
        return self._header(tid)[5]

    def _require(self, kinds: tuple[int, ...], name: str) -> int:
        tid = self._find(kinds, name)
        if tid is None:
            raise BTFError(f"kernel BTF has no type '{name}'")
        return tid

    def _member_in(self, tid: int, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of `name` in struct `tid`, searching anonymous members."""
        for m in self.members(tid):
            if m.name == name:
                return m.bit_offset, m.type_id
            if not m.name:
                inner = self._member_in(m.type_id, name)
                if inner is not None:
                    return m.bit_offset + inner[0], inner[1]
        return None

    def offset_of(self, struct_name: str, path: str) -> int:
        """Byte offset of a dotted member path, e.g. ("nf_conn", "proto.tcp.state").

        Array members take an index: "tuplehash[1].tuple".
        """
        tid = self._require((KIND_STRUCT, KIND_UNION), struct_name)
        bits = 0
        for part in path.split("."):
            name, _, index = part.partition("[")
            found = self._member_in(tid, name)
            if found is None:
                raise BTFError(f"kernel BTF: struct {struct_name} has no member '{path}'")
            bits += found[0]
            tid = self.resolve(found[1])
            if index:
                btf, pos, _, kind, _, _ = self._header(tid)
                if kind != KIND_ARRAY:
                    raise BTFError(f"kernel BTF: '{name}' in {struct_name} is not an array")
                elem = struct.unpack_from("<I", btf._data, pos + 12)[0]
                tid = self.resolve(elem)
                bits += int(index.rstrip("]")) * self._type_size(tid) * 8
        if bits % 8:
            raise BTFError(f"kernel BTF: {struct_name}.{path} is a bitfield")
        return bits // 8

    def _type_size(self, tid: int) -> int:
        btf, pos, _, kind, _, size_type = self._header(self.resolve(tid))
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _, nelems = struct.unpack_from("<III", btf._data, pos + 12)
            return self._type_size(elem) * nelems
        return size_type

    def enum_value(self, enum_name: str, constant: str) -> int:
        tid = self._require((KIND_ENUM, KIND_ENUM64), enum_name)
        btf, pos, _, kind, vlen, _ = self._header(tid)
        item = 8 if kind == KIND_ENUM else 12
        for i in range(vlen):
            name_off, lo = struct.unpack_from("<Ii", btf._data, pos + 12 + item * i)
            if btf._str(name_off) == constant:
                if kind == KIND_ENUM64:
                    hi = struct.unpack_from("<I", btf._data, pos + 20 + item * i)[0]
                    return (hi << 32) | (lo & 0xFFFFFFFF)
                return lo
        raise BTFError(f"kernel BTF: enum {enum_name} has no constant {constant}")


def kernel_btf(module: str | None = "nf_conntrack") -> BTF:
    """vmlinux BTF, with a module's split BTF layered on when it exists.

    Parsed once per process and module (vmlinux's is ~5 MB, ~0.15-0.3 s):
    start-up reads it several times (checks, mode detection, the probe's
    offsets) and the running kernel's BTF does not change.  A module loaded
    later is seen: whether its BTF exists is part of the cache key."""
    if module and not (Path("/sys/kernel/btf") / module).exists():
        module = None
    return _load_kernel_btf(module)


def forget_kernel_btf() -> None:
    """Drop the parsed BTF (~7 MB for vmlinux's: the blob and its arrays), once
    start-up no longer needs it; a later kernel_btf() parses it again."""
    _load_kernel_btf.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_kernel_btf(module: str | None) -> BTF:
    base = BTF.load("/sys/kernel/btf/vmlinux")
    return BTF.load(Path("/sys/kernel/btf") / module, base) if module else base
