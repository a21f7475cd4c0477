"""What the engine sends back to a stream's connection: plain data, no tensors.

The API turns these into the JSON messages of docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FrameTiming:
    """Where a frame's time went inside the server, in seconds."""

    decode_seconds: float  # bytes -> preprocessed tensor (decode thread)
    queue_seconds: float  # preprocessed -> its batched step starts (waiting for the inference thread / window)
    step_seconds: float  # the batched eventful step it was part of (whole batch)


@dataclass(frozen=True)
class FrameResult:
    """One processed frame."""

    frame: int  # index of the binary message on its connection
    budget_tokens: int  # patch tokens per gate this frame used (num_patches for a dense frame)
    dense: bool  # computed densely (first frame, flushed, refreshed, or budget >= num_patches)
    updated_fraction: float  # mean fraction of tokens updated over all gates
    outputs: dict[str, Any]  # {"top": [{"label", "index", "score"}, ...]}
    received_at: float  # time.perf_counter() when the message arrived
    timing: FrameTiming
    batch_size: int
    reused: bool = False  # the stream's last result served again (frame policy skip / adaptive): no model step
    fidelity: dict[str, Any] | None = None  # the stream's fidelity estimate (adaptive, report_fidelity set)


@dataclass(frozen=True)
class FrameDropped:
    """A frame that was skipped because a newer frame of the same stream arrived first."""

    frame: int


@dataclass(frozen=True)
class FrameError:
    """A frame that could not be used (undecodable, out of limits) or whose step failed."""

    frame: int | None
    code: str
    message: str = field(default="")


StreamMessage = FrameResult | FrameDropped | FrameError
