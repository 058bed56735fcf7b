#!/usr/bin/env python3
"""conntracct's task runner (stdlib only; each task installs what it needs).

    ./tasks.py setup    apt packages the agent needs, kernel header tree for BCC, .venv
    ./tasks.py run      set up, then run the agent (args after -- go to `conntracct run`;
                        without args: `conntracct run --ensure-tracking`, so a host with
                        no conntrack rule still shows flows; see the README's Quick start)
    ./tasks.py test     set up, plus the servers and tools only the tests use, then run the
                        whole test suite (args go to pytest; without args the guest tests
                        follow, see vm-test and CONNTRACCT_VM_TESTS)
    ./tasks.py lint     ruff
    ./tasks.py bench    benchmarks, results into bench/README.md
    ./tasks.py vm-test  the probe tests again in kprobe mode, in a Debian kernel under QEMU
                        (args: full (default) or reduced, then optional pytest arguments
                        replacing the suite's tests; outputs in .cache/vm-test/)

Every task is idempotent: a second run does nothing it need not do.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
# Debian packages the agent needs to run (./tasks.py setup, run).
APT_PACKAGES = [
    "python3-bpfcc", "python3-venv", "linux-headers-amd64", "kmod",
    # the package's C extension (conntracct/_jsonline.c) builds at install
    "gcc", "python3-dev",
    "iproute2", "nftables", "conntrack", "iputils-ping", "procps",
]
# What only the tests use (./tasks.py test, bench): one entry per package,
# append to it; `run` never installs these.
TEST_APT_PACKAGES = [
    # real servers the sink tests write to and query back
    "influxdb", "victoria-metrics", "prometheus",
    # systemd-analyze, which checks dist/conntracct.service
    "systemd",
    # IPFIX collectors the ipfix sink tests read back from (nfcapd + nfdump,
    # pmacct's nfacctd, tshark's cflow dissector; tshark's debconf question
    # about capture rights takes its default under DEBIAN_FRONTEND=noninteractive),
    # and python3-ipfix, the library bench/ipfix_encode.py compares against
    "nfdump", "pmacct", "tshark", "python3-ipfix",
    # the peers bench/p6_vs_peers.py runs beside the agent (pmacctd is in
    # pmacct above) and its UDP flood
    "ulogd2", "ulogd2-json", "iperf3",
    # the terminal tests/integration/test_top.py drives `conntracct top` in
    "tmux",
]
# apt waits this long for another apt/dpkg (unattended-upgrades at boot) to
# release its locks, instead of failing.
APT_LOCK_WAIT_S = 600

# The guest for ./tasks.py vm-test: Debian's stock kernel (the headers above
# match it), booted by virtme-ng with the host's root filesystem read-only.
# virtme-ng needs busybox for its initramfs (Debian's 9p and virtio are modules).
VM_APT_PACKAGES = ["qemu-system-x86", "linux-image-amd64", "busybox-static"]
VM_VENV = ROOT / ".cache" / "vm-venv"     # virtme-ng only, apart from the project's .venv
VIRTME_NG = "virtme-ng==1.42"
VM_OUT = ROOT / ".cache" / "vm-test"
# Host-side bounds on one VM run (boot + set-up + tests), seconds.
VM_TIMEOUT = {"full": 2700, "reduced": 1200}


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, **kw)


def need_root(task: str) -> None:
    if os.geteuid() != 0:
        sys.exit(f"./tasks.py {task}: run as root (it installs packages and loads BPF programs)")


def apt_get(*args: str) -> None:
    """apt-get, waiting for the locks another apt or dpkg holds.  `install`
    waits for dpkg's lock itself (DPkg::Lock::Timeout); `update` ignores that
    option for its lists lock (apt 2.6), so a lock failure is retried here."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")   # C: the lock message below
    cmd = ["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_WAIT_S}", *args]
    deadline = time.monotonic() + APT_LOCK_WAIT_S
    while True:
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stderr)
        if proc.returncode == 0:
            return
        if "Could not get lock" not in proc.stderr or time.monotonic() > deadline:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        print("apt: another apt or dpkg holds its lock; retrying in 5 s", flush=True)
        time.sleep(5)


