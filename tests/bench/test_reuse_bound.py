"""`eventful-bench reuse-bound`: the simulated keyframe + sparse schedule against the dense model it must equal
where every row is recomputed, the two token-choice rules, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main
from bench.fidelity_bench import dense_reference
from bench.reuse_bound import RULES, _BranchCache, simulate
from model.vit import VisionTransformer
from tests.bench.test_bench_cli import write_clip
from tests.model.test_eventful import CONFIG, video


@pytest.fixture(scope="module")
def model():
    return VisionTransformer(CONFIG).eval()


@pytest.mark.parametrize("rule", RULES)
def test_every_row_recomputed_is_the_dense_model(model, rule):
    images = video(6)
    dense = dense_reference(model, images)
    for interval, tokens in [(3, CONFIG.num_patches), (1, 0)]:  # all rows kept, or a keyframe on every frame
        served = simulate(model, images, interval, tokens, rule)
        torch.testing.assert_close(served.logits, dense.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(served.features, dense.features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_fewer_rows_leave_the_sparse_frames_off_the_dense_model(model, rule):
    images = video(6)
    dense = dense_reference(model, images)
    served = simulate(model, images, 3, 4, rule)
    assert torch.equal(served.logits[[0, 3]], dense.logits[[0, 3]])  # keyframes are the dense model
    assert not torch.allclose(served.logits[[1, 2, 4, 5]], dense.logits[[1, 2, 4, 5]], atol=1e-4)


def test_the_gate_keeps_the_rows_whose_input_changed_most_and_the_oracle_those_whose_output_did():
    out, ref = torch.zeros(5, 2), torch.zeros(5, 2)
    new_in = torch.tensor([[9.0, 0], [0, 0], [1, 0], [3, 0], [2, 0]])  # row 0 is the class token
    new_out = torch.tensor([[0.0, 1], [0, 5], [0, 4], [0, 1], [0, 2]])
    for rule, kept in [("gate", {0, 3, 4}), ("oracle", {0, 1, 2})]:
        cache = _BranchCache(out, ref)
        result = cache.update(new_out, new_in, tokens=2, rule=rule, prefix=1)
        assert {i for i in range(5) if torch.equal(result[i], new_out[i])} == kept
        assert all(torch.equal(cache.ref[i], new_in[i]) for i in kept)  # a kept row's input is its new reference
        assert all(torch.equal(cache.ref[i], ref[i]) for i in set(range(5)) - kept)


def test_the_oracle_leaves_no_more_error_on_a_branch_than_the_gate():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        out, ref = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
        new_in, new_out = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
        left = {rule: (new_out - _BranchCache(out, ref).update(new_out, new_in, 7, rule, 1)).norm()
                for rule in RULES}
        assert left["oracle"] <= left["gate"] + 1e-6


def test_reuse_bound_command_end_to_end(tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    write_clip(clip)
    out = tmp_path / "bound.json"
    argv = ["reuse-bound", "--model", "deit-tiny-patch16-224", "--videos", str(clip), "--frames", "6",
            "--ratios", "2", "--intervals", "3,4", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = report["videos"][0]["results"]
    assert [(r["policy"], r["interval"]) for r in rows] == [
        ("skip", None), ("eventful", 3), ("gate", 3), ("oracle", 3), ("eventful", 4), ("gate", 4), ("oracle", 4)]
    eventful = {r["interval"]: r for r in rows if r["policy"] == "eventful"}
    assert all(r["mac_ratio"] > 1.5 for r in eventful.values())
    for row in rows:
        assert 0 <= row["top1_agreement"] <= 1 and row["rel_l2"] >= 0
        if row["policy"] in RULES:  # the simulated rows run the eventful row's r
            assert row["tokens"] == eventful[row["interval"]]["tokens"]
    assert main(argv[:-2] + ["--intervals", "1,3"]) == 2
    assert "--intervals" in capsys.readouterr().err
    yolos = ["reuse-bound", "--model", "yolos-tiny", "--videos", str(clip), "--frames", "6"]
    assert main(yolos) == 2
    assert "not a ViT classifier" in capsys.readouterr().err
