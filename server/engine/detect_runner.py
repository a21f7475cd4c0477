"""The detection runner: eventful YOLOS behind the ModelRunner interface; results are boxes in frame pixels.

Image tokens are gated by each stream's budget; the detection tokens (and the class token) are updated on every
frame. Frames are resized whole to the model input, so normalised boxes scale straight to the decoded frame.
"""

from __future__ import annotations

import time

import torch

from model.eventful import EventfulConfig
from model.yolos import YolosDetector, postprocess_detections
from server.engine.decode import FrameLimits
from server.engine.runner import FrameOutput, ModelRunner, StepResult
from server.engine.scheduler import PlannedFrame, StepPlan


class DetectRunner(ModelRunner):
    """A YolosDetector behind EventfulViT; outputs {"boxes": [{"label", "score", "box": [x0, y0, x1, y1]}]}."""

    def __init__(
        self, model: YolosDetector, eventful: EventfulConfig | None = None, threshold: float = 0.5,
        max_boxes: int = 100, limits: FrameLimits | None = None,
    ):  # fmt: skip
        super().__init__(model, eventful, top_k=1, limits=limits)
        self.threshold = threshold
        self.max_boxes = max_boxes

    def _frame_size(self, planned: PlannedFrame) -> tuple[int, int]:
        """The decoded (height, width) of a planned frame (the model input size if the plan does not say)."""
        return tuple(planned.frame_size) if planned.frame_size is not None else tuple(self.config.image_size)

    def execute(self, plan: StepPlan) -> StepResult:
        """One batched eventful step over the plan's streams, then the detection heads and post-processing."""
        start = time.perf_counter()
        for planned in plan.frames:
            if planned.flush:
                planned.state.flush()
        images = torch.stack([p.image for p in plan.frames]).to(self.device, self.dtype)  # [B, 3, H, W]
        out = self.eventful.step(images, [p.state for p in plan.frames], [p.budget for p in plan.frames])
        with torch.inference_mode():
            boxes = self.model.forward_boxes(out.tokens)  # [B, D, 4]
        sizes = [self._frame_size(p) for p in plan.frames]
        detections = postprocess_detections(out.logits, boxes, sizes, self.threshold, self.max_boxes)
        fractions = out.updated_fraction.tolist()
        outputs = []
        for j, planned in enumerate(plan.frames):
            tokens = planned.budget.tokens
            used = self.num_patches if out.dense_frame[j] or tokens is None else min(tokens, self.num_patches)
            result = {"boxes": detections[j].to_list(self.labels)}
            outputs.append(FrameOutput(used, out.dense_frame[j], fractions[j], out.macs[j], result))
        return StepResult(outputs, start, time.perf_counter() - start, out.dense_macs)
