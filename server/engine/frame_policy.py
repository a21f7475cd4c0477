"""A stream's frame policy in the server: which frames run densely, sparsely or not at all, and its audits.

`eventful` (the default) runs every frame through the eventful step at the stream's token budget. `skip` runs the
dense model on every k-th frame and serves the last result again between (marked `reused`); `keyframe` runs a
dense frame every k-th frame and the stream's token budget between; `adaptive` chooses per stream among frame
skipping and keyframe + sparse at a compute ratio, from online dense audits (model/chooser.py), and honours a
fidelity floor by lowering its compute ratio (more compute) until the floor holds, or says it cannot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from model.chooser import AdaptiveConfig, AdaptiveSchedule
from model.config import ViTConfig
from model.policy import StreamBudget
from model.schedule import FrameAction, FramePolicy
from server.engine.budget import BudgetError

POLICIES = ("eventful", "skip", "keyframe", "adaptive")
FLOOR_CHECK_FRAMES = 30  # frames between checks of a fidelity floor
FLOOR_STEP = 0.8  # a missed floor multiplies the compute ratio by this (more compute); a comfortable one divides


class PolicyError(BudgetError):
    """A policy setting out of range; `field` names it (the API answers 422, as for budgets)."""


@dataclass(frozen=True)
class StreamPolicySpec:
    """What an operator sets for one stream (PUT /v1/streams/{id}/policy)."""

    policy: str = "eventful"
    ratio: float | None = None  # skip / adaptive: dense MACs over the stream's
    interval: int | None = None  # keyframe: frames per dense frame (skip: instead of ratio)
    audit_share: float = 0.02  # adaptive: share of the stream's compute spent on audits
    min_top1_agreement: float | None = None  # adaptive: fidelity floor on top-1 agreement with dense
    max_rel_l2: float | None = None  # adaptive: fidelity floor on the logits' relative L2 error

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise PolicyError("policy", f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.ratio is not None and not (1 <= self.ratio <= 64):
            raise PolicyError("ratio", f"ratio must be in [1, 64], got {self.ratio}")
        if self.interval is not None and not (1 <= self.interval <= 256):
            raise PolicyError("interval", f"interval must be in [1, 256], got {self.interval}")
        if not 0 <= self.audit_share <= 0.5:
            raise PolicyError("audit_share", f"audit_share must be in [0, 0.5], got {self.audit_share}")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise PolicyError("min_top1_agreement", f"must be in [0, 1], got {self.min_top1_agreement}")
        if self.max_rel_l2 is not None and not 0 < self.max_rel_l2 <= 10:
            raise PolicyError("max_rel_l2", f"max_rel_l2 must be in (0, 10], got {self.max_rel_l2}")
        if self.policy == "skip" and (self.ratio is None) == (self.interval is None):
            raise PolicyError("ratio", "skip takes exactly one of ratio and interval")
        if self.policy == "keyframe" and self.interval is None:
            raise PolicyError("interval", "keyframe needs an interval (frames per dense frame)")
        if self.policy == "adaptive" and self.ratio is None:
            raise PolicyError("ratio", "adaptive needs a compute ratio")
        floors = self.min_top1_agreement is not None or self.max_rel_l2 is not None
        if floors and self.policy != "adaptive":
            field = "min_top1_agreement" if self.min_top1_agreement is not None else "max_rel_l2"
            raise PolicyError(field, "a fidelity floor needs the adaptive policy (its audits measure fidelity)")


@dataclass(frozen=True)
class FramePlan:
    """What one frame of a stream does: its action, the budget of a sparse frame, and a shadow step to run on a
    keyframe before its dense step (adaptive only)."""

    action: FrameAction
    budget: StreamBudget | None = None
    shadow: StreamBudget | None = None
    audit: bool = False  # adaptive: the frame is audited after it is served (compared with the dense model's answer)


class StreamSchedule:
    """One stream's frame policy at run time (owned by its record; the inference thread drives it)."""

    def __init__(self, spec: StreamPolicySpec, config: ViTConfig):
        self.spec = spec
        self.phase = 0
        self.floor_error: str | None = None
        self.frames = 0
        self.adaptive: AdaptiveSchedule | None = None
        self.fixed: FramePolicy | None = None
        if spec.policy == "adaptive":
            self.adaptive = AdaptiveSchedule(config, spec.ratio, AdaptiveConfig(audit_share=spec.audit_share))
        elif spec.policy == "skip":
            self.fixed = FramePolicy("skip", interval=float(spec.interval or spec.ratio))
        elif spec.policy == "keyframe":
            self.fixed = FramePolicy("keyframe", interval=float(spec.interval), tokens=0)

    def plan(self, image: torch.Tensor, tokens: int, has_result: bool) -> FramePlan:
        """This frame's plan. tokens: the stream's token budget now (keyframe policy's sparse frames);
        has_result: a result exists to serve again (else a reuse becomes a dense frame)."""
        if self.adaptive is not None:
            action, budget = self.adaptive.next_action(image)
            shadow = self.adaptive.shadow_budget() if action == "dense" else None
        else:
            action = self.fixed.action(self.phase)
            budget, shadow = StreamBudget(tokens=tokens), None
            self.phase += 1
        if action == "reuse" and not has_result:
            action = "dense"
        audit = self.adaptive is not None and self.adaptive.will_audit(action)
        return FramePlan(action, budget if action == "sparse" else None, shadow, audit)

    def after(self, action: FrameAction, served: torch.Tensor | None, audit, shadow: torch.Tensor | None,
              served_macs: int, shadow_macs: int, probes=None) -> int:
        """After the frame is served (adaptive: may run an audit through `audit()`, which returns the dense logits
        of the frame and reseeds the stream). Returns the MACs spent measuring."""
        if self.adaptive is None or served is None:
            return 0
        extra, _ = self.adaptive.after_frame(self.frames, action, served, audit, shadow, shadow_macs, served_macs,
                                             probes)
        self.frames += 1
        if self.frames % FLOOR_CHECK_FRAMES == 0:
            self._check_floor()
        return extra

    def _check_floor(self) -> None:
        """Give the stream more compute while its estimate misses a floor; back towards its ratio once it holds
        comfortably; say so when even dense frames would not do."""
        spec, chooser = self.spec, self.adaptive
        if spec.min_top1_agreement is None and spec.max_rel_l2 is None:
            return
        est = chooser.estimate()
        if est["rel_l2"] is None:
            return
        missed = (spec.max_rel_l2 is not None and est["rel_l2"] > spec.max_rel_l2) or (
            spec.min_top1_agreement is not None and est["top1"] < spec.min_top1_agreement)
        floor_top1 = spec.min_top1_agreement
        comfortable = (spec.max_rel_l2 is None or est["rel_l2"] < 0.7 * spec.max_rel_l2) and (
            floor_top1 is None or est["top1"] > floor_top1 + 0.5 * (1 - floor_top1))
        if missed:
            if chooser.ratio <= 1.0:
                self.floor_error = "the fidelity floor is not met even at ratio 1 (every frame dense)"
            else:
                chooser.set_ratio(max(1.0, chooser.ratio * FLOOR_STEP))
                self.floor_error = None
        elif comfortable and chooser.ratio < spec.ratio:
            chooser.set_ratio(min(spec.ratio, chooser.ratio / FLOOR_STEP))
            self.floor_error = None
        else:
            self.floor_error = None

    def view(self) -> dict:
        """What GET /v1/streams shows: the policy, what it serves now, and (adaptive) the fidelity estimate."""
        out = {"policy": self.spec.policy, "setting": asdict(self.spec)}
        if self.fixed is not None:
            out["serving"] = self.fixed.name
        if self.adaptive is not None:
            est = self.adaptive.estimate()
            out["serving"] = self.adaptive.policy.name
            out["effective_ratio"] = self.adaptive.ratio
            out["fidelity"] = {
                "audits": est["audits"], "source": est["source"], "rel_l2": est["rel_l2"],
                "rel_l2_interval": [v if math.isfinite(v) else None for v in est["rel_l2_interval"]],
                "top1_agreement": est["top1"], "top1_interval": list(est["top1_interval"]),
            }
            out["floor_met"] = self.floor_error is None
            out["floor_error"] = self.floor_error
        return out


__all__ = ["POLICIES", "FramePlan", "PolicyError", "StreamPolicySpec", "StreamSchedule"]
