"""Plain statistics the engine emits; the metrics module turns them into Prometheus metrics.

The engine never imports prometheus_client: it calls a StatsSink with these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepStats:
    """One batched eventful step."""

    batch_size: int
    step_seconds: float
    queue_seconds: list[float]  # per frame: preprocessed -> step start
    updated_fractions: list[float]  # per frame
    macs: int  # multiply-accumulates done by the step (all frames)
    dense_macs: int  # what the same frames would have cost densely


@dataclass(frozen=True)
class FrameEvent:
    """A frame changed state: received, decoded, dropped (superseded), failed (with an error code)."""

    kind: str  # "received" | "decoded" | "processed" | "dropped" | "failed"
    code: str | None = None  # error code for "failed"
    seconds: float | None = None  # decode time for "decoded"


@dataclass(frozen=True)
class AuditStats:
    """One dense audit of an adaptive stream: the served answer against the dense model on the same frame, as the
    model's fidelity measure compares them (model/fidelity.py)."""

    measure: str  # "logits" (classifiers) | "boxes" (detectors)
    error: float  # logits: relative L2 distance from the dense logits; boxes: 1 - mean IoU of the matched boxes
    agreement: float  # logits: 1 when the top-1 classes are equal, else 0; boxes: box F1 at IoU 0.5
    macs: int  # what the audit cost (a dense frame)


@dataclass(frozen=True)
class LatencyStats:
    """End to end: binary message received -> result message handed to the socket."""

    seconds: float


@dataclass(frozen=True)
class EngineSnapshot:
    """Current values for gauges (read at scrape time)."""

    ready: bool
    active_streams: int  # connected streams
    retained_streams: int  # disconnected streams whose state is kept for a resume
    state_bytes: int  # all streams' eventful state, connected and retained
    budget_tokens: int  # the global budget now (tokens per gate)
    num_patches: int
    target_latency_s: float = 0.0  # auto mode's target; 0 in fixed mode
    measured_p95_s: float | None = None  # end to end, over the controller's window (about the last second)
    stream_tokens: tuple[float, int, int] | None = None  # (mean, min, max) tokens per gate over connected streams
    saturated: bool = False  # auto mode: the minimum budget cannot meet the target; frames are being shed
    pool_bytes: int = 0  # the state pool on the model's device: every slot, allocated at start-up (0: none)
    floor_unmet_streams: int = 0  # adaptive streams whose fidelity floor is not met even at every frame dense


class StatsSink(Protocol):
    def step(self, stats: StepStats) -> None: ...

    def frame(self, event: FrameEvent) -> None: ...

    def latency(self, stats: LatencyStats) -> None: ...

    def refused(self, reason: str) -> None: ...

    def audit(self, stats: AuditStats) -> None: ...

    def audit_skipped(self, reason: str) -> None: ...


class NullStats:
    """A StatsSink that records nothing."""

    def step(self, stats: StepStats) -> None:
        pass

    def frame(self, event: FrameEvent) -> None:
        pass

    def latency(self, stats: LatencyStats) -> None:
        pass

    def audit(self, stats: AuditStats) -> None:
        pass

    def audit_skipped(self, reason: str) -> None:
        pass

    def refused(self, reason: str) -> None:
        pass
