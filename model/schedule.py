"""Policies as schedules over frames and tokens, per stream.

Each frame of a stream is one of three actions:
  "dense"  - every token computed (a keyframe): the dense model's answer, and the stream's state reseeded;
  "sparse" - the eventful step under a token budget (top-r or threshold) against the stream's state;
  "reuse"  - nothing computed: the last answer is served again (marked reused), at near-zero cost.
A `FramePolicy` is the rule that picks the action: frame skipping (dense every k-th frame, reuse between: what a
user does without us), keyframe + sparse (dense every k-th frame, a token budget between: the I/P-frame structure
of video codecs), top-r and threshold (dense once, sparse after). `interval` may be fractional: keyframes fall
where floor(n / interval) steps, so the long-run share of dense frames is exactly 1 / interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from model.config import ViTConfig
from model.macs import dense_macs, embed_macs, eventful_block_macs, head_macs
from model.policy import StreamBudget

FrameAction = Literal["dense", "sparse", "reuse"]
POLICY_KINDS: tuple[str, ...] = ("dense", "skip", "keyframe", "topr", "threshold")


@dataclass(frozen=True)
class FramePolicy:
    """One stream's schedule. kind: dense | skip | keyframe | topr | threshold.

    interval: frames per keyframe (skip, keyframe; >= 1); tokens / threshold: the budget of sparse frames.
    """

    kind: str
    interval: float | None = None
    tokens: int | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy must be one of {POLICY_KINDS}, got {self.kind!r}")
        if self.kind in ("skip", "keyframe") and not (self.interval is not None and self.interval >= 1):
            raise ValueError(f"{self.kind} needs an interval >= 1 (frames per keyframe), got {self.interval!r}")
        if self.kind in ("keyframe", "topr") and self.tokens is None:
            raise ValueError(f"{self.kind} needs a token budget")
        if self.kind == "threshold" and self.threshold is None:
            raise ValueError("threshold needs a threshold")

    @property
    def name(self) -> str:
        if self.kind == "skip":
            return f"skip(k={self.interval:g})"
        if self.kind == "keyframe":
            return f"keyframe(k={self.interval:g},r={self.tokens})"
        if self.kind == "topr":
            return f"topr(r={self.tokens})"
        if self.kind == "threshold":
            return f"threshold(h={self.threshold:g})"
        return "dense"

    @property
    def budget(self) -> StreamBudget:
        """The budget of this policy's sparse frames."""
        return StreamBudget(tokens=self.tokens, threshold=self.threshold)

    def is_keyframe(self, n: int) -> bool:
        """Frame n (0 = first under this policy) is a keyframe."""
        if self.kind == "dense" or n == 0:
            return True
        if self.interval is None:
            return False
        return math.floor(n / self.interval) != math.floor((n - 1) / self.interval)

    def action(self, n: int) -> FrameAction:
        """What frame n (counted from when the policy took over the stream) does."""
        if self.is_keyframe(n):
            return "dense"
        return "reuse" if self.kind == "skip" else "sparse"


def sparse_frame_macs(config: ViTConfig, tokens: int, level: str = "tokenwise") -> int:
    """MACs of one sparse frame where every gate lets `tokens` patch tokens through (plus the prefix tokens)."""
    n = min(tokens, config.num_patches) + config.num_prefix_tokens
    return embed_macs(config) + head_macs(config) + config.depth * eventful_block_macs(config, level, n, n, n)


def mac_fraction(policy: FramePolicy, config: ViTConfig, level: str = "tokenwise") -> float:
    """Long-run MACs per frame of a fixed-budget policy, as a fraction of a dense frame (threshold: unknown)."""
    dense = dense_macs(config)
    if policy.kind == "dense":
        return 1.0
    if policy.kind == "skip":
        return 1.0 / policy.interval
    if policy.kind == "threshold":
        raise ValueError("a threshold policy's cost depends on the video; measure it")
    sparse = sparse_frame_macs(config, policy.tokens, level) / dense
    if policy.kind == "topr":
        return sparse
    return (1.0 + (policy.interval - 1.0) * sparse) / policy.interval


def policy_for_ratio(
    kind: str, ratio: float, config: ViTConfig, interval: float | None = None, level: str = "tokenwise"
) -> FramePolicy | None:
    """The policy of this kind that spends 1/ratio of the dense MACs per frame (its token budget solved for), or
    None where it cannot: a keyframe interval at or below the ratio leaves nothing for the sparse frames."""
    if ratio < 1:
        raise ValueError(f"compute ratio must be >= 1, got {ratio}")
    if kind == "skip":
        return FramePolicy("skip", interval=ratio)
    if kind == "dense":
        return FramePolicy("dense") if ratio == 1 else None
    if kind not in ("topr", "keyframe"):
        raise ValueError(f"cannot solve a {kind!r} policy for a compute ratio")
    k = 1.0 if kind == "topr" else float(interval)
    if kind == "keyframe" and k <= ratio:
        return None
    # per sparse frame, as a fraction of dense: topr 1/ratio; keyframe (k/ratio - 1) / (k - 1)
    target = 1.0 / ratio if kind == "topr" else (k / ratio - 1.0) / (k - 1.0)
    dense = dense_macs(config)
    lo, hi = 0, config.num_patches  # largest r whose sparse frame fits the target
    if sparse_frame_macs(config, 0, level) / dense > target:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sparse_frame_macs(config, mid, level) / dense <= target:
            lo = mid
        else:
            hi = mid - 1
    if kind == "topr":
        return FramePolicy("topr", tokens=lo)
    return FramePolicy("keyframe", interval=k, tokens=lo)


__all__ = ["FrameAction", "FramePolicy", "POLICY_KINDS", "mac_fraction", "policy_for_ratio", "sparse_frame_macs"]
