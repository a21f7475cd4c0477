"""Per-stream budgets: how many tokens (top-r) or how much change (threshold) a stream's gates update per frame.

The gates themselves (ranking and masks inside the fixed-shape step) are in model/eventful.py."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamBudget:
    """One stream's budget for one frame.

    tokens: top-r policy, at most r patch tokens per gate (prefix tokens are always updated on top).
    threshold: threshold policy, update patch tokens whose RMS change is >= threshold (0 updates all).
    Both set: threshold, capped at `tokens`. Neither set: every token (dense).
    """

    tokens: int | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 0):
            raise ValueError(f"budget tokens must be a non-negative integer, got {self.tokens!r}")
        if self.threshold is not None and not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ValueError(f"budget threshold must be a finite number >= 0, got {self.threshold!r}")

    @classmethod
    def dense(cls) -> StreamBudget:
        return cls()

    def is_dense_for(self, num_patches: int) -> bool:
        """True when this budget selects every token whatever the change (so the step may run densely)."""
        tokens_all = self.tokens is None or self.tokens >= num_patches
        threshold_all = self.threshold is None or self.threshold == 0
        return tokens_all and threshold_all
