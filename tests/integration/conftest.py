"""Real servers for the sink tests, as session fixtures (tests/servers/)."""

from tests.servers.influx import influxd, influxd_auth, victoria_metrics  # noqa: F401
from tests.servers.prometheus import prometheus_server  # noqa: F401
