"""`eventful-bench rlt`: VideoMAE with Run-Length Tokenization at several thresholds vs no RLT, on a real video.

Clips are consecutive windows of num_frames frames. Per clip every tau runs back to back (rotating the order),
one clip at a time; timings are medians over clips. tau = 0 drops nothing: it is the plain model and the
reference for fidelity (top-1 agreement, relative L2 error of the logits). All clips at once, packed into one
batch without padding, are timed too (`batch_ms`: the whole batch, median over repeats).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from model.rlt import classify_clips, clip_macs
from model.videomae import VideoMAE


@dataclass
class TauResult:
    tau: float
    clip_ms: float  # median per clip, one clip per call
    speedup: float  # no-RLT clip_ms / clip_ms
    batch_ms: float  # all clips packed in one call
    batch_speedup: float
    tokens_kept_fraction: float  # mean over clips
    tokens_kept_min: float
    tokens_kept_max: float
    mac_ratio: float  # no-RLT MACs / RLT MACs over all clips
    agreement: float  # top-1 agreement with no RLT
    rel_l2: float  # mean over clips of ||logits - no-RLT logits|| / ||no-RLT logits||


@dataclass
class RltBenchReport:
    model: str
    video: str
    clips: int
    frames_per_clip: int
    image_size: tuple[int, int]
    tokens_per_clip: int
    dense_clip_ms: float
    dense_gmacs: float
    threads: int
    results: list[TauResult] = field(default_factory=list)


def video_clips(images: torch.Tensor, num_frames: int, count: int, stride: int | None = None) -> torch.Tensor:
    """Consecutive windows of num_frames frames, stride apart (default: non-overlapping). [T, 3, H, W] ->
    [count', num_frames, 3, H, W] with count' <= count (as many as the video holds)."""
    stride = stride or num_frames
    starts = list(range(0, images.shape[0] - num_frames + 1, stride))[:count]
    if not starts:
        raise ValueError(f"the video has {images.shape[0]} frames; a clip needs {num_frames}")
    return torch.stack([images[s : s + num_frames] for s in starts])


@torch.inference_mode()
def run_rlt_bench(
    model: VideoMAE,
    clips: torch.Tensor,
    taus: list[float],
    *,
    model_name: str,
    video_name: str,
    warmup: int = 1,
    batch_repeats: int = 2,
    progress=None,
) -> RltBenchReport:
    """clips: [N, T, 3, H, W] preprocessed. tau 0 (no RLT) is always run as the reference."""
    taus = [0.0] + [t for t in taus if t != 0.0]
    n = clips.shape[0]
    for _ in range(warmup):
        classify_clips(model, clips[:1], 0.0)
    ms: dict[float, list[float]] = {tau: [] for tau in taus}
    logits: dict[float, list[torch.Tensor]] = {tau: [] for tau in taus}
    kept: dict[float, list[int]] = {tau: [] for tau in taus}
    for i in range(n):
        rotation = i % len(taus)
        for tau in taus[rotation:] + taus[:rotation]:
            start = time.perf_counter()
            out = classify_clips(model, clips[i : i + 1], tau)
            ms[tau].append((time.perf_counter() - start) * 1e3)
            logits[tau].append(out.logits[0].float())
            kept[tau].append(out.tokens_kept[0])
        if progress is not None:
            progress(i + 1, n)
    batch_ms: dict[float, list[float]] = {tau: [] for tau in taus}
    for r in range(batch_repeats):
        rotation = r % len(taus)
        for tau in taus[rotation:] + taus[:rotation]:
            start = time.perf_counter()
            classify_clips(model, clips, tau)
            batch_ms[tau].append((time.perf_counter() - start) * 1e3)

    config = model.config
    reference = torch.stack(logits[0.0])
    dense_ms = statistics.median(ms[0.0])
    dense_batch = statistics.median(batch_ms[0.0])
    report = RltBenchReport(
        model=model_name, video=video_name, clips=n, frames_per_clip=config.num_frames,
        image_size=tuple(config.image_size), tokens_per_clip=config.num_patches, dense_clip_ms=dense_ms,
        dense_gmacs=clip_macs(config, config.num_patches) / 1e9, threads=torch.get_num_threads(),
    )  # fmt: skip
    for tau in taus:
        out = torch.stack(logits[tau])
        fractions = [k / config.num_patches for k in kept[tau]]
        rel = [float((o - r).norm() / r.norm().clamp_min(1e-12)) for o, r in zip(out, reference, strict=True)]
        report.results.append(
            TauResult(
                tau=tau, clip_ms=statistics.median(ms[tau]), speedup=dense_ms / statistics.median(ms[tau]),
                batch_ms=statistics.median(batch_ms[tau]), batch_speedup=dense_batch / statistics.median(batch_ms[tau]),
                tokens_kept_fraction=statistics.fmean(fractions), tokens_kept_min=min(fractions),
                tokens_kept_max=max(fractions),
                mac_ratio=clip_macs(config, config.num_patches) * n / sum(clip_macs(config, k) for k in kept[tau]),
                agreement=float((out.argmax(-1) == reference.argmax(-1)).float().mean()),
                rel_l2=statistics.fmean(rel),
            )
        )  # fmt: skip
    return report


def format_table(report: RltBenchReport) -> str:
    lines = [
        f"model {report.model}  video {report.video}  clips {report.clips} x {report.frames_per_clip} frames  "
        f"{report.image_size[0]}x{report.image_size[1]} ({report.tokens_per_clip} tokens/clip)  "
        f"threads {report.threads}",
        f"no RLT: {report.dense_clip_ms:.1f} ms/clip median, {report.dense_gmacs:.1f} GMAC/clip",
        f"{'tau':>6} {'kept%':>6} {'min%':>5} {'max%':>5} {'ms/clip':>8} {'speedup':>8} {'batch ms':>9} "
        f"{'batch x':>8} {'MACx':>6} {'top1%':>6} {'relL2':>6}",
    ]
    for r in report.results:
        lines.append(
            f"{r.tau:6.3g} {100 * r.tokens_kept_fraction:6.1f} {100 * r.tokens_kept_min:5.1f} "
            f"{100 * r.tokens_kept_max:5.1f} {r.clip_ms:8.1f} {r.speedup:7.2f}x {r.batch_ms:9.1f} "
            f"{r.batch_speedup:7.2f}x {r.mac_ratio:5.2f}x {100 * r.agreement:6.1f} {r.rel_l2:6.3f}"
        )
    return "\n".join(lines)
