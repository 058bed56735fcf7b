"""Probe images (conntracct/probe/image.py) without a kernel: which
instructions name a map, what an image is keyed on, the folder kept."""

from __future__ import annotations

import logging
import os
import struct

from conntracct.probe import image

INSN = struct.Struct("<BBhi")


def ld_map(dst: int, src_kind: int, fd: int) -> bytes:
    """A 64-bit load of a map (src_kind 1: by fd, 2: a value in it), two slots."""
    return INSN.pack(0x18, (src_kind << 4) | dst, 0, fd) + INSN.pack(0, 0, 0, 0)


def test_only_map_loads_are_references_and_an_unknown_fd_spoils_the_image():
    insns = (INSN.pack(0xB7, 1, 0, 7)          # r1 = 7: an immediate that happens to equal an fd
             + ld_map(1, 1, 7) + ld_map(2, 2, 9)
             + INSN.pack(0x18, 3, 0, 7) + INSN.pack(0, 0, 0, 0)   # a plain 64-bit constant (src 0)
             + INSN.pack(0x95, 0, 0, 0))
    assert image.map_references(insns, {7: "flows", 9: "stats"}) == [(1, "flows"), (3, "stats")]
    assert image.map_references(insns, {7: "flows"}) is None


def test_the_key_follows_the_request_the_source_text_and_the_header_tree(tmp_path):
    source = tmp_path / "probe.c"
    source.write_text("int x;")
    headers = tmp_path / "build"
    request = {"source": str(source), "cflags": ["-DA=1"]}
    base = image.key(request, [source], headers, "0.26.0")
    assert image.key(dict(request), [source], headers, "0.26.0") == base
    assert image.key({**request, "cflags": ["-DA=2"]}, [source], headers, "0.26.0") != base
    assert image.key(request, [source], headers, "0.29.1") != base
    os.symlink(tmp_path, tmp_path / "other")
    assert image.key(request, [source], tmp_path / "other", "0.26.0") != base
    source.write_text("int y;")
    assert image.key(request, [source], headers, "0.26.0") != base


def test_the_folder_keeps_the_newest_images_and_a_broken_one_reads_as_none(tmp_path, caplog):
    folder = str(tmp_path / "cache")
    assert not image.any_kept(folder) and not image.any_kept("")
    kept = {"maps": {}, "programs": {}, "refused": {}}
    for i in range(image.KEEP + 2):
        image.write(folder, f"k{i}", kept)
        os.utime(tmp_path / "cache" / f"probe-k{i}.json", (i, i))
    image.write(folder, "k0", kept)    # written again: the newest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"probe-k{i}.json" for i in [0, *range(3, image.KEEP + 2)])
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == "0o700"
    assert image.read(folder, "k0") == kept and image.read(folder, "absent") is None
    (tmp_path / "cache" / "probe-k0.json").write_text('{"maps": {}}')
    with caplog.at_level(logging.WARNING, "conntracct.probe.image"):
        assert image.read(folder, "k0") is None
    assert "not a probe image" in caplog.text
