"""`eventful-bench model`: the frame-skipping baseline, the fidelity measures, and the command end to end."""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest
import torch

from bench.cli import main
from bench.model_bench import fidelity, frame_skip_outputs

RESULT_KEYS = {"budget", "eventful_ms", "speedup", "mac_ratio", "efficiency", "rel_l2", "top1_agreement", "state_bytes"}


def indexed_logits(frames: int, classes: int = 6) -> torch.Tensor:
    """[T, K] logits whose column 0 holds the frame index, so each output row tells which frame it came from."""
    logits = torch.randn(frames, classes, generator=torch.Generator().manual_seed(0))
    logits[:, 0] = torch.arange(frames, dtype=logits.dtype)
    return logits


def source_frames(outputs: torch.Tensor) -> list[int]:
    return [int(v) for v in outputs[:, 0].tolist()]


# ---- frame skipping ----------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, 0.9])
def test_frame_skip_at_ratio_one_or_below_is_dense(ratio):
    dense = indexed_logits(9)
    assert torch.equal(frame_skip_outputs(dense, ratio), dense)


def test_frame_skip_at_ratio_two_repeats_every_other_frame():
    dense = indexed_logits(8)
    out = frame_skip_outputs(dense, 2.0)
    assert source_frames(out) == [0, 0, 2, 2, 4, 4, 6, 6]
    assert torch.equal(out[::2], dense[::2])  # the computed frames are the dense ones, unchanged


@pytest.mark.parametrize("frames", [1, 7, 20, 21])
def test_frame_skip_at_fractional_ratio_computes_the_expected_frames(frames):
    ratio = 3.5
    out = frame_skip_outputs(indexed_logits(frames), ratio)
    # frame t is computed when floor(t / r) != floor((t - 1) / r) (and t = 0), i.e. 1 + floor((T - 1) / r) frames
    computed = [t for t in range(frames) if t == 0 or math.floor(t / ratio) != math.floor((t - 1) / ratio)]
    assert len(computed) == 1 + math.floor((frames - 1) / ratio)
    assert sorted(set(source_frames(out))) == computed
    # every frame shows the latest computed frame at or before it
    assert source_frames(out) == [max(c for c in computed if c <= t) for t in range(frames)]
    if frames == 20:
        assert computed == [0, 4, 7, 11, 14, 18] and len(computed) == math.ceil(frames / ratio)


# ---- fidelity ----------------------------------------------------------------------------------


def test_fidelity_on_hand_made_logits():
    dense = torch.tensor(
        [
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # top-1 0
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # top-1 5
            [1.0, 2.0, 3.0, 4.0, 6.0, 5.0],  # top-1 4, top-5 excludes class 0
            [3.0, 1.0, 2.0, 6.0, 5.0, 4.0],  # top-1 3, top-5 excludes class 1 (includes 0)
        ]
    )
    outputs = torch.stack(
        [
            dense[0],  # same: agrees, error 0
            2 * dense[1],  # same argmax, error ||d|| / ||d|| = 1
            torch.tensor([7.0, 2.0, 3.0, 4.0, 6.0, 5.0]),  # top-1 0: disagrees, outside dense top-5; error 6/sqrt(91)
            torch.tensor([7.0, 1.0, 2.0, 6.0, 5.0, 4.0]),  # top-1 0: disagrees, inside dense top-5; error 4/sqrt(91)
        ]
    )
    fid = fidelity(outputs, dense)
    rel = [0.0, 1.0, 6 / math.sqrt(91), 4 / math.sqrt(91)]
    assert fid["top1_agreement"] == pytest.approx(0.5)
    assert fid["top5_containment"] == pytest.approx(0.75)
    assert fid["rel_l2"] == pytest.approx(sum(rel) / 4, rel=1e-6)
    assert fid["rel_l2_first_quarter"] == pytest.approx(rel[0], abs=1e-7)
    assert fid["rel_l2_last_quarter"] == pytest.approx(rel[3], rel=1e-6)


def test_fidelity_of_dense_against_itself_is_perfect():
    dense = indexed_logits(5, classes=10)
    fid = fidelity(dense.clone(), dense)
    assert fid["top1_agreement"] == 1.0 and fid["top5_containment"] == 1.0 and fid["rel_l2"] == 0.0


# ---- the command end to end --------------------------------------------------------------------


def write_clip(path, frames: int = 6, h: int = 48, w: int = 64) -> None:
    """A small moving-square clip (mpeg4, which PyAV's bundled FFmpeg always has)."""
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            image = background.copy()
            image[8:24, 4 + 6 * i : 20 + 6 * i] = (250, 30, 30)  # a square moving right
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_clip(path)
    return path


