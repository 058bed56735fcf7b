#!/bin/bash
# Runs inside the ./tasks.py vm-test guest: Debian's kernel under QEMU, the
# host's root filesystem shared read-only (this checkout, its .venv, BCC, the
# kernel's header tree), OUT the only writable shared directory.
#
#   tests/vm/guest.sh OUT full|reduced [pytest arguments instead of the suite's tests]
#
# Writes OUT/junit.xml, OUT/timings.json and OUT/rc; its output is the
# console, which the host keeps (OUT/console.log).
set -u
OUT=$1 SUITE=${2:-full}
shift 2
cd "$(dirname "$0")/../.."
echo "rc=255" > "$OUT/rc"
BOOT=$(cut -d' ' -f1 /proc/uptime)
echo "guest: kernel $(uname -r), $(nproc) CPUs, up ${BOOT}s"

# The guest's root is read-only: no bytecode or pytest cache writes; /tmp,
# /run and /var/cache are the guest's own.
export PYTHONDONTWRITEBYTECODE=1
export CONNTRACCT_TEST_MODE=kprobe CONNTRACCT_TEST_GUEST=1 CONNTRACCT_EXPECT_AUTO=kprobe
PY=.venv/bin/python

modprobe nf_conntrack || { echo "modprobe nf_conntrack failed"; exit 1; }

# What this kernel offers, and how long one BCC compile of the probe takes here.
$PY - "$OUT/timings.json" "$BOOT" <<'PY'
import json, sys, time
from conntracct.probe.btf import kernel_btf
from conntracct.probe.loader import ProbeSettings, compile_probe, destroy_func
from conntracct.probe.offsets import kernel_offsets
t = time.monotonic()
btf = kernel_btf()
offsets = kernel_offsets(btf)
btf_s = time.monotonic() - t
print(f"guest: BTF {'vmlinux + split ' + btf.origin if btf.origin != 'vmlinux' else 'vmlinux'}: "
      f"{len(offsets)} offsets resolved in {btf_s:.1f}s "
      f"(nf_conn.status at {offsets['CT_STATUS']}, ct_net at {offsets['CT_NET']}, ext at {offsets['CT_EXT']})")
from bcc import BPF
t = time.monotonic()
BPF(text=b"int empty(void *ctx) { return 0; }").cleanup()   # BCC's fixed cost: helpers.h, kernel headers
empty_s = time.monotonic() - t
t = time.monotonic()
compile_probe("kprobe", ProbeSettings.from_config(), destroy_func()).close()
compile_s = time.monotonic() - t
print(f"guest: BCC compile + load of the kprobe probe (its child process): {compile_s:.1f}s "
      f"(an empty program, here: {empty_s:.1f}s)")
json.dump({"boot_s": float(sys.argv[2]), "btf_s": round(btf_s, 2), "compile_s": round(compile_s, 2),
           "empty_compile_s": round(empty_s, 2)}, open(sys.argv[1], "w"))
PY

$PY -m conntracct check --mode auto || true

if [ "$SUITE" = reduced ]; then
    TESTS=(tests/integration/test_probe_modes.py::test_fentry_detection_names_the_module
           tests/integration/test_probe_modes.py::test_auto_picks_the_cheapest_mode_that_attaches
           tests/integration/test_agent_netns.py::test_flows_end_to_end_through_nat)
    BUDGET=900
else
    TESTS=(tests/integration/test_probe_modes.py tests/integration/test_mode_detection.py
           tests/integration/test_least_privilege.py
           tests/integration/test_flow_end_hook.py tests/integration/test_agent_netns.py)
    BUDGET=2400
fi
[ $# -gt 0 ] && TESTS=("$@")
T0=$(cut -d' ' -f1 /proc/uptime)
timeout --kill-after=30 "$BUDGET" $PY -m pytest -p no:cacheprovider -rA -q --durations=10 \
    --junitxml="$OUT/junit.xml" "${TESTS[@]}"
RC=$?
T1=$(cut -d' ' -f1 /proc/uptime)
$PY - "$OUT/timings.json" "$T0" "$T1" <<'PY'
import json, sys
path, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
try:
    timings = json.load(open(path))
except OSError:
    timings = {}
timings["tests_s"] = round(t1 - t0, 1)
json.dump(timings, open(path, "w"))
PY
echo "rc=$RC" > "$OUT/rc"
echo "guest: tests exited $RC after $(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.0f", b-a}')s"
exit $RC
