"""Kibana saved objects for the finished flows the elasticsearch sink
archives (one ECS document per flow: docs/elasticsearch.md): a data view, a
saved search, Lens visualizations and a dashboard holding them, in the shape
Kibana 8 exports (Stack Management > Saved objects > Import reads it back).

Written to dashboards/kibana/conntracct-flows.ndjson by dashboards/build.py;
tests/unit/test_kibana_objects.py checks every field used against the sink's
index template.
"""

from __future__ import annotations

import json
from typing import Any

DATA_VIEW_ID = "conntracct-flows"
# Daily indices (conntracct-flows-YYYY.MM.DD) and the data stream
# (conntracct-flows), without the living-flows index (index_live_flows):
# its documents are not finished flows and would count twice.
DATA_VIEW_PATTERN = "conntracct-flows*,-conntracct-flows-live"
CORE_VERSION = "8.8.0"
TYPE_VERSIONS = {"index-pattern": "8.0.0", "search": "8.0.0", "lens": "8.9.0", "dashboard": "8.9.0"}
LAYER = "flows"   # every Lens visualization here has one layer, on the data view

QUERY = {"query": "", "language": "kuery"}


def saved_object(type_: str, id_: str, attributes: dict, references: list[dict]) -> dict[str, Any]:
    return {"type": type_, "id": id_, "attributes": attributes, "references": references,
            "coreMigrationVersion": CORE_VERSION, "typeMigrationVersion": TYPE_VERSIONS[type_],
            "managed": False}


# -- Lens columns ------------------------------------------------------------

def terms(label: str, field: str, data_type: str, order_by: str, size: int = 10) -> dict:
    return {"label": label, "dataType": data_type, "operationType": "terms", "sourceField": field,
            "isBucketed": True, "scale": "ordinal",
            "params": {"size": size, "orderBy": {"type": "column", "columnId": order_by},
                       "orderDirection": "desc", "otherBucket": True, "missingBucket": False,
                       "parentFormat": {"id": "terms"}}}


def total(label: str, field: str, fmt: str | None = None) -> dict:
    col = {"label": label, "dataType": "number", "operationType": "sum", "sourceField": field,
           "isBucketed": False, "scale": "ratio", "params": {"emptyAsNull": True}}
    if fmt:
        col["params"]["format"] = {"id": fmt, "params": {"decimals": 1}}
    return col


def count(label: str = "Flows") -> dict:
    return {"label": label, "dataType": "number", "operationType": "count", "sourceField": "___records___",
            "isBucketed": False, "scale": "ratio", "params": {"emptyAsNull": True}}


def over_time() -> dict:
    return {"label": "@timestamp", "dataType": "date", "operationType": "date_histogram",
            "sourceField": "@timestamp", "isBucketed": True, "scale": "interval",
            "params": {"interval": "auto", "includeEmptyRows": True, "dropPartials": False}}


def histogram(label: str, field: str) -> dict:
    return {"label": label, "dataType": "number", "operationType": "range", "sourceField": field,
            "isBucketed": True, "scale": "interval",
            "params": {"type": "histogram", "maxBars": "auto", "includeEmptyRows": True,
                       "ranges": [{"from": 0, "to": 1000, "label": ""}]}}


def lens(id_: str, title: str, description: str, vis_type: str, columns: dict[str, dict],
         visualization: dict) -> dict[str, Any]:
    state = {
        "datasourceStates": {"formBased": {"layers": {LAYER: {
            "columns": columns, "columnOrder": list(columns), "incompleteColumns": {}}}}},
        "visualization": visualization,
        "query": QUERY,
        "filters": [],
        "internalReferences": [],
        "adHocDataViews": {},
    }
    return saved_object("lens", id_, {"title": title, "description": description, "visualizationType": vis_type,
                                      "state": state},
                        [{"type": "index-pattern", "id": DATA_VIEW_ID,
                          "name": f"indexpattern-datasource-layer-{LAYER}"}])


def table(id_: str, title: str, description: str, columns: dict[str, dict]) -> dict[str, Any]:
    return lens(id_, title, description, "lnsDatatable", columns, {
        "layerId": LAYER, "layerType": "data", "columns": [{"columnId": c} for c in columns]})


def bars(id_: str, title: str, description: str, columns: dict[str, dict], x: str, y: str,
         split: str | None = None, series: str = "bar_stacked") -> dict[str, Any]:
    layer = {"layerId": LAYER, "layerType": "data", "seriesType": series, "xAccessor": x, "accessors": [y]}
    if split:
        layer["splitAccessor"] = split
    return lens(id_, title, description, "lnsXY", columns, {
        "legend": {"isVisible": True, "position": "right"}, "valueLabels": "hide",
        "preferredSeriesType": series, "layers": [layer]})


def donut(id_: str, title: str, description: str, columns: dict[str, dict], group: str, metric: str):
    return lens(id_, title, description, "lnsPie", columns, {
        "shape": "donut", "layers": [{"layerId": LAYER, "layerType": "data", "primaryGroups": [group],
                                      "metrics": [metric], "numberDisplay": "percent",
                                      "categoryDisplay": "default", "legendDisplay": "default",
                                      "nestedLegend": False}]})


# -- the objects -------------------------------------------------------------

def data_view() -> dict[str, Any]:
    return saved_object("index-pattern", DATA_VIEW_ID, {
        "title": DATA_VIEW_PATTERN, "name": "conntracct finished flows", "timeFieldName": "@timestamp",
        "sourceFilters": "[]", "fieldFormatMap": json.dumps({
            "network.bytes": {"id": "bytes"}, "source.bytes": {"id": "bytes"},
            "destination.bytes": {"id": "bytes"},
            "event.duration": {"id": "duration", "params": {"inputFormat": "nanoseconds",
                                                            "outputFormat": "humanizePrecise"}}}),
        "fieldAttrs": "{}", "runtimeFieldMap": "{}", "fields": "[]", "allowNoIndex": True}, [])


