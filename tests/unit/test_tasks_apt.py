"""./tasks.py's apt calls wait for a lock another apt holds instead of failing.

Real apt-get, pointed at a private lists directory with no sources (no
network, nothing installed), whose lock this test holds the way another
`apt-get update` would (fcntl lock on <lists>/lock) for a few seconds.
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_tasks():
    spec = importlib.util.spec_from_file_location("tasks", ROOT / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def private_update(lists: Path) -> tuple[str, ...]:
    return ("-o", f"Dir::State::Lists={lists}", "-o", "Dir::Etc::sourcelist=/dev/null",
            "-o", f"Dir::Etc::sourceparts={lists}", "update")


@pytest.fixture
def lists(tmp_path: Path) -> Path:
    if shutil.which("apt-get") is None:
        pytest.skip("not a Debian-like system: tasks.py's apt set-up does not apply")
    (tmp_path / "partial").mkdir()
    return tmp_path


def test_update_waits_for_the_lists_lock(lists, capsys):
    tasks = load_tasks()
    lock = open(lists / "lock", "w")
    fcntl.lockf(lock, fcntl.LOCK_EX)
    # apt-get itself gives up at once on this lock (apt 2.6 ignores
    # DPkg::Lock::Timeout for it): the reason tasks.py retries.
    alone = subprocess.run(["apt-get", *private_update(lists)], capture_output=True, text=True)
    assert alone.returncode != 0 and "Could not get lock" in alone.stderr
    threading.Timer(3.0, lambda: fcntl.lockf(lock, fcntl.LOCK_UN)).start()
    started = time.monotonic()
    tasks.apt_get(*private_update(lists))      # raises CalledProcessError if it gave up
    assert time.monotonic() - started >= 3.0
    assert "another apt or dpkg holds its lock" in capsys.readouterr().out
    lock.close()


def test_other_failures_are_not_retried(lists):
    tasks = load_tasks()
    started = time.monotonic()
    with pytest.raises(subprocess.CalledProcessError):
        tasks.apt_get("-o", f"Dir::State::Lists={lists}", "install", "-s",
                      "conntracct-no-such-package")
    assert time.monotonic() - started < 30


def test_run_installs_no_test_server():
    tasks = load_tasks()
    assert not set(tasks.APT_PACKAGES) & set(tasks.TEST_APT_PACKAGES)
    assert {"influxdb", "victoria-metrics", "prometheus", "systemd"} <= set(tasks.TEST_APT_PACKAGES)
