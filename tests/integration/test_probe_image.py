"""The compiled probe kept on disk (conntracct/probe/image.py): the second
start on this kernel loads the first one's image with bpf(2), without the
BCC compiler process, gets the same maps, and its probe reports exactly
the kernel's flows; an image the kernel refuses is compiled again and
replaced."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os

import pytest

from conntracct import netns
from conntracct.probe import bpfsys, compiler, loader
from conntracct.probe.loader import MAPS, Probe, ProbeSettings, compile_probe
from conntracct.probe.modes import try_netfilter
from tests.integration.probe_churn import new_flows, read_during_churn
from tests.netns import Topology

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF (CI runs as root)")]


@pytest.fixture
def netfilter():
    if not try_netfilter().ok:
        pytest.skip(f"this kernel has no BPF netfilter programs: {try_netfilter().detail}")


def settings(tmp_path) -> ProbeSettings:
    return dataclasses.replace(ProbeSettings.from_config(), max_flows=65536, cache_dir=str(tmp_path / "cache"))


class NoCompiler:
    def __init__(self) -> None:
        raise AssertionError("the compiler process was started")


def shapes(compiled) -> dict:
    return {name: bpfsys.map_shape(fd) for name, fd in compiled.maps.items()}


def test_the_second_load_comes_from_the_image_with_the_same_maps(netfilter, tmp_path, monkeypatch):
    first = compile_probe("netfilter", settings(tmp_path))
    try:
        compiled = shapes(first)
        kept = list((tmp_path / "cache").glob("probe-*.json"))
        assert len(kept) == 1
        assert set(json.loads(kept[0].read_text())["programs"]) == {"netfilter_hook", loader.BATCH_PROGRAM}
    finally:
        first.close()
    monkeypatch.setattr(compiler, "_Child", NoCompiler)
    second = compile_probe("netfilter", settings(tmp_path))
    try:
        assert set(second.maps) == set(MAPS["netfilter"]) and not second.refused
        assert set(second.programs) == {"netfilter_hook", loader.BATCH_PROGRAM}
        assert shapes(second) == compiled
    finally:
        second.close()
    other = dataclasses.replace(settings(tmp_path), max_flows=131072)    # other flags: not this image
    with pytest.raises(AssertionError, match="compiler process was started"):
        compile_probe("netfilter", other)


def test_a_probe_from_the_image_reports_the_kernels_flows(netfilter, tmp_path, monkeypatch):
    compile_probe("netfilter", settings(tmp_path)).close()
    monkeypatch.setattr(compiler, "_Child", NoCompiler)
    got: list[bytes] = []
    with Topology(acct=True, timestamp=True) as topo, netns.entered(topo.ns_path("router")):
        probe = Probe("netfilter", settings(tmp_path), got.append, False)
        try:
            result, cap = read_during_churn(probe, topo, duration=1, rate=300)
        finally:
            lost = probe.stats()["records_lost"]
            batched = probe.takes_in_batches
            probe.close()
    assert lost == 0 and batched      # the syscall program came from the image too
    ours, kernel = new_flows(got, cap, result.port)
    assert sum(kernel.values()) >= 200, result.summary()
    assert ours == kernel


def without_its_exit(insns: str) -> str:
    """The verifier refuses a program that does not end with an exit."""
    return base64.b64encode(base64.b64decode(insns)[:-8]).decode()


@pytest.mark.parametrize(("spoil", "why"), [(without_its_exit, "last insn is not an exit"),
                                            (lambda insns: "AAAAAAAAAAA=", "malformed image")],
                         ids=["refused by the kernel", "malformed"])
def test_an_image_that_does_not_load_is_compiled_again_and_replaced(netfilter, tmp_path, caplog, spoil, why):
    compile_probe("netfilter", settings(tmp_path)).close()
    path, = (tmp_path / "cache").glob("probe-*.json")
    good = json.loads(path.read_text())
    bad = json.loads(path.read_text())
    bad["programs"]["netfilter_hook"]["insns"] = spoil(bad["programs"]["netfilter_hook"]["insns"])
    path.write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING, "conntracct.probe.loader"):
        compile_probe("netfilter", settings(tmp_path)).close()
    assert "the kept image was not loaded" in caplog.text and why in caplog.text, caplog.text
    assert json.loads(path.read_text())["programs"]["netfilter_hook"] == good["programs"]["netfilter_hook"]
