"""Entering another network namespace for a while, on the calling thread only.

netfilter links, ctnetlink sockets and /proc/sys/net all belong to the
namespace of the thread that creates or opens them, and keep it afterwards.
So the agent can account a namespace (a router, a container) while its
sinks talk to the network from the namespace it was started in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    pass


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"cannot enter network namespace {what}: {os.strerror(err)}")


@contextlib.contextmanager
def entered(path: str | None) -> Iterator[None]:
    """Run the block in the network namespace at `path` (None: stay here)."""
    if path is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise NetnsError(e.errno, f"cannot open network namespace {path}: {e.strerror}") from None
        try:
            _setns(target, path)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home, "of the agent")
    finally:
        os.close(home)


def inode() -> int:
    """The network namespace inode of the calling thread."""
    return os.stat("/proc/thread-self/ns/net").st_ino
