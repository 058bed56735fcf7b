#!/usr/bin/env python3
"""Run every benchmark in one go and write the results table into bench/README.md.

    ./tasks.py bench [-- --only P2 P4] [-- --smoke]
    .venv/bin/python bench/run.py [--smoke] [--only P1 ...] [--readme PATH | --no-readme]

P1..P6 run one after the other, each as its own process (bench/p*.py, which
also run alone), then the sink benchmarks that were here before
(influx_line_protocol.py, es_sink_throughput.py, influx_sink_throughput.py);
their output goes into the README as it is.  The table and the machine it
ran on replace the part of bench/README.md between the `results` markers;
the rest of the README (method, what stands in the way) is written by hand.
Each benchmark's results are kept in bench/results/<P>.json, so `--only P3`
re-runs one and the table still shows the others (with their own dates).
`--smoke` runs everything for a few seconds and writes neither results nor
README unless `--readme` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import ROOT, machine  # noqa: E402

BENCHMARKS = {
    "P1": "p1_hook_cost.py",
    "P2": "p2_pipeline.py",
    "P3": "p3_churn.py",
    "P4": "p4_steady_state.py",
    "P5": "p5_startup.py",
    "P6": "p6_vs_peers.py",
}
# The sink benchmarks that predate this runner: (script, arguments, smoke arguments).
SINK_BENCHMARKS = [
    ("influx_line_protocol.py", [], ["--records", "2000"]),
    ("es_sink_throughput.py", [], ["--records", "2000", "--batch", "500"]),
    ("influx_sink_throughput.py", [], None),     # real servers: not in the smoke run
    ("enrich_ranges.py", [], ["--smoke"]),       # range labels: records/s with 10 to 10,000 ranges
    ("ipfix_encode.py", [], ["--smoke"]),        # IPFIX records/s: struct encoder vs the ipfix library
]
START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS = BENCH / "results"


def ensure_compiler() -> None:
    """The traffic helpers (bench/flows.c, tests/netns/churn.c) are compiled with gcc."""
    if shutil.which("gcc"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "gcc", "libc6-dev"],
                   check=True, env=env)


def run_one(name: str, script: str, smoke: bool, outdir: Path) -> dict:
    out = outdir / f"{name}.json"
    cmd = [sys.executable, str(BENCH / script), "--json", str(out)] + (["--smoke"] if smoke else [])
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    started, date = time.monotonic(), time.strftime("%Y-%m-%d %H:%M %Z")
    code = subprocess.run(cmd, cwd=ROOT).returncode
    elapsed = time.monotonic() - started
    if code != 0 or not out.exists():
        return {"bench": name, "title": script, "failed": f"exit status {code}", "rows": [], "seconds": elapsed,
                "date": date}
    result = json.loads(out.read_text())
    result.update(seconds=elapsed, date=date, machine=machine())
    return result


def run_sink_benchmarks(smoke: bool) -> list[tuple[str, str]]:
    outputs = []
    for script, args, smoke_args in SINK_BENCHMARKS:
        if smoke and smoke_args is None:
            continue
        cmd = [sys.executable, str(BENCH / script), *(smoke_args if smoke else args)]
        print(f"\n=== {script}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        text = proc.stdout.strip() or proc.stderr.strip()
        if proc.returncode != 0:
            text = f"(did not run: exit status {proc.returncode})\n{(proc.stderr or proc.stdout).strip()[-600:]}"
        print(text, flush=True)
        outputs.append((script, text))
    return outputs


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("**pass**" if ok else "**miss**")


def results_markdown(results: list[dict], sinks: list[tuple[str, str]], smoke: bool, started: str) -> str:
    m = machine()
    lines = [START, "", f"Table of {started}{' (smoke run: not a measurement)' if smoke else ''}: "
             f"`./tasks.py bench` on {m['cpu']}, {m['memory']} RAM, kernel {m['kernel']}, "
             f"Python {m['python']}, BCC {m['bcc']}.", ""]
    lines += ["| # | what | measured | target | verdict | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        if r.get("failed"):
            lines.append(f"| {r['bench']} | {r['title']} | did not run ({r['failed']}) | | | |")
            continue
        for row in r["rows"]:
            metric = row["metric"].replace("|", "\\|")
            indent = len(metric) - len(metric.lstrip())
            metric = "&nbsp;" * (2 * indent) + metric.strip()
            lines.append(f"| {row['bench']} | {metric} | {row['measured']} | {row['target']} | "
                         f"{verdict(row['ok'])} | {row['note'].replace('|', '/')} |")
    lines += ["", "When each ran, and for how long: " + ", ".join(
        f"{r['bench']} {r.get('date', '?')} ({r['seconds']:.0f} s)" for r in results) + "."]
    if sinks:
        lines += ["", "Sink benchmarks (the scripts that predate this runner), same run:", ""]
        for script, text in sinks:
            lines += [f"`bench/{script}`:", "", "```", text, "```", ""]
    lines += ["", END]
    return "\n".join(lines)


def write_readme(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds per benchmark: proves they run")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--no-sinks", action="store_true", help="skip the older sink benchmarks")
    parser.add_argument("--readme", type=Path, help="where to write the table (default: bench/README.md, "
                                                    "not written by a smoke run)")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/run.py: run as root (network namespaces, BPF): ./tasks.py bench")
    ensure_compiler()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    outdir = Path(tempfile.mkdtemp(prefix="conntracct-bench-"))
    try:
        fresh = {name: run_one(name, script, args.smoke, outdir) for name, script in BENCHMARKS.items()
                 if not args.only or name in args.only}
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        for name, result in fresh.items():
            if not result.get("failed"):
                (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    # The table: this run's results, and the kept results of the benchmarks not run now.
    results = []
    for name in BENCHMARKS:
        if name in fresh:
            results.append(fresh[name])
        elif not args.smoke and (RESULTS / f"{name}.json").exists():
            results.append(json.loads((RESULTS / f"{name}.json").read_text()))
    if args.no_sinks or args.only:
        kept = RESULTS / "sinks.json"
        sinks = [tuple(x) for x in json.loads(kept.read_text())] if kept.exists() and not args.smoke else []
    else:
        sinks = run_sink_benchmarks(args.smoke)
        if not args.smoke:
            (RESULTS / "sinks.json").write_text(json.dumps(sinks, indent=1) + "\n")
    section = results_markdown(results, sinks, args.smoke, started)
    print("\n" + section)
    readme = args.readme or (None if args.smoke else BENCH / "README.md")
    if readme and not args.no_readme:
        write_readme(readme, section)
        print(f"\nresults written to {readme}")
    sys.exit(1 if any(r.get("failed") for r in fresh.values()) else 0)


if __name__ == "__main__":
    main()
