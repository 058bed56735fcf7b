"""Reading the router's conntrack table with conntrack-tools.

Everything here parses the ``extended`` text format of ``conntrack``
(``-o extended,id,ktimestamp``), for table dumps (``-L``) and for events
(``-E``) alike, into plain dicts of one shape:

    {
        "event": "DESTROY" | "NEW" | "UPDATE" | None,   # None for -L lines
        "family": "ipv4" | "ipv6", "l3num": 2 | 10,
        "proto": "tcp" | "udp" | "icmp" | "icmpv6" | ..., "protonum": 6,
        "timeout": int | None,            # absent on DESTROY events
        "state": "TIME_WAIT" | None,      # TCP (and SCTP/DCCP) only
        "orig":  {"src", "dst", "sport", "dport", "type", "code", "id",
                  "packets", "bytes"},    # keys present only when printed
        "reply": {... same ...},
        "status": ["ASSURED", "UNREPLIED", ...],
        "assured": bool, "unreplied": bool,
        "mark": int, "zone": int, "use": int | None,
        "id": int | None,                 # conntrack id (-o id)
        "delta_time": int | None,         # seconds, needs nf_conntrack_timestamp
        "start": float | None, "stop": float | None,   # epoch s, 1 s resolution
        "line": str,                      # the raw line
    }

Addresses are normalised with :mod:`ipaddress`.  Counters (``packets`` /
``bytes``) are present only when ``nf_conntrack_acct`` was on when the entry
was created.

XML output (``-o xml``) was rejected on purpose: conntrack-tools 1.4.7 prints
no ICMP type/code/id in XML, and appends `` [USERSPACE] portid=...`` after
``</flow>`` on events.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .build import compile_c

Flow = dict[str, Any]

_TUPLE_KEYS = {"src", "dst", "sport", "dport", "type", "code", "id", "packets", "bytes"}
_FAMILIES = {"ipv4": 2, "ipv6": 10}
_BRACKET_TIME = re.compile(r"\[(start|stop)=([^\]]*)\]")
_EVENT_TIME = re.compile(r"^\[(\d+\.\d+)\]\s*")
_EVENT_KIND = re.compile(r"^\s*\[(NEW|UPDATE|DESTROY)\]\s*")


def _num(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        return value


def _addr(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def _ctime(value: str) -> float | None:
    try:
        return time.mktime(time.strptime(value.strip(), "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        return None


def parse_flow_line(line: str) -> Flow | None:
    """Parse one line of ``conntrack -L`` / ``conntrack -E`` text output.

    Accepts the default and the ``extended`` format, with or without the
    ``id``, ``ktimestamp`` and ``timestamp`` output options.  Returns None for
    lines that are not flows (summaries, notices, blank lines).
    """
    raw = line.rstrip("\n")
    text = raw.strip()
    if not text or text.startswith(("conntrack v", "NOTICE", "WARNING")):
        return None
    flow: Flow = {
        "event": None, "event_time": None, "family": None, "l3num": None,
        "proto": None, "protonum": None, "timeout": None, "state": None,
        "orig": {}, "reply": {}, "status": [], "assured": False, "unreplied": False,
        "mark": 0, "zone": 0, "use": None, "id": None, "delta_time": None,
        "start": None, "stop": None, "line": raw,
    }
    m = _EVENT_TIME.match(text)
    if m:
        flow["event_time"] = float(m.group(1))
        text = text[m.end():]
    m = _EVENT_KIND.match(text)
    if m:
        flow["event"] = m.group(1)
        text = text[m.end():]
    for which, value in _BRACKET_TIME.findall(text):
        flow[which] = _ctime(value)
    text = _BRACKET_TIME.sub(" ", text)
    # Everything after [USERSPACE] names the process that caused the event.
    text = text.split("[USERSPACE]", 1)[0]

    tokens = text.split()
    i = 0
    if tokens and tokens[0] in _FAMILIES:
        flow["family"] = tokens[0]
        flow["l3num"] = int(tokens[1])
        i = 2
    if i + 1 >= len(tokens) or not tokens[i + 1].isdigit():
        return None
    flow["proto"] = tokens[i]
    flow["protonum"] = int(tokens[i + 1])
    i += 2
    # Optional timeout (absent on DESTROY events) and optional state.
    if i < len(tokens) and tokens[i].isdigit():
        flow["timeout"] = int(tokens[i])
        i += 1
    if i < len(tokens) and "=" not in tokens[i] and not tokens[i].startswith("["):
        flow["state"] = tokens[i]
        i += 1

    direction: str | None = "orig"
    prev_key = None
    for tok in tokens[i:]:
        if tok.startswith("[") and tok.endswith("]"):
            flag = tok[1:-1]
            flow["status"].append(flag)
            if direction == "reply" and flag != "UNREPLIED":
                direction = None  # flags after the reply tuple end it
            prev_key = None
            continue
        if "=" not in tok:
            continue
        key, value = tok.split("=", 1)
        if key == "src" and direction == "orig" and "src" in flow["orig"]:
            direction = "reply"
        if key in _TUPLE_KEYS and direction is not None and not (
            key == "id" and prev_key != "code"
        ):
            if key == "src" and direction == "reply" and "src" in flow["reply"]:
                direction = None
            else:
                flow[direction][key] = _addr(value) if key in ("src", "dst") else _num(value)
                prev_key = key
                continue
        # Not part of a tuple: the rest of the line is about the whole flow.
        direction = None
        prev_key = key
        flow[key.replace("-", "_")] = _num(value)
    if flow["family"] is None and "src" in flow["orig"]:
        flow["family"] = "ipv6" if ":" in flow["orig"]["src"] else "ipv4"
        flow["l3num"] = _FAMILIES[flow["family"]]
    flow["assured"] = "ASSURED" in flow["status"]
    flow["unreplied"] = "UNREPLIED" in flow["status"]
    return flow


def parse_flows(text: str) -> list[Flow]:
    """Parse many lines of conntrack output, skipping non-flow lines."""
    out = []
    for line in text.splitlines():
        flow = parse_flow_line(line)
        if flow is not None:
            out.append(flow)
    return out


def parse_stats(text: str) -> dict[str, int]:
    """Sum ``conntrack -S`` per-CPU counters into one dict."""
    totals: dict[str, int] = {}
    for line in text.splitlines():
        for key, value in re.findall(r"(\w+)=(\d+)", line):
            if key == "cpu":
                continue
            totals[key] = totals.get(key, 0) + int(value)
    return totals


def match_flow(flow: Flow, **want: Any) -> bool:
    """True when every criterion matches.

    Keys are top-level flow keys (``proto="tcp"``, ``family="ipv6"``) or
    ``orig_<k>`` / ``reply_<k>`` for tuple keys (``orig_sport=40000``).
    """
    for key, value in want.items():
        if key.startswith(("orig_", "reply_")):
            side, sub = key.split("_", 1)
            have = flow[side].get(sub)
            if sub in ("src", "dst") and value is not None:
                value = _addr(str(value))
        else:
            have = flow.get(key)
        if have != value:
            return False
    return True


def find_flows(flows: Iterable[Flow], **want: Any) -> list[Flow]:
    """Flows matching every criterion, see :func:`match_flow`."""
    return [f for f in flows if match_flow(f, **want)]


class EventCapture:
    """Background ``conntrack -E`` in a namespace, parsed into flow dicts.

    Command: ``conntrack -E -e DESTROY -o extended,id,ktimestamp`` run with
    the rcvbuf.c LD_PRELOAD shim (64 MiB event socket buffer; conntrack-tools
    1.4.7's own ``-b`` misses the event socket).  Without gcc the shim is
    skipped and bursts of more than ~1,000 events can be lost; check
    :attr:`lost_events`.

    Started and stopped by :meth:`Topology.conntrack_events`.  Start-up and
    shut-down are synchronised with a sentinel entry (UDP 203.0.113.254 ->
    203.0.113.253, inserted and deleted with ``conntrack -I/-D``): the capture
    is live once the sentinel's DESTROY arrives, and on stop every event the
    kernel queued before the closing sentinel has been read.  Sentinels are
    filtered out of :attr:`events`.
    """

    SENTINEL_SRC = "203.0.113.254"
    SENTINEL_DST = "203.0.113.253"
    OUTPUT = "extended,id,ktimestamp"   # -o; a subclass may add "timestamp" (event_time)

    def __init__(self, topo: Any, ns: str = "router",
                 kinds: Iterable[str] = ("DESTROY",),
                 buffer_size: int = 64 << 20) -> None:
        self.topo = topo
        self.ns = ns
        self.kinds = tuple(k.upper() for k in kinds)
        self.buffer_size = buffer_size
        self.events: list[Flow] = []
        self.stderr = ""
        self._all: list[Flow] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._sentinel_port = 40000
        self._sentinels_seen: set[int] = set()

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 10.0) -> EventCapture:
        mask = ",".join(sorted(set(self.kinds) | {"DESTROY"}))
        env = dict(os.environ)
        shim = compile_c("rcvbuf.c", shared=True, libs=("-ldl",))
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
            env["CTA_NETLINK_RCVBUF"] = str(self.buffer_size)
        self.shimmed = shim is not None
        self._proc = self.topo.popen(
            self.ns, "conntrack", "-E", "-e", mask, "-o", self.OUTPUT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._err_thread = threading.Thread(target=self._read_err, daemon=True)
        self._err_thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self._send_sentinel()
            if self._wait_sentinel(port, 0.3):
                return self
            if self._proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"conntrack -E did not come up in {self.ns}: {self.stderr}")

    def stop(self, timeout: float = 10.0) -> list[Flow]:
        if self._proc is None:
            return self.events
        if self._proc.poll() is None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._wait_sentinel(self._send_sentinel(), 1.0):
                    break
            self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._thread:
            self._thread.join(timeout=5)
        if self._err_thread:
            self._err_thread.join(timeout=5)
        self.topo._forget(self._proc)
        self._proc = None
        with self._cond:
            self.events = [f for f in self._all if f["event"] in self.kinds]
        return self.events

    # -- queries -----------------------------------------------------------
    @property
    def lost_events(self) -> bool:
        """True when conntrack reported ENOBUFS (the kernel dropped events)."""
        return "ENOBUFS" in self.stderr

    def snapshot(self) -> list[Flow]:
        with self._cond:
            return [f for f in self._all if f["event"] in self.kinds]

    def wait_for(self, predicate: Callable[[Flow], bool] | None = None,
                 timeout: float = 15.0, count: int = 1, **want: Any) -> list[Flow]:
        """Wait until ``count`` captured events match; return them.

        Expired entries are reaped by the kernel's conntrack GC worker, which
        runs every few seconds, so DESTROY events for timed-out flows arrive
        up to several seconds after the timeout.  While waiting, this lists
        the table every half second (``conntrack -L`` reaps expired entries
        it walks over), which makes timeouts show up promptly.
        """
        def matching() -> list[Flow]:
            out = []
            for f in self._all:
                if f["event"] not in self.kinds:
                    continue
                if predicate is not None and not predicate(f):
                    continue
                if want and not match_flow(f, **want):
                    continue
                out.append(f)
            return out

        deadline = time.monotonic() + timeout
        next_poke = time.monotonic() + 0.5
        while True:
            with self._cond:
                found = matching()
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(found)}/{count} matching events after {timeout}s "
                        f"({len(self._all)} events seen)")
                self._cond.wait(min(remaining, 0.1))
            if time.monotonic() >= next_poke:
                next_poke = time.monotonic() + 0.5
                self.topo.run(self.ns, "conntrack", "-L", check=False)

    # -- internals ---------------------------------------------------------
    def _send_sentinel(self) -> int:
        self._sentinel_port += 1
        port = self._sentinel_port
        tup = ["-p", "udp", "-s", self.SENTINEL_SRC, "-d", self.SENTINEL_DST,
               "--sport", str(port), "--dport", "9"]
        self.topo.run(self.ns, "conntrack", "-I", *tup, "-t", "60", check=False)
        self.topo.run(self.ns, "conntrack", "-D", *tup, check=False)
        return port

    def _wait_sentinel(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while port not in self._sentinels_seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            flow = parse_flow_line(line)
            if flow is None:
                continue
            with self._cond:
                if flow["orig"].get("src") == self.SENTINEL_SRC and \
                        flow["orig"].get("dst") == self.SENTINEL_DST:
                    if flow["event"] == "DESTROY":
                        self._sentinels_seen.add(flow["orig"].get("sport"))
                else:
                    self._all.append(flow)
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self.stderr += line

    def __enter__(self) -> EventCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
