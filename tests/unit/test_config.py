"""Configuration: defaults, search order, example files, and error messages
that name the file, line, key path, bad value and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import model_validator

from conntracct import config as config_module
from conntracct.config import ConfigError, load_config, parse_config, resolve_secret
from conntracct.configtypes import parse_duration, parse_size
from conntracct.flow import KINDS
from conntracct.sinks import SINKS, Sink, SinkConfig, create_sink

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def error_of(yaml_text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml_text, "test.yml")
    message = str(info.value)
    assert "pydantic" not in message and "Traceback" not in message
    return message


# -- defaults and files ------------------------------------------------------

def test_defaults_give_one_stdout_text_sink_and_the_documented_curve():
    config = parse_config("")
    assert [(s.type, s.name, s.format) for s in config.sinks] == [("stdout", "stdout", "text")]
    assert config.sinks[0].kinds == frozenset(KINDS)
    assert (config.sinks[0].queue_size, config.sinks[0].batch_size, config.sinks[0].flush_interval) == (10000, 500, 1)
    assert config.probe.rate_curve_ns() == ([(60 * 10**9, 20 * 10**9), (300 * 10**9, 60 * 10**9)], 300 * 10**9)
    assert (config.probe.mode, config.probe.max_flows, config.probe.netlink_rcvbuf) == ("auto", 262144, 64 << 20)
    assert (config.sysctl.manage, config.sysctl.restore, config.shutdown.drain_timeout) == (True, False, 5.0)
    assert config.log_level == "info" and config.enrich.local_addresses is None


@pytest.mark.parametrize("name", ["minimal.yml", "conntracct.yml"])
def test_example_configs_are_valid(name):
    config = load_config(CONFIGS / name)
    assert config.source == str(CONFIGS / name)
    assert config.sinks[0].type == "stdout"


def test_full_example_spells_out_every_default():
    full = load_config(CONFIGS / "conntracct.yml").model_dump()
    assert full == parse_config("").model_dump()


@pytest.fixture
def search(tmp_path, monkeypatch):
    """HOME and the system path pointed into tmp_path."""
    home, system = tmp_path / "home", tmp_path / "etc" / "conntracct.yml"
    (home / ".config").mkdir(parents=True)
    system.parent.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system)
    return home / ".config" / "conntracct.yml", system


def test_search_order_home_then_system_then_builtin(search):
    user, system = search
    assert load_config().source == "<built-in default>"
    system.write_text("log_level: error\n")
    assert (load_config().source, load_config().log_level) == (str(system), "error")
    user.write_text("log_level: debug\n")
    assert (load_config().source, load_config().log_level) == (str(user), "debug")


def test_explicit_path_wins_and_must_exist(search, tmp_path):
    search[0].write_text("log_level: debug\n")
    explicit = tmp_path / "mine.yml"
    explicit.write_text("log_level: warning\n")
    assert load_config(explicit).log_level == "warning"
    with pytest.raises(ConfigError, match=r"missing\.yml: config file does not exist"):
        load_config(tmp_path / "missing.yml")


# -- error messages ----------------------------------------------------------

def test_yaml_syntax_error_names_line_and_column():
    assert error_of("probe:\n  mode: [auto\n").startswith("test.yml:3:1: YAML syntax error")


def test_duplicate_yaml_key_is_an_error():
    assert error_of("log_level: info\nlog_level: debug\n") == (
        "test.yml:2:1: YAML syntax error: duplicate key 'log_level' (first on line 1)")


def test_unknown_key_names_path_line_and_suggests():
    message = error_of("probe:\n  mode: auto\n  max_flow: 5000\n")
    assert message.startswith("test.yml:3: probe.max_flow: unknown key (did you mean 'max_flows'?)")
    assert ("expected one of: cache_dir, max_flows, mode, netlink_rcvbuf, netns, rate_curve, ringbuf_pages, "
            "sweep_interval (got 5000)") in message


def test_bad_type_names_key_value_and_expectation():
    assert error_of("probe: {max_flows: lots}") == "test.yml:1: probe.max_flows: expected an integer (got 'lots')"
    assert error_of("probe: {max_flows: 10}") == "test.yml:1: probe.max_flows: expected a number >= 1024 (got 10)"
    assert error_of("sysctl: {manage: maybe}") == "test.yml:1: sysctl.manage: expected true or false (got 'maybe')"
    assert error_of("sinks:\n  - type: stdout\n    format: xml\n") == (
        "test.yml:3: sinks[0].format: expected 'text', 'json', 'netfilter' or 'conntrack_exporter' (got 'xml')")


def test_bad_duration_names_key_and_value():
    message = error_of("sinks: [{type: stdout, flush_interval: soon}]")
    assert message.startswith("test.yml:1: sinks[0].flush_interval: expected a duration such as")
    assert message.endswith("(got 'soon')")
    assert "sinks[0].retry.backoff: expected a duration greater than zero (got '0s')" in error_of(
        "sinks: [{type: stdout, retry: {backoff: 0s}}]")


def test_rate_curve_must_grow_older_and_slower():
    message = error_of("probe:\n  rate_curve:\n    - {below: 60s, every: 20s}\n"
                       "    - {below: 30s, every: 10s}\n    - {then: 5m}\n")
    assert message.splitlines() == [
        "test.yml:4: probe.rate_curve[1].below: expected an age above the previous step's 60s"
        " (ages must increase) (got 30s)",
        "test.yml:4: probe.rate_curve[1].every: expected an interval of at least the previous 20s"
        " (intervals must not shrink) (got 10s)"]


def test_rate_curve_shape_errors():
    assert "probe.rate_curve: expected the last item to be {then: <duration>}" in error_of(
        "probe: {rate_curve: [{below: 1m, every: 10s}]}")
    assert "probe.rate_curve[0]: expected {below: <duration>, every: <duration>}" in error_of(
        "probe: {rate_curve: [{below: 1m}, {then: 5m}]}")
    assert "probe.rate_curve[1].every: expected a duration that is not negative (got '-5s')" in error_of(
        "probe: {rate_curve: [{below: 1m, every: 10s}, {below: 2m, every: -5s}, {then: 5m}]}")


def test_custom_rate_curve_in_ns():
    config = parse_config("probe: {rate_curve: [{below: 500ms, every: 100ms}, {then: 1h}]}")
    assert config.probe.rate_curve_ns() == ([(500_000_000, 100_000_000)], 3600 * 10**9)


def test_ringbuf_pages_must_be_a_power_of_two():
    assert "probe.ringbuf_pages: expected a power of two such as 64, 128 or 256 (got 100)" in error_of(
        "probe: {ringbuf_pages: 100}")


def test_duplicate_sink_names_are_rejected():
    message = error_of("sinks:\n  - type: stdout\n  - type: stdout\n    format: json\n")
    assert message.startswith("test.yml:3: sinks[1].name: duplicate sink name 'stdout' (also sinks[0])")
    assert parse_config("sinks: [{type: stdout}, {type: stdout, name: json}]").sinks[1].name == "json"


def test_unknown_sink_type_names_index_name_type_and_known_types():
    known = ", ".join(sorted(SINKS))   # every registered sink, whatever the registry holds
    assert "stderr, stdout" in known
    assert error_of("sinks:\n  - type: stdout\n  - type: kafka\n    name: bus\n") == (
        f"test.yml:3: sinks[1].type: sink 'bus' has unknown type 'kafka'; known types: {known} (got 'kafka')")
    assert error_of("sinks: [{format: json}]") == (
        f"test.yml:1: sinks[0].type: this sink has no `type`; known types: {known}")


def test_sink_keys_are_validated_by_the_sinks_model():
    assert "sinks[0].kinds[0]: expected 'new', 'update' or 'destroy' (got 'open')" in error_of(
        "sinks: [{type: stderr, kinds: [open]}]")
    assert "sinks[0].batch_size: expected at most queue_size (10) (got 20)" in error_of(
        "sinks: [{type: stdout, queue_size: 10, batch_size: 20}]")
    assert "sinks[0].token: unknown key" in error_of("sinks: [{type: stdout, token: x}]")


def test_enrich_values_are_checked():
    assert "enrich.ignore[1]: expected a CIDR" in error_of("enrich: {ignore: [10.0.0.0/8, 10.0.0.0/33]}")
    assert "enrich.labels.direction: label 'direction' is set by the agent" in error_of(
        "enrich: {labels: {direction: in}}")
    config = parse_config("enrich: {ignore: [10.1.2.3/8, '2001:db8::1'], local_addresses: [192.0.2.1]}")
    assert [str(n) for n in config.enrich.ignore] == ["10.0.0.0/8", "2001:db8::1/128"]
    assert [str(n) for n in config.enrich.local_addresses] == ["192.0.2.1/32"]


def test_every_error_is_reported_at_once():
    lines = error_of("log_level: loud\nshutdown: {drain_timeout: x}\n").splitlines()
    assert [line.split(": ")[1] for line in lines] == ["log_level", "shutdown.drain_timeout"]   # file order


def test_top_level_must_be_a_mapping():
    assert error_of("- stdout\n") == "test.yml: expected a mapping of keys at the top (got a list)"


# -- value types -------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("20s", 20), ("5m", 300), ("1h", 3600), ("500ms", 0.5), ("1m30s", 90), (" 2.5s ", 2.5),
    (7, 7), (0.25, 0.25), ("3", 3)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5 parsecs", "s", "1m30", "-1s", True, None, [1]])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [
    (4096, 4096), ("64MiB", 64 << 20), ("64M", 64 << 20), ("64MB", 64_000_000), ("1.5KiB", 1536),
    ("512B", 512), ("1GiB", 1 << 30)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_netlink_rcvbuf_accepts_sizes_and_rejects_nonsense():
    assert parse_config("probe: {netlink_rcvbuf: 8MiB}").probe.netlink_rcvbuf == 8 << 20
    assert "probe.netlink_rcvbuf: expected a size in bytes" in error_of("probe: {netlink_rcvbuf: 8 furlongs}")


# -- secrets -----------------------------------------------------------------

def test_resolve_secret_reads_the_environment(monkeypatch):
    monkeypatch.setenv("INFLUX_TOKEN", "s3cret")
    assert resolve_secret(None, "INFLUX_TOKEN", "sinks[1].token") == "s3cret"
    assert resolve_secret("inline", None, "sinks[1].token") == "inline"
    assert resolve_secret(None, None, "sinks[1].token") is None


def test_resolve_secret_errors_name_the_key(monkeypatch):
    monkeypatch.delenv("NOPE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"^sinks\[1\]\.token_env: environment variable 'NOPE_TOKEN' is not set$"):
        resolve_secret(None, "NOPE_TOKEN", "sinks[1].token")
    with pytest.raises(ConfigError, match=r"give either token or token_env, not both"):
        resolve_secret("x", "NOPE_TOKEN", "sinks[1].token")


class TokenSink(Sink):
    """A network-style sink: its own keys, a secret from the environment."""

    class Config(SinkConfig):
        url: str
        token: str | None = None
        token_env: str | None = None

        @model_validator(mode="after")
        def _token(self):
            self.token = resolve_secret(self.token, self.token_env, "token")
            return self

    default_kinds = frozenset({"destroy"})

    def write(self, batch):
        pass


def test_a_registered_sink_brings_its_keys_default_kinds_and_secrets(monkeypatch):
    monkeypatch.setitem(SINKS, "archive", TokenSink)
    monkeypatch.setenv("ARCHIVE_TOKEN", "s3cret")
    sink = parse_config("sinks: [{type: archive, url: 'http://x', token_env: ARCHIVE_TOKEN}]").sinks[0]
    assert isinstance(sink, TokenSink.Config)
    assert (sink.token, sink.kinds) == ("s3cret", frozenset({"destroy"}))
    assert isinstance(create_sink(sink), TokenSink)
    assert error_of("sinks: [{type: archive}]") == "test.yml:1: sinks[0].url: required key is missing"
    monkeypatch.delenv("ARCHIVE_TOKEN")
    assert error_of("sinks:\n  - type: archive\n    url: x\n    token_env: ARCHIVE_TOKEN\n") == (
        "test.yml:2: sinks[0]: token_env: environment variable 'ARCHIVE_TOKEN' is not set")
