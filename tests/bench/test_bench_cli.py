"""`eventful-bench model`: the frame-skipping baseline, the fidelity measures, streams and mixed budgets, the
kernel-op counter, and the command end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from bench.cli import _parse_budget_specs, main
from bench.kernel_ops import count_launches
from bench.model_bench import fidelity, frame_schedule, frame_skip_outputs, stream_budget_values, stream_offsets
from model.chooser import AdaptiveConfig

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
    phases = skip["phases"]  # frame skipping over both phases of its pattern, scored from the dense reference
    assert phases["phases"] == 2
    assert phases["rel_l2_range"][0] <= skip["rel_l2"] <= phases["rel_l2_range"][1]
    assert phases["rel_l2_range"][0] <= phases["rel_l2_mean"] <= phases["rel_l2_range"][1]
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
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["videos"][0]["results"]] == ["skip", "adaptive"]
    assert report["explore"] == AdaptiveConfig.explore == "trial"  # the benchmark runs the server's default
    assert main(argv[:-2] + ["--policies", "skip,often"]) == 2
    assert "often" in capsys.readouterr().err


# ---- streams and mixed budgets -----------------------------------------------------------------


def test_mixed_budgets_parse_one_row_per_comma_and_alternate_over_streams():
    assert _parse_budget_specs("98,64:32") == [(98,), (64, 32)]
    assert _parse_budget_specs("0.1:0.2:0.3") == [(0.1, 0.2, 0.3)]
    assert stream_budget_values((64, 32), 5) == [64, 32, 64, 32, 64]
    assert stream_budget_values((98,), 3) == [98, 98, 98]
    assert stream_budget_values((64, 32), 1) == [64]


@pytest.mark.parametrize("text", ["64:x", "64:-1", "", "64,,:"])
def test_bad_budget_specs_are_refused(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "--model", "deit-tiny-patch16-224", "--video", "v.mp4", "--budgets", text])
    assert exit_info.value.code == 2
    assert "--budgets" in capsys.readouterr().err


def test_streams_start_at_spread_offsets_and_wrap_around():
    assert stream_offsets(6, 3) == [0, 2, 4]
    assert stream_offsets(30, 8) == [0, 3, 7, 11, 15, 18, 22, 26]
    schedule = frame_schedule(6, 3)
    assert schedule.shape == (6, 3)
    assert schedule[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert schedule[:, 2].tolist() == [4, 5, 0, 1, 2, 3]
    assert frame_schedule(6, 3, steps=8)[7].tolist() == [1, 3, 5]  # playback goes on past the T frames


REPORT_KEYS = {"streams", "stream_offsets", "dtype", "execution", "dense_execution", "dense_kernel_ops_per_step",
               "dense_host_syncs_per_step", "dense_device_kernels_per_step"}
STREAM_RESULT_KEYS = {"budget_spec", "stream_budgets", "stream_mac_ratios", "kernel_ops_per_step",
                      "host_syncs_per_step", "device_kernels_per_step", "kernel_ops_by_name", "pool_bytes"}


def test_model_command_with_streams_and_mixed_budgets(clip, tmp_path, capsys):
    out = tmp_path / "streams.json"
    # 64x64: 16 patches, so 16 is every token; 8:4 alternates r = 8 and r = 4 over the 3 streams
    argv = ["model", "--model", "deit-tiny-patch16-224", "--image-size", "64", "--video", str(clip), "--frames", "6",
            "--streams", "3", "--budgets", "16,8:4", "--warmup", "1", "--threads", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "streams 3" in printed and " 8:4 " in printed and "ops" in printed

    report = json.loads(out.read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["streams"] == 3 and report["stream_offsets"] == [0, 2, 4]
    assert report["dtype"] == "float32" and report["execution"] == report["dense_execution"] == "eager"
    assert report["dense_kernel_ops_per_step"] > 0 and report["dense_device_kernels_per_step"] is None
    full, mixed = report["results"]
    for result in (full, mixed):
        assert RESULT_KEYS | STREAM_RESULT_KEYS <= result.keys()
        assert result["kernel_ops_per_step"] > 0 and result["host_syncs_per_step"] >= 0
        assert sum(result["kernel_ops_by_name"].values()) == result["kernel_ops_per_step"]
        assert len(result["stream_mac_ratios"]) == 3
    assert full["budget_spec"] == "16" and full["stream_budgets"] == [16, 16, 16] and full["budget"] == 16
    assert mixed["budget_spec"] == "8:4" and mixed["stream_budgets"] == [8, 4, 8]
    assert mixed["budget"] == pytest.approx(20 / 3)
    # every stream at full budget is the dense model on that stream's own frames
    assert full["rel_l2"] <= 1e-4 and full["top1_agreement"] == 1
    assert full["mac_ratio"] == pytest.approx(1.0, abs=1e-9)
    # the budgets alternate: streams 0 and 2 (r = 8) cost the same, stream 1 (r = 4) less
    r8, r4, r8_again = mixed["stream_mac_ratios"]
    assert r8 == pytest.approx(r8_again) and r4 > r8 > 1
    assert mixed["mac_ratio"] == pytest.approx(3 / sum(1 / r for r in mixed["stream_mac_ratios"]))
    assert mixed["rel_l2"] > full["rel_l2"]


def test_model_command_runs_in_bfloat16(clip, tmp_path):
    out = tmp_path / "bf16.json"
    argv = ["model", "--model", "deit-tiny-patch16-224", "--image-size", "64", "--video", str(clip), "--frames", "3",
            "--streams", "2", "--budgets", "4", "--dtype", "bfloat16", "--warmup", "0", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and report["results"][0]["kernel_ops_per_step"] > 0


def test_model_command_refuses_graph_execution_without_cuda(clip, capsys):
    argv = ["model", "--model", "deit-tiny-patch16-224", "--video", str(clip), "--execution", "graph"]
    assert main(argv) == 2
    assert "--execution graph" in capsys.readouterr().err


# ---- the kernel-op counter ---------------------------------------------------------------------


def test_kernel_ops_count_the_work_and_not_the_views():
    a, b = torch.randn(4, 8), torch.randn(8, 3)

    def three_kernels():
        x = a.view(2, 16).reshape(4, 8).t().contiguous()  # a copy (views and the no-op reshape free)
        y = a @ b  # a matmul
        z = torch.relu(y.unsqueeze(0).squeeze(0)[:, :2])  # relu on a view
        return x.contiguous(), z.detach()  # already contiguous: no copy

    _, counts = count_launches(three_kernels)
    assert counts.kernel_ops == 3, counts.kernel_op_names
    assert counts.host_syncs == 0 and counts.device_kernels is None


def test_kernel_ops_count_each_op_once_and_host_syncs_once_each():
    a = torch.randn(5, 6)
    layer = torch.nn.Linear(6, 4)

    def work():
        out = layer(a)  # aten::linear -> aten::t (a view) + aten::addmm: one
        total = out.sum().item()  # the sum: one; item -> _local_scalar_dense: one sync, no kernel
        nonzero = (out > 0).nonzero()  # the comparison and nonzero: two; nonzero reads its size back: a sync
        return total, nonzero, bool(out[0, 0] > 0)  # a comparison on a view: one; is_nonzero -> item: one sync

    with torch.inference_mode():
        _, counts = count_launches(work)
    assert counts.kernel_ops == 5, counts.kernel_op_names
    assert counts.host_syncs == 3
    assert not {"aten::linear", "aten::t", "aten::item", "aten::_local_scalar_dense"} & counts.kernel_op_names.keys()


# ---- the GPU check script ----------------------------------------------------------------------

GPU_CHECK = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("script", [GPU_CHECK, GPU_CHECK.with_name("gpu_wheels.sh")])
def test_gpu_check_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_check_summary_reads_model_reports(tmp_path):
    """The summary step of gpu_check.sh (bench/gpu_summary.py) on two hand-made reports."""
    from bench.gpu_summary import summary_lines

    for streams, ms in ((1, 2.0), (8, 4.0)):
        report = {"model": "m", "image_size": [224, 224], "streams": streams, "dtype": "bfloat16",
                  "execution": "graph", "dense_ms": 2 * ms, "dense_kernel_ops_per_step": 100,
                  "results": [{"budget_spec": "64", "eventful_ms": ms, "speedup": 2.0, "mac_ratio": 3.0,
                               "top1_agreement": 0.9, "kernel_ops_per_step": 400, "host_syncs_per_step": 0}]}
        (tmp_path / f"model_m_b{streams}.json").write_text(json.dumps(report))
    lines = summary_lines(tmp_path)
    assert len([line for line in lines if line.lstrip().startswith("m ")]) == 2
    assert any(" 2.00x " in line and "100/400" in line for line in lines)
