"""The detection runner: eventful YOLOS behind the ModelRunner interface; results are boxes in frame pixels.

Image tokens are gated by each stream's budget; the detection tokens (and the class token) are updated on every
frame. Frames are resized whole to the model input, so normalised boxes scale straight to the decoded frame.
"""

from __future__ import annotations

from typing import Any

import torch

from model.eventful import EventfulConfig, StepOutput
from model.fidelity import BoxFidelity
from model.yolos import Detections, YolosDetector, postprocess_detections
from server.engine.decode import FrameLimits
from server.engine.planner import PlannedFrame, StepPlan
from server.engine.runner import ModelRunner


class DetectRunner(ModelRunner):
    """A YolosDetector behind EventfulViT; outputs {"boxes": [{"label", "score", "box": [x0, y0, x1, y1]}]}."""

    task = "detect"
    fidelity = BoxFidelity()  # audits compare the served detections with the dense ones (box F1, matched IoU)

    def __init__(
        self, model: YolosDetector, eventful: EventfulConfig | None = None, threshold: float = 0.5,
        max_boxes: int = 100, limits: FrameLimits | None = None, slots: int = 8,
    ):  # fmt: skip
        super().__init__(model, eventful, top_k=1, limits=limits, slots=slots)
        self.threshold = threshold
        self.max_boxes = max_boxes

    def _frame_size(self, planned: PlannedFrame) -> tuple[int, int]:
        """The decoded (height, width) of a planned frame (the model input size if the plan does not say)."""
        return tuple(planned.frame_size) if planned.frame_size is not None else tuple(self.config.image_size)

    def read_out(self, out: StepOutput, plan: StepPlan) -> tuple[list[dict[str, Any]], list[Detections]]:
        """Per frame, the detection heads on its detection tokens, post-processed to boxes in frame pixels: the
        result's boxes, and the same Detections on the CPU (what audits compare)."""
        with torch.inference_mode():
            boxes = self.model.forward_boxes(out.tokens)  # [B, D, 4]
        sizes = [self._frame_size(p) for p in plan.frames]
        detections = [d.to("cpu") for d in postprocess_detections(out.logits, boxes, sizes, self.threshold,
                                                                     self.max_boxes)]
        return [{"boxes": d.to_list(self.labels)} for d in detections], detections
