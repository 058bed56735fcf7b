"""Value types every config model shares: durations, sizes, networks, secrets,
the strict model base, and the error a bad configuration raises.

Kept apart from conntracct.config so sink modules can import these without
importing the sink registry that config.py itself needs (no import cycle).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is meant for humans as is.

    A ValueError so that raising it inside a pydantic validator still reports
    the key path it happened at."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, with a hint."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # extra="forbid" alone says only "Extra inputs are not permitted";
        # users need the allowed keys and the likely typo.
        if not isinstance(data, dict):
            return data
        # A field's key in the file is its alias where it has one (`from`, a keyword).
        keys = {field.alias or name for name, field in cls.model_fields.items()}
        allowed = sorted(keys)
        unknown = []
        for key, value in data.items():
            if key in keys:
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            unknown.append(((key,), f"unknown key{hint}; expected one of: {', '.join(allowed)}", value))
        if unknown:
            raise config_errors(unknown)
        return data


NO_VALUE = object()   # for config_errors(): the error is about no single value


class Verbatim(str):
    """A value errors show as is, not repr()'d: '30s' for a parsed duration."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def seconds_text(seconds: float) -> Verbatim:
    return Verbatim(f"{seconds:g}s")


def config_errors(errors: list[tuple[tuple[str | int, ...], str, Any]]) -> ValidationError:
    """A ValidationError of (key path, message, bad value) triples.

    Raised inside a validator, pydantic prefixes each path with the location
    being validated, so the final error names the full key path."""
    return ValidationError.from_exception_data("config", [
        # The message goes in as context: literal braces in it stay literal.
        InitErrorDetails(type=PydanticCustomError("config", "{message}", {"message": message}),
                         loc=loc, input=value)
        for loc, message, value in errors])


# -- durations ---------------------------------------------------------------

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h|d)")
DURATION_HINT = "a duration such as 500ms, 20s, 5m, 1h, 1m30s or a number of seconds"


def parse_duration(value: Any) -> float:
    """'20s', '5m', '1h', '500ms', '1m30s' or a number of seconds -> seconds."""
    if isinstance(value, bool):       # bool is an int: `true` is no duration
        raise PydanticCustomError("duration", "expected " + DURATION_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _parse_duration_text(text)
    else:
        raise PydanticCustomError("duration", "expected " + DURATION_HINT)
    if seconds < 0:
        raise PydanticCustomError("duration", "expected a duration that is not negative")
    if not seconds < float("inf"):     # inf, NaN
        raise PydanticCustomError("duration", "expected a finite duration")
    return seconds


def _parse_duration_text(text: str) -> float:
    if text.startswith("-"):     # parsed, so the error can say "negative"
        return -_parse_duration_text(text[1:].lstrip())
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise PydanticCustomError("duration", "expected " + DURATION_HINT)
    return total


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise PydanticCustomError("duration", "expected a duration greater than zero")
    return seconds


# Durations are held as float seconds (what threading/time want); use
# seconds_to_ns() where the probe wants integers.
Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]


def seconds_to_ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


# -- byte sizes --------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
SIZE_HINT = "a size in bytes such as 65536, 64KiB, 64MiB or 1GB"


def parse_size(value: Any) -> int:
    """Bytes from an int or '64MiB' / '64M' (binary) / '64MB' (decimal) / '512B'."""
    if isinstance(value, bool):
        raise PydanticCustomError("byte_size", "expected " + SIZE_HINT)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            number, prefix, binary, unit_b = match.groups()
            # "64M" and "64MiB" are binary, "64MB" decimal: what iproute2 and
            # most sysctl docs mean by each.
            base = 1000 if unit_b and not binary and prefix else 1024
            if binary and not prefix:
                raise PydanticCustomError("byte_size", "expected " + SIZE_HINT)
            return int(float(number) * base ** _SIZE_POWERS[prefix.lower()])
    raise PydanticCustomError("byte_size", "expected " + SIZE_HINT)


ByteSize = Annotated[int, BeforeValidator(parse_size)]


# -- networks ----------------------------------------------------------------

def parse_network(value: Any) -> IPNetwork:
    """'10.0.0.0/8', '2001:db8::/32' or a bare address (a /32 or /128).

    Host bits are tolerated ('10.1.2.3/8' means 10.0.0.0/8): the intent is clear."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            pass
    raise PydanticCustomError("network", "expected a CIDR such as 10.0.0.0/8, 2001:db8::/32 or an address")


Network = Annotated[IPNetwork, BeforeValidator(parse_network)]


# -- secrets -----------------------------------------------------------------

def resolve_secret(value: str | None, env_name: str | None, key: str) -> str | None:
    """A secret given inline (`token: ...`) or by environment variable
    (`token_env: NAME`), so config files can be shared without credentials.

    `key` is the dotted key path users see in the error, e.g. 'sinks[1].token';
    giving both forms is ambiguous, so it is an error too."""
    if value is not None and env_name is not None:
        name = key.rsplit(".", 1)[-1]
        raise ConfigError(f"{key}: give either {name} or {name}_env, not both")
    if env_name is None:
        return value
    secret = os.environ.get(env_name)
    if secret is None:
        raise ConfigError(f"{key}_env: environment variable {env_name!r} is not set")
    return secret
