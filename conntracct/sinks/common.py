"""What sinks share: endpoint text (written and parsed), the protocols with
ports, TLS options, URL validation and secrets read from the environment.

Sinks import these from here and never from each other, so a sink can be
added or removed without touching another one.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator

from ..configtypes import NO_VALUE, ConfigError, StrictModel, config_errors, resolve_secret
from ..flow import IPPROTO_NAMES, FlowEvent

# Protocols whose tuples carry ports (the rest have 0 there): by name from
# flow.IPPROTO_NAMES, the one table of protocol numbers and names.
PORT_PROTOS = frozenset(number for number, name in IPPROTO_NAMES.items()
                        if name in ("tcp", "udp", "dccp", "sctp", "udplite"))


def endpoint(addr: str, port: int | None = None) -> str:
    """'addr', 'addr:port', or '[v6addr]:port' (brackets only with a port)."""
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def remote_endpoint(event: FlowEvent) -> tuple[str, int]:
    """(address, port) of the flow's remote end: for an inbound flow its
    source with the local service's port (conntrack_exporter's host label),
    else where the flow really ends (the reply tuple's source, after DNAT).
    Needs the enricher's `direction` label; the Prometheus sink's per-host
    series and the conntrack_exporter log line both use it."""
    if event.labels.get("direction") == "inbound":
        return event.orig.src, event.orig.dport
    return event.reply.src, event.reply.sport


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\[\]]+)\]|(?P<host>[^\s:\[\]/]+))(?::(?P<port>\d{1,5}))?")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def host_port(value: str, hint: str, default_port: int | None = None, min_port: int = 1) -> tuple[str, int]:
    """'192.0.2.1:80' / '[2001:db8::1]:80' / 'name:80' (or without ':port'
    when there is a `default_port`) -> (host, port).  `hint` ("expected
    host:port such as ...") is the error's advice."""
    match = _HOST_PORT.fullmatch(value.strip())
    if match is None or (match["port"] is None and default_port is None):
        raise ValueError(hint + (" (IPv6 addresses in brackets)" if value.count(":") > 1 else ""))
    port = int(match["port"]) if match["port"] is not None else default_port
    if not min_port <= port <= 65535:
        raise ValueError(f"expected a port from {min_port} to 65535" + (" (0: any free port)" if min_port == 0 else "")
                         + f", got {port}")
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise ValueError(f"expected an IPv6 address between the brackets; {hint}") from None
        return match["v6"], port
    host = match["host"]
    if re.fullmatch(r"[0-9.]+", host):   # digits and dots: meant as an IPv4 address
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv4 address, got {host!r}; {hint}") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"expected an IP address or host name, got {host!r}; {hint}")
    return host, port


# -- TLS -----------------------------------------------------------------------

def _pem_file(value: str | None) -> str | None:
    if value is not None and not os.path.isfile(value):
        raise ValueError("expected a readable PEM file (CA certificates); it does not exist")
    return value


class TLSConfig(StrictModel):
    """`tls:` of every sink that speaks HTTPS; ignored for http:// URLs (a
    sink with several hosts may mix them)."""

    verify: bool = True       # check the server's certificate and host name
    ca_file: Annotated[str | None, AfterValidator(_pem_file)] = None   # default: the system's CAs


# -- URLs ----------------------------------------------------------------------

def http_url(example: str, port_required: bool = False) -> Callable[[str], str]:
    """A validator of an http(s) base URL: no credentials (sinks take them as
    their own keys), no query or fragment; with `port_required`, an http://
    URL must name its port (the server's default is not 80).  `example`
    shows the expected form in errors."""

    def check(value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL such as {example}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("expected a URL without credentials: give them as the sink's own keys "
                             "(token, username/password, api_key)")
        if parts.query or parts.fragment:
            raise ValueError("expected a URL without ?query or #fragment")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("expected a URL with a port number from 1 to 65535") from None
        if port_required and port is None and parts.scheme == "http":
            raise ValueError(f"expected a port in the URL, e.g. {example}")
        return value.strip().rstrip("/")

    return check


# -- secrets -------------------------------------------------------------------

def read_secrets(model: Any, *keys: str) -> list[str | None]:
    """Each secret `key` of a config model, given inline or by its `<key>_env`
    variable (configtypes.resolve_secret); errors name the key at fault."""
    values = []
    for key in keys:
        try:
            values.append(resolve_secret(getattr(model, key), getattr(model, key + "_env"), key))
        except ConfigError as exc:
            where, message = str(exc).split(": ", 1)
            raise config_errors([((where,), message, NO_VALUE)]) from None
    return values