def test_model_command_end_to_end(clip, tmp_path, capsys):
    out = tmp_path / "out" / "bench.json"
    argv = ["model", "--model", "deit-tiny-patch16-224", "--video", str(clip), "--frames", "4",
            "--budgets", "196,64", "--warmup", "0", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dense:" in printed and f"wrote {out}" in printed

    report = json.loads(out.read_text())
    assert {"model", "video", "frames", "dense_ms", "results"} <= report.keys()
    assert report["model"] == "deit-tiny-patch16-224"
    assert report["video"] == str(clip)
    assert report["frames"] == 4
    assert report["dense_ms"] > 0
    assert [r["budget"] for r in report["results"]] == [196, 64]
    for result in report["results"]:
        assert RESULT_KEYS <= result.keys()
        assert result["eventful_ms"] > 0 and result["speedup"] > 0 and result["state_bytes"] > 0
        assert result["efficiency"] == pytest.approx(result["speedup"] / result["mac_ratio"])

    full, sparse = report["results"]
    # every token at every gate: the eventful model is the dense model
    assert full["rel_l2"] <= 1e-4
    assert full["top1_agreement"] == 1
    assert full["mac_ratio"] == pytest.approx(1.0, abs=1e-9)
    # 64 of 196 patches after a dense first frame: well under the dense compute
    assert sparse["mac_ratio"] > 1.5
    assert sparse["state_bytes"] == full["state_bytes"]  # state size depends on the level, not the budget


@pytest.mark.parametrize("kind", ["missing", "not a video"])
def test_model_command_rejects_a_bad_video(kind, tmp_path, capsys):
    video = tmp_path / "video.mp4"
    if kind == "not a video":
        video.write_bytes(b"not a video" * 100)
    argv = ["model", "--model", "deit-tiny-patch16-224", "--video", str(video), "--frames", "4", "--warmup", "0"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and str(video) in captured.err
    assert captured.out == ""


def test_model_command_rejects_too_few_frames(clip, capsys):
    argv = ["model", "--model", "deit-tiny-patch16-224", "--video", str(clip), "--frames", "1"]
    assert main(argv) == 2
    assert "--frames" in capsys.readouterr().err


def test_a_stream_with_dense_refreshes_is_timed_by_both_kinds_of_frame():
    from bench.model_bench import _typical_ms

    # one dense 30 ms frame in every 3, sparse 10 ms between: 50/3 ms a frame, never the sparse median alone
    times = [30.0, 10.0, 10.0] * 10
    dense = [True, False, False] * 10
    assert _typical_ms(times, dense) == pytest.approx(50 / 3)
    assert _typical_ms([5.0, 7.0, 6.0], [False] * 3) == 6.0


FIDELITY_KEYS = {"ratio", "policy", "mac_ratio", "top1_agreement", "rel_l2", "rel_l2_first_quarter",
                 "rel_l2_last_quarter", "token_rel_l2", "moving_token_rel_l2"}


def test_fidelity_command_end_to_end(clip, tmp_path, capsys):
    out = tmp_path / "fidelity.json"
    argv = ["fidelity", "--model", "deit-tiny-patch16-224", "--videos", str(clip), str(clip), "--frames", "6",
            "--ratios", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == "deit-tiny-patch16-224" and len(report["videos"]) == 2
    video = report["videos"][0]
    assert {"video", "frames", "dense_stability", "results"} <= video.keys() and video["frames"] == 6
    policies = [r["policy"] for r in video["results"]]
    assert "skip" in policies and "adaptive" in policies and "keyframe4" in policies
    for row in video["results"]:
        assert FIDELITY_KEYS <= row.keys()
        assert row["ratio"] == 2
        assert row["mac_ratio"] > 1  # measured, first dense frame included (over 6 frames, keyframe8 is near 1.3)
    skip = next(r for r in video["results"] if r["policy"] == "skip")
    assert skip["mac_ratio"] == pytest.approx(2.0)
    adaptive = next(r for r in video["results"] if r["policy"] == "adaptive")
    assert adaptive["mac_ratio"] >= 1.9  # audits and shadows are paid from the same compute
    assert report["videos"][1]["results"] == video["results"]  # deterministic: the same clip, the same figures


@pytest.mark.parametrize("flag,value,message", [("--audit-share", "0.7", "audit"), ("--ratios", "0.5", "ratios")])
def test_fidelity_command_rejects_bad_settings(clip, capsys, flag, value, message):
    argv = ["fidelity", "--model", "deit-tiny-patch16-224", "--videos", str(clip), "--frames", "6", flag, value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_fidelity_command_runs_only_the_policies_asked_for(clip, tmp_path, capsys):
    out = tmp_path / "fidelity.json"
    argv = ["fidelity", "--model", "deit-tiny-patch16-224", "--videos", str(clip), "--frames", "6", "--ratios", "2",
            "--policies", "adaptive", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert [r["policy"] for r in json.loads(out.read_text())["videos"][0]["results"]] == ["skip", "adaptive"]
    assert main(argv[:-2] + ["--policies", "skip,often"]) == 2
    assert "often" in capsys.readouterr().err
