#!/usr/bin/env python3
"""P5 start-up: time from `conntracct run` to the first record.

    .venv/bin/python bench/p5_startup.py [--smoke] [--runs 5] [--json PATH]

In the router of tests/netns's topology, tests/netns/churn.c opens 500 new
TCP connections per second (so a NEW record is due as soon as the probe is
attached) while `conntracct run` (mode auto, JSON stdout sink into a file,
flushed every 10 ms) is started `--runs` times, one after the other, twice
each: first with an empty probe.cache_dir (a cold start: BCC compiles the
probe, as on a host's first start or after a kernel, BCC or probe setting
changed), then again with the image that start kept (a warm start: every
later start; the target is held against it).  Per start:

  first record   the first record's own timestamp (taken by the probe in the
                 kernel) minus the wall-clock time of the spawn: what start-up
                 costs, without the sink's batching
  on disk        when the first line is in the sink's file (polled every 5 ms)
  phases         from the agent's own log times (milliseconds): spawn ->
                 "probe mode" logged (interpreter, imports, configuration,
                 sinks, mode detection) -> "conntracct running" (sysctls,
                 BCC compile of the probe, attach)

and, in a separate process per run, the parts on their own: importing the
agent, mode detection (conntracct.probe.modes.choose_mode: the checks, kernel
BTF parsed, and a two-instruction program per mode loaded and attached with
bpf(2)), compiling the probe (loader.compile_probe without a cache folder),
loading the kept image instead (with one) and attaching it (the rest of
loader.Probe).  Medians over the runs; the first run (coldest caches) is
reported too.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Report, arguments, need_root  # noqa: E402

TARGET_S = 1.0

PARTS = r"""
import dataclasses, json, shutil, sys, tempfile, time
t0 = time.perf_counter()
import conntracct.agent  # noqa: F401  (everything `conntracct run` imports)
t1 = time.perf_counter()
from conntracct.probe.modes import choose_mode
mode, _, _ = choose_mode("auto")
t2 = time.perf_counter()
from conntracct.probe import loader
kept = dataclasses.replace(loader.ProbeSettings.from_config(), cache_dir=tempfile.mkdtemp())
start = time.perf_counter()
loader.compile_probe(mode, dataclasses.replace(kept, cache_dir="")).close()
t_compile = time.perf_counter() - start
loader.compile_probe(mode, kept).close()     # compiled again, and kept
real_compile = loader.compile_probe
took = {}
def timed_compile(*args, **kw):
    start = time.perf_counter()
    try:
        return real_compile(*args, **kw)
    finally:
        took["image"] = time.perf_counter() - start
loader.compile_probe = timed_compile
t3 = time.perf_counter()
probe = loader.Probe(mode, kept, lambda raw: None, True)
t4 = time.perf_counter()
probe.close()
shutil.rmtree(kept.cache_dir)
print(json.dumps({"mode": mode, "import": t1 - t0, "detect": t2 - t1, "compile": t_compile, "image": took["image"],
                  "attach": (t4 - t3) - took["image"]}))
