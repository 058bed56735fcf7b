"""`conntracct top`: the busiest flows and remote hosts, live, in a terminal.

It attaches its own probe, as iftop or nethogs do, with a rate curve of one
record per second for every active flow, and shows each flow's current rate
(bytes/s and packets/s in both directions) from the totals of its last
records.  It runs as the agent does -- the same namespace lock, so it never
accounts a namespace a running agent already accounts, and the same clean
exit -- but with no sinks: the records go to the table on screen.

Keys: r / t / a sort by rate, total, age; / filters (an address, a CIDR or a
port; Enter applies, Esc clears); q or Ctrl-C quits.  Made for 80x24 and
more, over SSH too: rich draws, the keys come through termios in cbreak mode.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .config import Config, RateStep
from .flow import DESTROY, FlowEvent
from .sinks.common import PORT_PROTOS, endpoint, remote_endpoint

REFRESH_S = 1.0
INTERVAL_NS = 1_000_000_000      # top's rate curve: a record per second while a flow is active
SAMPLES = 3                      # records a rate is taken over (about two seconds)
IDLE_NS = 2_500_000_000          # no record for this long: the flow is idle, its rate 0
KEEP_ENDED_NS = 5_000_000_000    # an ended flow stays on screen this long
KEEP_IDLE_NS = 60_000_000_000    # an idle flow without an end is dropped after this
SORTS = {"r": "rate", "t": "total", "a": "age"}


# -- the model -----------------------------------------------------------------

@dataclass
class FlowRow:
    """One flow as shown: its latest record, rates over its last records."""
    event: FlowEvent
    first_ns: int
    samples: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))   # (ts, bo, br, po, pr)
    ended_ns: int = 0

    def add(self, e: FlowEvent) -> None:
        self.event = e
        self.samples.append((e.ts_ns, e.bytes_orig, e.bytes_reply, e.packets_orig, e.packets_reply))
        if e.kind == DESTROY:
            self.ended_ns = e.ts_ns

    def rates(self, now_ns: int) -> tuple[float, float, float, float]:
        """(bytes/s orig, bytes/s reply, packets/s orig, packets/s reply) now."""
        if len(self.samples) < 2 or now_ns - self.samples[-1][0] > IDLE_NS or self.ended_ns:
            return 0.0, 0.0, 0.0, 0.0
        (t0, *first), (t1, *last) = self.samples[0], self.samples[-1]
        seconds = max(t1 - t0, 1) / 1e9
        return tuple((b - a) / seconds for a, b in zip(first, last, strict=True))   # type: ignore[return-value]

    @property
    def total(self) -> int:
        return self.event.bytes_orig + self.event.bytes_reply


@dataclass
class Filter:
    """What `/` typed: a port number, a network in CIDR form, or part of an address."""
    text: str = ""

    def __post_init__(self) -> None:
        self.text = self.text.strip()
        self.port = int(self.text) if self.text.isdigit() else None
        try:
            self.network = ipaddress.ip_network(self.text, strict=False) if "/" in self.text else None
        except ValueError:
            self.network = None

    def __bool__(self) -> bool:
        return bool(self.text)

    def matches(self, e: FlowEvent) -> bool:
        if not self.text:
            return True
        o, r = e.orig, e.reply
        if self.port is not None:
            return e.proto in PORT_PROTOS and self.port in (o.sport, o.dport, r.sport, r.dport)
        addresses = (o.src, o.dst, r.src, r.dst)
        if self.network is not None:
            return any(ipaddress.ip_address(a) in self.network for a in addresses
                       if ipaddress.ip_address(a).version == self.network.version)
        return any(self.text in a for a in addresses)


@dataclass
class HostRow:
    host: str
    flows: int = 0
    rates: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    total: int = 0


class FlowTable:
    """The flows seen, fed from the probe's reader thread, read by the screen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flows: dict[int, FlowRow] = {}
        self.records = 0

    def add(self, e: FlowEvent) -> None:
        with self._lock:
            self.records += 1
            row = self._flows.get(e.flow_id)
            if row is None:
                row = self._flows[e.flow_id] = FlowRow(e, e.start_ns or e.ts_ns)
            row.add(e)

    def rows(self, now_ns: int) -> list[FlowRow]:
        """The flows to show; ended and long-idle ones are forgotten."""
        with self._lock:
            for fid in [fid for fid, row in self._flows.items()
                        if (row.ended_ns and now_ns - row.ended_ns > KEEP_ENDED_NS)
                        or now_ns - row.samples[-1][0] > KEEP_IDLE_NS]:
                del self._flows[fid]
            return list(self._flows.values())


