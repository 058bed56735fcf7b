"""Compiling the harness's small C helpers at test time (gcc).

Outputs go to one private temporary directory per process, removed at exit.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).parent
_lock = threading.Lock()
_dir: Path | None = None
_built: dict[str, Path] = {}


def have_compiler(cc: str = "gcc") -> bool:
    return shutil.which(cc) is not None


def compile_c(source: str, *, shared: bool = False, libs: tuple[str, ...] = (),
              cc: str = "gcc") -> Path | None:
    """Compile ``tests/netns/<source>`` once per process.

    Returns the executable (or shared object with ``shared=True``), or None
    when no compiler is installed.  Raises RuntimeError if compiling fails.
    """
    global _dir
    with _lock:
        key = f"{source}:{shared}"
        if key in _built and _built[key].exists():
            return _built[key]
        if not have_compiler(cc):
            return None
        if _dir is None:
            _dir = Path(tempfile.mkdtemp(prefix="cta-build-"))
            atexit.register(shutil.rmtree, _dir, True)
        stem = Path(source).stem
        out = _dir / (f"lib{stem}.so" if shared else stem)
        flags = ["-shared", "-fPIC"] if shared else []
        # -I HERE: the helpers share tests/netns/helper.h (bench/flows.c too).
        proc = subprocess.run([cc, "-O2", "-Wall", "-I", str(HERE), *flags, "-o", str(out), str(HERE / source),
                               *libs],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source} failed:\n{proc.stderr}")
        _built[key] = out
        return out
