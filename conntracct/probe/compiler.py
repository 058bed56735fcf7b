"""Compiling and loading the probe with BCC, in a child process.

BCC compiles with clang/LLVM inside the process that calls it, and what
that leaves behind stays for the process's life: ~36 MB of heap and the
LLVM/clang library pages, the larger part of an idle agent's RSS
(bench/README.md, P6).  So the agent never imports bcc.  It runs this
module as a child (`python -m conntracct.probe.compiler FD`), which
compiles the probe, loads the programs asked for and sends back the file
descriptors of its maps and programs over a Unix socket (SCM_RIGHTS),
then exits.  The kernel objects live on through those descriptors: the
agent attaches the programs and reads the maps with bpf(2) itself
(bpfsys).

Asked to (Request.image_dir), the child also keeps an image of what it
loaded (probe/image.py), which later starts load without it (from_image).

The child imports nothing of the agent's but bpfsys and image, so it
starts in about the time `import bcc` takes, and the agent starts it
early (start_early) so that overlaps its own start-up.  It inherits the
caller's ambient capabilities; maps and programs belong to no network
namespace (the agent links them in its own).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from . import bpfsys, image

# A reply carries a few maps and programs: far below SCM_MAX_FD (253).
_REPLY_LIMIT = 1 << 16


@dataclass(frozen=True)
class Request:
    """What to build: the source and its flags, then what to load from it."""
    source: str
    cflags: list[str]
    programs: list[tuple[str, int, int]]     # (function, program type, expected attach type or -1)
    sleepable: list[tuple[str, int]]         # (function, program type): loaded by bpfsys, may be refused
    maps: list[str]
    # Programs BCC loads and attaches itself as it compiles (KFUNC_PROBE/KRETFUNC_PROBE).
    autoattached: bool = False
    # Keep an image of what was loaded in this folder, under this key (probe/image.py).
    image_dir: str = ""
    image_key: str = ""


@dataclass
class Compiled:
    """The loaded probe, as file descriptors the caller owns."""
    maps: dict[str, int] = field(default_factory=dict)
    programs: dict[str, int] = field(default_factory=dict)
    links: list[int] = field(default_factory=list)    # attachments BCC made (fentry)
    refused: dict[str, str] = field(default_factory=dict)   # sleepable programs the kernel refused, and why

    def fds(self) -> list[int]:
        return [*self.maps.values(), *self.programs.values(), *self.links]

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)
        self.maps, self.programs, self.links = {}, {}, []


class CompileError(Exception):
    """BCC's own words for why the probe did not compile or load."""


def bcc_installed() -> bool:
    """Whether `import bcc` would work, without importing it (that loads libbcc, ~13 MB)."""
    return find_spec("bcc") is not None


def header_tree() -> Path:
    """The kernel headers BCC compiles with."""
    return Path("/lib/modules") / os.uname().release / "build"


def bcc_version() -> str:
    """BCC's version, read from its version.py rather than imported."""
    spec = find_spec("bcc")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (Path(folder) / "version.py").read_text())
        except OSError:
            continue
        if found:
            return found.group(1)
    return "?"


