"""`eventful-bench model`: dense vs eventful on a real video, interleaved per frame, plus frame skipping.

For every frame the dense model and each budget's eventful stream run back to back (rotating the order),
so machine noise hits all of them alike; medians are reported. Fidelity is measured against the dense
model's output on the same frame, and compared with frame skipping at the same compute.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from model.eventful import EventfulConfig, EventfulViT
from model.policy import StreamBudget
from model.vit import VisionTransformer


@dataclass
class BudgetResult:
    budget: float  # tokens per gate (top-r) or threshold (threshold policy)
    policy: str
    eventful_ms: float
    speedup: float
    mac_ratio: float
    efficiency: float  # speedup / mac_ratio
    rel_l2: float  # mean over frames of ||eventful - dense|| / ||dense|| (logits)
    top1_agreement: float
    top5_containment: float  # eventful top-1 inside dense top-5
    updated_fraction: float
    state_bytes: int
    state_breakdown: dict[str, int]
    skip_top1_agreement: float  # frame skipping at the same compute (same mac_ratio)
    skip_rel_l2: float
    rel_l2_first_quarter: float
    rel_l2_last_quarter: float


@dataclass
class ModelBenchReport:
    model: str
    video: str
    frames: int
    level: str
    policy: str
    gate_position: str
    refresh_interval: int | None
    image_size: tuple[int, int]
    tokens: int
    dense_ms: float
    dense_gmacs: float
    dense_consecutive_top1_stability: float  # how often the dense top-1 stays the same frame to frame
    threads: int
    device: str = "cpu"
    results: list[BudgetResult] = field(default_factory=list)


def _clock(device: torch.device) -> float:
    """time.perf_counter once the device has finished what was queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def frame_skip_outputs(dense_logits: torch.Tensor, compute_ratio: float) -> torch.Tensor:
    """Run dense on a 1/compute_ratio share of frames, evenly spread, and repeat the last result."""
    out = torch.empty_like(dense_logits)
    last = None
    for t in range(dense_logits.shape[0]):
        if last is None or math.floor(t / compute_ratio) != math.floor((t - 1) / compute_ratio):
            last = dense_logits[t]
        out[t] = last
    return out


