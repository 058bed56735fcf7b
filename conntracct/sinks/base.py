"""What every sink is: a config model, the kinds it wants, write(batch), close().

Queueing, batching, retries and drop counting are not a sink's business: the
pipeline (conntracct.pipeline) does them once for all sinks.  A sink only
writes one batch and says what became of it:

- returns None (or ACCEPTED): every record written;
- returns a WriteResult: written in part -- `retry` records may succeed
  later, `rejected` ones never will, the rest were written (Telegraf's
  PartialWriteError); the pipeline retries the first with back-off and
  drops and counts the second;
- raises TransientSinkError / PermanentSinkError: nothing written (the
  request failed as a whole), and whether trying again could help.

A sink keeps no failure state from one write() to the next: a retry is a
new write() of the records the pipeline passes back.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from ..configtypes import ByteSize, PositiveDuration, StrictModel, config_errors, seconds_text
from ..flow import KINDS, FlowEvent
from ..spool import RECORD_BYTES

Kind = Literal["new", "update", "destroy"]
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _sink_name(value: str | None) -> str | None:
    # Names end up in log lines and metric labels: keep them plain.
    if value is not None and not _NAME.fullmatch(value):
        raise ValueError("expected a name of letters, digits, '_', '.' or '-'")
    return value


def _kind_set(value: frozenset[str]) -> frozenset[str]:
    if not value:
        raise ValueError(f"expected at least one of {', '.join(KINDS)}")
    return value


class RetryConfig(StrictModel):
    max_attempts: int = Field(5, ge=1)         # attempts in all, the first one included
    backoff: PositiveDuration = 0.5            # wait before the 2nd attempt, doubled after
    max_backoff: PositiveDuration = 30.0

    @model_validator(mode="after")
    def _backoff_capped_above_start(self) -> RetryConfig:
        if self.max_backoff < self.backoff:
            raise config_errors([(("max_backoff",), f"expected at least backoff ({self.backoff:g}s)",
                                   seconds_text(self.max_backoff))])
        return self


def _spool_directory(value: str) -> str:
    """An absolute directory the agent can write (or create) spool files in."""
    if not os.path.isabs(value):
        raise ValueError("expected an absolute path of a directory for the spool file")
    if os.path.exists(value):
        if not os.path.isdir(value):
            raise ValueError("expected a directory; this is a file")
        if not os.access(value, os.W_OK | os.X_OK):
            raise ValueError("the agent cannot write in this directory (permissions, or a read-only "
                             "file system)")
        return value
    parent = os.path.dirname(value.rstrip("/"))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"does not exist and the agent cannot create it in {parent}")
    return value


class SpoolConfig(StrictModel):
    """A disk spool for what the sink's memory queue cannot hold
    (conntracct/spool.py): delivered in order, at least once, across outages
    and restarts."""

    path: Annotated[str, AfterValidator(_spool_directory)]
    max_size: ByteSize = Field(1024 ** 3, gt=0)   # records' bytes; a full spool drops NEW/UPDATE first


class SinkConfig(StrictModel):
    """Keys every sink has: its identity and the pipeline settings for it.

    A sink's own model inherits this and adds its keys."""

    type: str
    name: Annotated[str | None, AfterValidator(_sink_name)] = None   # default: type
    queue_size: int = Field(10000, ge=1)
    batch_size: int = Field(500, ge=1)
    flush_interval: PositiveDuration = 1.0
    # Default: every kind; the registry substitutes the sink class's default_kinds.
    kinds: Annotated[frozenset[Kind], AfterValidator(_kind_set)] = frozenset(KINDS)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    spool: SpoolConfig | None = None

    @model_validator(mode="after")
    def _defaults_and_limits(self) -> SinkConfig:
        if self.name is None:
            self.name = self.type
        if self.batch_size > self.queue_size:
            raise config_errors([(("batch_size",), f"expected at most queue_size ({self.queue_size})",
                                  self.batch_size)])
        if self.spool is not None and self.spool.max_size < self.batch_size * RECORD_BYTES:
            least = self.batch_size * RECORD_BYTES
            raise config_errors([(("spool", "max_size"), f"expected at least one batch: batch_size "
                                  f"({self.batch_size}) x {RECORD_BYTES} bytes = {least}",
                                  self.spool.max_size)])
        return self


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What became of a batch written in part.  Records in neither list were
    written.  `reason` says why the others were not (for the log)."""

    retry: Sequence[FlowEvent] = ()      # not written; trying again may succeed (throttled)
    rejected: Sequence[FlowEvent] = ()   # refused for good (e.g. a mapping error)
    reason: str = ""


ACCEPTED = WriteResult()   # every record written


class SinkError(Exception):
    """Base of the errors a sink raises from write() or at start: the whole
    batch failed (a failure of part of it is a WriteResult)."""


class TransientSinkError(SinkError):
    """Trying again later may succeed (timeout, connection refused, 429, 5xx)."""


class PermanentSinkError(SinkError):
    """Trying again cannot help (bad credentials, 4xx, a closed stream)."""


class Sink(ABC):
    """One destination for flow records.  Called from a single worker thread."""

    Config: ClassVar[type[SinkConfig]] = SinkConfig
    default_kinds: ClassVar[frozenset[str]] = frozenset(KINDS)

    def __init__(self, config: SinkConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name or self.config.type

    @abstractmethod
    def write(self, batch: list[FlowEvent]) -> WriteResult | None:
        """Deliver the batch: None (or ACCEPTED) when all of it was written,
        a WriteResult when part of it was not, TransientSinkError /
        PermanentSinkError when none of it was.  Must not modify the events:
        other sinks share them."""

    def observe(self, snapshot: Callable[[], dict]) -> None:  # noqa: B027 - optional hook
        """Called once at start with the agent's counters (Agent.snapshot);
        a sink that exports the agent's own metrics keeps it."""

    def close(self) -> None:  # noqa: B027 - optional hook: most sinks hold nothing
        """Flush and release resources; called once, after the last write()."""
