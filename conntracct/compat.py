"""conntracct (Go, ti-mo/conntracct) configuration files, accepted as they are.

Their format is recognised and translated into ours before validation:

    conntracct (Go)                      this agent
    sinks: {NAME: {type: ..., ...}}      sinks: [{name: NAME, type: ..., ...}]
      influxdb-udp  address host:port    influxdb-udp  address, payload_size (udpPayloadSize,
                    udpPayloadSize         default 512), schema: conntracct
      influxdb-http address URL,         influxdb      api: v1, url, database,
                    database               schema: conntracct
      elastic       address URL[,URL]    elasticsearch hosts [...], index (database),
                    database               document: conntracct
      stdout / stderr                    stdout / stderr
      dummy                              dummy (counts and discards)
      clickhouse                         (not implemented: warned and left out)
    batchSize / sourcePorts / timeout    batch_size / source_ports / timeout
    username / password                  username / password
    probe.rate_curve {0: {age, rate}..}  probe.rate_curve [{below, every}, ..., {then}]
    sysctl_manage                        sysctl.manage
    api_enabled / api_endpoint           (warned: use a prometheus sink)
    pprof_enabled / pprof_endpoint       (warned: not implemented)

Every translated key remembers where it came from, so a validation error
names the user's own key and line (`sinks.influx.address`, not
`sinks[0].url`).  Keys neither format knows remain errors.  docs/migrating.md
is the user's side of this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Top-level keys only conntracct's format has.
GO_TOP_KEYS = ("api_enabled", "api_endpoint", "sysctl_manage", "pprof_enabled", "pprof_endpoint")
# What stands in for what is not implemented (one warning line each).
INSTEAD = {
    "api_enabled": "conntracct's HTTP stats API is not implemented; the agent's own counters are "
                   "served by a prometheus sink (type: prometheus, listen: 127.0.0.1:9100)",
    "api_endpoint": "conntracct's HTTP stats API is not implemented; give a prometheus sink's `listen` instead",
    "pprof_enabled": "Go's pprof profiler does not apply to this agent; profile it with py-spy if needed",
    "pprof_endpoint": "Go's pprof profiler does not apply to this agent; profile it with py-spy if needed",
    "clickhouse": "the ClickHouse sink is not implemented; this sink is left out "
                  "(keep flows with an elasticsearch or influxdb sink)",
    "latestValues": "conntracct's ClickHouse-only option; ignored",
}
# Keys of conntracct's SinkConfig (internal/config/sink.go) -> ours.
GO_SINK_KEYS = {"type": "type", "batchSize": "batch_size", "udpPayloadSize": "payload_size",
                "sourcePorts": "source_ports", "address": None, "username": "username",
                "password": "password", "database": None, "shards": None, "replicas": None,
                "timeout": "timeout", "latestValues": None}
# Which of those each type uses (the rest are ignored by conntracct too: warned).
TYPE_KEYS = {
    "influxdb-udp": {"address", "batchSize", "udpPayloadSize", "sourcePorts"},
    "influxdb-http": {"address", "database", "batchSize", "sourcePorts", "username", "password", "timeout"},
    "elastic": {"address", "database", "batchSize", "username", "password", "shards", "replicas",
                "timeout"},
    "stdout": {"batchSize"}, "stderr": {"batchSize"}, "dummy": {"batchSize"},
}
TYPE_ALIASES = {"elasticsearch": "elastic"}
UDP_PAYLOAD_DEFAULT = 512     # conntracct's default (udpPayloadSize)
ES_INDEX_DEFAULT = "conntracct"


@dataclass
class Translation:
    data: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    # (our key path prefix, the user's key path): error locations mapped back
    paths: list[tuple[tuple, tuple]] = field(default_factory=list)

    def original(self, loc: tuple) -> tuple:
        """The user's key path for an error at `loc` in the translated data."""
        best: tuple[tuple, tuple] | None = None
        for ours, theirs in self.paths:
            if loc[:len(ours)] == ours and (best is None or len(ours) > len(best[0])):
                best = (ours, theirs)
        if best is None:
            return loc
        return best[1] + loc[len(best[0]):]


def is_conntracct_format(data: dict[str, Any]) -> bool:
    probe = data.get("probe")
    return (isinstance(data.get("sinks"), dict) or any(key in data for key in GO_TOP_KEYS)
            or (isinstance(probe, dict) and isinstance(probe.get("rate_curve"), dict)))


def translate(data: dict[str, Any]) -> Translation:
    """conntracct's format -> ours (keys of ours present in the file pass
    through, so a file may mix both)."""
    out = Translation({})
    for key, value in data.items():
        if key in ("api_enabled", "api_endpoint", "pprof_enabled", "pprof_endpoint"):
            out.warnings.append(f"{key}: ignored: {INSTEAD[key]}")
        elif key == "sysctl_manage":
            sysctl = out.data.setdefault("sysctl", {})
            if isinstance(sysctl, dict):
                sysctl["manage"] = value
            out.paths.append((("sysctl", "manage"), ("sysctl_manage",)))
        elif key == "sysctl" and isinstance(value, dict) and isinstance(out.data.get("sysctl"), dict):
            out.data["sysctl"] = {**value, **out.data["sysctl"]}
        elif key == "sinks" and isinstance(value, dict):
            out.data["sinks"] = _sinks(value, out)
        elif key == "probe" and isinstance(value, dict) and isinstance(value.get("rate_curve"), dict):
            out.data["probe"] = {**value, "rate_curve": _curve(value["rate_curve"], out)}
        else:
            out.data[key] = value
    return out


# -- probe.rate_curve ----------------------------------------------------------

