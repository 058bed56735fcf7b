"""What sinks share (conntracct/sinks/common.py), and that they share it
instead of importing each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conntracct.flow import IPPROTO_NAMES
from conntracct.sinks import SINKS
from conntracct.sinks.common import PORT_PROTOS, TLSConfig, endpoint, host_port, http_url

SINK_DIR = Path(__file__).resolve().parents[2] / "conntracct" / "sinks"


def _sink_modules() -> set[str]:
    """Module names (e.g. 'influxdb') of the registered sink classes."""
    return {sys.modules[cls.__module__].__name__.rsplit(".", 1)[1] for cls in SINKS.values()}


def test_no_sink_imports_another_sink():
    sinks = _sink_modules()
    for name in sinks:
        tree = ast.parse((SINK_DIR / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported = {node.module} if node.module else {alias.name for alias in node.names}
                assert not imported & (sinks - {name}), f"sinks/{name}.py imports {imported & sinks}"


def test_every_sink_with_tls_options_uses_the_one_model():
    for cls in SINKS.values():
        field = cls.Config.model_fields.get("tls")
        if field is not None:
            assert field.annotation is TLSConfig, cls


def test_protocols_with_ports_are_named_in_flow():
    assert sorted(IPPROTO_NAMES[n] for n in PORT_PROTOS) == ["dccp", "sctp", "tcp", "udp", "udplite"]


def test_endpoint_text():
    assert endpoint("192.0.2.1") == "192.0.2.1"
    assert endpoint("192.0.2.1", 80) == "192.0.2.1:80"
    assert endpoint("2001:db8::1", 443) == "[2001:db8::1]:443"
    assert endpoint("2001:db8::1") == "2001:db8::1"


@pytest.mark.parametrize(("url", "port_required", "error"), [
    ("http://h:8086/", False, None),
    ("https://h", True, None),
    ("http://h", True, "expected a port in the URL"),
    ("h:8086", False, "expected an http:// or https:// URL such as http://x:1"),
    ("http://u:p@h:1", False, "expected a URL without credentials"),
    ("http://h:1/?q=1", False, "expected a URL without ?query"),
    ("http://h:99999", False, "expected a URL with a port number from 1 to 65535"),
])
def test_http_url(url, port_required, error):
    check = http_url("http://x:1", port_required)
    if error is None:
        assert check(url) == url.rstrip("/")
    else:
        with pytest.raises(ValueError, match=error.replace("?", r"\?")):
            check(url)


@pytest.mark.parametrize(("text", "default_port", "expected"), [
    ("192.0.2.1:80", None, ("192.0.2.1", 80)), ("[2001:db8::1]:443", None, ("2001:db8::1", 443)),
    ("collector.example", 4739, ("collector.example", 4739)), ("[::]:0", None, "expected a port from 1 to 65535"),
    ("9318", None, "expected host:port"), ("::1:80", None, "(IPv6 addresses in brackets)"),
    ("[fe80::zz]:80", None, "expected an IPv6 address between the brackets"),
    ("192.0.2.300:80", None, "expected an IPv4 address, got '192.0.2.300'"),
    ("bad_host!:80", None, "expected an IP address or host name, got 'bad_host!'")])
def test_host_port(text, default_port, expected):
    if isinstance(expected, tuple):
        assert host_port(text, "expected host:port", default_port) == expected
    else:
        with pytest.raises(ValueError) as info:
            host_port(text, "expected host:port", default_port)
        assert expected in str(info.value)