class _Child:
    """A compiler process and our end of its socket."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)


_started: _Child | None = None


def start_early(image_dir: str = "") -> None:
    """Start the compiler child now, before its request: its interpreter and
    `import bcc` (~0.3 s) then overlap the caller's own start-up (bench P5).
    Not when `image_dir` holds probe images: one is likely to fit.
    A child whose caller goes away without asking exits."""
    global _started
    if _started is None and bcc_installed() and not image.any_kept(image_dir):
        _started = _Child()


def from_image(kept: dict, request: Request) -> Compiled:
    """The probe loaded from an image (image.instantiate), without BCC; the
    compiler child started early, if any, is sent away."""
    global _started
    if _started is not None:
        _started.sock.close()
        _started.proc.wait()
        _started = None
    maps, programs, refused = image.instantiate(kept, request.maps, {name for name, _ in request.sleepable})
    return Compiled(maps=maps, programs=programs, refused=refused)


def compile_and_load(request: Request) -> Compiled:
    """Build the probe in a child (the one start_early() started, if any) and take over its maps and programs."""
    global _started
    child, _started = _started or _Child(), None
    with child.sock:
        try:
            child.sock.sendall(json.dumps(request.__dict__).encode())
            message, fds, _flags, _addr = socket.recv_fds(child.sock, _REPLY_LIMIT, 64, socket.MSG_CMSG_CLOEXEC)
        finally:
            child.proc.wait()
    if not message:
        raise CompileError(f"the BCC compiler process ended without an answer (exit status {child.proc.returncode})")
    reply = json.loads(message)
    if "error" in reply:
        raise CompileError(reply["error"])
    names = iter(fds)
    return Compiled(maps={name: next(names) for name in reply["maps"]},
                    programs={name: next(names) for name in reply["programs"]},
                    links=[next(names) for _ in range(reply["links"])], refused=reply["refused"])


# -- the child -------------------------------------------------------------------------

def _build(request: Request, BPF) -> Compiled:
    b = BPF(src_file=request.source.encode(), cflags=request.cflags)
    out = Compiled(maps={name: b[name.encode()].map_fd for name in request.maps})
    for name, prog_type, attach_type in request.programs:
        out.programs[name] = b.load_func(name.encode(), prog_type, attach_type=attach_type).fd
    if request.autoattached:
        out.programs.update((name.decode(), fn.fd) for name, fn in b.funcs.items())
        out.links = [*b.kfunc_entry_fds.values(), *b.kfunc_exit_fds.values()]
    for name, prog_type in request.sleepable:
        try:
            out.programs[name] = bpfsys.load_program(prog_type, b.dump_func(name.encode()), name.encode(),
                                                     bpfsys.BPF_F_SLEEPABLE)
        except OSError as e:
            out.refused[name] = str(e)
    if request.image_dir and not request.autoattached:
        kept = _capture(b, request, out)
        if kept is not None:
            image.write(request.image_dir, request.image_key, kept)
    return out


def _capture(b, request: Request, built: Compiled) -> dict | None:
    """image.capture() of what _build() loaded: every map the source defines, by name."""
    from bcc.libbcc import lib
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]
    tables = [lib.bpf_table_name(b.module, i) for i in range(lib.bpf_num_tables(b.module))]
    maps = {name.decode(): lib.bpf_table_fd(b.module, name) for name in tables}
    kinds = {name: (prog_type, attach_type, 0) for name, prog_type, attach_type in request.programs}
    kinds.update((name, (prog_type, -1, bpfsys.BPF_F_SLEEPABLE)) for name, prog_type in request.sleepable)
    programs = {name: (b.dump_func(name.encode()), *kinds[name]) for name in built.programs}
    return image.capture(programs, maps, request.maps, built.refused)


def _serve(sock: socket.socket) -> None:
    try:     # before the request: the caller may have started this child ahead of it
        from bcc import BPF
    except ImportError as e:
        BPF, failure = None, f"python3 module 'bcc' not found ({e})"
    data = sock.recv(_REPLY_LIMIT)
    if not data:
        return      # the caller went away without asking
    try:
        if BPF is None:
            raise CompileError(failure)
        built = _build(Request(**json.loads(data)), BPF)
    except Exception as e:     # BCC raises bare Exception for compile and load failures
        # Sent whole: the caller's loader.explain() keeps the line a user can act on.
        sock.send(json.dumps({"error": str(e).strip() or type(e).__name__}).encode())
        return
    reply = {"maps": list(built.maps), "programs": list(built.programs), "links": len(built.links),
             "refused": built.refused}
    socket.send_fds(sock, [json.dumps(reply).encode()], built.fds())


if __name__ == "__main__":
    with socket.socket(fileno=int(sys.argv[1])) as parent:
        _serve(parent)
    # Skip BCC's clean-up at exit: the caller holds the descriptors now.
    sys.stdout.flush()
    os._exit(0)