def _curve(points: dict[Any, Any], out: Translation) -> Any:
    """{N: {age, rate}} -> [{below: next age, every: rate}, ..., {then: last rate}].

    conntracct: a flow at least `age` old sends an update every `rate`; the
    points apply in the order of their keys (0, 1, 2)."""
    try:
        keys = sorted(points, key=lambda k: int(k))
    except (TypeError, ValueError):
        return points       # not numbered: let validation name it
    if not keys or not all(isinstance(points[k], dict) for k in keys):
        return points
    steps: list[dict[str, Any]] = []
    base = ("probe", "rate_curve")
    for i, key in enumerate(keys):
        point = points[key]
        key = str(key)      # YAML reads `0:` as a number; the path shows it as the file does
        extra = sorted(set(point) - {"age", "rate"})
        if extra:
            # conntracct's points have only age and rate: keep the error on the user's key
            steps.append({"below": point.get("rate"), "every": point.get("rate"), extra[0]: point[extra[0]]})
            out.paths.append(((*base, i), (*base, key)))
            continue
        if i + 1 < len(keys):
            nxt = points[keys[i + 1]]
            steps.append({"below": nxt.get("age"), "every": point.get("rate")})
            out.paths += [((*base, i, "below"), (*base, str(keys[i + 1]), "age")),
                          ((*base, i, "every"), (*base, key, "rate")), ((*base, i), (*base, key))]
        else:
            steps.append({"then": point.get("rate")})
            out.paths += [((*base, i, "then"), (*base, key, "rate")), ((*base, i), (*base, key))]
    return steps


# -- sinks -----------------------------------------------------------------------

def _sinks(sinks: dict[str, Any], out: Translation) -> list[Any]:
    result: list[Any] = []
    for name, params in sinks.items():
        where = ("sinks", name)
        if not isinstance(params, dict):
            out.paths.append((("sinks", len(result)), where))
            result.append(params)     # validation says "expected a mapping"
            continue
        go_type = TYPE_ALIASES.get(params.get("type"), params.get("type"))
        if go_type == "clickhouse":
            out.warnings.append(f"sinks.{name}: type clickhouse: {INSTEAD['clickhouse']}")
            continue
        out.paths.append((("sinks", len(result)), where))
        result.append(_sink(str(name), go_type, params, (len(result),), out))
    return result


def _sink(name: str, go_type: Any, params: dict[str, Any], index: tuple, out: Translation) -> dict[str, Any]:
    ours: dict[str, Any] = {"name": name}
    here, theirs = ("sinks", *index), ("sinks", name)
    used = TYPE_KEYS.get(go_type)
    for key, value in params.items():
        if key in GO_SINK_KEYS:
            if key == "latestValues" or (used is not None and key != "type" and key not in used):
                why = INSTEAD["latestValues"] if key == "latestValues" else f"not used by type {go_type}"
                out.warnings.append(f"sinks.{name}.{key}: ignored: {why} (as conntracct does)")
                continue
            target = GO_SINK_KEYS[key]
            if target is not None:
                ours[target] = value
                out.paths.append(((*here, target), (*theirs, key)))
        else:
            ours[key] = value     # ours, or unknown: validation decides and names it
    kind = {"influxdb-udp": _influx_udp, "influxdb-http": _influx_http, "elastic": _elastic}.get(go_type)
    if kind is not None:
        kind(name, params, ours, here, theirs, out)
    elif go_type in ("stdout", "stderr", "dummy"):
        ours.pop("source_ports", None)   # the text line always has ports
    return ours


def _influx_udp(name: str, params: dict, ours: dict, here: tuple, theirs: tuple, out: Translation) -> None:
    ours["type"] = "influxdb-udp"
    ours["schema"] = "conntracct"
    if "address" in params:
        ours["address"] = params["address"]
        out.paths.append(((*here, "address"), (*theirs, "address")))
    ours.setdefault("payload_size", UDP_PAYLOAD_DEFAULT)


def _influx_http(name: str, params: dict, ours: dict, here: tuple, theirs: tuple, out: Translation) -> None:
    ours.update(type="influxdb", api="v1", schema="conntracct")
    if "address" in params:
        ours["url"] = params["address"]
        out.paths.append(((*here, "url"), (*theirs, "address")))
    if "database" in params:
        ours["database"] = params["database"]
        out.paths.append(((*here, "database"), (*theirs, "database")))


def _elastic(name: str, params: dict, ours: dict, here: tuple, theirs: tuple, out: Translation) -> None:
    ours.update(type="elasticsearch", document="conntracct")
    ours.pop("source_ports", None)
    address = params.get("address", "http://localhost:9200")   # conntracct's default
    hosts = [a.strip() for a in address.split(",")] if isinstance(address, str) else address
    ours["hosts"] = hosts
    out.paths.append(((*here, "hosts"), (*theirs, "address")))
    ours["index"] = params.get("database", ES_INDEX_DEFAULT)
    out.paths.append(((*here, "index"), (*theirs, "database")))
    for key in ("shards", "replicas"):
        if key in params:
            out.warnings.append(f"sinks.{name}.{key}: ignored: the agent's index template leaves "
                                f"number_of_{key} to the cluster's defaults")


# -- conntracct config convert -------------------------------------------------

def convert(text: str, source: str) -> tuple[str, list[str]]:
    """A configuration file's text -> (the same configuration in this agent's
    own format, as YAML, and the warnings).  Validated first: a file that
    would not load is not converted (ConfigError)."""
    import yaml

    from .config import parse_config, read_yaml  # config imports this module

    config = parse_config(text, source)
    data, _ = read_yaml(text, source)
    ours = translate(data).data if is_conntracct_format(data) else data
    header = [f"# {source}, in conntracct (Python)'s own format (conntracct config convert)"]
    header += [f"# left out: {warning}" for warning in config.warnings]
    body = yaml.safe_dump(ours, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body, config.warnings
