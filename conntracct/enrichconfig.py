"""The `enrich:` section: ignore rules, global labels and range labels.

    enrich:
      ignore:
        - 10.0.0.0/8                          # either endpoint in the network
        - udp/53 to 198.51.100.0/24           # a rule as text ...
        - tcp 1-1023 from 2001:db8::/32
        - {protocol: both, ports: [53, 5353], to: 198.51.100.0/24}   # ... or as a mapping
      labels: {site: fra1}
      ranges:                                 # labels per address range (promacct's -r)
        - {range: 192.0.2.10-192.0.2.20, labels: {customer: acme, env: prod}}
        - {range: 2001:db8:1::/48, labels: {customer: beta}}
      range_endpoint: remote                  # remote | source | destination | either

Ignore rules look at the original direction: `from` the original source,
`to` the original destination, `ports` its destination port (the service),
`source_ports` its source port, `net` either endpoint.  Every part a rule
names must match; a rule naming ports only matches protocols with ports.
Docs: docs/migrating.md (the Datadog ConnectionFilter mapping) and README.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .configtypes import IPNetwork, Network, StrictModel, config_errors, parse_network
from .flow import IPPROTO_NAMES

RESERVED_LABELS = frozenset({"direction"})   # set by the enricher itself
PROTO_NUMBERS = {name: number for number, name in IPPROTO_NAMES.items()}
# Datadog's ConnectionFilter says TCP, UDP or both.
PROTO_GROUPS = {"both": (6, 17), "any": ()}

IGNORE_HINT = ("expected a CIDR such as 10.0.0.0/8 or a rule such as 'udp/53 to 198.51.100.0/24', "
               "'tcp 1-1023 from 2001:db8::/32' or {protocol: tcp, ports: [22], from: <CIDR>}")


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    errors = [((key,), "label names must not be empty" if not key
               else f"label {key!r} is set by the agent", key)
              for key in labels if not key or key in RESERVED_LABELS]
    if errors:
        raise config_errors(errors)
    return labels


# -- ports and protocols -------------------------------------------------------

PortRange = tuple[int, int]


def parse_ports(value: Any) -> tuple[PortRange, ...] | None:
    """53, '53', '1-1023', '22,80', or a list of those -> ((low, high), ...)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    ranges = []
    for item in items:
        for part in (item.split(",") if isinstance(item, str) else [item]):
            ranges.append(_port_range(part))
    if not ranges:
        raise PydanticCustomError("ports", "expected at least one port")
    return tuple(ranges)


def _port_range(part: Any) -> PortRange:
    hint = "expected ports such as 53, 1-1023 or [22, 8000-8100] (1 to 65535)"
    if isinstance(part, bool):
        raise PydanticCustomError("ports", hint)
    if isinstance(part, int):
        low = high = part
    elif isinstance(part, str):
        low_text, _, high_text = part.strip().partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if high_text else low
        except ValueError:
            raise PydanticCustomError("ports", hint) from None
    else:
        raise PydanticCustomError("ports", hint)
    if not 0 <= low <= high <= 65535:
        raise PydanticCustomError("ports", hint)
    return low, high


def parse_protocols(value: Any) -> tuple[int, ...]:
    """'tcp', 'both' (tcp and udp), 'any', a number, or a list -> protocol
    numbers; () means any."""
    if isinstance(value, tuple):   # the default, already parsed
        return value
    items = value if isinstance(value, list) else [value]
    numbers: list[int] = []
    for item in items:
        name = item.strip().lower() if isinstance(item, str) else item
        if name in PROTO_GROUPS:
            if not PROTO_GROUPS[name]:
                return ()
            numbers += PROTO_GROUPS[name]
        elif name in PROTO_NUMBERS:
            numbers.append(PROTO_NUMBERS[name])
        elif isinstance(name, int) and not isinstance(name, bool) and 0 <= name <= 255:
            numbers.append(name)
        elif isinstance(name, str) and name.isdigit() and int(name) <= 255:
            numbers.append(int(name))
        else:
            raise PydanticCustomError("protocol", "expected a protocol: {names}, both, any or a number",
                                      {"names": ", ".join(PROTO_NUMBERS)})
    return tuple(dict.fromkeys(numbers))


# -- ignore rules --------------------------------------------------------------

