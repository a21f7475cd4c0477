"""The small random ViT the eventful-model tests share (tests/model/test_eventful.py's CONFIG)."""

from __future__ import annotations

import pytest
import torch

from model.vit import VisionTransformer
from tests.model.test_eventful import CONFIG


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(CONFIG).eval()
    with torch.no_grad():  # larger-than-init weights so changes propagate visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model
