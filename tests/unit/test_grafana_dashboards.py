"""dashboards/grafana/*.json: what dashboards/build.py writes, valid for
Grafana's own schema (grafana-foundation-sdk's models read them back
unchanged), importable with a data-source prompt, and every variable a query
uses defined.  That the queries return the right data is
tests/integration/test_dashboards.py's job."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
MACROS = {"timeFilter", "__interval", "__interval_ms", "__rate_interval", "__range", "__range_s", "__range_ms"}


def build_module():
    spec = importlib.util.spec_from_file_location("dashboards_build", ROOT / "dashboards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_files_are_what_the_generator_writes():
    outputs = build_module().outputs()
    assert set(outputs) >= set(DASHBOARDS) and len(DASHBOARDS) == 3
    stale = [str(p.relative_to(ROOT)) for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    assert not stale, f"run dashboards/build.py: {stale} differ from its output"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_grafana_schema_round_trip(path):
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    data = json.loads(path.read_text())
    body = {k: v for k, v in data.items() if not k.startswith("__")}
    model = Dashboard.from_json(body)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == body
    assert body["schemaVersion"] >= 39 and body["uid"] and body["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_import_asks_for_the_data_source(path):
    data = json.loads(path.read_text())
    [ds_input] = data["__inputs"]
    assert ds_input["type"] == "datasource"
    placeholder = "${%s}" % ds_input["name"]
    refs = re.findall(r'"uid": "([^"]*)"', json.dumps({k: v for k, v in data.items() if k != "__inputs"}))
    # every data source reference (panels, targets, variables) is the input, none is a local uid
    datasource_refs = [json.dumps(p["datasource"]) for p in data["panels"] if "datasource" in p]
    assert datasource_refs and all(placeholder in r for r in datasource_refs)
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == placeholder
            assert target["datasource"]["type"] == ds_input["pluginId"]
    for var in data["templating"]["list"]:
        if "datasource" in var:
            assert var["datasource"]["uid"] == placeholder
    assert placeholder in refs


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_queries_use_only_defined_variables(path):
    data = json.loads(path.read_text())
    names = {v["name"] for v in data["templating"]["list"]}
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            text = target.get("query") or target.get("expr")
            assert text, f"{panel['title']}: empty query"
            used = set(re.findall(r"\$(\w+)", text)) | set(re.findall(r"\$\{(\w+)\}", text))
            assert used - names <= MACROS, f"{panel['title']}: undefined {used - names - MACROS}"
