"""The record layout is defined once, in bpf/record.h; the agent derives its
side from it (conntracct/probe/layout.py).  These tests compile the header
with gcc and check, field by field, every offset and size the Python side
takes from it, and the constants it names."""

import re
import subprocess

import pytest

from conntracct import flow
from conntracct.probe import loader, record
from conntracct.probe.layout import DEFINES, HEADER, STRUCTS, parse

TYPES = "typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;\n"


def field_paths(struct_name: str, prefix: str = ""):
    """Every field of a struct, nested fields as 'orig.family'."""
    for f in STRUCTS[struct_name].fields:
        yield prefix + f.name
        if f.ctype.startswith("struct "):
            yield from field_paths(f.ctype.split()[1], prefix + f.name + ".")


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """offsetof/sizeof of every struct and field of bpf/record.h as gcc lays
    them out (the BPF target uses the same natural alignment for these
    fixed-width types)."""
    prints = []
    for name in STRUCTS:
        prints.append(f'printf("{name} - %zu\\n", sizeof(struct {name}));')
        for path in field_paths(name):
            prints.append(f'printf("{name} {path} %zu %zu\\n", offsetof(struct {name}, {path}),'
                          f" sizeof(((struct {name} *)0)->{path}));")
    src = ("#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n" + TYPES
           + f'#include "{HEADER}"\nint main(void) {{\n' + "\n".join(prints) + "\nreturn 0; }\n")
    d = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text(src)
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(d / "layout"), str(d / "layout.c")], check=True)
    out = subprocess.run([str(d / "layout")], capture_output=True, text=True, check=True).stdout
    layout = {}
    for line in out.splitlines():
        name, path, *numbers = line.split()
        layout[name, path] = tuple(int(n) for n in numbers)
    return layout


def test_every_field_offset_and_size_match_gcc(c_layout):
    checked = 0
    for name, s in STRUCTS.items():
        assert c_layout[name, "-"] == (s.size,), f"sizeof(struct {name})"
        assert s.struct.size == s.size, f"struct {name}: Python format {s.struct.format}"
        for path in field_paths(name):
            offset, f = s.field(path)
            assert c_layout[name, path] == (offset, f.size), f"struct {name}.{path}"
            checked += 1
    assert checked > 40


def test_formats_unpack_each_field_from_its_c_offset(c_layout):
    """A record with every field's bytes set to a distinct value: the
    derived formats read each field back from where gcc put it."""
    s = STRUCTS["flow_record"]
    raw = bytearray(s.size)
    for f in s.fields:
        if not f.padding:
            raw[f.offset:f.offset + f.size] = bytes([len(f.name)]) * f.size
    values = s.struct.unpack(bytes(raw))
    names = [f for f in s.fields if not f.padding]
    at = 0
    for f in names:
        n = f.count if f.ctype in ("u16", "u32", "u64") else 1
        for v in values[at:at + n]:
            expect = bytes([len(f.name)]) * (f.size // n)
            assert v == (expect if isinstance(v, bytes) else int.from_bytes(expect, "little")), f.name
        at += n
    assert at == len(values)


def test_offsets_the_decoder_and_sweep_use(c_layout):
    """The spans record.py and ends.py slice raw records and keys with."""
    def at(struct_name, path):
        return c_layout[struct_name, path]
    assert record._TAIL_AT == at("flow_record", "netns")[0]
    assert record._START_AT == at("flow_record", "start_ns")[0]
    zone_at, zone_size = at("flow_record", "zone")
    assert record._ORIG == slice(at("flow_record", "orig")[0], sum(at("flow_record", "orig")))
    assert record._REPLY == slice(at("flow_record", "reply")[0], sum(at("flow_record", "reply")))
    # The compiled decoder includes record.h itself: as built, it agrees
    assert record._decode.RECORD_SIZE == record.RECORD.size == c_layout["flow_record", "-"][0]
    assert (record._decode.IDENTITY_AT, record._decode.IDENTITY_END) == (at("flow_record", "orig")[0],
                                                                        zone_at + zone_size)
    from conntracct.probe import ends
    for name, path in (("_KEY_FAMILY", "orig.family"), ("_KEY_PROTO", "orig.proto"), ("_KEY_SRC", "orig.src"),
                       ("_KEY_DST", "orig.dst"), ("_KEY_SRC_U", "orig.src_u"), ("_KEY_DST_U", "orig.dst_u"),
                       ("_KEY_ZONE", "zone")):
        offset, size = at("flow_key", path)
        got = getattr(ends, name)
        assert (got.start, got.stop) == (offset, offset + size) if isinstance(got, slice) else got == offset, name


def test_kinds_flags_stats_and_settings_come_from_the_header():
    text = HEADER.read_text()
    kinds = {int(v): k[5:].lower() for k, v in re.findall(r"^#define (KIND_\w+) (\d+)", text, re.M)}
    assert kinds == record.KIND_CODES and record.TRACK == "track"
    flags = {k: int(v) for k, v in re.findall(r"^#define (FLAG_\w+) (\d+)", text, re.M)}
    assert flags == {name: getattr(flow, name) for name in flags}   # flow.py names the agent's flags too
    stats = {int(v): k[5:].lower() for k, v in re.findall(r"^#define (STAT_\w+) (\d+)", text, re.M)}
    assert stats.pop(len(record.STAT_NAMES)) == "count"
    assert stats == dict(enumerate(record.STAT_NAMES))
    assert (loader.SET_WALL_OFFSET, loader.SET_AGENT_START, loader.SET_STAMPED_SINCE_START) == (
        DEFINES["SET_WALL_OFFSET"], DEFINES["SET_AGENT_START"], DEFINES["SET_STAMPED_SINCE_START"])


def test_flow_state_is_named_by_the_header():
    raw = record.FLOW_STATE.pack(1, 2, 3, 4, 5, 6, 7)
    state = record.FlowState.unpack(raw)
    assert state._fields == tuple(STRUCTS["flow_state"].names())
    assert (state.first_seen, state.next_emit, state.packets, state.bytes, state.flags) == (1, 2, (3, 4), (5, 6), 7)


def test_parser_lays_out_padding_and_nesting_as_c_does():
    defines, structs = parse("#define A_B 7\nstruct in {\n    u8 a;\n    u32 b;\n};\n"
                             "struct out {\n    u16 x;\n    struct in i;\n    u8 tail[3];\n};\n")
    assert defines == {"A_B": 7}
    assert (structs["in"].size, structs["in"].offset("b")) == (8, 4)
    assert structs["out"].offset("i.b") == 8 and structs["out"].size == 16
    assert structs["out"].struct.format == "<H2x8s3s1x"
