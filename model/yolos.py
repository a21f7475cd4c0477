"""YOLOS (Fang et al., NeurIPS 2021): a plain ViT detector. Weights only; the eventful step is EventfulViT's.

A DeiT backbone whose sequence carries D learned detection tokens next to the class token; after the last block
the detection tokens go through a class MLP (num_classes + 1 logits, the last is "no object") and a box MLP
(normalised cx, cy, w, h after a sigmoid), as transformers' YolosForObjectDetection.

Our token order is [cls, det_1..det_D, patches] (transformers: [cls, patches, det]): the detection tokens are
prefix tokens, so EventfulViT updates them on every frame and gates only the image tokens. Attention has no
mask and no relative positions, so the order changes nothing but where each position embedding sits (the
loader moves them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.config import DetectorConfig
from model.kernels import linear
from model.vit import VisionTransformer


class MlpHead(nn.Module):
    """Linear layers with ReLU between them (DETR's MLPPredictionHead)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, [*dims[1:], out_dim], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = linear(x, layer)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class YolosDetector(VisionTransformer):
    """YOLOS weights: patch embedding, class + detection tokens, blocks, final norm, class and box heads."""

    def __init__(self, config: DetectorConfig):
        super().__init__(config)  # cls token, pos_embed over [cls, det, patches], blocks, norm
        del self.head  # the detection heads replace the classifier
        c, d = config.embed_dim, config.num_detection_tokens
        self.det_token = nn.Parameter(torch.zeros(1, d, c))
        # [depth - 1, 1, N, C]: added to the residual stream after every block but the last
        self.mid_pos_embed = (
            nn.Parameter(torch.zeros(config.depth - 1, 1, config.num_tokens, c))
            if config.mid_position_embeddings else None
        )  # fmt: skip
        self.class_head = MlpHead(c, c, config.num_classes + 1)
        self.box_head = MlpHead(c, c, 4)
        self.init_random_weights()

    def prefix_tokens(self) -> list[torch.Tensor]:
        """[cls, det_1 .. det_D]: embed() gives [B, 1 + D + Np, C]."""
        return [self.cls_token, self.det_token]

    def after_block(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.mid_pos_embed is not None and index < self.config.depth - 1:
            return x + self.mid_pos_embed[index]
        return x

    def _detection_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, N or P, C] final residual stream -> normed detection tokens [B, D, C]
        return self.norm(tokens[:, 1 : 1 + self.config.num_detection_tokens])

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits of every detection token, "no object" last. tokens: [B, N, C] -> [B, D, classes + 1]."""
        return self.class_head(self._detection_tokens(tokens))

    def forward_boxes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boxes (cx, cy, w, h), normalised to the input image. tokens: [B, N, C] -> [B, D, 4]."""
        return self.box_head(self._detection_tokens(tokens)).sigmoid()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: [B, 3, H, W] -> (class logits [B, D, classes + 1], boxes [B, D, 4])."""
        x = self.forward_features(images)
        return self.forward_head(x), self.forward_boxes(x)


@dataclass
class Detections:
    """One image's kept detections, best first; boxes in the original frame's pixels (x0, y0, x1, y1)."""

    scores: torch.Tensor  # [K]
    labels: torch.Tensor  # [K] class indices (into config.label_names)
    boxes: torch.Tensor  # [K, 4]

    def to(self, device: torch.device | str) -> Detections:
        return Detections(self.scores.to(device), self.labels.to(device), self.boxes.to(device))

    def to_list(self, label_names: tuple[str, ...] | list[str] | None) -> list[dict]:
        """Plain values: [{"label", "score", "box": [x0, y0, x1, y1]}]."""
        out = []
        for score, label, box in zip(self.scores.tolist(), self.labels.tolist(), self.boxes.tolist(), strict=True):
            name = label_names[label] if label_names and label < len(label_names) else f"class_{label}"
            out.append({"label": name, "score": round(score, 4), "box": [round(v, 1) for v in box]})
        return out


def boxes_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1). boxes: [..., 4]."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def postprocess_detections(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    frame_sizes: list[tuple[int, int]],
    threshold: float = 0.5,
    top_k: int = 100,
) -> list[Detections]:
    """transformers' post_process_object_detection, plus top-k: softmax over classes, best class excluding
    "no object", score > threshold, boxes scaled to each frame's (height, width) (the whole frame was resized
    to the model input, so normalised coordinates map straight to frame pixels).

    logits: [B, D, classes + 1], boxes: [B, D, 4] normalised (cx, cy, w, h).
    """
    probs = logits.float().softmax(dim=-1)[..., :-1]  # [B, D, classes]
    scores, labels = probs.max(dim=-1)  # [B, D]
    corners = boxes_to_corners(boxes.float())  # [B, D, 4]
    out = []
    for b, (height, width) in enumerate(frame_sizes):
        scale = corners.new_tensor([width, height, width, height])
        keep = (scores[b] > threshold).nonzero().squeeze(1)
        order = scores[b, keep].argsort(descending=True)[:top_k]
        keep = keep[order]
        out.append(Detections(scores[b, keep], labels[b, keep], corners[b, keep] * scale))
    return out


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of (x0, y0, x1, y1) boxes. a: [M, 4], b: [K, 4] -> [M, K]."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-12)


__all__ = ["Detections", "MlpHead", "YolosDetector", "box_iou", "boxes_to_corners", "postprocess_detections"]
