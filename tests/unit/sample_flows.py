"""FlowEvent factory for unit tests: a plausible record, any field overridable."""

from __future__ import annotations

from typing import Any

from conntracct.flow import NEW, FlowEvent, FlowTuple

T0 = 1_795_000_000_123_456_789   # 2026-11-18T11:06:40.123456789Z


def flow(kind: str = NEW, orig: tuple = ("192.0.2.2", "198.51.100.2", 40000, 80),
         reply: tuple | None = None, **fields: Any) -> FlowEvent:
    """A TCP flow; `reply` defaults to the mirror of `orig` (no NAT)."""
    o = FlowTuple(*orig)
    r = FlowTuple(*reply) if reply is not None else FlowTuple(o.dst, o.src, o.dport, o.sport)
    values: dict[str, Any] = dict(
        kind=kind, flow_id=0x1234ABCD5678EF90, family=6 if ":" in o.src else 4, proto=6,
        orig=o, reply=r, packets_orig=3, bytes_orig=180, packets_reply=2, bytes_reply=120,
        delta_packets_orig=1, delta_bytes_orig=60, delta_packets_reply=1, delta_bytes_reply=40,
        start_ns=T0 - 2_000_000_000, stop_ns=0, ts_ns=T0, netns=4026531840, tcp_state=3,
        status=0x18E)
    values.update(fields)
    return FlowEvent(**values)
