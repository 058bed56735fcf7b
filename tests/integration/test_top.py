"""`conntracct top` driven in tmux, 80x24, against known traffic.

top accounts the lab's router namespace (--netns, like probe.netns) while two
paced TCP streams cross it, one four times as fast as the other.  The test
reads the screen as a user would (tmux capture-pane): the fast stream must be
the first flow, with a rate within 20% of what its generator sent; sorting
and filtering keys must act; q, and Ctrl-C, must end top with status 0, its
BPF programs and links gone and the namespace's lock released; beside a
running agent top must refuse with status 2.  The captured screen is
also what docs/top.png is made from (CONNTRACCT_TOP_SCREENSHOT=path: .svg, or .png drawn by chromium).
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from rich.text import Text

from conntracct import instance
from tests.integration.running_agent import TEST_MODE, RunningAgent
from tests.netns import Topology

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)"),
              pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (./tasks.py setup installs it)")]

ROOT = Path(__file__).resolve().parents[2]
FAST, SLOW = 400_000, 100_000     # payload bytes per second of the two streams
DURATION = 25.0                   # seconds each stream runs

SINK = """
import socket, sys
s = socket.socket(socket.AF_INET); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4); print("READY", flush=True)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    while c.recv(1 << 16):
        pass
    c.close()
"""
# Sends `rate` bytes a second in ten slices a second, on schedule (no drift).
PACED = """
import socket, sys, time
dst, port, rate, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection((dst, port), timeout=10)
chunk, start, sent = b"x" * (rate // 10), time.monotonic(), 0
while time.monotonic() - start < duration:
    c.sendall(chunk); sent += len(chunk)
    time.sleep(max(0.0, start + sent / rate - time.monotonic()))
c.close()
print(sent, time.monotonic() - start)
"""


class Tmux:
    """One tmux server of our own (-L) holding one 80x24 session."""

    def __init__(self, name: str):
        self.socket = name

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True, timeout=10).stdout

    def start(self, command: list[str]) -> None:
        self("new-session", "-d", "-x", "80", "-y", "24", "-s", "top",
             shlex.join(command) + "; echo EXIT=$?; sleep 60")

    def screen(self, escapes: bool = False) -> str:
        return self("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top")

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "top", *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
        # the server's socket file stays behind otherwise
        (Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / self.socket).unlink(missing_ok=True)


def wait_screen(tmux: Tmux, predicate, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux.screen()
        if predicate(screen):
            return screen
        time.sleep(0.25)
    raise AssertionError(f"screen never showed {what} within {timeout}s:\n{screen}")


UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


def number(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)([kMG]?)", text)
    assert m, text
    return float(m.group(1)) * UNITS[m.group(2)]


def flow_rows(screen: str) -> list[tuple[str, list[float]]]:
    """The flow table's rows: (flow text, [out B/s, in B/s, out p/s, in p/s, total])."""
    rows = []
    for line in screen.splitlines():
        m = re.match(r"^(tcp \S+>\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+$", line)
        if m:
            rows.append((m.group(1), [number(x) for x in m.groups()[1:]]))
    return rows


def bpf_ids(pid: int) -> dict[str, set[int]]:
    """BPF programs and links a process holds, from its fds' fdinfo."""
    out: dict[str, set[int]] = {"prog_id": set(), "link_id": set()}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for key in out:
            for m in re.finditer(rf"^{key}:\s*(\d+)", text, re.M):
                out[key].add(int(m.group(1)))
    return out


BPF_PROG_GET_FD_BY_ID, BPF_LINK_GET_FD_BY_ID = 13, 30


def bpf_object_exists(cmd: int, object_id: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 4)(object_id, 0, 0, 0)
    fd = libc.syscall(321, cmd, ctypes.byref(attr), ctypes.sizeof(attr))   # SYS_bpf on x86_64
    if fd >= 0:
        os.close(fd)
        return True
    assert ctypes.get_errno() == 2, os.strerror(ctypes.get_errno())   # ENOENT: gone
    return False


def svg_of(ansi: str) -> str:
    """The captured pane (with its colours) drawn as an SVG terminal window, by rich."""
    console = Console(record=True, width=80, height=24, force_terminal=True, color_system="truecolor",
                      file=io.StringIO())
    lines = ansi.splitlines()[:24]
    for line in lines + [""] * (24 - len(lines)):
        console.print(Text.from_ansi(line), soft_wrap=True)
    svg = console.export_svg(title="conntracct top (tmux, 80x24)")
    # Fira Code is fetched from the web, which an <img> does not do: name local monospace fonts too
    return svg.replace("font-family: Fira Code, monospace",
                       "font-family: Fira Code, DejaVu Sans Mono, Menlo, Consolas, monospace")


def write_screenshot(ansi: str, path: Path) -> None:
    """The pane as an SVG, or as a PNG: that SVG drawn by headless chromium
    (apt's `chromium`, needed only to make the README's picture again) at
    twice its size, with the window's rounded corners transparent."""
    svg = svg_of(ansi)
    if path.suffix != ".png":
        path.write_text(svg)
        return
    chromium = shutil.which("chromium")
    assert chromium, "a .png screenshot needs chromium (apt-get install chromium)"
    width, height = (math.ceil(float(x)) for x in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups())
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "top.svg"
        source.write_text(svg)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        "--force-device-scale-factor=2", "--default-background-color=00000000",
                        f"--screenshot={path.resolve()}", source.as_uri()],
                       check=True, timeout=120, capture_output=True)


