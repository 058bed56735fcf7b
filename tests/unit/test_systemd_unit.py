"""dist/conntracct.service: systemd accepts it, and its exposure stays "OK".

systemd-analyze comes from Debian's systemd package (tasks.py installs it
for the tests).  The unit's ExecStart= names the install prefix the README
uses (/opt/conntracct); `verify` checks that the command exists, so the test
points it at this checkout's .venv instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "dist" / "conntracct.service"
PREFIX = "/opt/conntracct"
MEASURED_CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"}   # README, "Least privilege"


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: ./tasks.py test installs Debian's systemd package")
    venv_bin = Path(sys.prefix) / "bin" / "conntracct"
    assert venv_bin.exists(), f"{venv_bin}: run ./tasks.py setup"
    text = UNIT.read_text()
    assert f"{PREFIX}/.venv/bin/conntracct" in text
    copy = tmp_path / "conntracct.service"
    copy.write_text(text.replace(f"{PREFIX}/.venv", sys.prefix))
    return copy


def settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_verify_passes(unit: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "conntracct.service" not in proc.stderr, proc.stderr   # no warning about our unit either


def test_exposure_is_ok(unit: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for conntracct\.service: ([\d.]+) (\w+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match[1]) <= 2.0 and match[2] == "OK", match[0]


def test_capabilities_are_the_measured_ones() -> None:
    s = settings(UNIT.read_text())
    assert set(s["AmbientCapabilities"][0].split()) == MEASURED_CAPS
    assert set(s["CapabilityBoundingSet"][0].split()) == MEASURED_CAPS
    assert s["DynamicUser"] == ["yes"] and "User" not in s     # a dedicated user, never root
    assert s["Restart"] == ["on-failure"] and s["RestartPreventExitStatus"] == ["2"]


def test_stop_outlasts_the_drain() -> None:
    """SIGTERM drains the sinks within shutdown.drain_timeout; systemd must
    not SIGKILL the agent before that."""
    from conntracct.config import Config
    s = settings(UNIT.read_text())
    assert s["KillSignal"] == ["SIGTERM"]
    assert float(s["TimeoutStopSec"][0]) > Config().shutdown.drain_timeout + 10
