"""dashboards/kibana/conntracct-flows.ndjson, checked structurally.

No Kibana or Elasticsearch can be installed here, so this is all that is
checked: the saved-object types are ones Kibana imports, every reference
resolves to an object of the file with the referenced type, every panel of
the dashboard has its reference, and every field a visualization, the saved
search or the data view uses is mapped by the elasticsearch sink's index
template with an aggregatable type.  Whether Kibana renders it is not tested.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conntracct.sinks.elasticsearch import daily_index, index_templates, live_index, mappings
from tests.unit.sample_flows import flow

NDJSON = Path(__file__).resolve().parents[2] / "dashboards" / "kibana" / "conntracct-flows.ndjson"
TYPES = {"index-pattern", "search", "lens", "dashboard", "visualization"}
# Field types Elasticsearch aggregates on (doc values); text and object are not.
AGGREGATABLE = {"keyword", "long", "integer", "short", "byte", "double", "float", "ip", "date", "date_nanos",
                "boolean"}
RECORDS = "___records___"   # Lens' document count, no field


def objects() -> list[dict]:
    return [json.loads(line) for line in NDJSON.read_text().splitlines() if line.strip()]


def field_types(props: dict | None = None, prefix: str = "") -> dict[str, str]:
    """Flattened mapping: 'source.ip' -> 'ip'."""
    props = mappings()["properties"] if props is None else props
    out = {}
    for name, spec in props.items():
        path = prefix + name
        if "properties" in spec:
            out.update(field_types(spec["properties"], path + "."))
        out[path] = spec.get("type", "object")
    return out


FIELDS = field_types()


def assert_aggregatable(field: str, where: str) -> None:
    assert field in FIELDS, f"{where}: field {field!r} is not in the index template"
    assert FIELDS[field] in AGGREGATABLE, f"{where}: field {field!r} is {FIELDS[field]}, not aggregatable"


def lens_fields(obj: dict) -> list[str]:
    layers = obj["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]
    return [col["sourceField"] for layer in layers.values() for col in layer["columns"].values()]


def test_saved_object_types_and_ids():
    objs = objects()
    assert {o["type"] for o in objs} <= TYPES
    ids = [(o["type"], o["id"]) for o in objs]
    assert len(ids) == len(set(ids))
    assert {o["type"] for o in objs} >= {"index-pattern", "search", "lens", "dashboard"}


def test_references_resolve():
    objs = objects()
    known = {(o["type"], o["id"]) for o in objs}
    for o in objs:
        for ref in o["references"]:
            assert (ref["type"], ref["id"]) in known, f"{o['type']} {o['id']}: dangling reference {ref}"
        names = [r["name"] for r in o["references"]]
        assert len(names) == len(set(names)), o["id"]


def test_every_dashboard_panel_has_its_reference():
    [dash] = [o for o in objects() if o["type"] == "dashboard"]
    panels = json.loads(dash["attributes"]["panelsJSON"])
    refs = {r["name"]: r for r in dash["references"]}
    assert len(panels) == len(refs) >= 7
    for p in panels:
        ref = refs[f"{p['panelIndex']}:{p['panelRefName']}"]
        assert ref["type"] == p["type"]
    # the dashboard holds every visualization and the saved search
    assert {r["id"] for r in refs.values()} == {o["id"] for o in objects() if o["type"] in ("lens", "search")}


def test_lens_layers_use_the_data_view_and_aggregatable_fields():
    for o in objects():
        if o["type"] != "lens":
            continue
        layers = o["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]
        for layer_id, layer in layers.items():
            assert {"type": "index-pattern", "id": "conntracct-flows",
                    "name": f"indexpattern-datasource-layer-{layer_id}"} in o["references"]
            assert sorted(layer["columnOrder"]) == sorted(layer["columns"])
            for col_id, col in layer["columns"].items():
                if col["operationType"] == "count":
                    assert col["sourceField"] == RECORDS
                    continue
                assert_aggregatable(col["sourceField"], f"lens {o['id']} column {col_id}")
                order = col.get("params", {}).get("orderBy", {})
                if order.get("type") == "column":
                    assert order["columnId"] in layer["columns"]
        vis = o["attributes"]["state"]["visualization"]
        used = set(re.findall(r'"(?:xAccessor|splitAccessor|columnId)": "(\w+)"', json.dumps(vis)))
        for accessor_list in re.findall(r'"(?:accessors|primaryGroups|metrics)": \[([^\]]*)\]', json.dumps(vis)):
            used |= set(re.findall(r'"(\w+)"', accessor_list))
        columns = {c for layer in layers.values() for c in layer["columns"]}
        assert used and used <= columns, f"lens {o['id']}: {used - columns} not columns"


def test_saved_search_and_data_view_fields():
    objs = {o["type"]: o for o in objects() if o["type"] in ("search", "index-pattern")}
    search = objs["search"]["attributes"]
    for field in search["columns"] + [s[0] for s in search["sort"]]:
        assert_aggregatable(field, "saved search")
    view = objs["index-pattern"]["attributes"]
    assert FIELDS[view["timeFieldName"]] in ("date", "date_nanos")
    for field in json.loads(view["fieldFormatMap"]):
        assert_aggregatable(field, "data view format")
    source = json.loads(search["kibanaSavedObjectMeta"]["searchSourceJSON"])
    assert source["indexRefName"] in {r["name"] for r in objs["search"]["references"]}


@pytest.mark.parametrize("mode", ["daily", "data_stream"])
def test_data_view_matches_the_sink_indices(mode):
    """The pattern takes the finished-flow indices of both index modes and leaves the live index out."""
    [view] = [o for o in objects() if o["type"] == "index-pattern"]
    parts = view["attributes"]["title"].split(",")
    include = [p for p in parts if not p.startswith("-")]
    exclude = [p[1:] for p in parts if p.startswith("-")]

    def matches(name: str) -> bool:
        def glob(p: str) -> bool:
            return re.fullmatch(re.escape(p).replace(r"\*", ".*"), name) is not None
        return any(map(glob, include)) and not any(map(glob, exclude))

    index = daily_index("conntracct-flows", flow()) if mode == "daily" else "conntracct-flows"
    assert matches(index)
    assert not matches(live_index("conntracct-flows"))
    # the template's own patterns are covered by the data view
    for template in index_templates("conntracct-flows", mode, False).values():
        for pattern in template["index_patterns"]:
            assert matches(pattern.replace("*", "2026.11.30"))
