"""The command line: conntracct run | check | test | version."""

from __future__ import annotations

import logging
import os
import sys

import click

from . import __version__
from .config import PROBE_MODES, ConfigError, load_config

MODES = PROBE_MODES
EXIT_USAGE = 2   # bad configuration or an environment that cannot run the agent


def fail(message: str) -> None:
    click.echo(f"conntracct: {message}", err=True)
    sys.exit(EXIT_USAGE)


def configured(path: str | None, mode: str | None):
    try:
        config = load_config(path)
    except ConfigError as e:
        fail(str(e))
    for warning in config.warnings:   # what a conntracct (Go) file asked for and we left out
        click.echo(f"conntracct: warning: {config.source}: {warning}", err=True)
    if mode:
        config.probe.mode = mode
    return config


config_option = click.option("-c", "--config", "config_path", metavar="PATH",
                             help="YAML configuration (default: $HOME/.config/conntracct.yml, then "
                                  "/etc/conntracct/conntracct.yml, else a built-in stdout sink)")
mode_option = click.option("--mode", type=click.Choice(MODES), help="override probe.mode")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """conntracct: per-flow packet and byte accounting from the kernel's
    conntrack counters, read by an eBPF probe and sent to sinks."""


ensure_tracking_option = click.option(
    "--ensure-tracking", is_flag=True,
    help="set conntrack.ensure_tracking: add the nftables table `inet conntracct` (an accept-only "
         "ct state rule) while the agent runs, so conntrack tracks traffic where no rule uses it")


netns_option = click.option("--netns", metavar="PATH",
                            help="override probe.netns: account this network namespace "
                                 "(/var/run/netns/NAME, /proc/PID/ns/net); sinks stay in the agent's")


@main.command()
@config_option
@mode_option
@ensure_tracking_option
@netns_option
def run(config_path: str | None, mode: str | None, ensure_tracking: bool, netns: str | None) -> None:
    """Run the agent until SIGINT/SIGTERM, then drain the sinks and exit 0."""
    from .probe import compiler
    config = configured(config_path, mode)
    compiler.start_early(config.probe.cache_dir)   # BCC's process starts while the agent's modules load
    from .agent import Agent, EnvironmentProblem
    if ensure_tracking:
        config.conntrack.ensure_tracking = True
    if netns is not None:
        if not os.path.exists(netns):
            fail(f"--netns {netns}: no such file (expected a namespace such as /var/run/netns/NAME)")
        config.probe.netns = netns
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(Agent(config).run())
    except EnvironmentProblem as e:
        fail(str(e))


@main.command()
@config_option
@mode_option
def check(config_path: str | None, mode: str | None) -> None:
    """Show what this kernel allows and which attach mode `auto` picks, and why."""
    from .check import report
    from .netns import NetnsError, entered
    config = configured(config_path, mode)
    try:
        with entered(config.probe.netns):   # netfilter links are per namespace
            text, usable = report(config.probe.mode, config.conntrack.ensure_tracking)
    except NetnsError as e:
        fail(f"probe.netns: {e}")
    click.echo(text)
    sys.exit(0 if usable else 1)


@main.command()
@config_option
@mode_option
def test(config_path: str | None, mode: str | None) -> None:
    """Self-test: send known traffic through private network namespaces and
    check that the probe reports every flow exactly (exit 1 if not)."""
    from .agent import EnvironmentProblem
    from .selftest import run_selftest
    config = configured(config_path, mode)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        text, passed = run_selftest(config)
    except EnvironmentProblem as e:
        fail(str(e))
    click.echo(text)
    sys.exit(0 if passed else 1)


@main.group()
def config() -> None:
    """Configuration tools."""


@config.command()
@click.argument("path", metavar="FILE")
def convert(path: str) -> None:
    """Print FILE (e.g. a conntracct (Go) configuration) in this agent's own
    format; what is left out is said in comments and on stderr."""
    from pathlib import Path

    from .compat import convert as convert_text
    try:
        text = Path(path).read_text(encoding="utf-8")
        converted, warnings = convert_text(text, path)
    except OSError as e:
        fail(f"{path}: cannot read the config file: {e.strerror}")
    except ConfigError as e:
        fail(str(e))
    for warning in warnings:
        click.echo(f"conntracct: warning: {path}: {warning}", err=True)
    click.echo(converted, nl=False)


@main.command()
@config_option
@mode_option
@click.option("--netns", metavar="PATH", type=click.Path(exists=True, dir_okay=False),
              help="network namespace to account, e.g. /run/netns/NAME (overrides probe.netns)")
def top(config_path: str | None, mode: str | None, netns: str | None) -> None:
    """Live view of the busiest flows and remote hosts with their rates, from
    a probe of its own (keys: r/t/a sort, / filter, q quit)."""
    from .top import run_top
    sys.exit(run_top(configured(config_path, mode), netns))


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"conntracct {__version__}")