class IgnoreRule(StrictModel):
    """One ignore rule beyond a plain CIDR (module docstring)."""

    protocol: Annotated[tuple[int, ...], BeforeValidator(parse_protocols)] = ()
    ports: Annotated[tuple[PortRange, ...] | None, BeforeValidator(parse_ports)] = None
    source_ports: Annotated[tuple[PortRange, ...] | None, BeforeValidator(parse_ports)] = None
    net: Network | None = None
    from_: Annotated[Network | None, Field(alias="from")] = None
    to: Network | None = None
    _text: str | None = PrivateAttr(None)   # the rule as written, for messages

    @model_validator(mode="after")
    def _names_something(self) -> IgnoreRule:
        if not (self.protocol or self.ports or self.source_ports or self.net or self.from_ or self.to):
            raise ValueError("expected a rule naming a protocol, ports or a network (this one matches "
                             "every flow)")
        return self

    def __str__(self) -> str:
        return self._text or self.describe()

    def describe(self) -> str:
        """The rule in the text form the ignore list accepts."""
        parts = []
        protos = ",".join(IPPROTO_NAMES.get(p, str(p)) for p in self.protocol)
        ports = _ports_text(self.ports)
        if protos and ports:
            parts.append(f"{protos}/{ports}")
        elif protos or ports:
            parts.append(protos or ports)
        if self.source_ports:
            parts.append("sport " + _ports_text(self.source_ports))
        for word, net in (("net", self.net), ("from", self.from_), ("to", self.to)):
            if net is not None:
                parts.append(f"{word} {net}")
        return " ".join(parts)

    def as_mapping(self) -> dict[str, Any]:
        """The rule as the mapping form (config convert)."""
        out: dict[str, Any] = {}
        if self.protocol:
            out["protocol"] = [IPPROTO_NAMES.get(p, p) for p in self.protocol]
        for key in ("ports", "source_ports"):
            if getattr(self, key):
                out[key] = _ports_text(getattr(self, key))
        for key, net in (("net", self.net), ("from", self.from_), ("to", self.to)):
            if net is not None:
                out[key] = str(net)
        return out

    def matches(self, proto: int, src: Any, dst: Any, sport: int, dport: int, has_ports: bool) -> bool:
        """src/dst as ipaddress objects (or None if not addresses)."""
        if self.protocol and proto not in self.protocol:
            return False
        if self.ports is not None and not (has_ports and _in_ports(dport, self.ports)):
            return False
        if self.source_ports is not None and not (has_ports and _in_ports(sport, self.source_ports)):
            return False
        if self.net is not None and not (_in(src, self.net) or _in(dst, self.net)):
            return False
        if self.from_ is not None and not _in(src, self.from_):
            return False
        return self.to is None or _in(dst, self.to)


def _in(ip: Any, net: IPNetwork) -> bool:
    return ip is not None and ip.version == net.version and ip in net


def _in_ports(port: int, ranges: tuple[PortRange, ...]) -> bool:
    return any(low <= port <= high for low, high in ranges)


def _ports_text(ranges: tuple[PortRange, ...] | None) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges or ())


_RULE_WORDS = {"from": "from", "to": "to", "net": "net", "host": "net", "sport": "source_ports"}


def _rule_from_text(text: str) -> dict[str, Any]:
    """'udp/53 to 198.51.100.0/24', 'tcp 1-1023 from 2001:db8::/32',
    'both 53,5353', 'tcp sport 1024-65535 net 10.0.0.0/8' -> mapping form."""
    words = text.split()
    rule: dict[str, Any] = {}
    i = 0
    head = words[0].split("/", 1) if words else [""]
    names = head[0].lower().split(",")
    if all(name in PROTO_NUMBERS or name in PROTO_GROUPS for name in names):
        rule["protocol"] = names
        if len(head) == 2:
            rule["ports"] = head[1]
        i = 1
    if i < len(words) and words[i][:1].isdigit() and "ports" not in rule:
        if "." in words[i] or ":" in words[i]:
            raise ValueError("a network where ports were expected")   # a bad CIDR, most likely
        rule["ports"] = words[i]
        i += 1
    while i < len(words):
        key = _RULE_WORDS.get(words[i].lower())
        if key is None or i + 1 >= len(words) or key in rule:
            raise ValueError("unreadable rule")
        rule[key] = words[i + 1]
        i += 2
    if not rule:
        raise ValueError("unreadable rule")
    return rule


