"""What Grafana does to a panel's query before sending it, for the dashboard
tests: template variables in their formatted forms and the time macros.

Reference: Grafana's templateSrv (variables; a custom allValue is inserted
unformatted), the InfluxDB data source's interpolateQueryExpr (multi-value
or include-all variables are regex-escaped, several values become (a|b)),
the Prometheus data source's regex escaping, pkg/tsdb/influxdb (raw InfluxQL:
$timeFilter is `time >= <from>ms and time <= <to>ms`, $__interval the
interval text, $__interval_ms its milliseconds), the Prometheus data source
($__rate_interval = max($__interval + scrape interval, 4 x scrape interval);
$__range is whole seconds with "s"), and gtime's roundInterval.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

ALL = "$__all"

# roundInterval (Grafana's gtime / rangeutil): (upper bound ms, interval ms)
_ROUND = [(10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
          (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000),
          (90000, 60000), (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000),
          (1500000, 1200000), (2700000, 1800000), (5400000, 3600000), (9000000, 7200000),
          (16200000, 10800000), (24300000, 21600000), (64800000, 43200000), (604800000, 86400000),
          (1814400000, 604800000), (3628800000, 2592000000)]
_UNITS = [("y", 31536000000), ("w", 604800000), ("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000),
          ("ms", 1)]


def round_interval(ms: float) -> int:
    for bound, interval in _ROUND:
        if ms <= bound:
            return interval
    return 31536000000


def parse_duration_ms(text: str) -> int:
    m = re.fullmatch(r"[<>=]*(\d+)(ms|s|m|h|d|w|y)", text.strip())
    if not m:
        raise ValueError(f"not a Grafana interval: {text!r}")
    return int(m.group(1)) * dict(_UNITS)[m.group(2)]


def format_duration(ms: int) -> str:
    """Grafana's interval text: the largest unit that divides evenly."""
    for unit, size in _UNITS:
        if ms % size == 0 and ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def escape_influx(value: str) -> str:
    """Grafana's escapeRegex: regex specials and / get a backslash."""
    return re.sub(r"[\\^$*+?.()|{}\[\]/]", lambda m: "\\" + m.group(0), value)


def escape_prometheus(value: str) -> str:
    """prometheusSpecialRegexEscape: inside a PromQL string a regex escape needs two backslashes."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


@dataclass
class Variable:
    name: str
    multi: bool
    include_all: bool
    all_value: str | None
    options: list[str] = field(default_factory=list)   # what the variable's own query returned

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> Variable:
        return cls(v["name"], bool(v.get("multi")), bool(v.get("includeAll")), v.get("allValue"))


@dataclass
class TimeRange:
    from_ms: int
    to_ms: int

    @property
    def seconds(self) -> float:
        return (self.to_ms - self.from_ms) / 1000


class Interpolator:
    """Grafana's interpolation for one data source type ('influxdb' or 'prometheus')."""

    def __init__(self, kind: str, variables: list[Variable], time_range: TimeRange,
                 max_data_points: int = 1000, scrape_interval_ms: int = 15000):
        self.kind = kind
        self.variables = {v.name: v for v in variables}
        self.range = time_range
        self.max_data_points = max_data_points
        self.scrape_ms = scrape_interval_ms   # the Prometheus data source's "scrape interval"

    def interval_ms(self, panel_min_interval: str | None) -> int:
        ms = round_interval((self.range.to_ms - self.range.from_ms) / self.max_data_points)
        floor = parse_duration_ms(panel_min_interval) if panel_min_interval else 0
        if self.kind == "prometheus":
            floor = max(floor, self.scrape_ms)
        return max(ms, floor)

    def _format(self, var: Variable, selection: list[str] | str) -> str:
        if selection == ALL:
            if var.all_value is not None:
                return var.all_value          # a custom allValue is inserted unformatted
            selection = var.options
        values = [selection] if isinstance(selection, str) else list(selection)
        if not var.multi and not var.include_all:
            return values[0] if values else ""
        escape = escape_influx if self.kind == "influxdb" else escape_prometheus
        escaped = [escape(v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    def variables_replaced(self, text: str, selections: dict[str, list[str] | str]) -> str:
        def sub(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2) or m.group(3)
            var = self.variables.get(name)
            if var is None:
                return m.group(0)   # a macro or an alias pattern ($tag_x, $col)
            return self._format(var, selections.get(name, ALL))
        return re.sub(r"\$(\w+)|\$\{(\w+)\}|\[\[(\w+)\]\]", sub, text)

    def macros(self, interval_ms: int) -> dict[str, str]:
        r = self.range
        rate_ms = max(interval_ms + self.scrape_ms, 4 * self.scrape_ms)
        range_s = math.floor(r.seconds)
        return {
            "timeFilter": f"time >= {r.from_ms}ms and time <= {r.to_ms}ms",
            "__interval_ms": str(interval_ms),
            "__interval": format_duration(interval_ms),
            "interval": format_duration(interval_ms),
            "__rate_interval_ms": str(rate_ms),
            "__rate_interval": format_duration(rate_ms),
            "__range_ms": str(r.to_ms - r.from_ms),
            "__range_s": str(range_s),
            "__range": f"{range_s}s",
        }

    def query(self, text: str, panel_min_interval: str | None,
              selections: dict[str, list[str] | str]) -> tuple[str, int]:
        """(the query as sent, the interval in ms)."""
        interval = self.interval_ms(panel_min_interval)
        text = self.variables_replaced(text, selections)
        macros = self.macros(interval)
        text = re.sub(r"\$(\w+)", lambda m: macros.get(m.group(1), m.group(0)), text)
        leftover = re.findall(r"\$(?!tag_|col\b)\w+", text)
        if leftover:
            raise AssertionError(f"not substituted: {leftover} in {text}")
        return text, interval
