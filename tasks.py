#!/usr/bin/env python3
"""conntracct's task runner (stdlib only; each task installs what it needs).

    ./tasks.py setup    apt packages, kernel header tree for BCC, .venv
    ./tasks.py run      set up, then run the agent (args after -- go to `conntracct run`)
    ./tasks.py test     set up, then run the whole test suite (args go to pytest)
    ./tasks.py lint     ruff
    ./tasks.py bench    benchmarks, results into bench/README.md

Every task is idempotent: a second run does nothing it need not do.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
# Debian packages the agent and its tests need.
APT_PACKAGES = [
    "python3-bpfcc", "python3-venv", "linux-headers-amd64", "kmod",
    "iproute2", "nftables", "conntrack", "iputils-ping", "procps",
    # real servers the sink tests write to and query back
    "influxdb", "victoria-metrics", "prometheus",
]


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, **kw)


def need_root(task: str) -> None:
    if os.geteuid() != 0:
        sys.exit(f"./tasks.py {task}: run as root (it installs packages and loads BPF programs)")


def apt_install(packages: list[str]) -> None:
    missing = [p for p in packages
               if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                 text=True).stdout != "install ok installed"]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh("apt-get", "update", "-q", env=env)
    sh("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, env=env)


def header_tree() -> None:
    """BCC compiles against /lib/modules/$(uname -r)/build.  When the running
    kernel has no tree, point it at the distribution's headers: the probe takes
    every struct layout from BTF, so only the headers' macros and types are used."""
    mod = Path("/lib/modules") / platform.release()
    if (mod / "build" / "include").is_dir():
        return
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    trees = sorted(Path("/usr/src").glob(f"linux-headers-*-{arch}"), key=lambda p: p.name)
    if not trees:
        sys.exit(f"no /usr/src/linux-headers-*-{arch}: install linux-headers-{arch}")
    build = trees[-1]
    common = build.with_name(build.name[: -len(arch)] + "common")
    mod.mkdir(parents=True, exist_ok=True)
    for link, target in (("build", build), ("source", common)):
        path = mod / link
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)
    print(f"linked {mod}/build -> {build}", flush=True)


def tracefs() -> None:
    tracing = Path("/sys/kernel/tracing")
    if tracing.is_dir() and not any(tracing.iterdir()):
        sh("mount", "-t", "tracefs", "tracefs", str(tracing), check=False)


def venv() -> None:
    stamp = VENV / ".installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    if not PY.exists():
        # System site packages: Debian's python3-bpfcc provides `import bcc`.
        sh("/usr/bin/python3", "-m", "venv", "--system-site-packages", str(VENV))
    sh(str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]")
    stamp.write_text(want)


def setup() -> None:
    need_root("setup")
    apt_install(APT_PACKAGES)
    header_tree()
    tracefs()
    venv()


def run(args: list[str]) -> None:
    setup()
    os.execv(str(VENV / "bin" / "conntracct"), ["conntracct", "run", *args])


def test(args: list[str]) -> None:
    setup()
    os.chdir(ROOT)
    code = subprocess.run([str(PY), "-m", "pytest", *(args or ["tests"])]).returncode
    sys.exit(code)


def lint(args: list[str]) -> None:
    venv()
    sys.exit(subprocess.run([str(VENV / "bin" / "ruff"), "check", "conntracct", "tests", "tasks.py", *args],
                            cwd=ROOT).returncode)


def bench(args: list[str]) -> None:
    setup()
    sys.exit(subprocess.run([str(PY), str(ROOT / "bench" / "run.py"), *args], cwd=ROOT).returncode)


TASKS = {"setup": lambda args: setup(), "run": run, "test": test, "lint": lint, "bench": bench}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in TASKS:
        sys.exit(__doc__)
    task, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    TASKS[task](rest)


if __name__ == "__main__":
    main(sys.argv[1:])
