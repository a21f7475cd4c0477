"""Real checkpoint on real video: eventful at full budget equals dense on every frame."""

from __future__ import annotations

import pytest
import torch

from model.eventful import EventfulConfig, EventfulViT, full_budget
from model.loaders import load_model
from model.policy import StreamBudget
from model.preprocess import Preprocessor, read_video_frames


@pytest.fixture(scope="module")
def deit_and_frames(shared_file):
    model = load_model(str(shared_file("weights/deit_tiny_patch16_224.pth")))
    frames = read_video_frames(shared_file("data/videos/cockatoo.mp4"))
    images = Preprocessor(model.config.preprocess)(frames)
    with torch.inference_mode():
        dense = torch.cat([model(images[i : i + 32]) for i in range(0, len(images), 32)])
    return model, images, dense


@pytest.mark.slow
@pytest.mark.parametrize(
    "level, budget, frames",
    [
        ("tokenwise", "full", None),
        ("tokenwise", "threshold0", None),
        ("qk", "full", 40),
        ("full", "threshold0", 40),
    ],
)
def test_full_budget_equals_dense_on_every_frame(deit_and_frames, level, budget, frames):
    model, images, dense = deit_and_frames
    assert len(images) == 280
    runner = EventfulViT(model, EventfulConfig(level=level))
    state = runner.new_state()
    stream_budget = full_budget(model.config.num_patches) if budget == "full" else StreamBudget(threshold=0.0)
    worst = 0.0
    for t in range(frames or len(images)):
        out = runner.step(images[t : t + 1], [state], [stream_budget])
        worst = max(worst, float((out.logits - dense[t : t + 1]).abs().max()))
    assert worst <= 1e-4


@pytest.mark.slow
def test_sparse_budget_after_full_budget_frame_is_exact_again(deit_and_frames):
    """Budget changes between frames on real video: sparse frames approximate, a full frame is exact."""
    model, images, dense = deit_and_frames
    runner = EventfulViT(model, EventfulConfig())
    state = runner.new_state()
    errors = []
    for t, tokens in enumerate([196, 64, 64, 32, 196, 98, 98]):
        out = runner.step(images[t : t + 1], [state], [StreamBudget(tokens=tokens)])
        errors.append(float((out.logits - dense[t : t + 1]).abs().max()))
    # full frames (0, 4) and the seeding frames after them (1, 5) are exact; the others approximate
    assert max(errors[0], errors[1], errors[4], errors[5]) <= 1e-4
    assert min(errors[2], errors[3], errors[6]) > 1e-3