SEARCH_COLUMNS = ["source.ip", "source.port", "destination.ip", "destination.port", "network.transport",
                  "network.direction", "source.bytes", "destination.bytes", "event.duration",
                  "conntrack.tcp_state", "source.nat.ip", "destination.nat.ip"]


def saved_search() -> dict[str, Any]:
    source = {"query": QUERY, "filter": [], "indexRefName": "kibanaSavedObjectMeta.searchSourceJSON.index"}
    return saved_object("search", "conntracct-flows-search", {
        "title": "conntracct: finished flows", "description": "One row per finished flow, newest first.",
        "columns": SEARCH_COLUMNS, "sort": [["@timestamp", "desc"]], "grid": {}, "hideChart": False,
        "isTextBasedQuery": False,
        "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(source)}},
        [{"name": "kibanaSavedObjectMeta.searchSourceJSON.index", "type": "index-pattern", "id": DATA_VIEW_ID}])


def visualizations() -> list[dict[str, Any]]:
    return [
        table("conntracct-top-sources", "Top talkers: sources", "Flow initiators by bytes (both directions).", {
            "host": terms("Source", "source.ip", "ip", "bytes", 20),
            "bytes": total("Bytes", "network.bytes", "bytes"),
            "flows": count()}),
        table("conntracct-top-destinations", "Top talkers: destinations", "Servers reached, by bytes.", {
            "host": terms("Destination", "destination.ip", "ip", "bytes", 20),
            "port": terms("Port", "destination.port", "number", "bytes", 5),
            "bytes": total("Bytes", "network.bytes", "bytes"),
            "flows": count()}),
        bars("conntracct-bytes-over-time", "Bytes over time", "Bytes of the flows that ended in each "
             "interval, by direction.", {
                 "time": over_time(),
                 "bytes": total("Bytes", "network.bytes", "bytes"),
                 "direction": terms("Direction", "network.direction", "string", "bytes", 5)},
             "time", "bytes", "direction"),
        donut("conntracct-flows-by-protocol", "Flows by protocol", "Finished flows by L4 protocol.", {
            "protocol": terms("Protocol", "network.transport", "string", "flows", 10),
            "flows": count()}, "protocol", "flows"),
        bars("conntracct-flows-by-port", "Flows by destination port", "The busiest destination ports, "
             "by protocol.", {
                 "port": terms("Destination port", "destination.port", "number", "flows", 15),
                 "flows": count(),
                 "protocol": terms("Protocol", "network.transport", "string", "flows", 5)},
             "port", "flows", "protocol"),
        table("conntracct-nat", "NAT translations", "Flows whose addresses were translated: source.nat.ip is "
              "the source as the server saw it (SNAT), destination.nat.ip the real server (DNAT).", {
                  "src": terms("Source", "source.ip", "ip", "flows", 20),
                  "src_nat": terms("Translated source", "source.nat.ip", "ip", "flows", 5),
                  "dst": terms("Destination", "destination.ip", "ip", "flows", 10),
                  "dst_nat": terms("Translated destination", "destination.nat.ip", "ip", "flows", 5),
                  "flows": count(),
                  "bytes": total("Bytes", "network.bytes", "bytes")}),
        bars("conntracct-duration", "Flow duration", "Finished flows by how long they lived "
             "(event.duration, nanoseconds).", {
                 "duration": histogram("Duration (ns)", "event.duration"),
                 "flows": count()},
             "duration", "flows", series="bar"),
    ]


def dashboard(panels: list[dict[str, Any]]) -> dict[str, Any]:
    layout = [(0, 0, 24, 12), (0, 12, 12, 14), (12, 12, 12, 14), (0, 26, 12, 14), (12, 26, 12, 14),
              (0, 40, 24, 14), (0, 54, 24, 12), (0, 66, 24, 16)]
    order = ["conntracct-bytes-over-time", "conntracct-top-sources", "conntracct-top-destinations",
             "conntracct-flows-by-protocol", "conntracct-flows-by-port", "conntracct-nat", "conntracct-duration",
             "conntracct-flows-search"]
    by_id = {p["id"]: p for p in panels}
    panels_json, references = [], []
    for i, (obj_id, (x, y, w, h)) in enumerate(zip(order, layout, strict=True), 1):
        index = str(i)
        panels_json.append({"type": by_id[obj_id]["type"], "gridData": {"x": x, "y": y, "w": w, "h": h, "i": index},
                            "panelIndex": index, "embeddableConfig": {"enhancements": {}},
                            "panelRefName": f"panel_{index}"})
        references.append({"name": f"{index}:panel_{index}", "type": by_id[obj_id]["type"], "id": obj_id})
    return saved_object("dashboard", "conntracct-flows-dashboard", {
        "title": "conntracct: finished flows", "description": "Flows archived by the conntracct agent's "
        "elasticsearch sink: top talkers, bytes over time, protocols and ports, NAT, durations.",
        "panelsJSON": json.dumps(panels_json), "timeRestore": False, "version": 1,
        "optionsJSON": json.dumps({"useMargins": True, "syncColors": False, "syncCursor": True,
                                   "syncTooltips": False, "hidePanelTitles": False}),
        "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps({"query": QUERY, "filter": []})}},
        references)


def saved_objects() -> list[dict[str, Any]]:
    """In import order: what an object references comes before it."""
    search = saved_search()
    vis = visualizations()
    return [data_view(), search, *vis, dashboard([*vis, search])]
