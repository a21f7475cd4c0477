"""`eventful-bench detect`: dense vs eventful YOLOS on a real video, interleaved per frame.

For every frame the dense detector and each budget's eventful stream run back to back (rotating the order),
timings are medians. Fidelity is measured against the dense detections of the same frame: recall of the dense
boxes (same label, IoU >= 0.5, greedy one-to-one matching by IoU), the mean IoU of the matched boxes, and,
independent of thresholds and labels, the mean IoU between each detection token's eventful and dense box.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from model.eventful import EventfulConfig, EventfulViT
from model.policy import StreamBudget
from model.yolos import Detections, YolosDetector, box_iou, boxes_to_corners, postprocess_detections

MATCH_IOU = 0.5


@dataclass
class DetectBudgetResult:
    budget: int  # image tokens per gate (detection and class tokens always updated on top)
    eventful_ms: float
    speedup: float
    mac_ratio: float
    agreement: float | None  # = recall: dense boxes found again (same label, IoU >= 0.5); None without dense boxes
    recall: float | None
    mean_iou: float | None  # over matched boxes
    token_box_iou: float  # mean IoU of each detection token's box, eventful vs dense (all tokens)
    updated_fraction: float
    boxes_per_frame: float


@dataclass
class DetectBenchReport:
    model: str
    video: str
    frames: int
    level: str
    image_size: tuple[int, int]
    tokens: int
    detection_tokens: int
    threshold: float
    top_k: int
    dense_ms: float
    dense_gmacs: float
    dense_boxes_per_frame: float
    threads: int
    results: list[DetectBudgetResult] = field(default_factory=list)


def match_boxes(dense: Detections, other: Detections, iou_threshold: float = MATCH_IOU) -> list[float]:
    """Greedy one-to-one matching (highest IoU first) of dense boxes to other boxes with the same label and
    IoU >= iou_threshold; returns the IoU of every match."""
    if len(dense.scores) == 0 or len(other.scores) == 0:
        return []
    iou = box_iou(dense.boxes, other.boxes)  # [M, K]
    iou = torch.where(dense.labels[:, None] == other.labels[None, :], iou, torch.zeros_like(iou))
    matches = []
    while True:
        best = int(iou.argmax())
        value = float(iou.flatten()[best])
        if value < iou_threshold:
            return matches
        i, j = divmod(best, iou.shape[1])
        matches.append(value)
        iou[i, :] = -1
        iou[:, j] = -1


@torch.inference_mode()
def run_detect_bench(
    model: YolosDetector,
    images: torch.Tensor,
    frame_size: tuple[int, int],
    budgets: list[int],
    *,
    model_name: str,
    video_name: str,
    eventful: EventfulConfig,
    threshold: float = 0.5,
    top_k: int = 100,
    warmup: int = 2,
    progress=None,
) -> DetectBenchReport:
    """images: [T, 3, H, W] preprocessed frames of one video whose frames are frame_size (height, width)."""
    t_frames = images.shape[0]
    runners = [EventfulViT(model, eventful) for _ in budgets]
    states = [runner.new_state() for runner in runners]
    stream_budgets = [StreamBudget(tokens=int(b)) for b in budgets]
    for _ in range(warmup):
        model(images[:1])
        for runner in runners:
            out = runner.step(images[:1], [runner.new_state()], [StreamBudget.dense()])
            model.forward_boxes(out.tokens)

    dense_ms, dense_out = [], []
    ev_ms: list[list[float]] = [[] for _ in budgets]
    ev_out: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in budgets]
    ev_macs: list[list[int]] = [[] for _ in budgets]
    ev_fraction: list[list[float]] = [[] for _ in budgets]
    dense_macs = 0
    order = list(range(-1, len(budgets)))
    for t in range(t_frames):
        frame = images[t : t + 1]
        rotation = t % len(order)
        for j in order[rotation:] + order[:rotation]:
            start = time.perf_counter()
            if j < 0:
                logits, boxes = model(frame)
                dense_ms.append((time.perf_counter() - start) * 1e3)
                dense_out.append((logits[0], boxes[0]))
                continue
            out = runners[j].step(frame, [states[j]], [stream_budgets[j]])
            boxes = model.forward_boxes(out.tokens)
            ev_ms[j].append((time.perf_counter() - start) * 1e3)
            ev_out[j].append((out.logits[0], boxes[0]))
            ev_macs[j].append(out.macs[0])
            ev_fraction[j].append(float(out.updated_fraction[0]))
            dense_macs = out.dense_macs
        if progress is not None:
            progress(t + 1, t_frames)

    def detections(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Detections]:
        logits = torch.stack([o[0] for o in outputs])
        boxes = torch.stack([o[1] for o in outputs])
        return postprocess_detections(logits, boxes, [frame_size] * len(outputs), threshold, top_k)

    dense_dets = detections(dense_out)
    dense_med = statistics.median(dense_ms)
    report = DetectBenchReport(
        model=model_name, video=video_name, frames=t_frames, level=eventful.level,
        image_size=tuple(model.config.image_size), tokens=model.config.num_tokens,
        detection_tokens=model.config.num_detection_tokens, threshold=threshold, top_k=top_k, dense_ms=dense_med,
        dense_gmacs=dense_macs / 1e9, dense_boxes_per_frame=statistics.fmean(len(d.scores) for d in dense_dets),
        threads=torch.get_num_threads(),
    )  # fmt: skip
    for j, budget in enumerate(budgets):
        dets = detections(ev_out[j])
        matched, total = [], 0
        for dense, other in zip(dense_dets, dets, strict=True):
            total += len(dense.scores)
            matched.extend(match_boxes(dense, other))
        token_iou = [
            float(torch.diagonal(box_iou(boxes_to_corners(d[1]), boxes_to_corners(e[1]))).mean())
            for d, e in zip(dense_out, ev_out[j], strict=True)
        ]
        recall = len(matched) / total if total else None
        speedup = dense_med / statistics.median(ev_ms[j])
        report.results.append(
            DetectBudgetResult(
                budget=int(budget), eventful_ms=statistics.median(ev_ms[j]), speedup=speedup,
                mac_ratio=dense_macs * t_frames / sum(ev_macs[j]), agreement=recall, recall=recall,
                mean_iou=statistics.fmean(matched) if matched else None, token_box_iou=statistics.fmean(token_iou),
                updated_fraction=statistics.fmean(ev_fraction[j]),
                boxes_per_frame=statistics.fmean(len(d.scores) for d in dets),
            )
        )  # fmt: skip
    return report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(report: DetectBenchReport) -> str:
    lines = [
        f"model {report.model}  video {report.video}  frames {report.frames}  {report.image_size[0]}x"
        f"{report.image_size[1]} ({report.tokens} tokens, {report.detection_tokens} detection)  level {report.level}"
        f"  threads {report.threads}",
        f"dense: {report.dense_ms:.1f} ms/frame median, {report.dense_gmacs:.2f} GMAC, "
        f"{report.dense_boxes_per_frame:.1f} boxes/frame (score > {report.threshold:g}, top {report.top_k})",
        f"{'budget':>7} {'ms':>8} {'speedup':>8} {'MACx':>6} {'upd%':>5} {'recall%':>8} {'mIoU':>6} "
        f"{'tokIoU':>6} {'boxes':>6}",
    ]
    for r in report.results:
        miou = "-" if r.mean_iou is None else f"{r.mean_iou:.3f}"
        lines.append(
            f"{r.budget:>7} {r.eventful_ms:8.1f} {r.speedup:7.2f}x {r.mac_ratio:5.2f}x {100 * r.updated_fraction:5.1f} "
            f"{_pct(r.recall):>8} {miou:>6} {r.token_box_iou:6.3f} {r.boxes_per_frame:6.1f}"
        )
    return "\n".join(lines)
