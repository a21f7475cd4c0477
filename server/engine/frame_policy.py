"""A stream's frame policy in the server: which frames run densely, sparsely or not at all, and its audits.

`eventful` (the default) runs every frame through the eventful step at the stream's token budget. `skip` runs the
dense model on every k-th frame and serves the last result again between (marked `reused`); `keyframe` runs a
dense frame every k-th frame and the stream's token budget between; `adaptive` chooses per stream among frame
skipping and keyframe + sparse at a compute ratio, from online dense audits (model/chooser.py), and honours a
fidelity floor by lowering its compute ratio (more compute) until the floor holds, or says it cannot. What an audit
compares is the runner's fidelity measure (model/fidelity.py): a classifier's logits (top-1 agreement, rel-L2) or a
detector's detections (box F1, mean IoU of the matched boxes); each has its own floors (FLOORS). A clip model's
compute follows its content (RLT), so it takes no ratio and no frame policy: `adaptive` there audits the stream's
clips against the plain model and holds a floor by lowering the stream's own tau (model/clip_audit.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from model.chooser import EXPLORE, AdaptiveConfig, AdaptiveSchedule
from model.clip_audit import ClipAuditConfig, ClipAudits
from model.config import ViTConfig
from model.fidelity import Fidelity
from model.policy import StreamBudget
from model.rlt import clip_macs
from model.schedule import FrameAction, FramePolicy
from server.engine.budget import BudgetError

POLICIES = ("eventful", "skip", "keyframe", "adaptive")
FLOOR_CHECK_FRAMES = 30  # frames between checks of a fidelity floor
FLOOR_STEP = 0.8  # a floor that holds with room lets the compute ratio grow by 1 / this at most per check
FLOORS = {"logits": ("min_top1_agreement", "max_rel_l2"), "boxes": ("min_box_f1",)}  # by fidelity measure
REPORT_EVERY = 10  # frames between refreshes of the estimate result messages carry (report_fidelity)


class PolicyError(BudgetError):
    """A policy setting out of range; `field` names it (the API answers 422, as for budgets)."""


@dataclass(frozen=True)
class StreamPolicySpec:
    """What an operator sets for one stream (PUT /v1/streams/{id}/policy)."""

    policy: str = "eventful"
    ratio: float | None = None  # skip / adaptive: dense MACs over the stream's
    interval: int | None = None  # keyframe: frames per dense frame (skip: instead of ratio)
    audit_share: float = 0.02  # adaptive: share of the stream's compute spent on audits
    min_top1_agreement: float | None = None  # adaptive (classifier): fidelity floor on top-1 agreement with dense
    max_rel_l2: float | None = None  # adaptive (classifier): fidelity floor on the logits' relative L2 error
    min_box_f1: float | None = None  # adaptive (detector): fidelity floor on box F1 against the dense detections
    report_fidelity: bool = False  # adaptive: each result message carries the stream's fidelity estimate
    # adaptive (frame models): how keyframe candidates are measured (model/chooser.py); None: the chooser's default
    explore: str | None = None

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
        if self.min_box_f1 is not None and not 0 <= self.min_box_f1 <= 1:
            raise PolicyError("min_box_f1", f"min_box_f1 must be in [0, 1], got {self.min_box_f1}")
        if self.policy == "skip" and (self.ratio is None) == (self.interval is None):
            raise PolicyError("ratio", "skip takes exactly one of ratio and interval")
        if self.policy == "keyframe" and self.interval is None:
            raise PolicyError("interval", "keyframe needs an interval (frames per dense frame)")
        floors = self.floors
        if floors and self.policy != "adaptive":
            raise PolicyError(floors[0], "a fidelity floor needs the adaptive policy (its audits measure fidelity)")
        if self.report_fidelity and self.policy != "adaptive":
            raise PolicyError("report_fidelity", "report_fidelity needs the adaptive policy (its audits measure it)")
        if self.explore is not None and self.explore not in EXPLORE:
            raise PolicyError("explore", f"explore must be one of {', '.join(EXPLORE)}, not {self.explore!r}")
        if self.explore is not None and self.policy != "adaptive":
            raise PolicyError("explore", "explore needs the adaptive policy (it explores keyframe candidates)")

    def explore_in_effect(self, rlt_tau: float | None) -> str | None:
        """How an adaptive stream of a frame model explores (its setting, or the chooser's default); None otherwise."""
        if self.policy != "adaptive" or rlt_tau is not None:
            return None
        return self.explore or AdaptiveConfig.explore

    @property
    def floors(self) -> list[str]:
        """The fidelity floors set, by field name."""
        return [name for names in FLOORS.values() for name in names if getattr(self, name) is not None]

    def check_fidelity(self, fidelity: Fidelity | None, rlt_tau: float | None = None) -> None:
        """Raises PolicyError where the model cannot serve this setting: adaptive without a fidelity measure (no
        audits) or (frame models) without a ratio, a floor of another measure (a top-1 floor for a detector, a box
        F1 floor for a classifier), and on a clip model (rlt_tau set) a frame policy, a ratio or a trial."""
        if rlt_tau is not None:
            if self.policy in ("skip", "keyframe"):
                raise PolicyError("policy", f"a clip model takes no {self.policy} policy: RLT decides what each "
                                  "clip computes (adaptive audits it and holds a fidelity floor)")
            if self.ratio is not None:
                raise PolicyError("ratio", "a clip model takes no compute ratio: its compute follows its content "
                                  "(RLT); a fidelity floor keeps more tubelets where it needs them")
            if self.explore is not None:
                raise PolicyError("explore", "a clip model has no keyframe candidates to explore (RLT decides what "
                                  "each clip computes)")
        if self.policy != "adaptive":
            return
        if self.ratio is None and rlt_tau is None:
            raise PolicyError("ratio", "adaptive needs a compute ratio")
        if fidelity is None:
            raise PolicyError("policy", "the adaptive policy's audits need a classifier or a detector model")
        for name in self.floors:
            if name not in FLOORS[fidelity.kind]:
                model = "a detector" if fidelity.kind == "boxes" else "a classifier"
                raise PolicyError(name, f"{name} is not a floor for {model}; its floors: "
                                  f"{', '.join(FLOORS[fidelity.kind])}")


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

    def __init__(self, spec: StreamPolicySpec, config: ViTConfig, fidelity: Fidelity | None = None,
                 rlt_tau: float | None = None):
        self.spec = spec
        self.phase = 0
        self.floor_error: str | None = None
        self.frames = 0
        self.adaptive: AdaptiveSchedule | None = None
        self.clip: ClipAudits | None = None  # a clip model's adaptive stream: audits, and its own tau
        self._reported: dict | None = None  # the estimate result messages carry (report_fidelity), and its frame
        self._reported_at = -REPORT_EVERY  # the first message computes it
        self.fixed: FramePolicy | None = None
        if spec.policy == "adaptive" and rlt_tau is not None:
            self.clip = ClipAudits(rlt_tau, clip_macs(config, config.num_patches),
                                   ClipAuditConfig(audit_share=spec.audit_share), spec.max_rel_l2,
                                   spec.min_top1_agreement)
        elif spec.policy == "adaptive":
            self.adaptive = AdaptiveSchedule(config, spec.ratio,
                                             AdaptiveConfig(audit_share=spec.audit_share,
                                                            explore=spec.explore_in_effect(rlt_tau)),
                                             fidelity=fidelity)
        elif spec.policy == "skip":
            self.fixed = FramePolicy("skip", interval=float(spec.interval or spec.ratio))
        elif spec.policy == "keyframe":
            self.fixed = FramePolicy("keyframe", interval=float(spec.interval), tokens=0)

    def plan(self, image: torch.Tensor, tokens: int, has_result: bool) -> FramePlan:
        """This frame's plan. tokens: the stream's token budget now (keyframe policy's sparse frames);
        has_result: a result exists to serve again (else a reuse becomes a dense frame)."""
        if self.clip is not None:  # every frame enters the window; a due clip runs at the stream's tau
            return FramePlan("sparse", StreamBudget(threshold=self.clip.tau), None, self.clip.will_audit())
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

    def skip_audit(self) -> None:
        """The frame planned as audited is served and counted without its audit (no time for it)."""
        if self.adaptive is not None:
            self.adaptive.skip_audit()
        if self.clip is not None:
            self.clip.skip_audit()

    def after(self, action: FrameAction, served: Any, audit, shadow: Any, served_macs: int, shadow_macs: int,
              probes=None) -> int:
        """After the frame is served (adaptive: may run an audit through `audit()`, which returns the dense answer
        of the frame and reseeds the stream). served, shadow: answers as the fidelity measure compares them (class
        logits, Detections; None: a clip stream's frame that classified nothing). Returns the MACs spent measuring."""
        if self.clip is not None:
            self.frames += 1
            if served is None:
                self.clip.skip_audit()  # no clip was due: a drawn audit waits for one
                return 0
            extra = self.clip.after_clip(served, served_macs, audit)
            # a missed floor moves the tau down at once: it stays missed only at tau 0, where nothing is dropped
            self.floor_error = None if self.clip.floor_met else "the fidelity floor is not met even at tau 0"
            return extra
        if self.adaptive is None or served is None:
            return 0
        extra, _ = self.adaptive.after_frame(self.frames, action, served, audit, shadow, shadow_macs, served_macs,
                                             probes)
        self.frames += 1
        if self.frames % FLOOR_CHECK_FRAMES == 0:
            self._check_floor()
        return extra

    def _check_floor(self) -> None:
        """Hold the floor on what the stream is served from now on: the largest compute ratio (at most the one set)
        whose predicted fidelity meets it, from the measured reuse curves (the estimate of the frames served so far
        would answer for old frames, served at another ratio). More compute at once where it is needed; less a step
        at a time where the floor holds with room. Say so where even every frame dense would not meet it."""
        spec, chooser = self.spec, self.adaptive
        max_error = spec.max_rel_l2  # the error floor (classifiers)
        min_agreement = spec.min_top1_agreement if spec.min_top1_agreement is not None else spec.min_box_f1
        if min_agreement is None and max_error is None:
            return
        need = chooser.ratio_for_floor(max_error, min_agreement, spec.ratio)
        if need is None:  # nothing measured yet
            return
        if need < chooser.ratio:
            chooser.set_ratio(need)
        elif need > chooser.ratio:
            chooser.set_ratio(min(need, chooser.ratio / FLOOR_STEP))
        error, agreement = chooser.predicted_at(chooser.ratio)
        met = (max_error is None or error <= max_error) and (min_agreement is None or agreement >= min_agreement)
        self.floor_error = None if met else "the fidelity floor is not met even at ratio 1 (every frame dense)"

    def message_fidelity(self) -> dict | None:
        """What a result message of this stream carries under `fidelity` (report_fidelity set): the estimate as the
        policy view shows it, computed again every REPORT_EVERY frames (not on every frame); None otherwise."""
        if not self.spec.report_fidelity:  # set only with adaptive (a frame or a clip schedule)
            return None
        if self.frames - self._reported_at >= REPORT_EVERY:
            self._reported = self.view()["fidelity"]
            self._reported_at = self.frames
        return self._reported

    def view(self) -> dict:
        """What GET /v1/streams shows: the policy, what it serves now, and (adaptive) the fidelity estimate."""
        out = {"policy": self.spec.policy, "setting": asdict(self.spec)}
        if self.fixed is not None:
            out["serving"] = self.fixed.name
        if self.clip is not None:
            out["serving"] = f"rlt(tau={self.clip.tau:g})"
            out["tau"] = self.clip.tau
            out["fidelity"] = _fidelity_view(self.clip.estimate(), self.clip.fidelity)
            out["floor_met"] = self.floor_error is None
            out["floor_error"] = self.floor_error
        if self.adaptive is not None:
            est = self.adaptive.estimate()
            out["serving"] = self.adaptive.policy.name
            out["explore"] = self.adaptive.config.explore  # (the setting's, or the default where it is null)
            out["effective_ratio"] = self.adaptive.ratio
            out["fidelity"] = _fidelity_view(est, self.adaptive.fidelity)
            out["floor_met"] = self.floor_error is None
            out["floor_error"] = self.floor_error
        return out


def _fidelity_view(est: dict, fidelity: Fidelity) -> dict:
    """The estimate under the names of what it measures: a classifier's `rel_l2` and `top1_agreement`, a detector's
    `box_f1` and `mean_iou` (of the matched boxes: 1 - the box error), each with its interval."""
    view = {"audits": est["audits"], "source": est["source"]}
    if fidelity.kind == "boxes":
        error, (low, high) = est["box_error"], est["box_error_interval"]
        view.update(box_f1=est["box_f1"], box_f1_interval=list(est["box_f1_interval"]),
                    mean_iou=None if error is None else 1.0 - error,
                    mean_iou_interval=[max(0.0, 1.0 - high) if math.isfinite(high) else 0.0, min(1.0, 1.0 - low)])
        return view
    view.update(rel_l2=est["rel_l2"],
                rel_l2_interval=[v if math.isfinite(v) else None for v in est["rel_l2_interval"]],
                top1_agreement=est["top1"], top1_interval=list(est["top1_interval"]))
    return view


__all__ = ["POLICIES", "FramePlan", "PolicyError", "StreamPolicySpec", "StreamSchedule"]
