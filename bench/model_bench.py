"""`eventful-bench model`: dense vs eventful on a real video, interleaved per step, plus frame skipping.

B streams play the same video from different offsets (stream j from frame j * T // B), one batched step per frame.
For every step the dense model (over the same [B, 3, H, W] batch) and each budget's eventful streams run back to
back (rotating the order), so machine noise hits all of them alike; medians are reported. A budget may differ
between streams in one step (64:32: alternating streams get r = 64 and r = 32). Fidelity is measured per stream
against the dense model's output on the same frame, and compared with frame skipping at the same compute, then
averaged over the streams. After the timed steps, one warm step of each is profiled for what it launches
(bench.kernel_ops).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.kernel_ops import count_launches
from model.eventful import EventfulConfig, EventfulViT
from model.policy import StreamBudget
from model.vit import VisionTransformer

BudgetSpec = tuple[float, ...]  # budgets of streams 0, 1, 2, ... repeating: (64, 32) alternates r = 64 and r = 32


@dataclass
class BudgetResult:
    budget: float  # tokens per gate (top-r) or threshold (threshold policy); mixed budgets: the streams' mean
    policy: str
    eventful_ms: float  # per step of all the streams
    speedup: float  # dense step time over eventful step time, the same streams
    mac_ratio: float  # dense MACs over eventful MACs, all streams and frames
    efficiency: float  # speedup / mac_ratio
    rel_l2: float  # mean over frames of ||eventful - dense|| / ||dense|| (logits), per stream, then over streams
    top1_agreement: float
    top5_containment: float  # eventful top-1 inside dense top-5
    updated_fraction: float
    state_bytes: int  # one stream's
    state_breakdown: dict[str, int]
    skip_top1_agreement: float  # frame skipping on each stream at that stream's MAC ratio (the same compute)
    skip_rel_l2: float
    rel_l2_first_quarter: float
    rel_l2_last_quarter: float
    budget_spec: str = ""  # as asked: "64", "64:32" (streams alternate), "h=0.1"
    stream_budgets: list[float] = field(default_factory=list)  # stream j's budget
    stream_mac_ratios: list[float] = field(default_factory=list)  # stream j's dense MACs over its eventful MACs
    kernel_ops_per_step: int | None = None  # one warm sparse step over all the streams (bench.kernel_ops)
    host_syncs_per_step: int | None = None
    device_kernels_per_step: int | None = None  # CUDA only: kernels the device ran
    kernel_ops_by_name: dict[str, int] = field(default_factory=dict)
    pool_bytes: int | None = None  # the runner's state pool, where it has one


@dataclass
class ModelBenchReport:
    model: str
    video: str
    frames: int  # frames read; every stream plays all of them, from its own offset
    level: str
    policy: str
    gate_position: str
    refresh_interval: int | None
    image_size: tuple[int, int]
    tokens: int
    dense_ms: float  # per step of all the streams
    dense_gmacs: float  # per frame
    dense_consecutive_top1_stability: float  # how often the dense top-1 stays the same frame to frame
    threads: int
    device: str = "cpu"
    streams: int = 1
    stream_offsets: list[int] = field(default_factory=lambda: [0])
    dtype: str = "float32"
    execution: str = "eager"  # the eventful step's
    dense_execution: str = "eager"  # the dense baseline's: eager, torch.compile or cuda graph
    gate_rank: str = "auto"  # how compiled gates rank tokens: topk, count, or auto (count on CUDA)
    dense_kernel_ops_per_step: int | None = None
    dense_host_syncs_per_step: int | None = None
    dense_device_kernels_per_step: int | None = None
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


def budget_spec_text(spec: BudgetSpec, policy: str = "topr") -> str:
    """How a budget was asked for: "64", "64:32"; thresholds "h=0.1", "h=0.1:0.2"."""
    text = ":".join(f"{v:g}" for v in spec)
    return text if policy == "topr" else f"h={text}"


def stream_budget_values(spec: BudgetSpec | float, streams: int) -> list[float]:
    """Stream j's budget: the spec's values in turn (64:32 over 3 streams: 64, 32, 64)."""
    values = tuple(spec) if isinstance(spec, tuple | list) else (float(spec),)
    return [float(values[j % len(values)]) for j in range(streams)]


def stream_offsets(frames: int, streams: int) -> list[int]:
    """Stream j starts at frame j * T // B of the T frames: one camera's video, as B cameras out of step."""
    return [j * frames // streams for j in range(streams)]


def frame_schedule(frames: int, streams: int, steps: int | None = None) -> torch.Tensor:
    """[steps, B] the frame each stream sees at each step: its offset plus the step, wrapping around the T frames."""
    offsets = torch.tensor(stream_offsets(frames, streams))
    return (offsets[None, :] + torch.arange(steps or frames)[:, None]) % frames


class CapturedForward:
    """A module's forward captured as one CUDA graph per input shape and dtype, then replayed: the dense baseline
    for --execution graph (eager kernels, launched by the device, as the eventful step's captured graph). The
    input is copied into the graph's static input; the output is the graph's static output (overwritten by the
    next call: copy what is kept)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        key = (tuple(images.shape), images.dtype, images.device)
        if key not in self._graphs:
            static_input = images.clone()
            side = torch.cuda.Stream(images.device)
            side.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream (library handles, workspaces)
                for _ in range(3):
                    self.module(static_input)
            torch.cuda.current_stream(images.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.module(static_input)
            self._graphs[key] = (graph, static_input, static_output)
        graph, static_input, static_output = self._graphs[key]
        static_input.copy_(images)
        graph.replay()
        return static_output


def dense_baseline(model: VisionTransformer, execution: str, device: torch.device) -> tuple[Callable, str]:
    """The dense model run the way the eventful step runs (like with like): eager, torch.compile'd, or captured as a
    CUDA graph. Returns the callable and its name for the report."""
    if execution == "eager":
        return model, "eager"
    if execution == "compile":
        if device.type == "cpu":  # inductor's C++ kernels then show in profiles (bench.kernel_ops counts them)
            from torch._inductor import config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True
        return torch.compile(model), "torch.compile"
    if execution in ("graph", "compile-graph"):
        if device.type != "cuda":
            raise ValueError(f"--execution {execution} captures CUDA graphs: it needs --device cuda")
        if execution == "compile-graph":  # compiled on the warm-up calls, then captured, as the eventful step
            return CapturedForward(torch.compile(model)), "torch.compile + cuda graph"
        return CapturedForward(model), "cuda graph"
    raise ValueError(f"unknown execution {execution!r}")


def stream_fidelity(outputs: torch.Tensor, dense_logits: torch.Tensor, mac_ratios: list[float]) -> dict[str, float]:
    """fidelity() of each stream against its own dense outputs, and frame skipping on it at its MAC ratio, averaged
    over the streams. outputs, dense_logits: [T, B, K] (step, stream, class)."""
    per_stream = []
    for j, ratio in enumerate(mac_ratios):
        dense = dense_logits[:, j]
        fid = fidelity(outputs[:, j], dense)
        skip = fidelity(frame_skip_outputs(dense, ratio), dense)
        fid.update(skip_top1_agreement=skip["top1_agreement"], skip_rel_l2=skip["rel_l2"])
        per_stream.append(fid)
    return {key: statistics.fmean(f[key] for f in per_stream) for key in per_stream[0]}


def eventful_runner(model: VisionTransformer, eventful: EventfulConfig) -> EventfulViT:
    """The eventful runner of a model. A ViTDet backbone's outputs are its feature maps [B, C, h, w], compared
    flattened (`flatten(1)`, a no-op for classifier logits [B, K]): rel_l2 is then the feature map's error, and top-1
    / top-5 (the largest feature) mean nothing."""
    from model.vitdet import EventfulViTDet, ViTDetBackbone

    return EventfulViTDet(model, eventful) if isinstance(model, ViTDetBackbone) else EventfulViT(model, eventful)


def _profile_sparse_step(
    runner: EventfulViT, batch: Callable, first_step: int, states: list, budgets: list, device: torch.device, tries: int
):
    """LaunchCounts of a step over the streams that runs no stream densely, looking at most `tries` steps on (a
    stream at full budget or refreshing every frame never gets one: the last step's counts, then)."""
    for t in range(first_step, first_step + tries):
        out, counts = count_launches(lambda t=t: runner.step(batch(t), states, budgets), device)
        if not any(out.dense_frame):
            break
    return counts


@torch.inference_mode()
def run_model_bench(
    model: VisionTransformer,
    images: torch.Tensor,
    budgets: list[BudgetSpec | float],
    *,
    model_name: str,
    video_name: str,
    eventful: EventfulConfig,
    policy: str = "topr",
    warmup: int = 2,
    streams: int = 1,
    dense_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dense_execution: str = "eager",
    progress=None,
) -> ModelBenchReport:
    """images: [T, 3, H, W] preprocessed frames, on the model's device and in its dtype. B = `streams` streams play
    them from different offsets, one batched step per frame; the dense model runs the same [B, 3, H, W] batches
    (dense_forward, default the model itself). Returns the report (see print_table)."""
    t_frames, device = images.shape[0], images.device
    dense_forward = model if dense_forward is None else dense_forward
    schedule = frame_schedule(t_frames, streams).to(device)  # [T, B]

    def batch(t: int) -> torch.Tensor:  # [B, 3, H, W] the streams' frames at step t (t >= T: playback goes on)
        return images.index_select(0, schedule[t % t_frames])

    specs = [tuple(b) if isinstance(b, tuple | list) else (float(b),) for b in budgets]
    values = [stream_budget_values(spec, streams) for spec in specs]
    runners = [eventful_runner(model, eventful) for _ in specs]
    states = [[runner.new_state() for _ in range(streams)] for runner in runners]
    step_budgets = [[_budget(policy, v) for v in vals] for vals in values]

    if warmup:  # warm caches, the allocator, compiled code and captured graphs at this batch size; not measured
        for _ in range(warmup + 1):
            dense_forward(batch(0))
        for runner, bud in zip(runners, step_budgets, strict=True):
            warm_states = [runner.new_state() for _ in range(streams)]
            for t in range(warmup + 1):  # the first step seeds the states (dense), then sparse steps
                runner.step(batch(t), warm_states, bud)
            for state in warm_states:  # a pooled state's slot goes back to its pool (the pool keeps its size)
                if callable(getattr(state, "release", None)):
                    state.release()

    dense_ms: list[float] = []
    dense_logits: list[torch.Tensor] = []  # per step [B, K]
    ev_ms: list[list[float]] = [[] for _ in specs]
    ev_logits: list[list[torch.Tensor]] = [[] for _ in specs]
    ev_macs: list[list[list[int]]] = [[] for _ in specs]  # per step, per stream
    ev_fraction: list[list[float]] = [[] for _ in specs]  # per step, mean over streams
    ev_dense: list[list[bool]] = [[] for _ in specs]  # steps in which some stream ran densely (first, refresh)
    dense_macs = 0
    num_tokens = model.config.num_tokens
    order = list(range(-1, len(specs)))  # -1 = dense
    for t in range(t_frames):
        frames = batch(t)
        rotation = t % len(order)
        for j in order[rotation:] + order[:rotation]:
            start = _clock(device)
            if j < 0:
                logits = dense_forward(frames)
                dense_ms.append((_clock(device) - start) * 1e3)
                dense_logits.append(logits.float().flatten(1).cpu())
                continue
            out = runners[j].step(frames, states[j], step_budgets[j])
            ev_ms[j].append((_clock(device) - start) * 1e3)
            ev_logits[j].append(out.logits.float().flatten(1).cpu())
            ev_macs[j].append(list(out.macs))
            ev_fraction[j].append(float(out.updated_tokens.float().mean()) / num_tokens)
            ev_dense[j].append(any(out.dense_frame))
            dense_macs = out.dense_macs
        if progress is not None:
            progress(t + 1, t_frames)

    # what one warm step launches, outside the timed loop (the states play on from step T)
    _, dense_counts = count_launches(lambda: dense_forward(batch(t_frames)), device)
    tries = (eventful.refresh_interval or 1) + 1
    counts = [
        _profile_sparse_step(runner, batch, t_frames, states[j], step_budgets[j], device, tries)
        for j, runner in enumerate(runners)
    ]

    dense_stack = torch.stack(dense_logits)  # [T, B, K]
    dense_top1 = dense_stack.argmax(-1)  # [T, B]
    stability = float((dense_top1[1:] == dense_top1[:-1]).float().mean()) if t_frames > 1 else 1.0
    dense_med = statistics.median(dense_ms)
    report = ModelBenchReport(
        model=model_name, video=video_name, frames=t_frames, level=eventful.level, policy=policy,
        gate_position=eventful.gate_position, refresh_interval=eventful.refresh_interval,
        image_size=tuple(model.config.image_size), tokens=num_tokens, dense_ms=dense_med,
        dense_gmacs=dense_macs / 1e9, dense_consecutive_top1_stability=stability, threads=torch.get_num_threads(),
        device=str(device), streams=streams, stream_offsets=stream_offsets(t_frames, streams),
        dtype=str(images.dtype).removeprefix("torch."), execution=eventful.execution, dense_execution=dense_execution,
        gate_rank=eventful.gate_rank,
        dense_kernel_ops_per_step=dense_counts.kernel_ops, dense_host_syncs_per_step=dense_counts.host_syncs,
        dense_device_kernels_per_step=dense_counts.device_kernels,
    )
    for j, spec in enumerate(specs):
        stream_macs = [sum(step[b] for step in ev_macs[j]) for b in range(streams)]
        mac_ratio = dense_macs * t_frames * streams / sum(stream_macs)
        typical = _typical_ms(ev_ms[j], ev_dense[j])
        speedup = dense_med / typical
        stream_ratios = [dense_macs * t_frames / m for m in stream_macs]
        fid = stream_fidelity(torch.stack(ev_logits[j]), dense_stack, stream_ratios)
        pool = getattr(runners[j], "pool", None)
        report.results.append(
            BudgetResult(
                budget=statistics.fmean(values[j]), policy=policy, eventful_ms=typical, speedup=speedup,
                mac_ratio=mac_ratio, efficiency=speedup / mac_ratio, updated_fraction=statistics.fmean(ev_fraction[j]),
                state_bytes=states[j][0].nbytes, state_breakdown=states[j][0].breakdown(), **fid,
                budget_spec=budget_spec_text(spec, policy), stream_budgets=values[j], stream_mac_ratios=stream_ratios,
                kernel_ops_per_step=counts[j].kernel_ops, host_syncs_per_step=counts[j].host_syncs,
                device_kernels_per_step=counts[j].device_kernels, kernel_ops_by_name=counts[j].kernel_op_names,
                pool_bytes=pool.nbytes if pool is not None else None,
            )
        )
    return report


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def print_table(report: ModelBenchReport) -> str:
    device_kernels = report.dense_device_kernels_per_step
    lines = [
        f"model {report.model}  video {report.video}  frames {report.frames}  {report.image_size[0]}x"
        f"{report.image_size[1]} ({report.tokens} tokens)  level {report.level}  policy {report.policy}  "
        f"gate {report.gate_position}  refresh {report.refresh_interval}  threads {report.threads}  "
        f"device {report.device}",
        f"streams {report.streams} (offsets {','.join(map(str, report.stream_offsets))})  dtype {report.dtype}  "
        f"execution {report.execution} (dense: {report.dense_execution}, gate rank {report.gate_rank})",
        f"dense: {report.dense_ms:.1f} ms/step median ({report.streams} stream{'s' if report.streams > 1 else ''}), "
        f"{report.dense_gmacs:.2f} GMAC/frame, {_count(report.dense_kernel_ops_per_step)} kernel ops and "
        f"{_count(report.dense_host_syncs_per_step)} host syncs per step"
        + (f", {device_kernels} device kernels" if device_kernels is not None else "")
        + f"; dense top-1 stable on {100 * report.dense_consecutive_top1_stability:.0f}% of consecutive frames",
        f"{'budget':>9} {'ms':>8} {'speedup':>8} {'MACx':>6} {'eff':>5} {'upd%':>5} {'top1%':>6} {'in-top5%':>8} "
        f"{'relL2':>6} {'skip top1%':>10} {'skip relL2':>10} {'state MB':>8} {'ops':>6} {'syncs':>5}",
    ]
    for r in report.results:
        budget = r.budget_spec or (f"{int(r.budget)}" if r.policy == "topr" else f"h={r.budget:g}")
        lines.append(
            f"{budget:>9} {r.eventful_ms:8.1f} {r.speedup:7.2f}x {r.mac_ratio:5.2f}x {r.efficiency:5.2f} "
            f"{100 * r.updated_fraction:5.1f} {100 * r.top1_agreement:6.1f} {100 * r.top5_containment:8.1f} "
            f"{r.rel_l2:6.3f} {100 * r.skip_top1_agreement:10.1f} {r.skip_rel_l2:10.3f} {r.state_bytes / 1e6:8.1f} "
            f"{_count(r.kernel_ops_per_step):>6} {_count(r.host_syncs_per_step):>5}"
        )
    if report.results:
        breakdown = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in report.results[0].state_breakdown.items())
        lines.append(f"state per stream (MB): {breakdown}")
        pools = [f"{r.budget_spec} {r.pool_bytes / 1e6:.1f}" for r in report.results if r.pool_bytes is not None]
        if pools:
            lines.append(f"state pool per runner (MB): {', '.join(pools)}")
        kernels = [f"{r.budget_spec} {r.device_kernels_per_step}" for r in report.results
                   if r.device_kernels_per_step is not None]
        if kernels:
            lines.append(f"device kernels per step: {', '.join(kernels)}")
    return "\n".join(lines)
