"""One agent per accounted network namespace.

Two agents accounting the same namespace would report every flow twice (and
in netfilter mode the second cannot attach: the kernel allows one BPF
netfilter program per hook and priority, EBUSY).  Each agent holds an
exclusive flock on /run/conntracct/netns-<inode>.lock (systemd's
$RUNTIME_DIRECTORY when set) and writes its pid there; the kernel drops the
lock when the agent exits, however it exits, so a crash leaves nothing
stale to clean up.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("/run/conntracct")


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None, path: Path, inode: int):
        self.pid, self.path, self.inode = pid, path, inode
        who = f"pid {pid}" if pid else "a process"
        super().__init__(f"another conntracct ({who}) already accounts network namespace {inode} "
                         f"(it holds {path}); stop it first, or account another namespace (probe.netns)")


def lock_dir() -> Path:
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) if runtime else DEFAULT_DIR


def lock_path(inode: int, directory: Path | None = None) -> Path:
    return (directory or lock_dir()) / f"netns-{inode}.lock"


def holder(inode: int, directory: Path | None = None) -> int | None:
    """The pid of the agent accounting this namespace, or None (-1: a holder
    that wrote no pid)."""
    path = lock_path(inode, directory)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid(fd) or -1
    finally:
        os.close(fd)
    return None


def _pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


class InstanceLock:
    """Held from acquire() until release() or the process's end."""

    def __init__(self, inode: int):
        self.inode = inode
        self.path = lock_path(inode)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True if held; False if the lock directory is unusable (logged:
        the EBUSY check still stops a second netfilter agent).  Raises
        AlreadyRunning when another agent holds it."""
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            log.warning("cannot use %s (%s): a second agent in this namespace would not be detected "
                        "this way (set $RUNTIME_DIRECTORY to a writable directory)", self.path, e.strerror)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid(fd)
            os.close(fd)
            raise AlreadyRunning(pid, self.path, self.inode) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def busy_cause(inode: int, priority: int) -> str:
    """Why a BPF netfilter link at `priority` got EBUSY in this namespace:
    the kernel allows one BPF program per hook and priority."""
    # another agent's lock may be in the default directory when ours is not
    pids = [holder(inode, d) for d in dict.fromkeys((lock_dir(), DEFAULT_DIR))]
    pid = next((p for p in pids if p and p != os.getpid()), None)
    if pid:
        who = f"pid {pid}" if pid > 0 else "a process"
        return (f"its hooks at priority {priority} are held by another conntracct ({who}) accounting this "
                f"network namespace; one BPF netfilter program per hook and priority is allowed")
    return (f"another BPF netfilter program holds priority {priority} at this hook (another conntracct whose "
            f"lock is not in {lock_dir()}, or another tool): one BPF program per hook and priority is allowed")
