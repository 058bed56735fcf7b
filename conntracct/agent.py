"""The running agent: probe -> enrichment -> pipeline -> sinks, until a signal."""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from . import instance, netns, nssetup, privileges, selfmetrics, sysctl
from .config import Config
from .enrich import Enricher
from .flow import FlowEvent
from .pipeline import Pipeline
from .probe import bpfsys, compiler
from .probe.footprint import release_startup_memory, single_arena
from .probe.loader import ProbeError, ProbeSettings
from .probe.modes import choose_mode
from .probe.source import FlowSource
from .selfmetrics import Stats
from .sinks.base import SinkError

log = logging.getLogger("conntracct")


# Garbage collector, once start-up is over (tune_garbage_collector).
GC_YOUNG_THRESHOLD = 100_000


def tune_garbage_collector() -> None:
    """Collect once, freeze what start-up made (modules, config, the probe's
    objects) out of all later collections, and run the young collection every
    100,000 net container allocations instead of 700.

    Every record allocates a few containers (its FlowEvent, its queue entry)
    that live until the sink writes them, so with the defaults the collector
    ran every couple of hundred records and its full collections walked the
    whole start-up heap: a quarter of the reader's and sink's CPU (bench P2,
    raw -> line protocol: 150k -> 195k records/s).  The pipeline makes no
    reference cycles per record, so what is left for the collector to find
    is rare (an exception's traceback) and bounded by the threshold; the
    agent's RSS under 3,000 new flows/s stayed the same (112 MB after 40 s).
    Called before release_startup_memory(), which then trims what the
    collection freed."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


class EnvironmentProblem(Exception):
    """The host cannot run the agent as configured; the message says how to fix it."""


def probe_settings(config: Config) -> ProbeSettings:
    return ProbeSettings.from_config(config.probe)


class LossWatch:
    """Logs, at most every `interval` seconds, when a loss counter has grown
    (the loss counters and their meaning: selfmetrics.losses())."""

    def __init__(self, interval: float = 10.0):
        self._interval = interval
        self._next = time.monotonic() + interval
        self._seen: dict[str, int] = {}

    def check(self, snapshot) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._interval
        for key, (value, what) in selfmetrics.losses(snapshot()).items():
            grown = value - self._seen.get(key, 0)
            if grown > 0:
                log.warning("%s: %d %s", key, grown, what)
            self._seen[key] = value


class Agent:
    def __init__(self, config: Config, consumer: Callable[[FlowEvent], None] | None = None):
        self.config = config
        # Where enriched records go instead of the sinks' queues (conntracct top).
        self._consumer = consumer
        self.stats = Stats()
        self.stop = threading.Event()
        self.source: FlowSource | None = None
        self.pipeline: Pipeline | None = None
        self._sysctls = sysctl.ConntrackSysctls()
        # the accounted namespace: one agent, the ensure_tracking table, tracking checks
        self.namespace = nssetup.NamespaceSetup(config.conntrack.ensure_tracking)

    def snapshot(self) -> dict:
        """Every stage's counters: the probe's, enrichment's and each sink's."""
        out = self.stats.snapshot()
        if self.source is not None:
            out["probe"] = self.source.stats()
        out["conntrack"] = self.namespace.figures()
        return out

    def _start(self) -> None:
        cfg = self.config
        single_arena()     # before any thread starts
        lacking = privileges.problem(cfg.probe.netns, cfg.probe.mode)
        if lacking:
            raise EnvironmentProblem(lacking)
        compiler.start_early(cfg.probe.cache_dir)   # BCC's process starts while the sinks and mode detection do
        try:
            self.pipeline = Pipeline.from_config(cfg.sinks, self.stats)
        except SinkError as e:
            # e.g. a Prometheus endpoint whose port is taken
            raise EnvironmentProblem(str(e)) from None
        try:
            with netns.entered(cfg.probe.netns):
                self.namespace.enter()
                mode = self._choose_mode()
                stamped = self._sysctls_ready()
        except netns.NetnsError as e:
            raise EnvironmentProblem(f"probe.netns: {e}") from None
        except nssetup.SetupError as e:
            raise EnvironmentProblem(str(e)) from None
        enrich = Enricher(cfg.enrich, self.stats.stage("enrich"))
        offer = self._consumer or self.pipeline.offer

        def emit(event: FlowEvent) -> None:
            enriched = enrich(event)
            if enriched is not None:
                offer(enriched)

        for worker in self.pipeline.workers:
            worker.sink.observe(self.snapshot)
        self.pipeline.start()
        try:
            self.source = FlowSource(mode, probe_settings(cfg), emit, stamped,
                                     netlink_rcvbuf=int(cfg.probe.netlink_rcvbuf),
                                     sweep_interval_s=cfg.probe.sweep_interval, netns_path=cfg.probe.netns,
                                     kinds=self._wanted_kinds())
        except ProbeError as e:
            if os.strerror(errno.EBUSY) in str(e):
                with netns.entered(cfg.probe.netns):
                    cause = instance.busy_cause(netns.inode(), bpfsys.PRIORITY_AFTER_CONNTRACK)
                raise EnvironmentProblem(f"{e}: {cause}") from None
            raise EnvironmentProblem(f"{e}. `conntracct check` shows what this kernel allows.") from None
        tune_garbage_collector()    # first: its collection frees what the release then trims
        release_startup_memory()

    def _wanted_kinds(self) -> frozenset[str] | None:
        """The record kinds some sink wants (the source skips the others); all with a consumer."""
        if self._consumer is not None:
            return None
        return frozenset().union(*(w.kinds for w in self.pipeline.workers))

    def _choose_mode(self) -> str:
        requested = self.config.probe.mode
        mode, _checks, why = choose_mode(requested)
        if mode is None:
            if requested == "auto" and privileges.missing(None, mode="kprobe"):
                why += f"; without CAP_SYS_ADMIN kprobe mode cannot work: it needs it to {privileges.KPROBE_NEEDS}"
            raise EnvironmentProblem(
                f"conntracct cannot attach its probe (probe.mode: {requested}): {why}. "
                "Run `conntracct check` for the full table; as root on a fresh Debian host, "
                "`./tasks.py setup` installs BCC and a kernel header tree.")
        log.info("probe mode %s (%s)", mode, why)
        return mode

    def _sysctls_ready(self) -> bool:
        """Accounting and timestamps on (when managed); True if timestamps are."""
        if self.config.sysctl.manage:
            try:
                self._sysctls.enable()
            except sysctl.SysctlError as e:
                raise EnvironmentProblem(f"{e}. Run as root in the network namespace to account, "
                                         "or set sysctl.manage: false and set the sysctls yourself.") from None
        elif sysctl.read(sysctl.ACCT) != 1:
            log.warning("net.netfilter.nf_conntrack_acct is off and sysctl.manage is false: "
                        "flows will carry no counters")
        return sysctl.read(sysctl.TIMESTAMP) == 1

    def _restore_sysctls(self) -> None:
        if self.config.sysctl.manage and self.config.sysctl.restore and self._sysctls.previous:
            with netns.entered(self.config.probe.netns):
                self._sysctls.restore()

    def _leave_namespace(self) -> None:
        """Delete the ensure_tracking table, release the namespace's lock."""
        if not self.namespace.active:
            return
        try:
            with netns.entered(self.config.probe.netns):
                self.namespace.leave()
        except netns.NetnsError as e:
            log.error("%s: could not clean up there", e)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or self.stop); drain, flush, exit status 0."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        try:
            self._start()
        except EnvironmentProblem:
            self._restore_sysctls()
            self._leave_namespace()
            if self.pipeline is not None:
                self.pipeline.close(0)
            raise
        reader = threading.Thread(target=self.source.run, args=(self.stop,), name="flow-reader", daemon=True)
        reader.start()
        log.info("conntracct running: config %s, sinks %s", self.config.source,
                 ", ".join(s.name for s in self.config.sinks))
        losses = LossWatch()
        while not self.stop.wait(1.0):
            if not reader.is_alive():
                log.error("flow reader stopped unexpectedly; shutting down")
                break
            losses.check(self.snapshot)
            self.namespace.poll()
        self.stop.set()
        return self._shutdown(reader)

    def _shutdown(self, reader: threading.Thread) -> int:
        started = time.monotonic()
        deadline = self.config.shutdown.drain_timeout
        reader.join(deadline)
        summary = self.snapshot()
        self.source.close()
        self.pipeline.close(max(0.0, deadline - (time.monotonic() - started)))
        self._restore_sysctls()
        self._leave_namespace()
        # The sinks' counters after the drain; the probe's as it stopped.
        summary.update(self.stats.snapshot())
        log.info("conntracct stopped")
        for line in selfmetrics.summary_lines(summary):
            log.info("%s", line)
        return 0
