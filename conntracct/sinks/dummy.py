"""dummy sink (`type: dummy`): counts the records it gets and discards them.

conntracct (Go) has it to measure the agent without any backend; here too:
the pipeline's per-sink counters show what it received and wrote, and
`records` / `batches` say the same from the sink's side.
"""

from __future__ import annotations

from typing import Literal

from ..flow import FlowEvent
from .base import ACCEPTED, Sink, SinkConfig, WriteResult


class DummyConfig(SinkConfig):
    type: Literal["dummy"]


class DummySink(Sink):
    Config = DummyConfig

    def __init__(self, config: DummyConfig):
        super().__init__(config)
        self.records = 0
        self.batches = 0

    def write(self, batch: list[FlowEvent]) -> WriteResult:
        self.records += len(batch)
        self.batches += 1
        return ACCEPTED
