"""Static-camera clips, and the claim they exist for: eventful beats frame skipping at equal compute there."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.clips import StaticClipSpec, make_static_clip
from bench.model_bench import run_model_bench
from model.eventful import EventfulConfig
from model.loaders import load_model
from model.preprocess import Preprocessor, read_video_frames


def test_static_clip_changes_locally(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("bg", "sprite"):
        Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    spec = StaticClipSpec(width=160, height=96, frames=10, noise_std=1.0, crf=18)
    path = make_static_clip(tmp_path / "clip.mp4", tmp_path / "bg.png", [tmp_path / "sprite.png"], spec)
    frames = np.stack(read_video_frames(path)).astype(np.float32)
    assert frames.shape == (10, 96, 160, 3)
    # 16x16 patches whose content changed visibly between consecutive frames: a minority
    diff = np.abs(frames[1:] - frames[:-1]).reshape(9, 6, 16, 10, 16, 3).mean(axis=(2, 4, 5))
    changed = (diff > 8).mean()
    assert 0.0 < changed < 0.35


@pytest.mark.slow
def test_eventful_beats_frame_skipping_on_a_static_camera(tmp_path, shared_file):
    """Real DeiT-Tiny, a fixed camera on a real photograph with one object moving, sensor noise, exposure
    drift and H.264: clearly lower logit error than frame skipping at equal MACs."""
    clip = make_static_clip(
        tmp_path / "static.mp4",
        shared_file("data/images/chelsea.png"),
        [shared_file("data/images/coffee.png")],
        StaticClipSpec(frames=40, noise_std=2.0, crf=23),
    )
    model = load_model(str(shared_file("weights/deit_tiny_patch16_224.pth")))
    images = Preprocessor(model.config.preprocess)(read_video_frames(clip))
    report = run_model_bench(
        model, images, [98, 64], model_name="deit-tiny", video_name="static", eventful=EventfulConfig(), warmup=0
    )
    for result in report.results:
        assert result.mac_ratio > 1.8
        assert result.rel_l2 < 0.7 * result.skip_rel_l2
        assert result.top1_agreement >= result.skip_top1_agreement
    assert report.results[0].rel_l2 < report.results[1].rel_l2  # more tokens, less error
