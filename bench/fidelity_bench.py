"""`eventful-bench fidelity`: every policy against the dense model and against frame skipping at equal compute.

For each video and compute ratio, each policy family runs frame by frame at the setting that spends 1/ratio of
the dense MACs (frame skipping; keyframe + sparse at several keyframe intervals; top-r) and `adaptive` (the
per-stream chooser with its online dense audits, audit compute counted in its ratio). Fidelity is measured on
every frame against the dense model on that frame: on the class logits (top-1 agreement, relative L2) and on the
final patch-token features after the last LayerNorm (what a detection or tracking head reads): per-token relative
L2 over all tokens, and over the moving 10 % (the tokens whose dense feature changed most since the last frame).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from model.chooser import AdaptiveConfig, AdaptiveSchedule
from model.eventful import EventfulConfig, EventfulViT
from model.macs import dense_macs
from model.policy import StreamBudget
from model.schedule import FramePolicy, policy_for_ratio
from model.vit import VisionTransformer

KEYFRAME_INTERVALS = (2, 3, 4, 6, 8)
SEED = StreamBudget(tokens=0)  # any sparse budget: a flushed state computes every token and seeds its buffers
MOVING_SHARE = 0.1
MAX_PHASES = 12  # phases of frame skipping's pattern scored (a ratio p/q has p)


@dataclass
class Served:
    """What one policy served on every frame of a video."""

    logits: torch.Tensor  # [T, K]
    features: torch.Tensor  # [T, Np, C] final patch tokens after the last LayerNorm
    macs: list[int]
    actions: list[str]
    estimates: list[dict] = field(default_factory=list)  # adaptive: the chooser's fidelity estimate at the end


def _patch_features(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    # tokens: [B, N, C] final residual stream -> [B, Np, C] normed patch tokens
    return model.norm(tokens[:, model.config.num_prefix_tokens :])


@torch.inference_mode()
def dense_reference(model: VisionTransformer, images: torch.Tensor) -> Served:
    logits, features = [], []
    for t in range(images.shape[0]):
        tokens = model.forward_features(images[t : t + 1])
        logits.append(model.forward_head(tokens)[0])
        features.append(_patch_features(model, tokens)[0])
    macs = dense_macs(model.config)
    return Served(torch.stack(logits), torch.stack(features), [macs] * images.shape[0], ["dense"] * images.shape[0])


@torch.inference_mode()
def run_schedule(model: VisionTransformer, images: torch.Tensor, schedule, level: str = "tokenwise",
                 gate_position: str = "residual") -> Served:
    """Serve every frame as `schedule` says: a FramePolicy, or an AdaptiveSchedule (which also measures: a shadow
    sparse step before a keyframe, and audits that run the dense model after a frame is served and reseed)."""
    runner = EventfulViT(model, EventfulConfig(level=level, gate_position=gate_position))
    state = runner.new_state()
    logits, features, macs, actions = [], [], [], []
    adaptive = isinstance(schedule, AdaptiveSchedule)
    last: list[torch.Tensor] = []  # [logits [K], features [Np, C]] of the last computed frame
    probes = _Probes(runner, state)

    def compute(frame: torch.Tensor, action: str, budget) -> int:
        if action == "dense":  # every token through the eventful path, seeding the state for the frames after
            state.flush()
            budget = SEED
        out = runner.step(frame, [state], [budget])
        last[:] = [out.logits[0], _patch_features(model, out.tokens)[0]]
        return out.macs[0]

    for t in range(images.shape[0]):
        frame = images[t : t + 1]
        if adaptive:
            action, budget = schedule.next_action(frame[0])
        else:
            action, budget = schedule.action(t), schedule.budget
        shadow, shadow_macs = None, 0
        if adaptive and action == "dense" and (shadow_budget := schedule.shadow_budget()) is not None:
            out = runner.step(frame, [state], [shadow_budget])  # the sparse chain on the keyframe, before reseeding
            shadow, shadow_macs = out.logits[0], out.macs[0]
        cost = 0 if action == "reuse" else compute(frame, action, budget)
        served_logits, served_features = last
        logits.append(served_logits)
        features.append(served_features)
        if adaptive:
            def audit(f=frame) -> torch.Tensor:
                compute(f, "dense", SEED)  # the audit's MACs are the schedule's to count
                return last[0]

            probes.frame = frame
            extra, _ = schedule.after_frame(t, action, served_logits, audit, shadow, shadow_macs, cost, probes)
            cost += extra
        macs.append(cost)
        actions.append(action)
    served = Served(torch.stack(logits), torch.stack(features), macs, actions)
    if adaptive:
        served.estimates = [schedule.estimate()]
    return served


class _Probes:
    """A probe's copy of one stream's state, and its unserved sparse steps on the current frame."""

    def __init__(self, runner: EventfulViT, state):
        self.runner, self.state = runner, state
        self.copy = None
        self.frame: torch.Tensor | None = None  # [1, 3, H, W]

    def start(self) -> None:
        self.copy = self.state.clone()

    def step(self, budget) -> tuple[torch.Tensor, int]:
        out = self.runner.step(self.frame, [self.copy], [budget])
        return out.logits[0], out.macs[0]

    def stop(self) -> None:
        self.copy = None


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a, b: [..., D] -> [...]
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)


def score(served: Served, dense: Served, moving: torch.Tensor) -> dict[str, float]:
    """Fidelity of `served` against `dense` on every frame. moving: [T, Np] bool, the moving tokens per frame."""
    rel = _rel_l2(served.logits.float(), dense.logits.float())  # [T]
    token_rel = _rel_l2(served.features.float(), dense.features.float())  # [T, Np]
    quarter = max(1, rel.numel() // 4)
    moving_rel = [float(token_rel[t][moving[t]].mean()) for t in range(1, moving.shape[0])]
    return {
        "top1_agreement": float((served.logits.argmax(-1) == dense.logits.argmax(-1)).float().mean()),
        "rel_l2": float(rel.mean()),
        "rel_l2_first_quarter": float(rel[:quarter].mean()),
        "rel_l2_last_quarter": float(rel[-quarter:].mean()),
        "token_rel_l2": float(token_rel.mean()),
        "moving_token_rel_l2": statistics.fmean(moving_rel) if moving_rel else 0.0,
    }


def moving_tokens(dense: Served, share: float = MOVING_SHARE) -> torch.Tensor:
    """[T, Np] bool: per frame, the `share` of patch tokens whose dense feature changed most since the last frame."""
    feats = dense.features.float()
    change = torch.zeros(feats.shape[:2])
    change[1:] = (feats[1:] - feats[:-1]).norm(dim=-1)
    k = max(1, round(share * feats.shape[1]))
    top = change.topk(k, dim=1).indices
    return torch.zeros_like(change, dtype=torch.bool).scatter_(1, top, True)


def skip_at_phase(dense: Served, ratio: float, shift: int) -> Served:
    """Frame skipping at this ratio with its keyframe pattern shifted by `shift` frames, from the dense reference (a
    skipped frame serves the last dense result; frame 0 is dense whatever the phase: there is nothing to serve)."""
    source, last = [], 0
    for t in range(dense.logits.shape[0]):
        if t == 0 or math.floor((t + shift) / ratio) != math.floor((t + shift - 1) / ratio):
            last = t
        source.append(last)
    index = torch.tensor(source)
    return Served(dense.logits[index], dense.features[index], [dense.macs[0] * (s == t) for t, s in enumerate(source)],
                  ["dense" if s == t else "reuse" for t, s in enumerate(source)])


def skip_phases(dense: Served, moving: torch.Tensor, ratio: float) -> dict:
    """Frame skipping at this ratio over every phase of its keyframe pattern (the frame a user's skipping starts on
    is arbitrary): the mean and range of its fidelity. Phase 0 is the `skip` row's pattern."""
    period = Fraction(ratio).limit_denominator(MAX_PHASES).numerator  # a ratio p/q repeats every p frames
    rows = []
    for shift in range(min(period, MAX_PHASES)):
        served = skip_at_phase(dense, ratio, shift)
        rows.append({"mac_ratio": len(served.macs) * dense.macs[0] / sum(served.macs), **score(served, dense, moving)})
    keys = ("mac_ratio", "top1_agreement", "rel_l2", "token_rel_l2", "moving_token_rel_l2")
    return {"phases": len(rows), **{f"{k}_mean": statistics.fmean(r[k] for r in rows) for k in keys},
            **{f"{k}_range": [min(r[k] for r in rows), max(r[k] for r in rows)] for k in keys if k != "mac_ratio"}}