def top_pid(tmux: Tmux, ns_inode: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = instance.holder(ns_inode)
        if pid and pid > 0:
            return pid
        time.sleep(0.1)
    raise AssertionError(f"conntracct top never took the namespace's lock; its screen:\n{tmux.screen()}")


def test_top_in_tmux(tmp_path):
    tmux = Tmux(f"conntracct-top-{os.getpid()}")
    config = tmp_path / "top.yml"
    config.write_text(yaml.safe_dump({"probe": {"mode": TEST_MODE}, "sysctl": {"manage": True, "restore": True},
                                      "sinks": [{"type": "stdout"}]}))
    with Topology() as topo:
        inode = topo.netns_inode("router")
        dst = topo.addr("server", 4)
        fast_port, slow_port = topo.next_port(), topo.next_port()
        sinks = [topo.popen("server", sys.executable, "-c", SINK, dst, str(port), "1",
                            stdout=subprocess.PIPE, text=True) for port in (fast_port, slow_port)]
        for sink in sinks:
            assert sink.stdout.readline().strip() == "READY"
        try:
            tmux.start(["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "conntracct", "top", "-c", str(config),
                        "--netns", topo.ns_path("router")])
            pid = top_pid(tmux, inode)
            wait_screen(tmux, lambda s: "Flows by rate" in s and "attaching" not in s, 60, "the attached probe")
            held = bpf_ids(pid)
            assert held["prog_id"]
            streams = [topo.popen("client", sys.executable, "-c", PACED, dst, str(port), str(rate), str(DURATION),
                                  stdout=subprocess.PIPE, text=True)
                       for port, rate in ((fast_port, FAST), (slow_port, SLOW))]
            fast = f"tcp {topo.addr('client', 4)}:"
            # The rate is taken over the last records (one a second): after a few seconds it is steady.
            screen = wait_screen(
                tmux, lambda s: len(flow_rows(s)) >= 2 and flow_rows(s)[0][0].endswith(f"{dst}:{fast_port}")
                and abs(flow_rows(s)[0][1][0] - FAST) <= 0.2 * FAST, 20, "the fast stream on top at its rate")
            rows = flow_rows(screen)
            assert rows[0][0].startswith(fast) and rows[1][0].endswith(f"{dst}:{slow_port}")
            assert abs(rows[1][1][0] - SLOW) <= 0.2 * SLOW, screen
            assert all(rate > 0 for rate in rows[0][1][1:4]), screen   # ACKs back, packets both ways
            assert max(len(line) for line in screen.splitlines()) <= 80
            assert "Remote hosts" in screen and dst in screen.split("Remote hosts")[1]
            screenshot = os.environ.get("CONNTRACCT_TOP_SCREENSHOT")
            if screenshot:
                write_screenshot(tmux.screen(escapes=True), Path(screenshot))
            # filter by port: only the slow stream is left
            tmux.keys("/")
            tmux.keys("-l", str(slow_port))
            tmux.keys("Enter")
            screen = wait_screen(tmux, lambda s: f"filter: {slow_port}" in s and len(flow_rows(s)) == 1, 5,
                                 "the port filter applied")
            assert flow_rows(screen)[0][0].endswith(f"{dst}:{slow_port}")
            tmux.keys("Escape")
            tmux.keys("t")
            wait_screen(tmux, lambda s: "Flows by total" in s and len(flow_rows(s)) >= 2, 5, "sort by total")
            for stream in streams:
                stream.wait(DURATION + 15)
            tmux.keys("q")
            wait_screen(tmux, lambda s: "EXIT=" in s, 30, "top exiting")
            screen = tmux.screen()
            assert "EXIT=0" in screen, screen
            assert "Traceback" not in screen
        finally:
            tmux.kill()
            for sink in sinks:
                sink.kill()
        # Nothing left attached: the programs and links top held are gone, the lock is free.
        assert instance.holder(inode) is None
        assert not any(bpf_object_exists(BPF_PROG_GET_FD_BY_ID, i) for i in held["prog_id"])
        assert not any(bpf_object_exists(BPF_LINK_GET_FD_BY_ID, i) for i in held["link_id"])


def test_top_does_not_collide_with_a_running_agent(tmp_path):
    """An agent accounts the namespace: top says so and exits 2, the agent keeps running."""
    config = tmp_path / "top.yml"
    config.write_text(yaml.safe_dump({"probe": {"mode": TEST_MODE}, "sinks": [{"type": "stdout"}]}))
    with Topology() as topo:
        agent = RunningAgent(topo, ns=None, config={"probe": {"mode": TEST_MODE, "netns": topo.ns_path("router")}})
        try:
            top = subprocess.run([sys.executable, "-m", "conntracct", "top", "-c", str(config),
                                  "--netns", topo.ns_path("router")], cwd=ROOT, capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL, timeout=60)
            assert top.returncode == 2, top.stderr
            assert f"another conntracct (pid {agent.proc.pid}) already accounts" in top.stderr
            assert "Traceback" not in top.stderr
            assert agent.proc.poll() is None
        finally:
            assert agent.stop() == 0


def test_ctrl_c_detaches(tmp_path):
    """Ctrl-C (SIGINT from the terminal) ends top as q does: status 0, nothing left attached."""
    tmux = Tmux(f"conntracct-topc-{os.getpid()}")
    config = tmp_path / "top.yml"
    config.write_text(yaml.safe_dump({"probe": {"mode": TEST_MODE}, "sinks": [{"type": "stdout"}]}))
    with Topology() as topo:
        inode = topo.netns_inode("router")
        try:
            tmux.start(["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "conntracct", "top", "-c", str(config),
                        "--netns", topo.ns_path("router")])
            pid = top_pid(tmux, inode)
            wait_screen(tmux, lambda s: "Flows by rate" in s and "attaching" not in s, 60, "the attached probe")
            held = bpf_ids(pid)
            tmux.keys("C-c")
            screen = wait_screen(tmux, lambda s: "EXIT=" in s, 30, "top exiting")
            assert "EXIT=0" in screen and "Traceback" not in screen, screen
        finally:
            tmux.kill()
        assert held["prog_id"] and instance.holder(inode) is None
        assert not any(bpf_object_exists(BPF_PROG_GET_FD_BY_ID, i) for i in held["prog_id"])
        assert not any(bpf_object_exists(BPF_LINK_GET_FD_BY_ID, i) for i in held["link_id"])
