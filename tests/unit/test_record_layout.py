"""The record layout lives once on each side: bpf/conntracct.c and
conntracct/probe/record.py.  These tests fail when the two drift."""

import re
import struct
import subprocess

import pytest

from conntracct import flow
from conntracct.probe import record
from conntracct.probe.loader import PROBE_SOURCE, SET_AGENT_START, SET_STAMPED_SINCE_START, SET_WALL_OFFSET

SOURCE = (PROBE_SOURCE.parent / "record.h").read_text()


def c_struct(name: str) -> str:
    match = re.search(r"^struct %s \{.*?^\};" % name, SOURCE, re.S | re.M)
    assert match, f"struct {name} not found in {PROBE_SOURCE}"
    return match.group(0)


def c_defines(prefix: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"^#define (%s\w+) (\d+)" % prefix, SOURCE, re.M)}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """offsetof/sizeof of the probe's structs as gcc lays them out (the BPF
    target uses the same natural alignment for these fixed-width types)."""
    fields = [name for name, fmt in record.RECORD_FIELDS if not fmt.endswith("x")]
    prints = "".join(f'printf("{f} %zu\\n", offsetof(struct flow_record, {f}));' for f in fields)
    src = ("#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n"
           "typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;\n"
           + "\n".join(c_struct(s) for s in ("ct_tuple", "flow_record", "flow_key", "flow_state"))
           + "\nint main(void) {" + prints
           + 'printf("sizeof_record %zu\\nsizeof_tuple %zu\\nsizeof_key %zu\\nsizeof_state %zu\\n",'
             "sizeof(struct flow_record), sizeof(struct ct_tuple), sizeof(struct flow_key),"
             " sizeof(struct flow_state)); return 0; }\n")
    d = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text(src)
    subprocess.run(["gcc", "-o", str(d / "layout"), str(d / "layout.c")], check=True)
    out = subprocess.run([str(d / "layout")], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_record_field_offsets_match(c_layout):
    offset = 0
    for name, fmt in record.RECORD_FIELDS:
        if not fmt.endswith("x"):
            assert c_layout[name] == offset, f"flow_record.{name}: C offset {c_layout[name]}, Python {offset}"
        offset += struct.calcsize("<" + fmt)
    assert c_layout["sizeof_record"] == record.RECORD.size == offset


def test_key_state_and_tuple_sizes_match(c_layout):
    assert c_layout["sizeof_tuple"] == record.TUPLE.size
    assert c_layout["sizeof_key"] == record.FLOW_KEY.size
    assert c_layout["sizeof_state"] == record.FLOW_STATE.size


def test_kinds_flags_stats_and_settings_match():
    kinds = c_defines("KIND_")
    assert {v: k[5:].lower() for k, v in kinds.items()} == record.KIND_CODES
    flags = c_defines("FLAG_")
    assert flags == {name: getattr(flow, name) for name in flags}
    stats = c_defines("STAT_")
    count = stats.pop("STAT_COUNT")
    assert count == len(record.STAT_NAMES)
    assert {v: k[5:].lower() for k, v in stats.items()} == dict(enumerate(record.STAT_NAMES))
    settings = c_defines("SET_")
    assert (settings["SET_WALL_OFFSET"], settings["SET_AGENT_START"], settings["SET_STAMPED_SINCE_START"]) == (
        SET_WALL_OFFSET, SET_AGENT_START, SET_STAMPED_SINCE_START)
