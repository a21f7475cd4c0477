"""Fidelity measures (model/fidelity.py): what the adaptive chooser's audits compare, against the paths they must
equal: the detection benchmark's box matching, the logits' own rel-L2 and argmax, and the chooser run with them."""

from __future__ import annotations

import pytest
import torch

from bench.detect_bench import agreement
from bench.fidelity_bench import dense_reference, run_schedule
from model.chooser import AdaptiveConfig, AdaptiveSchedule
from model.fidelity import BoxFidelity, LogitFidelity, box_f1, match_boxes
from model.yolos import Detections
from tests.model.test_eventful import CONFIG, video


def _detections(boxes: list[list[float]], labels: list[int]) -> Detections:
    return Detections(torch.linspace(0.9, 0.5, len(labels)), torch.tensor(labels, dtype=torch.long),
                      torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))


DENSE = _detections([[0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 10], [0, 50, 8, 58]], [1, 2, 1, 0])
SERVED = _detections(
    [[1, 0, 11, 10],  # label 1, IoU 9/11 with dense 0
     [22, 20, 42, 40],  # label 2, IoU 360/440 with dense 1
     [50, 0, 60, 10],  # label 2: the same place as dense 2 but another label, no match
     [100, 100, 110, 110],  # nowhere
     [0, 52, 8, 60]],  # label 0, IoU 48/80 with dense 3
    [1, 2, 2, 1, 0])


def test_identical_detections_agree_fully():
    fidelity = BoxFidelity()
    assert fidelity.agreement(DENSE, DENSE) == 1.0 and fidelity.error(DENSE, DENSE) == pytest.approx(0.0, abs=1e-6)
    empty = _detections([], [])
    assert (fidelity.agreement(empty, empty), fidelity.error(empty, empty)) == (1.0, 0.0)  # nothing to find
    assert (fidelity.agreement(DENSE, empty), fidelity.error(DENSE, empty)) == (0.0, 1.0)  # boxes on one side only
    assert (fidelity.agreement(empty, DENSE), fidelity.error(empty, DENSE)) == (0.0, 1.0)


def test_box_fidelity_equals_the_detection_benchmark_s_measures_on_a_made_up_frame():
    matched = match_boxes(DENSE, SERVED)
    assert sorted(matched) == pytest.approx(sorted([9 / 11, 360 / 440, 48 / 80]))
    bench = agreement([DENSE], [SERVED])
    assert bench["recall"] == pytest.approx(3 / 4) and bench["precision"] == pytest.approx(3 / 5)
    fidelity = BoxFidelity()
    assert fidelity.agreement(SERVED, DENSE) == pytest.approx(bench["f1"]) == pytest.approx(2 * 3 / (4 + 5))
    assert fidelity.error(SERVED, DENSE) == pytest.approx(1 - bench["mean_iou"])
    assert box_f1(0, 0, 0) is None and agreement([_detections([], [])], [_detections([], [])])["f1"] is None


def test_logit_fidelity_is_rel_l2_and_top1():
    dense = torch.tensor([1.0, 3.0, -2.0])
    served = torch.tensor([1.5, 2.5, -2.0])
    fidelity = LogitFidelity()
    assert fidelity.error(served, dense) == pytest.approx(float((served - dense).norm() / dense.norm()))
    assert fidelity.agreement(served, dense) == 1.0
    assert fidelity.agreement(torch.tensor([4.0, 3.0, 0.0]), dense) == 0.0


class _TopBoxes:
    """Boxes made from a classifier's logits (a box per class, where its logit is high): a detector-like answer the
    chooser can be run on with the classifier path of bench/fidelity_bench."""

    @staticmethod
    def of(logits: torch.Tensor) -> Detections:
        keep = (logits > logits.mean()).nonzero().squeeze(1)  # [K']
        x = logits[keep].float()
        boxes = torch.stack([x, x, x + 10, x + 10], dim=-1)  # [K', 4]: shifts with the logit
        return Detections(logits[keep], keep, boxes)


class _BoxesOfLogits:
    """BoxFidelity over the boxes made from logits (what the chooser is handed stays logits)."""

    kind, error_name, agreement_name = "boxes", "box_error", "box_f1"

    def __init__(self):
        self.boxes = BoxFidelity()

    def error(self, served, dense):
        return self.boxes.error(_TopBoxes.of(served), _TopBoxes.of(dense))

    def agreement(self, served, dense):
        return self.boxes.agreement(_TopBoxes.of(served), _TopBoxes.of(dense))


def test_the_chooser_s_audits_with_a_box_measure_are_box_f1_against_dense_on_that_frame(vit):
    """The chooser's audits, reuse curve and estimate run on whatever the measure compares: with a box measure, every
    audit's F1 and error are the served answer's against the dense model's on one of the frames, and the estimate is
    keyed box_f1 / box_error."""
    images = video(40)
    dense = dense_reference(vit, images)
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig(audit_share=0.5), fidelity=_BoxesOfLogits())
    served = run_schedule(vit, images, schedule)
    assert schedule.audit_errors, "no audit ran"
    boxes = BoxFidelity()
    pairs = [(boxes.agreement(_TopBoxes.of(served.logits[t]), _TopBoxes.of(dense.logits[t])),
              boxes.error(_TopBoxes.of(served.logits[t]), _TopBoxes.of(dense.logits[t]))) for t in range(40)]
    for f1, error in zip(schedule.audit_agree, schedule.audit_errors, strict=True):
        assert min(abs(f1 - a) + abs(error - e) for a, e in pairs) < 1e-3
    estimate = schedule.estimate()
    assert {"box_f1", "box_f1_interval", "box_error", "box_error_interval"} <= set(estimate)
    assert "top1" not in estimate and 0 <= estimate["box_f1"] <= 1