"""

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(stderr: str, text: str) -> float | None:
    for line in stderr.splitlines():
        if text in line:
            m = LOG_TIME.match(line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def one_start(topo, workdir: Path, cache_dir: Path) -> dict:
    config = workdir / "conntracct.yml"
    config.write_text(f"probe: {{mode: auto, cache_dir: {cache_dir}}}\nsysctl: {{manage: true, restore: true}}\n"
                      "sinks: [{type: stdout, format: json, flush_interval: 10ms}]\n")
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        spawned = time.time()
        proc = topo.popen("router", sys.executable, "-m", "conntracct", "run", "-c", str(config),
                          stdout=out, stderr=err, cwd=str(ROOT))
    on_disk = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out_path.stat().st_size:
                on_disk = time.time() - spawned
                break
            time.sleep(0.005)
        time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
        topo._forget(proc)
    stderr = err_path.read_text()
    lines = out_path.read_text().splitlines()
    if not lines:
        raise RuntimeError(f"no record from the agent within 120 s:\n{stderr}")
    first_ts = json.loads(lines[0])["timestamp_ns"] / 1e9
    mode_at, running_at = log_time(stderr, "probe mode "), log_time(stderr, "conntracct running")
    return {"first_record_s": first_ts - spawned, "on_disk_s": on_disk,
            "to_mode_s": mode_at - spawned if mode_at else None,
            "mode_to_running_s": running_at - mode_at if mode_at and running_at else None,
            "mode": re.search(r"probe mode (\w+)", stderr).group(1) if mode_at else None}


def parts(topo) -> dict:
    out = topo.run("router", sys.executable, "-c", PARTS, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    need_root("P5")
    if args.smoke:
        args.runs = 1
    from tests.netns import Topology
    from tests.netns.churn import build_churn
    from tests.netns.traffic import start_server

    report = Report("P5", "start-up: `conntracct run` to the first record", __doc__, smoke=args.smoke)
    starts, colds, pieces = [], [], []
    workdir = Path(tempfile.mkdtemp(prefix="conntracct-bench-p5-"))
    try:
        with Topology(acct=True, timestamp=True) as topo:
            # New connections all along (500/s), stopped once the runs are done.
            binary = build_churn()
            if binary is None:
                sys.exit("gcc is needed for tests/netns/churn.c")
            dst, port = topo.addr("server"), topo.next_port()
            server = start_server(topo, [str(binary), "tcp-server", dst, str(port)])
            client = topo.popen("client", binary, "tcp-client", dst, port, 500, args.runs * 30 + 60, 512, 16, 3000,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1)
                for run in range(args.runs):
                    cache_dir = workdir / f"cache-{run}"     # empty: the first start compiles and keeps
                    colds.append(one_start(topo, workdir, cache_dir))
                    starts.append(one_start(topo, workdir, cache_dir))
                    pieces.append(parts(topo))
                    print(f"  cold: {colds[-1]}\n  warm: {starts[-1]}\n  parts: {pieces[-1]}", flush=True)
            finally:
                for proc in (client, server):
                    proc.terminate()
                    proc.communicate(timeout=30)
                    topo._forget(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def median(key, rows):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    first = median("first_record_s", starts)
    report.details = {"starts": starts, "cold_starts": colds, "parts": pieces}
    report.row(f"spawn -> first record (probe timestamp), warm start, median of {len(starts)}", f"{first:.2f} s",
               f"<= {TARGET_S:g} s", first <= TARGET_S,
               f"mode {starts[0]['mode']}; probe from the kept image; first run {starts[0]['first_record_s']:.2f} s")
    report.row("  cold start (BCC compiles: a host's first start, or a changed kernel/BCC/setting)",
               f"{median('first_record_s', colds):.2f} s", note=f"first run {colds[0]['first_record_s']:.2f} s")
    report.row("  spawn -> first line in the sink's file", f"{median('on_disk_s', starts):.2f} s",
               note="includes the sink's 10 ms flush interval")
    report.row("  spawn -> mode chosen (interpreter, imports, config, sinks, detection)",
               f"{median('to_mode_s', starts):.2f} s")
    report.row("  mode chosen -> running (sysctls, probe image loaded, attach)",
               f"{median('mode_to_running_s', starts):.2f} s",
               note=f"cold start: {median('mode_to_running_s', colds):.2f} s (BCC compile)")
    for key, label in (("import", "import conntracct.agent"),
                       ("detect", "mode detection (checks, BTF, a tiny program per mode)"),
                       ("compile", "BCC compile of the probe (cold)"),
                       ("image", "the kept image loaded instead (warm: maps made, programs verified)"),
                       ("attach", "attach + ring buffer")):
        report.row(f"  part on its own: {label}", f"{median(key, pieces) * 1000:.0f} ms")
    report.save(args.json)


if __name__ == "__main__":
    main()
