"""The agent's YAML configuration: models for every key, loading, and errors
that name the file, line, key path, bad value and what was expected.

Sink-specific keys are validated by each sink's own model, found through the
sink registry (conntracct.sinks.SINKS) by the item's `type`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from . import compat
from .configtypes import (
    NO_VALUE,
    ByteSize,
    ConfigError,
    Duration,
    PositiveDuration,
    StrictModel,
    config_errors,
    resolve_secret,
    seconds_text,
    seconds_to_ns,
)
from .enrichconfig import EnrichConfig
from .sinks import SINKS
from .sinks.base import SinkConfig

__all__ = ["Config", "ConfigError", "EnrichConfig", "ProbeConfig", "RateStep", "ShutdownConfig",
           "SinkConfig", "SysctlConfig", "default_config", "load_config", "parse_config",
           "resolve_secret", "search_path"]

SYSTEM_CONFIG = Path("/etc/conntracct/conntracct.yml")
USER_CONFIG = Path(".config/conntracct.yml")     # under $HOME
DEFAULT_YAML = """\
sinks:
  - type: stdout
    format: text
"""

# -- probe -------------------------------------------------------------------

_STEP_SHAPE = "expected {below: <duration>, every: <duration>} or, as the last item, {then: <duration>}"


class RateStep(StrictModel):
    """One step of the rate curve: flows younger than `below` update every
    `every`; the last item holds only `then`, the interval for older flows."""

    below: PositiveDuration | None = None
    every: PositiveDuration | None = None
    then: PositiveDuration | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> RateStep:
        is_step = self.below is not None and self.every is not None and self.then is None
        is_final = self.then is not None and self.below is None and self.every is None
        if not (is_step or is_final):
            raise ValueError(_STEP_SHAPE)
        return self


def _default_rate_curve() -> list[RateStep]:
    return [RateStep(below=60, every=20), RateStep(below=300, every=60), RateStep(then=300)]


def _check_rate_curve(steps: list[RateStep]) -> list[RateStep]:
    errors = []
    if not steps or steps[-1].then is None:
        errors.append(((), "expected the last item to be {then: <duration>}", NO_VALUE))
    for i, step in enumerate(steps[:-1]):
        if step.then is not None:
            errors.append(((i, "then"), "only the last item may hold `then`", step.then))
    if errors:
        raise config_errors(errors)
    # Strictly older ages, never-shorter intervals: a curve that speeds up
    # with age would contradict "old flows report less often".
    for i in range(1, len(steps)):
        prev, cur = steps[i - 1], steps[i]
        if cur.below is not None and cur.below <= prev.below:
            errors.append(((i, "below"), f"expected an age above the previous step's {prev.below:g}s"
                                         " (ages must increase)", seconds_text(cur.below)))
        interval, key = (cur.every, "every") if cur.then is None else (cur.then, "then")
        if interval < prev.every:
            errors.append(((i, key), f"expected an interval of at least the previous {prev.every:g}s"
                                     " (intervals must not shrink)", seconds_text(interval)))
    if errors:
        raise config_errors(errors)
    return steps


def _existing_path(value: str | None) -> str | None:
    if value is not None and not os.path.exists(value):
        raise ValueError("expected an existing network namespace file such as /var/run/netns/NAME")
    return value


def _power_of_two(value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError("expected a power of two such as 64, 128 or 256")
    return value


# The probe's attach modes, in `auto`'s order of preference: the one list of
# their names (the probe loader, mode detection and the CLI take it from here).
ATTACH_MODES = ("fentry", "kprobe", "netfilter")
PROBE_MODES = ("auto", *ATTACH_MODES)


class ProbeConfig(StrictModel):
    mode: Literal[PROBE_MODES] = "auto"   # type: ignore[valid-type]
    rate_curve: Annotated[list[RateStep], Field(default_factory=_default_rate_curve)]
    max_flows: int = Field(262144, ge=1024)
    # 8 MiB (~40,000 records): a burst of 100k new flows in 4 s loses nothing
    # with half of it (bench P4 with ringbuf_pages=1024; 256 lost 23%), and
    # every page of it is in the agent's RSS.
    ringbuf_pages: Annotated[int, Field(ge=1)] = 2048
    netlink_rcvbuf: Annotated[ByteSize, Field(ge=65536)] = 64 * 1024 * 1024
    # netfilter mode: how often to look for the end of flows conntrack sends
    # no DESTROY event for (they predate any event listener).
    sweep_interval: PositiveDuration = 30.0
    # The network namespace to account (a path such as /var/run/netns/NAME or
    # /proc/PID/ns/net); default: the agent's own.  Sinks stay in the agent's.
    netns: Annotated[str | None, AfterValidator(_existing_path)] = None
    # Where the compiled probe is kept for the next start on the same kernel
    # (no BCC compile then: bench P5); "" compiles at every start.
    cache_dir: str = "/var/cache/conntracct"

    _check_curve = field_validator("rate_curve")(_check_rate_curve)
    _check_pages = field_validator("ringbuf_pages")(_power_of_two)

    def rate_curve_ns(self) -> tuple[list[tuple[int, int]], int]:
        """([(age_ns, interval_ns), ...], final_interval_ns) for the probe:
        a flow younger than age_ns updates at most every interval_ns."""
        *steps, final = self.rate_curve
        return ([(seconds_to_ns(s.below), seconds_to_ns(s.every)) for s in steps],
                seconds_to_ns(final.then))


# -- the other sections ------------------------------------------------------

class SysctlConfig(StrictModel):
    manage: bool = True     # turn on nf_conntrack_acct / nf_conntrack_timestamp
    restore: bool = False   # put the previous values back on exit

    @model_validator(mode="after")
    def _restore_needs_manage(self) -> SysctlConfig:
        if self.restore and not self.manage:
            raise config_errors([(("restore",), "expected false: restoring needs sysctl.manage: true", True)])
        return self


class ConntrackConfig(StrictModel):
    # Add the agent's own nftables table `inet conntracct` (one accept-only
    # `ct state` rule in a chain hooked nowhere) so that conntrack tracks IPv4
    # and IPv6 in the accounted namespace even when no rule there uses it;
    # removed on exit (conntracct/nftable.py).  Off: the agent only warns.
    ensure_tracking: bool = False


# enrich: conntracct.enrichconfig (ignore rules, labels, range labels)


class ShutdownConfig(StrictModel):
    drain_timeout: Duration = 5.0


# -- sinks -------------------------------------------------------------------

def _known_types() -> str:
    return ", ".join(sorted(SINKS))


def parse_sink(value: Any) -> SinkConfig:
    """One `sinks` item -> the config model of the sink its `type` names."""
    if isinstance(value, SinkConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError("expected a mapping with a `type` key, e.g. {type: stdout}")
    sink_type = value.get("type")
    sink_class = SINKS.get(sink_type) if isinstance(sink_type, str) else None
    if sink_class is None:
        which = f"sink {value['name']!r}" if isinstance(value.get("name"), str) else "this sink"
        if "type" not in value:
            problem, got = "has no `type`", NO_VALUE
        else:
            problem, got = f"has unknown type {sink_type!r}", sink_type
        raise config_errors([(("type",), f"{which} {problem}; known types: {_known_types()}", got)])
    return sink_class.Config.model_validate({"kinds": sorted(sink_class.default_kinds), **value})


def _default_sinks() -> list[SinkConfig]:
    return [parse_sink({"type": "stdout"})]


def _check_sinks(sinks: list[SinkConfig]) -> list[SinkConfig]:
    if not sinks:
        raise ValueError("expected at least one sink")
    first: dict[str, int] = {}
    errors = []
    for i, sink in enumerate(sinks):
        if sink.name in first:
            errors.append(((i, "name"), f"duplicate sink name {sink.name!r} (also sinks[{first[sink.name]}]); "
                                        "give each sink its own `name` (it defaults to the type)", sink.name))
        first.setdefault(sink.name, i)
    errors += _shared_spools(sinks)
    if errors:
        raise config_errors(errors)
    return sinks


def _shared_spools(sinks: list[SinkConfig]) -> list:
    """A spool directory belongs to one sink (its file is locked by it)."""
    owner: dict[str, int] = {}
    errors = []
    for i, sink in enumerate(sinks):
        if sink.spool is None:
            continue
        path = os.path.realpath(sink.spool.path)
        if path in owner:
            errors.append(((i, "spool", "path"), f"also the spool of sinks[{owner[path]}]; "
                                                 "give each sink its own spool directory", sink.spool.path))
        owner.setdefault(path, i)
    return errors


# -- the whole file ----------------------------------------------------------

class Config(StrictModel):
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    sysctl: SysctlConfig = Field(default_factory=SysctlConfig)
    conntrack: ConntrackConfig = Field(default_factory=ConntrackConfig)
    # SerializeAsAny: dump each sink with its own model's keys.
    sinks: Annotated[list[Annotated[SerializeAsAny[SinkConfig], PlainValidator(parse_sink)]],
                     Field(default_factory=_default_sinks)]
    enrich: EnrichConfig = Field(default_factory=EnrichConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    log_level: Annotated[Literal["debug", "info", "warning", "error"],
                         BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = "info"

    _source: str = PrivateAttr("<built-in default>")
    _warnings: list[str] = PrivateAttr(default_factory=list)
    _check_sinks = field_validator("sinks")(_check_sinks)

    @property
    def source(self) -> str:
        """Where the configuration came from: a path or '<built-in default>'."""
        return self._source

    @property
    def warnings(self) -> list[str]:
        """What loading the file left out, one line each (conntracct.compat)."""
        return self._warnings


# -- loading -----------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: PyYAML silently keeps the last
    one, which hides mistakes like two `sinks:` sections."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _line_of(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """Line number (1-based) of the deepest YAML node on a key path."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)
                          and k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _key_path(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


_MESSAGES = {
    "missing": "required key is missing",
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list", "set_type": "expected a list",
    "frozen_set_type": "expected a list",
    "dict_type": "expected a mapping", "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}
_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _expected(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"expected a number {op} {error['ctx'][key]}"
    message = _MESSAGES.get(kind, error["msg"])
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
    return message


def _got(error: dict[str, Any]) -> str:
    """' (got <value>)', or '' where no single value is at fault."""
    value = error["input"]
    if error["type"] == "missing" or value is NO_VALUE:
        return ""
    if isinstance(value, dict | list) and not error["type"].endswith("_type"):
        return ""    # a check across keys: the message names the values
    return f" (got {_shown(value)})"


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]   # as YAML spells them
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(exc: ValidationError, source: str, root: yaml.Node | None,
              original: Callable[[tuple], tuple] | None = None) -> str:
    """Error lines; `original` maps a translated key path back to the file's."""
    errors = exc.errors(include_url=False)
    locs = [original(tuple(error["loc"])) if original else error["loc"] for error in errors]
    located = [(_line_of(root, loc), loc, error) for loc, error in zip(locs, errors, strict=True)]
    located.sort(key=lambda item: item[0] or 0)   # in file order, as the user reads it
    return "\n".join(f"{source}{f':{line}' if line else ''}: "
                     f"{_key_path(loc)}: {_expected(error)}{_got(error)}"
                     for line, loc, error in located)


def read_yaml(text: str, source: str = "<string>") -> tuple[dict[str, Any], yaml.Node | None]:
    """The top-level mapping of YAML text and its node tree (for error lines)."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: YAML error: {exc}") from None
    finally:
        loader.dispose()
    if data is None:     # an empty file: every default
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top (got {_shown(data)})")
    return data, root


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate YAML text; `source` names it in errors.  A conntracct (Go)
    file is translated first (conntracct.compat); its warnings are kept in
    Config.warnings and errors name the file's own keys."""
    data, root = read_yaml(text, source)
    translation = compat.translate(data) if compat.is_conntracct_format(data) else None
    try:
        config = Config.model_validate(translation.data if translation else data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, root, translation.original if translation else None)) from None
    config._source = source
    config._warnings = translation.warnings if translation else []
    return config


def default_config() -> Config:
    """What the agent runs with when no file exists: one stdout sink, text lines."""
    config = parse_config(DEFAULT_YAML)
    config._source = "<built-in default>"
    return config


def search_path() -> list[Path]:
    """Where load_config() looks, in order, when no path is given."""
    home = os.environ.get("HOME")
    return ([Path(home) / USER_CONFIG] if home else []) + [SYSTEM_CONFIG]


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The configuration from `path`, else the first file of search_path(),
    else the built-in default.  Raises ConfigError with a readable message."""
    if path is None:
        path = next((p for p in search_path() if p.exists()), None)
        if path is None:
            return default_config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    return parse_config(text, str(path))
