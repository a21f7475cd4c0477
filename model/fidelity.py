"""How a served answer is compared with the dense model's answer on the same frame: what the adaptive chooser's audits,
reuse curve and probes measure (model/chooser.py), and what the detection benchmark scores (bench/detect_bench.py).

A measure gives two numbers per pair (served, dense): an error (0 when the answers are the same) and an agreement in
[0, 1], averaged over frames.
  - classifiers (`LogitFidelity`): the logits' relative L2 error; agreement 1 when the top-1 classes are equal;
  - detectors (`BoxFidelity`): the served detections against the dense ones, boxes matched one to one (same label,
    IoU >= 0.5, greedy by IoU): agreement = box F1, error = 1 - mean IoU of the matched boxes. Two empty answers
    agree fully (F1 1, error 0); boxes on one side only, or none matched, agree not at all (F1 0, error 1).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

from model.yolos import Detections, box_iou

MATCH_IOU = 0.5  # a served box answers a dense one at this IoU or more (and the same label)
MAX_AUDITS = 1024  # the latest audits a stream's estimate rests on (a long-running stream's memory stays bounded)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the relative L2 error of a against the reference b."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def match_boxes(dense: Detections, other: Detections, iou_threshold: float = MATCH_IOU) -> list[float]:
    """Greedy one-to-one matching (highest IoU first) of dense boxes to other boxes with the same label and
    IoU >= iou_threshold; returns the IoU of every match."""
    if len(dense.scores) == 0 or len(other.scores) == 0:
        return []
    iou = box_iou(dense.boxes.float(), other.boxes.float())  # [M, K]
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


def box_f1(matched: int, dense_boxes: int, other_boxes: int) -> float | None:
    """F1 of matched boxes: precision over the other boxes, recall over the dense ones; None when neither side has
    a box (nothing to find, nothing found)."""
    if dense_boxes == 0 and other_boxes == 0:
        return None
    if matched == 0:
        return 0.0
    precision, recall = matched / other_boxes, matched / dense_boxes
    return 2 * precision * recall / (precision + recall)


class Fidelity(Protocol):
    """A fidelity measure: `error` and `agreement` of a served answer against the dense answer on the same frame;
    the names say what they are (the chooser's estimate is keyed by them)."""

    kind: ClassVar[Literal["logits", "boxes"]]
    error_name: ClassVar[str]
    agreement_name: ClassVar[str]

    def error(self, served: Any, dense: Any) -> float: ...

    def agreement(self, served: Any, dense: Any) -> float: ...


@dataclass(frozen=True)
class LogitFidelity:
    """Classifiers: answers are class logits [K]."""

    kind: ClassVar[Literal["logits"]] = "logits"
    error_name: ClassVar[str] = "rel_l2"
    agreement_name: ClassVar[str] = "top1"

    def error(self, served: torch.Tensor, dense: torch.Tensor) -> float:
        return rel_l2(served, dense)

    def agreement(self, served: torch.Tensor, dense: torch.Tensor) -> float:
        return 1.0 if bool(served.argmax() == dense.argmax()) else 0.0


@dataclass(frozen=True)
class BoxFidelity:
    """Detectors: answers are post-processed `Detections` (boxes, labels, scores) of one frame."""

    iou_threshold: float = MATCH_IOU
    kind: ClassVar[Literal["boxes"]] = "boxes"
    error_name: ClassVar[str] = "box_error"  # 1 - mean IoU of the matched boxes
    agreement_name: ClassVar[str] = "box_f1"

    def error(self, served: Detections, dense: Detections) -> float:
        matched = match_boxes(dense, served, self.iou_threshold)
        if matched:
            return 1.0 - sum(matched) / len(matched)
        return 0.0 if len(dense.scores) == 0 and len(served.scores) == 0 else 1.0

    def agreement(self, served: Detections, dense: Detections) -> float:
        matched = match_boxes(dense, served, self.iou_threshold)
        f1 = box_f1(len(matched), len(dense.scores), len(served.scores))
        return 1.0 if f1 is None else f1


def wilson(successes: float, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval of a share (successes of n trials; a sum of values in [0, 1] is conservative)."""
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student t quantile (Cornish-Fisher expansion of the normal quantile; exact enough for dof >= 1
    at the confidences used here, and never below the normal quantile)."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def audit_estimate(errors: Sequence[float], agreements: Sequence[float], confidence: float
                   ) -> tuple[float, tuple[float, float], float, tuple[float, float]]:
    """What a stream's audits say of the answers it is served: the mean error with its two-sided `confidence`
    interval (Student t; unbounded above from a single audit) and the mean agreement with Wilson's interval.
    errors, agreements: one per audit (at least one)."""
    n = len(errors)
    mean = statistics.fmean(errors)
    if n >= 2:
        half = t_quantile(confidence, n - 1) * statistics.stdev(errors) / math.sqrt(n)
        interval = (max(0.0, mean - half), mean + half)
    else:
        interval = (0.0, math.inf)
    agree = sum(agreements)
    return mean, interval, agree / n, wilson(agree, n, statistics.NormalDist().inv_cdf(0.5 + confidence / 2))


__all__ = [
    "MATCH_IOU", "MAX_AUDITS", "BoxFidelity", "Fidelity", "LogitFidelity", "audit_estimate", "box_f1", "match_boxes",
    "rel_l2", "t_quantile", "wilson",
]
