"""The InfluxQL data query for grafana-foundation-sdk.

The SDK ships typed queries for Prometheus, Loki, Elasticsearch and others,
but none for InfluxDB (Grafana's InfluxDB data source has no published
schema).  A dashboard's target is any `cog.variants.Dataquery` that encodes
itself with to_json(), so this is the InfluxDB target in raw-query mode, in
the JSON shape Grafana's InfluxDB data source saves (rawQuery: true).
"""

from __future__ import annotations

from typing import Any, Literal

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard


class InfluxQLQuery(cogvariants.Dataquery):
    def __init__(self, query: str = "", ref_id: str = "A", alias: str | None = None,
                 result_format: Literal["time_series", "table"] = "time_series",
                 datasource: dashboard.DataSourceRef | None = None):
        self.query = query
        self.ref_id = ref_id
        self.alias = alias
        self.result_format = result_format
        self.datasource = datasource

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refId": self.ref_id, "rawQuery": True, "query": self.query,
                               "resultFormat": self.result_format}
        if self.alias:
            out["alias"] = self.alias
        if self.datasource is not None:
            out["datasource"] = self.datasource.to_json()
        return out


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    """Builder in the SDK's style: InfluxQL(query).ref_id("A").alias(...)."""

    def __init__(self, query: str) -> None:
        self._internal = InfluxQLQuery(query)

    def build(self) -> InfluxQLQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> InfluxQL:
        self._internal.ref_id = ref_id
        return self

    def alias(self, alias: str) -> InfluxQL:
        self._internal.alias = alias
        return self

    def table(self) -> InfluxQL:
        self._internal.result_format = "table"
        return self

    def datasource(self, ref: dashboard.DataSourceRef) -> InfluxQL:
        self._internal.datasource = ref
        return self
