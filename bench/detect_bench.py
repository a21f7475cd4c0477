"""`eventful-bench detect`: dense vs eventful detectors (YOLOS, OWLv2 with text queries) on a real video,
interleaved per frame, beside frame skipping at the same compute.

For every frame the dense detector and each budget's eventful stream run back to back (rotating the order),
timings are medians. Fidelity is measured against the dense detections of the same frame: boxes matched one to
one (same label, IoU >= 0.5, greedy by IoU), their F1 (precision over the eventful boxes, recall over the dense
ones), the mean IoU of the matched boxes and, independent of thresholds and labels, the mean IoU between each
output token's eventful and dense box. Frame skipping at the budget's MAC ratio (the dense detections of every
ratio-th frame, repeated between) gets the same measures: stale boxes on moving objects are where it loses.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.eventful import EventfulConfig, EventfulViT, StepOutput
from model.fidelity import box_f1, match_boxes
from model.policy import StreamBudget
from model.yolos import Detections, YolosDetector, box_iou, boxes_to_corners, postprocess_detections


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
    box_f1: float | None = None  # 2PR / (P + R) of the matched boxes; None when neither side has a box
    skip_box_f1: float | None = None  # frame skipping at mac_ratio, the same measures
    skip_mean_iou: float | None = None


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
    queries: list[str] | None = None  # OWLv2: the text queries (labels)
    results: list[DetectBudgetResult] = field(default_factory=list)


@dataclass
class Detector:
    """What the benchmark needs of a detector family: its dense outputs, its eventful runner, the outputs of an
    eventful step, and detections from outputs. Outputs are (logits, boxes [Np or D, 4] normalised cx, cy, w, h)."""

    model: torch.nn.Module
    dense: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images [1, 3, H, W] -> one frame's
    runner: Callable[[EventfulConfig], EventfulViT]
    outputs: Callable[[EventfulViT, StepOutput], tuple[torch.Tensor, torch.Tensor]]
    detections: Callable[[torch.Tensor, torch.Tensor, list[tuple[int, int]], float, int], list[Detections]]
    output_tokens: int  # tokens with a box: detection tokens (YOLOS), patches (OWLv2)
    queries: list[str] | None = None


def yolos_detector(model: YolosDetector) -> Detector:
    def dense(images):
        logits, boxes = model(images)
        return logits[0], boxes[0]

    return Detector(model, dense, lambda cfg: EventfulViT(model, cfg),
                    lambda runner, out: (out.logits[0], model.forward_boxes(out.tokens)[0]),
                    postprocess_detections, model.config.num_detection_tokens)


def owlv2_detector(model, queries: list[str], tokenizer=None) -> Detector:
    """OWLv2 with these text queries (encoded once): class logits per patch against them, a box per patch.
    tokenizer: a transformers CLIP tokenizer (model.owlv2.load_tokenizer); None: the server's fallback for random
    weights (hashed words: the labels mean nothing, as the weights)."""
    from model.owlv2 import EventfulOwlv2, QueryCache, postprocess_owlv2

    cache = QueryCache(model, tokenizer)
    if tokenizer is None:
        from server.engine.queries import FallbackTokenizer

        fallback = FallbackTokenizer(model.config.vocab_size)
        embeddings = cache.update([fallback(q) for q in queries], labels=queries)
    else:
        embeddings = cache.update(queries)

    def dense(images):
        features = model.forward_head(model.forward_features(images))
        return model.class_logits(features, embeddings)[0], model.boxes(features)[0]

    def outputs(runner, out):
        logits, boxes = runner.detect(out.logits, embeddings)
        return logits[0], boxes[0]

    return Detector(model, dense, lambda cfg: EventfulOwlv2(model, cfg), outputs, postprocess_owlv2,
                    model.config.num_patches, list(queries))


def skip_schedule(frames: int, ratio: float) -> list[int]:
    """Frame skipping at this compute ratio: for each frame, the frame whose dense result is served (the dense model
    runs when floor(t / ratio) moves on, and its result is repeated until then)."""
    out, last = [], 0
    for t in range(frames):
        if t == 0 or math.floor(t / ratio) != math.floor((t - 1) / ratio):
            last = t
        out.append(last)
    return out


def agreement(dense_dets: list[Detections], dets: list[Detections]) -> dict[str, float | None]:
    """Matched boxes over the frames: recall, precision, F1 and mean IoU of the matches."""
    matched, dense_total, other_total = [], 0, 0
    for dense, other in zip(dense_dets, dets, strict=True):
        dense_total += len(dense.scores)
        other_total += len(other.scores)
        matched.extend(match_boxes(dense, other))
    recall = len(matched) / dense_total if dense_total else None
    precision = len(matched) / other_total if other_total else None
    return {"recall": recall, "precision": precision, "f1": box_f1(len(matched), dense_total, other_total),
            "mean_iou": statistics.fmean(matched) if matched else None}


@torch.inference_mode()
def run_detect_bench(
    model: YolosDetector | Detector,
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
    detector = model if isinstance(model, Detector) else yolos_detector(model)
    model = detector.model
    t_frames = images.shape[0]
    runners = [detector.runner(eventful) for _ in budgets]
    states = [runner.new_state() for runner in runners]
    stream_budgets = [StreamBudget(tokens=int(b)) for b in budgets]
    for _ in range(warmup):
        detector.dense(images[:1])
        for runner in runners:
            out = runner.step(images[:1], [runner.new_state()], [StreamBudget.dense()])
            detector.outputs(runner, out)

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
                dense_out.append(detector.dense(frame))
                dense_ms.append((time.perf_counter() - start) * 1e3)
                continue
            out = runners[j].step(frame, [states[j]], [stream_budgets[j]])
            ev_out[j].append(detector.outputs(runners[j], out))
            ev_ms[j].append((time.perf_counter() - start) * 1e3)
            ev_macs[j].append(out.macs[0])
            ev_fraction[j].append(float(out.updated_fraction[0]))
            dense_macs = out.dense_macs
        if progress is not None:
            progress(t + 1, t_frames)

    def detections(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Detections]:
        logits = torch.stack([o[0] for o in outputs])
        boxes = torch.stack([o[1] for o in outputs])
        return detector.detections(logits, boxes, [frame_size] * len(outputs), threshold, top_k)

    dense_dets = detections(dense_out)
    dense_med = statistics.median(dense_ms)
    report = DetectBenchReport(
        model=model_name, video=video_name, frames=t_frames, level=eventful.level,
        image_size=tuple(model.config.image_size), tokens=model.config.num_tokens,
        detection_tokens=detector.output_tokens, threshold=threshold, top_k=top_k, dense_ms=dense_med,
        dense_gmacs=dense_macs / 1e9, dense_boxes_per_frame=statistics.fmean(len(d.scores) for d in dense_dets),
        threads=torch.get_num_threads(), queries=detector.queries,
    )  # fmt: skip
    for j, budget in enumerate(budgets):
        dets = detections(ev_out[j])
        fid = agreement(dense_dets, dets)
        mac_ratio = dense_macs * t_frames / sum(ev_macs[j])
        skip = agreement(dense_dets, [dense_dets[s] for s in skip_schedule(t_frames, mac_ratio)])
        token_iou = [
            float(torch.diagonal(box_iou(boxes_to_corners(d[1]), boxes_to_corners(e[1]))).mean())
            for d, e in zip(dense_out, ev_out[j], strict=True)
        ]
        speedup = dense_med / statistics.median(ev_ms[j])
        report.results.append(
            DetectBudgetResult(
                budget=int(budget), eventful_ms=statistics.median(ev_ms[j]), speedup=speedup,
                mac_ratio=mac_ratio, agreement=fid["recall"], recall=fid["recall"], mean_iou=fid["mean_iou"],
                token_box_iou=statistics.fmean(token_iou), updated_fraction=statistics.fmean(ev_fraction[j]),
                boxes_per_frame=statistics.fmean(len(d.scores) for d in dets), box_f1=fid["f1"],
                skip_box_f1=skip["f1"], skip_mean_iou=skip["mean_iou"],
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
        f"{'budget':>7} {'ms':>8} {'speedup':>8} {'MACx':>6} {'upd%':>5} {'recall%':>8} {'F1%':>6} {'mIoU':>6} "
        f"{'tokIoU':>6} {'boxes':>6} {'skip F1%':>9} {'skip mIoU':>9}",
    ]
    if report.queries:
        lines.insert(1, f"queries: {', '.join(report.queries)}")
    for r in report.results:
        miou = "-" if r.mean_iou is None else f"{r.mean_iou:.3f}"
        skip_miou = "-" if r.skip_mean_iou is None else f"{r.skip_mean_iou:.3f}"
        lines.append(
            f"{r.budget:>7} {r.eventful_ms:8.1f} {r.speedup:7.2f}x {r.mac_ratio:5.2f}x {100 * r.updated_fraction:5.1f} "
            f"{_pct(r.recall):>8} {_pct(r.box_f1):>6} {miou:>6} {r.token_box_iou:6.3f} {r.boxes_per_frame:6.1f} "
            f"{_pct(r.skip_box_f1):>9} {skip_miou:>9}"
        )
    return "\n".join(lines)