def sort_key(sort: str, now_ns: int) -> Callable[[FlowRow], tuple]:
    if sort == "total":
        return lambda row: (-row.total,)
    if sort == "age":
        return lambda row: (row.first_ns,)        # oldest first
    return lambda row: (-sum(row.rates(now_ns)[:2]), -row.total)


def hosts(rows: list[FlowRow], now_ns: int) -> list[HostRow]:
    """Flows added up per remote host (the Prometheus sink's `host`, without port)."""
    out: dict[str, HostRow] = {}
    for row in rows:
        address, _port = remote_endpoint(row.event)
        h = out.setdefault(address, HostRow(address))
        h.flows += 0 if row.ended_ns else 1
        h.total += row.total
        for i, value in enumerate(row.rates(now_ns)):
            h.rates[i] += value
    return list(out.values())


# -- the screen ------------------------------------------------------------------

def human(value: float, unit: str = "") -> str:
    """1234567 -> '1.2M': short enough for 80 columns."""
    for suffix in ("", "k", "M", "G", "T"):
        if abs(value) < 999.5:
            text = f"{value:.0f}" if suffix == "" or value >= 99.5 else f"{value:.1f}"
            return f"{text}{suffix}{unit}"
        value /= 1000
    return f"{value:.0f}P{unit}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def age(seconds: float) -> str:
    """At most four characters: 59s, 59m, 23h, 364d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def flow_text(e: FlowEvent) -> str:
    o = e.orig
    ports = e.proto in PORT_PROTOS
    return (f"{e.proto_name} {endpoint(o.src, o.sport if ports else None)}>"
            f"{endpoint(o.dst, o.dport if ports else None)}")


@dataclass
class View:
    sort: str = "rate"
    filter: Filter = field(default_factory=Filter)
    typing: str | None = None     # the filter being typed after '/', else None
    title: str = "conntracct top"
    status: Callable[[], str] = lambda: ""   # e.g. the probe's state, after the title


def _table(title: str, first: str) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, padding=0,
              pad_edge=False, expand=True, show_edge=False, header_style="bold")
    t.add_column(first, ratio=1, no_wrap=True, overflow="ellipsis")
    for name, width in ((">B/s", 5), ("<B/s", 5), (">p/s", 5), ("<p/s", 5), ("total", 5)):
        t.add_column(name, justify="right", width=width, no_wrap=True)
    return t


def render(table: FlowTable, view: View, height: int, now_ns: int | None = None) -> Group:
    """The whole screen for a terminal `height` lines high."""
    now_ns = now_ns or time.time_ns()
    rows = [r for r in table.rows(now_ns) if view.filter.matches(r.event)]
    rows.sort(key=sort_key(view.sort, now_ns))
    host_rows = hosts(rows, now_ns)
    host_rows.sort(key=(lambda h: -h.total) if view.sort == "total" else (lambda h: (-sum(h.rates[:2]), -h.total)))
    total_rates = [sum(r.rates(now_ns)[i] for r in rows) for i in range(4)]

    # 24 lines: header 2, flows title+head+rule 3 + rows, hosts 3 + rows, footer 1
    host_lines = min(len(host_rows), max(3, (height - 9) // 3))
    flow_lines = max(1, height - 9 - host_lines)
    header = Group(
        Text.assemble((view.title, "bold"), "  ", (view.status(), "yellow"), no_wrap=True, overflow="ellipsis"),
        Text.assemble(f"{plural(len(rows), 'flow')}, {plural(len(host_rows), 'host')}   ", ("> ", "dim"),
                      human(total_rates[0], "B/s"), ("  < ", "dim"), human(total_rates[1], "B/s"),
                      ("   records ", "dim"), str(table.records), no_wrap=True, overflow="ellipsis"))

    flows = _table(f"Flows by {view.sort}" + (f" (filter: {view.filter.text})" if view.filter else ""), "flow")
    flows.add_column("age", justify="right", width=4, no_wrap=True)
    for r in rows[:flow_lines]:
        bo, br, po, pr = r.rates(now_ns)
        style = "dim" if r.ended_ns else None
        flows.add_row(flow_text(r.event), human(bo), human(br), human(po), human(pr), human(r.total),
                      age((now_ns - r.first_ns) / 1e9), style=style)

    remote = _table("Remote hosts", "host")
    remote.add_column("flows", justify="right", width=5, no_wrap=True)
    for h in host_rows[:host_lines]:
        bo, br, po, pr = h.rates
        remote.add_row(h.host, human(bo), human(br), human(po), human(pr), human(h.total), str(h.flows))

    if view.typing is not None:
        footer = Text.assemble(("filter: ", "bold"), view.typing, ("_", "blink"),
                               ("   Enter apply, Esc clear", "dim"))
    else:
        footer = Text("r rate  t total  a age  / filter  q quit    >: sent by the opener  <: sent back",
                      style="dim", no_wrap=True, overflow="ellipsis")
    return Group(header, flows, remote, footer)


# -- keys ------------------------------------------------------------------------

@contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Keys one at a time, no echo; Ctrl-C still sends SIGINT.  Restored on exit."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_keys(fd: int | None, timeout: float) -> str | None:
    """Keys typed within `timeout` ('' if none); None once the input is closed."""
    if fd is None:
        time.sleep(timeout)
        return ""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return ""
    data = os.read(fd, 64)
    return data.decode(errors="replace") if data else None


def handle_key(view: View, key: str) -> bool:
    """Apply one key to the view; False when it asks to quit."""
    if view.typing is not None:
        if key in ("\r", "\n"):
            view.filter, view.typing = Filter(view.typing), None
        elif key == "\x1b":
            view.filter, view.typing = Filter(), None
        elif key in ("\x7f", "\b"):
            view.typing = view.typing[:-1]
        elif key.isprintable():
            view.typing += key
        return True
    if key in ("q", "Q"):
        return False
    if key in SORTS:
        view.sort = SORTS[key]
    elif key == "/":
        view.typing = view.filter.text
    elif key == "\x1b":
        view.filter = Filter()
    return True


def run_screen(table: FlowTable, view: View, stop: threading.Event, console: Console | None = None,
               keys_fd: int | None = None) -> None:
    """Draw every second (and on each key) until q, Ctrl-C or `stop`."""
    console = console or Console()
    fd = sys.stdin.fileno() if keys_fd is None else keys_fd
    with cbreak(fd), Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
        next_draw = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_draw:
                live.update(render(table, view, console.size.height), refresh=True)
                next_draw = now + REFRESH_S
            keys = read_keys(fd, max(0.0, next_draw - time.monotonic()))
            if keys is None:   # no keyboard (stdin closed): Ctrl-C or a signal ends it
                fd = None
                continue
            if not keys:
                continue
            for key in _split_keys(keys):
                if not handle_key(view, key):
                    return
            next_draw = 0.0


def _split_keys(data: str) -> Iterator[str]:
    """Characters, with an escape sequence (arrow keys) taken as one ignored key."""
    i = 0
    while i < len(data):
        if data[i] == "\x1b" and i + 1 < len(data) and data[i + 1] in "[O":
            j = i + 2
            while j < len(data) and not data[j].isalpha() and data[j] != "~":
                j += 1
            i = j + 1
            continue
        yield data[i]
        i += 1


# -- running it ------------------------------------------------------------------

class _Collected(logging.Handler):
    """The agent's log lines while the screen is up; shown after it closes."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def top_config(config: Config, netns: str | None = None) -> Config:
    """The agent's configuration for top: no sinks, one record per second per
    active flow (the rates need it), probe.netns from --netns."""
    config.probe.rate_curve = [RateStep(then=INTERVAL_NS / 1e9)]
    if netns is not None:
        config.probe.netns = netns
    config.sinks = []
    return config


def run_top(config: Config, netns: str | None = None, console: Console | None = None) -> int:
    """Attach, show, detach: the exit status (2 when the probe cannot attach)."""
    from .agent import Agent, EnvironmentProblem

    config = top_config(config, netns)
    table = FlowTable()
    agent = Agent(config, consumer=table.add)
    where = config.probe.netns or "this network namespace"
    view = View(title=f"conntracct top  {where}",
                status=lambda: "attaching the probe..." if agent.source is None else f"{agent.source.mode} mode")
    collected = _Collected()
    collected.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[collected], force=True)

    def screen() -> None:
        try:
            run_screen(table, view, agent.stop, console)
        finally:
            agent.stop.set()   # q: the agent detaches and returns

    ui = threading.Thread(target=screen, name="top-screen", daemon=True)
    ui.start()
    try:
        status = agent.run()
    except EnvironmentProblem as e:
        agent.stop.set()
        ui.join(5)
        print(f"conntracct top: {e}", file=sys.stderr)
        return 2
    finally:
        agent.stop.set()
        ui.join(5)
        for line in collected.lines:
            print(line, file=sys.stderr)
    return status
