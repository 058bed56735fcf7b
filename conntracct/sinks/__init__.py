"""The sink registry: config `type` -> sink class.

Adding a sink = one module with one Sink subclass + one entry here.  Modules
import their client libraries inside the class, so an unused sink costs
nothing at start-up.
"""

from __future__ import annotations

from .base import ACCEPTED, PermanentSinkError, Sink, SinkConfig, TransientSinkError, WriteResult
from .dummy import DummySink
from .elasticsearch import ElasticsearchSink
from .influxdb import InfluxDBSink
from .influxdb_udp import InfluxDBUDPSink
from .ipfix import IPFIXSink
from .prometheus import PrometheusSink
from .stdout import StdoutSink

SINKS: dict[str, type[Sink]] = {
    "stdout": StdoutSink,
    "stderr": StdoutSink,
    "elasticsearch": ElasticsearchSink,
    "prometheus": PrometheusSink,
    "influxdb": InfluxDBSink,
    "ipfix": IPFIXSink,
    "dummy": DummySink,
    "influxdb-udp": InfluxDBUDPSink,
}


def create_sink(config: SinkConfig) -> Sink:
    """An instance of the sink a validated config describes."""
    return SINKS[config.type](config)


__all__ = ["ACCEPTED", "SINKS", "PermanentSinkError", "Sink", "SinkConfig", "TransientSinkError",
           "WriteResult", "create_sink"]
