"""The tracking watch's logic, the capability check and the per-namespace lock,
without root.  The kernel side (loopback probe, SNMP counters, nftables) is
tested for real in tests/integration/test_first_run.py."""

from __future__ import annotations

import logging
import multiprocessing
import os

import pytest

from conntracct import instance, nftable, privileges, tracking
from conntracct.tracking import FamilyState, TrackingWatch


class Counters:
    """Stands in for Tracker: traffic counters and probe answers set by the test."""

    def __init__(self):
        self.packets = {"ipv4": 100, "ipv6": 10}
        self.tracked = {"ipv4": False, "ipv6": True}
        self.probes = 0

    def traffic(self):
        return dict(self.packets)

    def probe(self, family):
        self.probes += 1
        return FamilyState(family, self.tracked[family], "tracking" if self.tracked[family] else "not tracking")


def make_watch(counters: Counters) -> TrackingWatch:
    states = {f: counters.probe(f) for f in tracking.FAMILIES}
    watch = TrackingWatch(counters, states, interval=0, reprobe=0)
    counters.probes = 0
    return watch


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_warns_once_per_family_only_when_untracked_traffic_passes(caplog):
    counters = Counters()
    watch = make_watch(counters)
    watch._next_probe = float("inf")          # no re-probe in this test
    watch.poll()
    assert warnings(caplog) == []              # no traffic yet: no warning
    counters.packets["ipv6"] += 50             # tracked family: never a warning
    watch.poll()
    assert warnings(caplog) == []
    counters.packets["ipv4"] += 7
    watch.poll()
    [message] = warnings(caplog)
    assert message.startswith("IPv4 traffic passes untracked: 7 packets") and tracking.FIX in message
    counters.packets["ipv4"] += 5
    watch.poll()
    assert len(warnings(caplog)) == 1          # once, while it stays untracked
    assert watch.figures() == {"ipv4": {"tracking": 0, "untracked_packets": 12},
                               "ipv6": {"tracking": 1, "untracked_packets": 0}}


def test_notices_tracking_that_starts_later(caplog):
    caplog.set_level(logging.INFO)
    counters = Counters()
    watch = make_watch(counters)
    counters.packets["ipv4"] += 3
    watch.poll()                               # warns, then probes ipv4 again (still untracked)
    assert counters.probes == 1
    counters.tracked["ipv4"] = True
    watch.poll()
    assert "conntrack now tracks IPv4" in caplog.text
    assert watch.figures()["ipv4"]["tracking"] == 1
    counters.packets["ipv4"] += 100            # tracked now: not counted as untracked
    watch.poll()
    assert watch.figures()["ipv4"]["untracked_packets"] == 3
    assert counters.probes == 2                # nothing left to re-probe


def test_unknown_family_neither_warns_nor_counts(caplog):
    counters = Counters()
    watch = make_watch(counters)
    watch.states["ipv4"] = FamilyState("ipv4", None, "cannot tell: loopback has no 127.0.0.1 here")
    counters.packets["ipv4"] += 10
    watch.poll()
    assert warnings(caplog) == []
    assert watch.figures()["ipv4"] == {"tracking": -1, "untracked_packets": 0}


# -- capabilities --------------------------------------------------------------

BIT = {name: 1 << n for name, n in privileges.CAP_NUMBERS.items()}
MEASURED = BIT["CAP_BPF"] | BIT["CAP_PERFMON"] | BIT["CAP_NET_ADMIN"]


def test_capability_mask_from_proc_status():
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\n"
    assert privileges.effective(status) == MEASURED


@pytest.mark.parametrize("drop", ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"])
def test_each_measured_capability_is_required(drop):
    assert list(privileges.missing(None, MEASURED & ~BIT[drop])) == [drop]


def test_netns_needs_sys_admin_which_also_stands_for_bpf_and_perfmon():
    assert privileges.missing(None, MEASURED) == {}
    assert list(privileges.missing("/run/netns/x", MEASURED)) == ["CAP_SYS_ADMIN"]
    assert privileges.missing("/run/netns/x", BIT["CAP_SYS_ADMIN"] | BIT["CAP_NET_ADMIN"]) == {}


def test_this_process_sees_its_own_mask():
    assert privileges.effective() == int(
        next(line for line in open("/proc/self/status") if line.startswith("CapEff:")).split()[1], 16)


# -- one agent per namespace -----------------------------------------------------

def _try_lock(directory: str, inode: int, out) -> None:
    os.environ["RUNTIME_DIRECTORY"] = directory
    try:
        instance.InstanceLock(inode).acquire()
        out.put("acquired")
    except instance.AlreadyRunning as e:
        out.put(str(e))


def test_second_lock_names_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    lock = instance.InstanceLock(4026531840)
    assert lock.acquire()
    assert instance.holder(4026531840) == os.getpid()
    out = multiprocessing.get_context("fork").Queue()
    proc = multiprocessing.get_context("fork").Process(target=_try_lock, args=(str(tmp_path), 4026531840, out))
    proc.start()
    proc.join(10)
    message = out.get(timeout=5)
    assert f"another conntracct (pid {os.getpid()}) already accounts network namespace 4026531840" in message
    lock.release()
    assert instance.holder(4026531840) is None            # released: nobody holds it, file or not


def test_ensure_tracking_table_is_accept_only_and_hooked_nowhere():
    text = nftable.ruleset(1234)
    assert text.startswith("table inet conntracct\ndelete table inet conntracct\n")   # atomic replace
    body = text.split("chain ensure_tracking {", 1)[1]
    assert "hook" not in body.replace("hooked nowhere", "") and "policy" not in body
    assert "ct state new,established,related accept" in body
    assert [w for w in ("drop", "reject", "jump", "goto", "mark set") if w in text] == []


def test_kprobe_mode_needs_sys_admin_which_covers_bpf_and_perfmon():
    assert list(privileges.missing(None, MEASURED, mode="kprobe")) == ["CAP_SYS_ADMIN"]
    assert privileges.missing(None, BIT["CAP_SYS_ADMIN"] | BIT["CAP_NET_ADMIN"], mode="kprobe") == {}
    assert list(privileges.missing(None, BIT["CAP_SYS_ADMIN"], mode="kprobe")) == ["CAP_NET_ADMIN"]