def parse_ignore(value: Any) -> IPNetwork | IgnoreRule:
    """One `ignore` item: a CIDR or address (either endpoint, any protocol),
    a rule as text, or a rule as a mapping."""
    if isinstance(value, IPNetwork | IgnoreRule):
        return value
    if isinstance(value, str):
        try:
            return parse_network(value)
        except PydanticCustomError:
            pass
        try:
            rule = _rule_from_text(value)
        except ValueError:
            raise PydanticCustomError("ignore_rule", IGNORE_HINT) from None
        try:
            parsed = IgnoreRule.model_validate(rule)
        except ValidationError as exc:
            # The text's parts are not keys the user wrote: say which part is wrong.
            problem = exc.errors(include_url=False)[0]
            raise PydanticCustomError("ignore_rule", "{part} in this rule: {msg}",
                                      {"part": str(problem["loc"][0]) if problem["loc"] else "rule",
                                       "msg": problem["msg"].removeprefix("Value error, ")}) from None
        parsed._text = value.strip()
        return parsed
    if isinstance(value, dict):
        return IgnoreRule.model_validate(value)
    raise PydanticCustomError("ignore_rule", IGNORE_HINT)


IgnoreItem = Annotated[IPNetwork | IgnoreRule, PlainValidator(parse_ignore)]


# -- range labels --------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RANGE_HINT = ("expected an address range: START-END (192.0.2.10-192.0.2.20), a CIDR "
              "(2001:db8::/32) or one address")


def parse_range(value: Any) -> tuple[IPAddress, IPAddress]:
    """'a-b', a CIDR or an address -> (first, last), one family."""
    if isinstance(value, tuple):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("address_range", RANGE_HINT)
    text = value.strip()
    try:
        if "-" in text:
            start_text, end_text = text.split("-", 1)
            first, last = ipaddress.ip_address(start_text.strip()), ipaddress.ip_address(end_text.strip())
        else:
            net = ipaddress.ip_network(text, strict=False)
            first, last = net.network_address, net.broadcast_address
    except ValueError:
        raise PydanticCustomError("address_range", RANGE_HINT) from None
    if first.version != last.version:
        raise PydanticCustomError("address_range", "expected both ends in one address family")
    if last < first:
        raise PydanticCustomError("address_range", "expected START-END with START not above END")
    return first, last


PROMACCT_HINT = ("expected {range: ..., labels: {...}} or promacct's -r text such as "
                 "'192.0.2.10-192.0.2.20:customer=acme:env=prod'")


class RangeLabels(StrictModel):
    """Labels every record whose chosen endpoint is in `range` carries."""

    range: Annotated[tuple[IPAddress, IPAddress], PlainValidator(parse_range)]
    labels: dict[str, str]

    _check_labels = field_validator("labels")(_check_labels)

    @model_validator(mode="before")
    @classmethod
    def _promacct_text(cls, data: Any) -> Any:
        """promacct's `-r RANGE:key=value:key=value` as it is.  IPv6 ranges
        hold colons too: the labels start at the first part with '='."""
        if not isinstance(data, str):
            return data
        parts = data.strip().split(":")
        first = next((i for i, part in enumerate(parts) if "=" in part), None)
        if first is None or first == 0 or not all("=" in part for part in parts[first:]):
            raise PydanticCustomError("range_labels", PROMACCT_HINT)
        return {"range": ":".join(parts[:first]),
                "labels": dict(part.split("=", 1) for part in parts[first:])}

    @property
    def range_text(self) -> str:
        first, last = self.range
        try:
            nets = list(ipaddress.summarize_address_range(first, last))
        except (TypeError, ValueError):
            nets = []
        return str(nets[0]) if len(nets) == 1 else f"{first}-{last}"


class EnrichConfig(StrictModel):
    ignore: list[IgnoreItem] = Field(default_factory=list)
    labels: Annotated[dict[str, str], Field(default_factory=dict)]
    local_addresses: list[Network] | None = None     # None: the host's own addresses
    ranges: list[RangeLabels] = Field(default_factory=list)
    # Which endpoint's range labels a record gets: the remote one (the peer
    # the Prometheus sink's per-host series name), the original source, the
    # destination (where the flow really ends), or both (source's, then
    # destination's labels over them).
    range_endpoint: Literal["remote", "source", "destination", "either"] = "remote"

    _check_labels = field_validator("labels")(_check_labels)
