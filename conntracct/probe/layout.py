"""The probe's record layout, read from its one definition: bpf/record.h.

The C declarations are the source of truth (as BCC builds its Python event
class from the C struct): this module parses the header's simple
declarations -- `#define NAME number` and structs of u8/u16/u32/u64 fields,
fixed-size arrays of them and structs declared before -- lays them out with
the C rules (natural alignment, a struct padded to its widest member), and
hands out struct formats and byte offsets by field name.  Nothing here
repeats a number of the layout; tests/unit/test_record_layout.py compiles
the header with gcc and checks every offset and size the agent uses.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "record.h"

_SCALARS = {"u8": (1, "B"), "u16": (2, "H"), "u32": (4, "I"), "u64": (8, "Q")}
_DEFINE = re.compile(r"^#define\s+([A-Z_][A-Z0-9_]*)\s+(\d+)\b", re.M)
_STRUCT = re.compile(r"^struct\s+(\w+)\s*\{(.*?)^\};", re.M | re.S)
_FIELD = re.compile(r"^\s*(struct\s+\w+|u8|u16|u32|u64)\s+(\w+)(?:\[(\d+)\])?\s*;", re.M)


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str          # "u8".."u64", or "struct NAME"
    count: int          # array length, 1 for a plain field
    offset: int
    size: int           # whole field, all elements
    align: int

    @property
    def padding(self) -> bool:
        return self.name.startswith("_pad")


class CStruct:
    """One struct of the header: its fields at their C offsets."""

    def __init__(self, name: str, fields: list[Field], size: int, align: int, structs: dict[str, CStruct]):
        self.name, self.fields, self.size, self.align = name, fields, size, align
        self._by_name = {f.name: f for f in fields}
        self._structs = structs
        self.struct = struct.Struct("<" + self.format())

    def field(self, path: str) -> tuple[int, Field]:
        """(offset, field) of a field; 'orig.family' names one inside a nested struct."""
        head, _, rest = path.partition(".")
        f = self._by_name.get(head)
        if f is None:
            raise KeyError(f"struct {self.name} has no field {head!r}")
        if not rest:
            return f.offset, f
        inner_offset, inner = self._structs[f.ctype.split()[1]].field(rest)
        return f.offset + inner_offset, inner

    def offset(self, path: str) -> int:
        return self.field(path)[0]

    def span(self, first: str, last: str | None = None) -> slice:
        """The bytes of one field, or of the fields from `first` to `last`."""
        start, _ = self.field(first)
        end_at, end = self.field(last or first)
        return slice(start, end_at + end.size)

    def format(self, first: str | None = None, last: str | None = None, expand: bool = False) -> str:
        """struct-module format of the fields from `first` to `last` (all by
        default), gaps included; nested structs as bytes, or their own fields
        with `expand`."""
        names = [f.name for f in self.fields]
        lo = names.index(first) if first else 0
        hi = names.index(last) if last else len(names) - 1
        out, at = [], self.fields[lo].offset
        for f in self.fields[lo:hi + 1]:
            if f.offset > at:
                out.append(f"{f.offset - at}x")
            out.append(self._field_format(f, expand))
            at = f.offset + f.size
        if last is None and self.size > at:
            out.append(f"{self.size - at}x")
        return "".join(out)

    def _field_format(self, f: Field, expand: bool) -> str:
        if f.padding:
            return f"{f.size}x"
        if f.ctype.startswith("struct "):
            inner = self._structs[f.ctype.split()[1]]
            return inner.format() * f.count if expand else f"{f.size}s"
        if f.ctype == "u8" and f.count > 1:
            return f"{f.count}s"     # byte arrays (addresses) as bytes
        code = _SCALARS[f.ctype][1]
        return f"{f.count}{code}" if f.count > 1 else code

    def names(self) -> list[str]:
        """The fields struct.unpack returns, in order (padding has no value)."""
        return [f.name for f in self.fields if not f.padding]


def parse(text: str) -> tuple[dict[str, int], dict[str, CStruct]]:
    """(#define constants, structs) of a header in the subset described above."""
    defines = {name: int(value) for name, value in _DEFINE.findall(text)}
    structs: dict[str, CStruct] = {}
    for name, body in _STRUCT.findall(text):
        fields, at, align = [], 0, 1
        for ctype, fname, count in _FIELD.findall(body):
            if ctype.startswith("struct"):
                ctype = "struct " + ctype.split()[1]
                inner = structs[ctype.split()[1]]
                size, falign = inner.size, inner.align
            else:
                size, falign = _SCALARS[ctype][0], _SCALARS[ctype][0]
            n = int(count) if count else 1
            at = -(-at // falign) * falign
            fields.append(Field(fname, ctype, n, at, size * n, falign))
            at += size * n
            align = max(align, falign)
        structs[name] = CStruct(name, fields, -(-at // align) * align, align, structs)
    return defines, structs


DEFINES, STRUCTS = parse(HEADER.read_text())
TUPLE_LAYOUT = STRUCTS["ct_tuple"]
RECORD_LAYOUT = STRUCTS["flow_record"]
KEY_LAYOUT = STRUCTS["flow_key"]
STATE_LAYOUT = STRUCTS["flow_state"]


def prefixed(prefix: str) -> dict[str, int]:
    """The header's constants named PREFIX_*, e.g. prefixed("KIND_")."""
    return {name: value for name, value in DEFINES.items() if name.startswith(prefix)}
