"""Reference for conntracct.probe.btf's name lookups: every named struct,
union, enum, typedef and function of one BTF blob in a dict, the plain way
(the probe's BTF keeps flat arrays and searches the string section instead).
"""

import struct

# kind -> (fixed bytes after the 12-byte header, bytes per vlen item)
_TRAILER = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0), 15: (0, 12),
            17: (4, 0), 19: (0, 12)}
NAMED_KINDS = (4, 5, 6, 19, 8, 12)     # struct, union, enum, enum64, typedef, func


def name_index(data: bytes, first_id: int = 1, base_strings: bytes = b"") -> dict[tuple[int, str], int]:
    """{(kind, name): first type id} of a BTF blob; `base_strings` is the
    base's string section when `data` is split BTF."""
    _magic, _v, _f, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
    strings = base_strings + data[hdr_len + str_off:hdr_len + str_off + str_len]
    out: dict[tuple[int, str], int] = {}
    pos, end, tid = hdr_len + type_off, hdr_len + type_off + type_len, first_id
    while pos < end:
        name_off, info = struct.unpack_from("<II", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if name_off and kind in NAMED_KINDS:
            name = strings[name_off:strings.index(b"\0", name_off)].decode()
            out.setdefault((kind, name), tid)
        fixed, item = _TRAILER.get(kind, (0, 0))
        pos += 12 + fixed + item * vlen
        tid += 1
    return out
