"""ViTDet and OWLv2 on every frame of a real video: the eventful step at full budget, and its gated path with every
token selected, equal the dense model (random weights, small configs; the frames are real)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.eventful import full_budget
from model.owlv2 import EventfulOwlv2, Owlv2Preprocessor
from model.policy import StreamBudget
from model.preprocess import Preprocessor, read_video_frames
from model.vitdet import EventfulViTDet
from tests.model import test_owlv2, test_vitdet

vitdet = test_vitdet.vitdet
owlv2 = test_owlv2.owlv2


@pytest.mark.parametrize("family", ["vitdet", "owlv2"])
@pytest.mark.parametrize("path", ["full budget", "gated, every token"])
def test_full_budget_equals_dense_on_every_frame_of_a_real_video(real_video, request, family, path, monkeypatch):
    model = request.getfixturevalue(family)
    frames = read_video_frames(str(real_video))
    if family == "vitdet":
        whole_frames = replace(model.config.preprocess, resize_shortest=None, resize_to=model.config.image_size,
                               crop_size=None)  # whole frames resized to the model's input, as ViTDet takes them
        images = Preprocessor(whole_frames)(frames)
        runner = EventfulViTDet(model)

        def dense(x):
            return model(x)
    else:
        images = Owlv2Preprocessor(model.config)(frames)
        runner = EventfulOwlv2(model)

        def dense(x):
            return model.forward_head(model.forward_features(x))
    state = runner.new_state()
    budget = full_budget(model.config.num_patches)
    with torch.inference_mode():
        runner.step(images[:1], [state], [StreamBudget(tokens=4)])  # seeded
        if path != "full budget":  # the gated, fixed-shape path at full width, not the seeding call
            monkeypatch.setattr(StreamBudget, "is_dense_for", lambda self, n: False)
        worst = 0.0
        for t in range(1, len(images)):
            out = runner.step(images[t : t + 1], [state], [budget])
            worst = max(worst, float((out.logits - dense(images[t : t + 1])).abs().max()))
    assert len(images) >= 30 and worst <= 1e-4
