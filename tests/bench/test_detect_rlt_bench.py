"""`eventful-bench detect` and `eventful-bench rlt` end to end on a short real video (small named models)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main
from bench.detect_bench import match_boxes
from model.yolos import Detections


def test_detect_bench_writes_results(real_video, tmp_path, capsys):
    out = tmp_path / "detect.json"
    code = main([
        "detect", "--model", "yolos-tiny", "--image-size", "64x96", "--video", str(real_video), "--frames", "4",
        "--budgets", "24,6", "--threshold", "0", "--top-k", "5", "--threads", "1", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["budget"] for r in report["results"]] == [24, 6]
    full, sparse = report["results"]
    assert full["agreement"] == full["recall"] == 1.0 and full["mean_iou"] > 0.999 and full["mac_ratio"] == 1.0
    assert sparse["mac_ratio"] > 1.0 and 0.0 <= sparse["recall"] <= 1.0 and sparse["speedup"] > 0
    assert "recall%" in capsys.readouterr().out


def test_rlt_bench_writes_results(real_video, tmp_path):
    out = tmp_path / "rlt.json"
    code = main([
        "rlt", "--model", "videomae-small", "--image-size", "32", "--video", str(real_video), "--clips", "2",
        "--tau", "0,0.1,5", "--threads", "1", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert [r["tau"] for r in results] == [0.0, 0.1, 5.0]
    assert results[0]["tokens_kept_fraction"] == 1.0 and results[0]["agreement"] == 1.0 and results[0]["rel_l2"] == 0
    assert results[2]["tokens_kept_fraction"] == 1 / 8  # tau 5 drops every repeat: the first of 8 tubelets stays
    assert results[2]["mac_ratio"] > 1.0


def test_bench_refuses_the_wrong_model_kind(real_video, capsys):
    assert main(["detect", "--model", "deit-tiny-patch16-224", "--video", str(real_video), "--frames", "2"]) == 2
    assert main(["rlt", "--model", "yolos-tiny", "--video", str(real_video)]) == 2
    assert "not a" in capsys.readouterr().err


def test_match_boxes_is_one_to_one_and_label_aware():
    dense = Detections(torch.tensor([0.9, 0.8]), torch.tensor([1, 2]), torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.0]]))
    other = Detections(torch.tensor([0.9]), torch.tensor([1]), torch.tensor([[0, 0, 10, 11.0]]))
    assert match_boxes(dense, other) == [pytest.approx(10 / 11)]  # the label-2 box has no partner