def fixed_policies(model: VisionTransformer, ratio: float, level: str) -> list[tuple[str, FramePolicy]]:
    """(family, policy) pairs that spend 1/ratio of the dense compute."""
    out = [("skip", policy_for_ratio("skip", ratio, model.config, level=level))]
    for k in KEYFRAME_INTERVALS:
        policy = policy_for_ratio("keyframe", ratio, model.config, interval=k, level=level)
        if policy is not None:
            out.append((f"keyframe{k}", policy))
    topr = policy_for_ratio("topr", ratio, model.config, level=level)
    if topr is not None:
        out.append(("topr", topr))
    return out





POLICY_FAMILIES = ("skip", "keyframe", "topr", "adaptive")


def run_video(model: VisionTransformer, images: torch.Tensor, ratios: list[float], *, video: str,
              level: str = "tokenwise", adaptive: AdaptiveConfig | None = None, progress=None,
              families: tuple[str, ...] = POLICY_FAMILIES, gate_position: str = "residual") -> dict:
    """One video's rows: every fixed policy family and `adaptive` at every ratio (`skip` always: it is the
    yardstick)."""
    dense = dense_reference(model, images)
    moving = moving_tokens(dense)
    top1 = dense.logits.argmax(-1)
    stability = float((top1[1:] == top1[:-1]).float().mean()) if top1.numel() > 1 else 1.0
    dense_frame_macs = dense.macs[0]
    results = []
    for ratio in ratios:
        for family, policy in fixed_policies(model, ratio, level):
            if family != "skip" and family.rstrip("0123456789") not in families:
                continue
            served = run_schedule(model, images, policy, level, gate_position)
            results.append(_row(ratio, family, policy.name, served, dense, moving, dense_frame_macs))
            if family == "skip":
                results[-1]["phases"] = skip_phases(dense, moving, ratio)
            if progress:
                progress(video, ratio, family)
        if "adaptive" not in families:
            continue
        schedule = AdaptiveSchedule(model.config, ratio, adaptive or AdaptiveConfig(), level=level)
        served = run_schedule(model, images, schedule, level, gate_position)
        row = _row(ratio, "adaptive", "adaptive", served, dense, moving, dense_frame_macs)
        row.update(_audit_report(served, dense))
        row["choices"] = schedule.choice_counts()
        results.append(row)
        if progress:
            progress(video, ratio, "adaptive")
    return {"video": video, "frames": images.shape[0], "dense_stability": stability, "results": results}


