"""The compiled probe kept on disk (`probe.cache_dir`): each program's
instructions as BCC made them, the shape of every map they use and where
the instructions name a map.  The next start with the same request (source,
flags, programs), kernel and BCC creates the maps and loads the programs
with bpf(2) itself: no compiler process and no clang, which were most of
`conntracct run`'s start-up (bench P5).  An image that cannot be read or
that the kernel refuses is compiled again and replaced.

Only requests whose programs the agent loads itself are kept: fentry's are
attached by BCC as they load (Request.autoattached).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

from . import bpfsys

log = logging.getLogger(__name__)

FORMAT = 1          # of the file; part of the key
KEEP = 4            # images kept in the folder (configurations, kernels), the newest
_INSN = struct.Struct("<BBhi")      # code, dst/src registers, offset, immediate
_LD_IMM64 = 0x18                     # a 64-bit load: src register 1 or 2 means imm is a map fd
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2


def key(request: dict, sources: list[Path], headers: Path, bcc_version: str) -> str:
    """What an image is valid for: the request, the text of the source and
    its headers, the kernel headers BCC compiles with, the running kernel,
    BCC, this format."""
    uname = os.uname()
    digest = hashlib.sha256(json.dumps([FORMAT, request, os.path.realpath(headers), bcc_version, uname.release,
                                        uname.version, uname.machine], sort_keys=True).encode())
    for source in sorted(sources):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def map_references(insns: bytes, fds: dict[int, str]) -> list[tuple[int, str]] | None:
    """(instruction index, map name) of every map an instruction names by
    fd; None if one names an fd that is not among `fds`."""
    out = []
    for index in range(len(insns) // _INSN.size):
        code, regs, _off, imm = _INSN.unpack_from(insns, index * _INSN.size)
        if code == _LD_IMM64 and regs >> 4 in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
            if imm not in fds:
                return None
            out.append((index, fds[imm]))
    return out


def capture(programs: dict[str, tuple[bytes, int, int, int]], maps: dict[str, int], wanted: list[str],
            refused: dict[str, str]) -> dict | None:
    """An image of loaded programs (name -> (instructions, type, attach type,
    flags)), the maps they use and the `wanted` ones (name -> fd: all the
    source defines), and the optional programs the kernel `refused`; None
    if it cannot be made."""
    names = {fd: name for name, fd in maps.items()}
    image: dict = {"maps": {name: bpfsys.map_shape(maps[name]) for name in wanted}, "programs": {},
                   "refused": refused}
    for name, (insns, prog_type, attach_type, flags) in programs.items():
        refs = map_references(insns, names)
        if refs is None:
            return None
        for _, map_name in refs:
            if map_name not in image["maps"]:
                image["maps"][map_name] = bpfsys.map_shape(maps[map_name])
        image["programs"][name] = {"type": prog_type, "attach_type": max(attach_type, 0), "flags": flags,
                                   "insns": base64.b64encode(insns).decode(), "maps": refs}
    return image


def instantiate(image: dict, wanted_maps: list[str], optional: set[str]) -> tuple[dict[str, int], dict[str, int],
                                                                                  dict[str, str]]:
    """Create the image's maps and load its programs: (maps wanted -> fd,
    programs -> fd, optional programs the kernel refused -> why).  OSError
    if the kernel refuses a map or a program that is not optional,
    ValueError if the image is malformed."""
    fds: dict[str, int] = {}
    programs: dict[str, int] = {}
    refused: dict[str, str] = dict(image["refused"])
    try:
        for name, shape in image["maps"].items():
            fds[name] = bpfsys.create_map(name, shape)
        for name, prog in image["programs"].items():
            insns = bytearray(base64.b64decode(prog["insns"]))
            for index, map_name in prog["maps"]:
                code, regs, off, _imm = _INSN.unpack_from(insns, index * _INSN.size)
                _INSN.pack_into(insns, index * _INSN.size, code, regs, off, fds[map_name])
            try:
                programs[name] = bpfsys.load_program(prog["type"], bytes(insns), name.encode(), prog["flags"],
                                                     prog["attach_type"])
            except OSError as e:
                if name not in optional:
                    raise
                refused[name] = str(e)
    except BaseException as e:
        for fd in [*fds.values(), *programs.values()]:
            os.close(fd)
        if isinstance(e, (KeyError, TypeError, AttributeError, struct.error)):
            raise ValueError(f"malformed image: {type(e).__name__}: {e}") from None
        raise
    for name in set(fds) - set(wanted_maps):     # the programs hold them
        os.close(fds.pop(name))
    return fds, programs, refused


def any_kept(directory: str) -> bool:
    try:
        return bool(directory) and any(Path(directory).glob("probe-*.json"))
    except OSError:     # e.g. not ours to read: a compile it is
        return False


def read(directory: str, image_key: str) -> dict | None:
    path = Path(directory) / f"probe-{image_key}.json"
    try:
        image = json.loads(path.read_text())
        if not isinstance(image, dict) or not {"maps", "programs", "refused"} <= image.keys():
            raise ValueError("not a probe image")
        return image
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("probe image %s unreadable (%s): compiling", path, e)
        return None


def write(directory: str, image_key: str, image: dict) -> None:
    """Keep an image, and the KEEP newest in all; a failure is logged, not fatal."""
    folder = Path(directory)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        part = folder / f".probe-{image_key}.{os.getpid()}"
        part.write_text(json.dumps(image))
        part.replace(folder / f"probe-{image_key}.json")
        kept = sorted(folder.glob("probe-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError as e:
        log.warning("probe image not kept in %s: %s", directory, e)