def apt_install(packages: list[str]) -> None:
    missing = [p for p in packages
               if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                 text=True).stdout != "install ok installed"]
    if not missing:
        return
    apt_get("update", "-q")
    apt_get("install", "-y", "-q", "--no-install-recommends", *missing)


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
    # The install builds the package's C extension too: a change to it reinstalls.
    sources = [ROOT / "pyproject.toml", *sorted((ROOT / "conntracct").rglob("*.c"))]
    want = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
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
    if not args:
        # A host without firewall, NAT or Docker rules tracks nothing, so the
        # agent would see no flow: ask it to install its own accept-only
        # table (it says so in its log and removes the table on exit).
        args = ["--ensure-tracking"]
        print("./tasks.py run: conntracct run --ensure-tracking (conntrack.ensure_tracking: "
              "the agent adds nftables table inet conntracct while it runs)", flush=True)
    os.execv(str(VENV / "bin" / "conntracct"), ["conntracct", "run", *args])


def test_setup() -> None:
    setup()
    apt_install(TEST_APT_PACKAGES)


def test(args: list[str]) -> None:
    test_setup()
    os.chdir(ROOT)
    code = subprocess.run([str(PY), "-m", "pytest", *(args or ["tests"])]).returncode
    if not args:
        # The whole suite includes the guest run (./tasks.py vm-test): kprobe
        # mode end to end and mode detection on Debian's stock kernel, about
        # 10 minutes under TCG.  CONNTRACCT_VM_TESTS=reduced runs a shorter
        # guest suite, =0 none.
        suite = os.environ.get("CONNTRACCT_VM_TESTS", "full")
        why_not = "CONNTRACCT_VM_TESTS=0" if suite == "0" else vm_unavailable()
        if why_not:
            print(f"vm-test: skipped: {why_not}", flush=True)
        else:
            code = vm_run(suite if suite in VM_TIMEOUT else "full") or code
    sys.exit(code)


def _version_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def vm_unavailable() -> str | None:
    """Why this machine cannot run the guest tests, or None."""
    if platform.machine() != "x86_64":
        return f"the guest is an x86_64 Debian kernel; this is {platform.machine()}"
    os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    if not re.search(r"^ID=\"?debian\"?$", os_release, re.M):
        return "not Debian: the guest is Debian's linux-image-amd64, QEMU and virtme-ng's busybox from apt"
    return None


def vm_kernel() -> tuple[str, Path]:
    """The newest Debian kernel in /boot with its modules and a header tree."""
    for image in sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name), reverse=True):
        kver = image.name.removeprefix("vmlinuz-")
        mod = Path("/lib/modules") / kver
        if (mod / "kernel").is_dir() and (mod / "build" / "include").is_dir():
            return kver, image
    sys.exit("vm-test: no /boot/vmlinuz-* with /lib/modules/<version>/kernel and build/ "
             "(apt-get install linux-image-amd64 linux-headers-amd64)")


def vm_setup() -> tuple[str, Path]:
    setup()
    apt_install(VM_APT_PACKAGES)
    stamp = VM_VENV / ".installed"
    if not (stamp.exists() and stamp.read_text() == VIRTME_NG):
        if not (VM_VENV / "bin" / "python").exists():
            sh("/usr/bin/python3", "-m", "venv", str(VM_VENV))
        sh(str(VM_VENV / "bin" / "python"), "-m", "pip", "install", "-q", VIRTME_NG)
        stamp.write_text(VIRTME_NG)
    return vm_kernel()


