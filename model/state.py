"""Per-stream eventful state: every reference tensor one stream needs, owned by the caller.

The model modules hold weights only; one VisionTransformer serves any number of StreamStates.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from model.config import ViTConfig

Level = Literal["tokenwise", "qk", "full"]
LEVELS: tuple[str, ...] = ("tokenwise", "qk", "full")


@dataclass
class LayerState:
    """One block's buffers for one stream. Shapes: N tokens, C channels, H heads, Dh = C / H."""

    qkv_reference: torch.Tensor  # [N, C] gate reference: block input the qkv projection last saw
    keys: torch.Tensor  # [H, N, Dh] key buffer
    values: torch.Tensor  # [H, N, Dh] value buffer
    attention_update: torch.Tensor  # [N, C] attention branch output (after proj) per token
    mlp_reference: torch.Tensor  # [N, C] gate reference: MLP input last seen
    mlp_update: torch.Tensor  # [N, C] MLP branch output per token
    # query-key level and above
    queries: torch.Tensor | None = None  # [H, N, Dh] query buffer (columns of Q.K^T need every query)
    proj_reference: torch.Tensor | None = None  # [N, C] gate reference: attention output proj last saw
    attention_logits: torch.Tensor | None = None  # [H, N, N] Q.K^T * scale (qk level)
    # attention-value level: softmax kept as unnormalised exp weights with a per-row offset
    exp_weights: torch.Tensor | None = None  # [H, N, N] exp(logits - row_offset)
    row_offset: torch.Tensor | None = None  # [H, N]
    row_sum: torch.Tensor | None = None  # [H, N] sum of exp_weights over keys
    weighted_values: torch.Tensor | None = None  # [H, N, Dh] exp_weights @ values

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class StreamState:
    """All buffers of one stream, plus the bookkeeping that says when it must run densely."""

    layers: list[LayerState]
    level: Level
    num_tokens: int
    frames_since_dense: int = 0
    needs_dense: bool = True  # next step computes every token (new or flushed stream)

    @classmethod
    def create(
        cls, config: ViTConfig, level: Level = "tokenwise", device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> StreamState:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        n, c, h, dh = config.num_tokens, config.embed_dim, config.num_heads, config.head_dim

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, device=device, dtype=dtype)

        layers = []
        for _ in range(config.depth):
            layer = LayerState(
                qkv_reference=zeros(n, c), keys=zeros(h, n, dh), values=zeros(h, n, dh),
                attention_update=zeros(n, c), mlp_reference=zeros(n, c), mlp_update=zeros(n, c),
            )
            if level in ("qk", "full"):
                layer.queries = zeros(h, n, dh)
                layer.proj_reference = zeros(n, c)
            if level == "qk":
                layer.attention_logits = zeros(h, n, n)
            if level == "full":
                layer.exp_weights = zeros(h, n, n)
                layer.row_offset = zeros(h, n)
                layer.row_sum = zeros(h, n)
                layer.weighted_values = zeros(h, n, dh)
            layers.append(layer)
        return cls(layers=layers, level=level, num_tokens=n)

    def flush(self) -> None:
        """Forget the past: the next frame is computed densely and re-seeds every buffer."""
        self.needs_dense = True
        self.frames_since_dense = 0

    def clone(self) -> StreamState:
        """An independent copy of every buffer (a probe of another budget runs on it without touching this one)."""
        layers = [LayerState(**{name: t.clone() for name, t in layer.tensors().items()}) for layer in self.layers]
        return StreamState(layers, self.level, self.num_tokens, self.frames_since_dense, self.needs_dense)

    def to(self, device: torch.device | str) -> StreamState:
        """Move every buffer to `device` (in place); returns self."""
        for layer in self.layers:
            for name, tensor in layer.tensors().items():
                setattr(layer, name, tensor.to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.layers[0].keys.device

    def breakdown(self) -> dict[str, int]:
        """Bytes per buffer kind, summed over layers."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for name, tensor in layer.tensors().items():
                out[name] = out.get(name, 0) + tensor.numel() * tensor.element_size()
        return out

    @property
    def nbytes(self) -> int:
        return sum(self.breakdown().values())
