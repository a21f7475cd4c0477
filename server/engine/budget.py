"""Where budgets are decided: the global policy plus per-stream overrides -> tokens per gate for each frame.

Resolved once per frame, when the frame is put into a step plan, so a change applies from the next step on.
In automatic mode (`auto`: a latency target, optional min/max tokens) the engine's budget controller
(`controller.py`) decides the tokens every round and hands them here (`set_auto`); fixed overrides and caps still
apply, and the controller counts them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal


class BudgetError(ValueError):
    """A budget value out of range for this model; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GlobalBudget:
    """The policy for every stream without an override."""

    mode: Literal["fixed", "auto"]
    tokens: int | None = None  # fixed: patch tokens per gate
    fraction: float | None = None  # fixed: fraction of the patch tokens per gate
    target_latency_ms: float | None = None  # auto: end-to-end latency target
    min_tokens: int | None = None  # auto: the controller's floor (default 0)
    max_tokens: int | None = None  # auto: the controller's ceiling (default: the model's patch tokens)


@dataclass(frozen=True)
class StreamOverride:
    """A per-stream rule: replace the global budget (tokens / fraction) or cap it (max_tokens)."""

    tokens: int | None = None
    fraction: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class ResolvedBudget:
    tokens: int  # patch tokens per gate, 0..num_patches
    source: Literal["global", "override", "cap"]


class BudgetPolicy:
    """Thread-safe: the API writes, the inference thread reads on every plan."""

    def __init__(self, num_patches: int, default: GlobalBudget, max_overrides: int = 1024):
        self.num_patches = num_patches
        self.max_overrides = max_overrides
        self._lock = threading.Lock()
        self._overrides: dict[str, StreamOverride] = {}
        self._held_tokens = self._tokens_of_fixed(default) if default.mode == "fixed" else num_patches
        self._global = default
        self._auto_tokens: dict[str, int] = {}  # auto mode: the controller's latest r per stream
        self.set_global(default)

    # ---- global ----------------------------------------------------------------------------

    def set_global(self, budget: GlobalBudget) -> None:
        if budget.mode == "fixed":
            tokens = self._tokens_of_fixed(budget)
            with self._lock:
                self._global, self._held_tokens = budget, tokens
                self._auto_tokens = {}
        else:
            if budget.target_latency_ms is None or not budget.target_latency_ms > 0:
                raise BudgetError("target_latency_ms", "auto mode needs target_latency_ms > 0")
            self._check_tokens("min_tokens", budget.min_tokens)
            self._check_tokens("max_tokens", budget.max_tokens)
            low, high = self.auto_range(budget)
            if low > high:
                raise BudgetError("min_tokens", f"min_tokens ({low}) must not exceed max_tokens ({high})")
            with self._lock:  # the controller starts from the tokens in effect now, within the range
                self._global = budget
                self._held_tokens = min(max(self._held_tokens, low), high)

    def auto_range(self, budget: GlobalBudget) -> tuple[int, int]:
        """(min, max) tokens the controller may give in auto mode."""
        low = 0 if budget.min_tokens is None else budget.min_tokens
        high = self.num_patches if budget.max_tokens is None else budget.max_tokens
        return low, high

    def set_auto(self, level: int, tokens: dict[str, int]) -> None:
        """The controller's decision: r for streams without one of their own (level) and for each listed stream."""
        with self._lock:
            if self._global.mode == "auto":
                self._held_tokens = level
                self._auto_tokens = dict(tokens)

    def get_global(self) -> tuple[GlobalBudget, int]:
        """The policy and the tokens per gate it gives now."""
        with self._lock:
            return self._global, self._held_tokens

    # ---- per stream ------------------------------------------------------------------------

    def set_override(self, stream_id: str, override: StreamOverride) -> None:
        given = [name for name in ("tokens", "fraction", "max_tokens") if getattr(override, name) is not None]
        if len(given) != 1:
            raise BudgetError("body", "give exactly one of tokens, fraction, max_tokens")
        for name in ("tokens", "max_tokens"):
            self._check_tokens(name, getattr(override, name))
        self._check_fraction("fraction", override.fraction)
        with self._lock:
            if stream_id not in self._overrides and len(self._overrides) >= self.max_overrides:
                raise BudgetError("stream_id", f"at most {self.max_overrides} stream overrides; delete some first")
            self._overrides[stream_id] = override

    def get_override(self, stream_id: str) -> StreamOverride | None:
        with self._lock:
            return self._overrides.get(stream_id)

    def clear_override(self, stream_id: str) -> bool:
        with self._lock:
            return self._overrides.pop(stream_id, None) is not None

    def resolve(self, stream_id: str) -> ResolvedBudget:
        """Tokens per gate for this stream's next frame."""
        with self._lock:
            level = self._held_tokens
            base = self._auto_tokens.get(stream_id, level)
            override = self._overrides.get(stream_id)
        if override is None:
            return ResolvedBudget(base, "global")
        if override.max_tokens is not None:
            cap = override.max_tokens
            return ResolvedBudget(min(cap, base), "cap" if cap < max(base, level) else "global")
        if override.tokens is not None:
            return ResolvedBudget(override.tokens, "override")
        return ResolvedBudget(self.fraction_to_tokens(override.fraction), "override")

    def terms(self, stream_id: str) -> tuple[int | None, int | None]:
        """(fixed tokens, cap) of a stream's override, for the controller: what it may not change, and its limit."""
        with self._lock:
            override = self._overrides.get(stream_id)
        if override is None:
            return None, None
        if override.max_tokens is not None:
            return None, override.max_tokens
        if override.tokens is not None:
            return override.tokens, None
        return self.fraction_to_tokens(override.fraction), None

    # ---- conversions and checks ------------------------------------------------------------

    def fraction_to_tokens(self, fraction: float) -> int:
        return min(self.num_patches, max(0, round(fraction * self.num_patches)))

    def _tokens_of_fixed(self, budget: GlobalBudget) -> int:
        if (budget.tokens is None) == (budget.fraction is None):
            raise BudgetError("body", "fixed mode needs exactly one of tokens, fraction")
        if budget.tokens is not None:
            self._check_tokens("tokens", budget.tokens)
            return budget.tokens
        self._check_fraction("fraction", budget.fraction)
        return self.fraction_to_tokens(budget.fraction)

    def _check_tokens(self, name: str, value: int | None) -> None:
        if value is not None and not (0 <= value <= self.num_patches):
            raise BudgetError(name, f"{name} must be between 0 and {self.num_patches} (the model's patch tokens)")

    @staticmethod
    def _check_fraction(name: str, value: float | None) -> None:
        if value is not None and not (0.0 <= value <= 1.0):
            raise BudgetError(name, f"{name} must be between 0 and 1")