def vm_accel() -> list[str]:
    """KVM only on real VT-x/AMD-V (a PVM /dev/kvm runs only its own guests); else TCG."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if (Path("/dev/kvm").exists() and re.search(r"\b(vmx|svm)\b", cpuinfo)
            and not Path("/sys/module/kvm_pvm").exists()):
        return []
    return ["--disable-kvm", "--qemu-opts=-cpu qemu64"]


def vm_run(suite: str, pytest_args: list[str] = ()) -> int:
    """Boot the guest once, run tests/vm/guest.sh `suite` (or `pytest_args`) in it, print a summary."""
    kver, image = vm_setup()
    out = VM_OUT
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out.with_suffix(".lock"), "w")   # held until this process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"vm-test: another vm-test is running (it holds {lock.name})")
    for old in out.iterdir():
        old.unlink()
    accel = vm_accel()
    cmd = [str(VM_VENV / "bin" / "vng"), "--run", str(image), *accel, "--cpus", str(min(os.cpu_count() or 1, 4)),
           "--memory", "2G", "--rwdir", str(out),
           "--exec", shlex.join([f"{ROOT}/tests/vm/guest.sh", str(out), suite, *pytest_args])]
    env = dict(os.environ, PATH=f"{VM_VENV / 'bin'}:{os.environ['PATH']}")   # vng runs virtme-run from PATH
    print(f"vm-test ({suite}): booting {kver} under {'KVM' if not accel else 'QEMU TCG (no KVM)'}", flush=True)
    started = time.monotonic()
    # vng's output goes through a pipe (it misbehaves writing to a file);
    # its own process group, so a timeout kills QEMU with it.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    deadline = started + VM_TIMEOUT[suite]
    fd = proc.stdout.fileno()
    with open(out / "console.log", "wb") as log:
        while True:
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
    proc.stdout.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.monotonic() - started
    return vm_summary(suite, kver, out, wall, timed_out)


def vm_summary(suite: str, kver: str, out: Path, wall: float, timed_out: bool) -> int:
    rc_file = out / "rc"
    rc = int(rc_file.read_text().strip().removeprefix("rc=")) if rc_file.exists() else 255
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    counts = "no test report"
    if (out / "junit.xml").exists():
        suites = ET.parse(out / "junit.xml").getroot()
        s = suites if suites.tag == "testsuite" else suites.find("testsuite")
        n, fail, err, skip = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        counts = f"{n - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped"
    parts = [f"boot {timings['boot_s']:.0f}s" if "boot_s" in timings else None,
             f"probe compile {timings['compile_s']:.0f}s (empty program {timings['empty_compile_s']:.0f}s)"
             if "compile_s" in timings else None,
             f"tests {timings['tests_s']:.0f}s" if "tests_s" in timings else None, f"VM total {wall:.0f}s"]
    verdict = "TIMED OUT" if timed_out else ("ok" if rc == 0 else f"FAILED (rc {rc})")
    print(f"\nvm-test ({suite}, {kver}, kprobe mode): {verdict}: {counts}; "
          f"{', '.join(p for p in parts if p)}; logs in {out}", flush=True)
    return 0 if rc == 0 and not timed_out else 1


def vm_test(args: list[str]) -> None:
    need_root("vm-test")
    suite = args[0] if args else "full"
    if suite not in VM_TIMEOUT:
        sys.exit(f"./tasks.py vm-test [{'|'.join(VM_TIMEOUT)}] [pytest arguments replacing the suite's tests]")
    why_not = vm_unavailable()
    if why_not:
        sys.exit(f"vm-test: {why_not}")
    sys.exit(vm_run(suite, args[1:]))


def lint(args: list[str]) -> None:
    venv()
    sys.exit(subprocess.run([str(VENV / "bin" / "ruff"), "check", "conntracct", "tests", "tasks.py", *args],
                            cwd=ROOT).returncode)


def bench(args: list[str]) -> None:
    test_setup()     # the sink benchmarks write to the test servers
    sys.exit(subprocess.run([str(PY), str(ROOT / "bench" / "run.py"), *args], cwd=ROOT).returncode)


TASKS = {"setup": lambda args: setup(), "run": run, "test": test, "lint": lint, "bench": bench,
         "vm-test": vm_test}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in TASKS:
        sys.exit(__doc__)
    task, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    TASKS[task](rest)


if __name__ == "__main__":
    main(sys.argv[1:])