def fidelity(outputs: torch.Tensor, dense_logits: torch.Tensor) -> dict[str, float]:
    """Agreement of per-frame outputs [T, K] with dense [T, K]."""
    top1 = outputs.argmax(-1)
    dense_top5 = dense_logits.topk(5, dim=-1).indices
    rel = [_rel_l2(o, d) for o, d in zip(outputs, dense_logits, strict=True)]
    quarter = max(1, len(rel) // 4)
    return {
        "top1_agreement": float((top1 == dense_logits.argmax(-1)).float().mean()),
        "top5_containment": float((dense_top5 == top1[:, None]).any(-1).float().mean()),
        "rel_l2": statistics.fmean(rel),
        "rel_l2_first_quarter": statistics.fmean(rel[:quarter]),
        "rel_l2_last_quarter": statistics.fmean(rel[-quarter:]),
    }


def _typical_ms(times: list[float], dense: list[bool]) -> float:
    """Mean time per frame of a stream whose frames are of two kinds (dense refreshes and sparse frames): each
    kind's median, weighted by its share. A plain median hides the dense frames (with --refresh 3 it reported
    speedups above the MAC ratio)."""
    kinds = [[t for t, d in zip(times, dense, strict=True) if d == kind] for kind in (True, False)]
    return sum(len(k) * statistics.median(k) for k in kinds if k) / len(times)


def _budget(policy: str, value: float) -> StreamBudget:
    if policy == "topr":
        return StreamBudget(tokens=int(value))
    return StreamBudget(threshold=float(value))


@torch.inference_mode()
def run_model_bench(
    model: VisionTransformer,
    images: torch.Tensor,
    budgets: list[float],
    *,
    model_name: str,
    video_name: str,
    eventful: EventfulConfig,
    policy: str = "topr",
    warmup: int = 2,
    progress=None,
) -> ModelBenchReport:
    """images: [T, 3, H, W] preprocessed frames, on the model's device. Returns the report (see print_table)."""
    t_frames = images.shape[0]
    device = images.device
    runners = [EventfulViT(model, eventful) for _ in budgets]
    states = [runner.new_state() for runner in runners]
    stream_budgets = [_budget(policy, value) for value in budgets]

    for _ in range(warmup):  # warm caches / allocator; not measured
        model(images[:1])
        for runner in runners:
            runner.step(images[:1], [runner.new_state()], [StreamBudget.dense()])

    dense_ms: list[float] = []
    dense_logits = []
    ev_ms: list[list[float]] = [[] for _ in budgets]
    ev_logits: list[list[torch.Tensor]] = [[] for _ in budgets]
    ev_macs: list[list[int]] = [[] for _ in budgets]
    ev_fraction: list[list[float]] = [[] for _ in budgets]
    ev_dense: list[list[bool]] = [[] for _ in budgets]  # which frames ran densely (first, refresh)
    dense_macs = 0
    order = list(range(-1, len(budgets)))  # -1 = dense
    for t in range(t_frames):
        frame = images[t : t + 1]
        rotation = t % len(order)
        for j in order[rotation:] + order[:rotation]:
            start = _clock(device)
            if j < 0:
                logits = model(frame)
                dense_ms.append((_clock(device) - start) * 1e3)
                dense_logits.append(logits[0].cpu())
                continue
            out = runners[j].step(frame, [states[j]], [stream_budgets[j]])
            ev_ms[j].append((_clock(device) - start) * 1e3)
            ev_logits[j].append(out.logits[0].cpu())
            ev_macs[j].append(out.macs[0])
            ev_fraction[j].append(float(out.updated_fraction[0]))
            ev_dense[j].append(out.dense_frame[0])
            dense_macs = out.dense_macs
        if progress is not None:
            progress(t + 1, t_frames)

    dense_stack = torch.stack(dense_logits).float()
    dense_top1 = dense_stack.argmax(-1)
    stability = float((dense_top1[1:] == dense_top1[:-1]).float().mean()) if t_frames > 1 else 1.0
    dense_med = statistics.median(dense_ms)
    report = ModelBenchReport(
        model=model_name, video=video_name, frames=t_frames, level=eventful.level, policy=policy,
        gate_position=eventful.gate_position, refresh_interval=eventful.refresh_interval,
        image_size=tuple(model.config.image_size), tokens=model.config.num_tokens, dense_ms=dense_med,
        dense_gmacs=dense_macs / 1e9, dense_consecutive_top1_stability=stability, threads=torch.get_num_threads(),
        device=str(device),
    )
    for j, value in enumerate(budgets):
        outputs = torch.stack(ev_logits[j]).float()
        mac_ratio = dense_macs * t_frames / sum(ev_macs[j])
        speedup = dense_med / _typical_ms(ev_ms[j], ev_dense[j])
        fid = fidelity(outputs, dense_stack)
        skip = fidelity(frame_skip_outputs(dense_stack, mac_ratio), dense_stack)
        report.results.append(
            BudgetResult(
                budget=value, policy=policy, eventful_ms=_typical_ms(ev_ms[j], ev_dense[j]), speedup=speedup,
                mac_ratio=mac_ratio, efficiency=speedup / mac_ratio, updated_fraction=statistics.fmean(ev_fraction[j]),
                state_bytes=states[j].nbytes, state_breakdown=states[j].breakdown(),
                skip_top1_agreement=skip["top1_agreement"], skip_rel_l2=skip["rel_l2"], **fid,
            )
        )
    return report


def print_table(report: ModelBenchReport) -> str:
    lines = [
        f"model {report.model}  video {report.video}  frames {report.frames}  {report.image_size[0]}x"
        f"{report.image_size[1]} ({report.tokens} tokens)  level {report.level}  policy {report.policy}  "
        f"gate {report.gate_position}  refresh {report.refresh_interval}  threads {report.threads}  "
        f"device {report.device}",
        f"dense: {report.dense_ms:.1f} ms/frame median, {report.dense_gmacs:.2f} GMAC; dense top-1 stable on "
        f"{100 * report.dense_consecutive_top1_stability:.0f}% of consecutive frames",
        f"{'budget':>8} {'ms':>8} {'speedup':>8} {'MACx':>6} {'eff':>5} {'upd%':>5} {'top1%':>6} {'in-top5%':>8} "
        f"{'relL2':>6} {'skip top1%':>10} {'skip relL2':>10} {'state MB':>8}",
    ]
    for r in report.results:
        budget = f"{int(r.budget)}" if r.policy == "topr" else f"h={r.budget:g}"
        lines.append(
            f"{budget:>8} {r.eventful_ms:8.1f} {r.speedup:7.2f}x {r.mac_ratio:5.2f}x {r.efficiency:5.2f} "
            f"{100 * r.updated_fraction:5.1f} {100 * r.top1_agreement:6.1f} {100 * r.top5_containment:8.1f} "
            f"{r.rel_l2:6.3f} {100 * r.skip_top1_agreement:10.1f} {r.skip_rel_l2:10.3f} {r.state_bytes / 1e6:8.1f}"
        )
    if report.results:
        breakdown = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in report.results[0].state_breakdown.items())
        lines.append(f"state per stream (MB): {breakdown}")
    return "\n".join(lines)