def _row(ratio: float, family: str, setting: str, served: Served, dense: Served, moving: torch.Tensor,
         dense_frame_macs: int) -> dict:
    mac_ratio = dense_frame_macs * len(served.macs) / max(1, sum(served.macs))
    return {"ratio": ratio, "policy": family, "setting": setting, "mac_ratio": mac_ratio,
            **score(served, dense, moving)}


def _audit_report(served: Served, dense: Served) -> dict:
    """Whether the chooser's final audit intervals hold the true values over the same frames."""
    if not served.estimates:
        return {"audits": 0, "audit_interval": None, "audit_covers": None}
    final = served.estimates[-1]
    true_rel = float(_rel_l2(served.logits.float(), dense.logits.float()).mean())
    true_top1 = float((served.logits.argmax(-1) == dense.logits.argmax(-1)).float().mean())
    lo, hi = final["rel_l2_interval"]
    tlo, thi = final["top1_interval"]
    return {
        "audits": final["audits"],
        "audit_rel_l2_interval": [lo, hi],
        "audit_top1_interval": [tlo, thi],
        "audit_covers": bool(lo <= true_rel <= hi and tlo <= true_top1 <= thi),
    }


def print_table(report: dict) -> str:
    lines = [f"model {report['model']}  level {report['level']}  image {report['image_size']}"]
    header = (f"{'ratio':>5} {'policy':<11} {'setting':<22} {'MACx':>5} {'top1%':>6} {'relL2':>6} {'1stQ':>6} "
              f"{'lastQ':>6} {'tokL2':>6} {'movL2':>6}  vs skip (relL2, movL2)  vs skip's phases (relL2)")
    for video in report["videos"]:
        lines.append(f"\n{video['video']}: {video['frames']} frames, dense top-1 stable on "
                     f"{100 * video['dense_stability']:.0f}% of consecutive frames")
        lines.append(header)
        skip = {r["ratio"]: r for r in video["results"] if r["policy"] == "skip"}
        for r in video["results"]:
            s = skip[r["ratio"]]
            lines.append(
                f"{r['ratio']:5.2g} {r['policy']:<11} {r['setting']:<22} {r['mac_ratio']:5.2f} "
                f"{100 * r['top1_agreement']:6.1f} {r['rel_l2']:6.3f} {r['rel_l2_first_quarter']:6.3f} "
                f"{r['rel_l2_last_quarter']:6.3f} {r['token_rel_l2']:6.3f} {r['moving_token_rel_l2']:6.3f}  "
                f"{r['rel_l2'] / max(s['rel_l2'], 1e-12):5.2f}x "
                f"{r['moving_token_rel_l2'] / max(s['moving_token_rel_l2'], 1e-12):5.2f}x"
                + (f"  {r['rel_l2'] / max(s['phases']['rel_l2_mean'], 1e-12):5.2f}x" if "phases" in s else "")
                + (f"  audits {r['audits']} covers {r['audit_covers']} {r.get('choices', '')}"
                   if r["policy"] == "adaptive" else "")
            )
            if "phases" in r:
                p = r["phases"]
                lines.append(
                    f"{'':5} {'':<11} {'over ' + str(p['phases']) + ' phases':<22} {p['mac_ratio_mean']:5.2f} "
                    f"{100 * p['top1_agreement_mean']:6.1f} {p['rel_l2_mean']:6.3f} {'':6} {'':6} "
                    f"{p['token_rel_l2_mean']:6.3f} {p['moving_token_rel_l2_mean']:6.3f}  relL2 "
                    f"{p['rel_l2_range'][0]:.3f}-{p['rel_l2_range'][1]:.3f}, top-1 "
                    f"{100 * p['top1_agreement_range'][0]:.1f}-{100 * p['top1_agreement_range'][1]:.1f} %")
    if "coverage" in report:
        lines.append(f"\naudit intervals holding the true values: {report['coverage']}")
    return "\n".join(lines)


def coverage(report: dict) -> dict:
    """How often the adaptive rows' audit intervals held the true values, over (video, ratio) cases."""
    cases = [r["audit_covers"] for v in report["videos"] for r in v["results"]
             if r["policy"] == "adaptive" and r.get("audit_covers") is not None]
    return {"cases": len(cases), "covered": sum(cases), "share": (sum(cases) / len(cases)) if cases else None}
