"""The command line as a user meets it: help, version, check, and exit status 2
with a clear message for bad configuration or an unusable environment."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conntracct import __version__

CLI = [sys.executable, "-m", "conntracct"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def conntracct(*args, user=None, timeout=60, **kw):
    cmd = CLI + list(args)
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def test_version():
    out = conntracct("version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"conntracct {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["check", "--help"], ["version", "--help"]])
def test_help_everywhere(args):
    out = conntracct(*args)
    assert out.returncode == 0
    assert "Usage: " in out.stdout


@pytest.mark.parametrize("text,expected", [
    ("probe:\n  mode: turbo\n", "probe.mode"),
    ("sinks:\n  - type: stdout\n    format: xml\n", "sinks[0].format"),
    ("sinks:\n  - type: kafka\n", "kafka"),
    ("probe:\n  rate_curve:\n    - {below: 60s, every: 20s}\n    - {below: 30s, every: 60s}\n    - {then: 5m}\n",
     "probe.rate_curve"),
    ("bogus_key: 1\n", "bogus_key"),
    ("probe: [unclosed\n", "bad.yml:2:1: YAML syntax error"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    for command in ("run", "check"):
        out = conntracct(command, "-c", str(path))
        assert out.returncode == 2, out
        assert expected in out.stderr
        assert "Traceback" not in out.stderr
        assert str(path) in out.stderr


def test_missing_config_file_exits_2(tmp_path):
    out = conntracct("run", "-c", str(tmp_path / "nope.yml"))
    assert out.returncode == 2
    assert "nope.yml" in out.stderr and "Traceback" not in out.stderr


def test_unknown_mode_option_is_a_usage_error():
    out = conntracct("run", "--mode", "warp")
    assert out.returncode == 2
    assert "warp" in out.stderr


@root_only
def test_not_root_exits_2_with_the_fix():
    probe = conntracct("version", user="65534")
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this checkout's Python: {probe.stderr.strip()[:200]}")
    cfg = Path(__file__).parent / "data" / "quiet.yml"
    out = conntracct("run", "-c", str(cfg), user="65534", env=dict(os.environ, HOME="/nonexistent"))
    assert out.returncode == 2, out
    assert "not root" in out.stderr and "Traceback" not in out.stderr


@root_only
def test_check_prints_a_table_and_picks_netfilter_here():
    out = conntracct("check", timeout=120)
    assert out.returncode == 0, out.stderr
    for row in ("btf", "header tree", "fentry", "kprobe", "netfilter", "ctnetlink events",
                "nf_conntrack_acct", "nf_conntrack_timestamp"):
        assert row in out.stdout
    assert "mode auto -> netfilter" in out.stdout


@root_only
def test_forcing_a_mode_this_kernel_lacks_fails_clearly():
    out = conntracct("check", "--mode", "kprobe", timeout=120)
    assert out.returncode == 1
    assert "mode kprobe: unusable" in out.stdout
    cfg = Path(__file__).parent / "data" / "quiet.yml"
    out = conntracct("run", "-c", str(cfg), "--mode", "kprobe", timeout=120)
    assert out.returncode == 2
    assert "cannot attach its probe" in out.stderr and "kprobe" in out.stderr
    assert "Traceback" not in out.stderr
