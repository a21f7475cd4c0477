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
    assert full["box_f1"] == 1.0 and full["skip_box_f1"] == 1.0 and full["skip_mean_iou"] > 0.999
    assert 0.0 <= sparse["box_f1"] <= 1.0 and 0.0 <= sparse["skip_box_f1"] <= 1.0
    assert "recall%" in capsys.readouterr().out


def test_detect_bench_runs_owlv2_with_text_queries(real_video, tmp_path, capsys):
    """The named OWLv2 (random weights, hashed-word queries): boxes labelled by the queries, at full budget the
    dense model's, beside frame skipping."""
    out = tmp_path / "owl.json"
    code = main([
        "detect", "--model", "owlv2-base-patch16", "--image-size", "64x64", "--video", str(real_video), "--frames",
        "4", "--budgets", "16,4", "--threshold", "0", "--top-k", "5", "--queries", "person, car", "--threads", "1",
        "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["queries"] == ["person", "car"] and report["detection_tokens"] == 16
    full, sparse = report["results"]
    assert full["box_f1"] == 1.0 and full["mean_iou"] > 0.999 and full["mac_ratio"] == 1.0
    assert sparse["mac_ratio"] > 1.0 and sparse["skip_box_f1"] is not None
    assert "queries: person, car" in capsys.readouterr().out


def test_skip_schedule_serves_every_ratio_th_frame():
    from bench.detect_bench import skip_schedule

    assert skip_schedule(7, 1.0) == list(range(7))
    assert skip_schedule(7, 2.0) == [0, 0, 2, 2, 4, 4, 6]
    assert skip_schedule(7, 3.0) == [0, 0, 0, 3, 3, 3, 6]


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
