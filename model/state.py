"""Per-stream eventful state: a slot of a `StatePool`, plus the bookkeeping that says when it must run densely.

The model modules hold weights only; one VisionTransformer serves any number of streams, whose buffers live in the
pool the caller (the engine, through its runner) owns. A `StreamState` is a handle: its slot index, and views of
its rows (`layers`) for inspection.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from model.config import ViTConfig
from model.pool import LEVELS, Level, StatePool

__all__ = ["LEVELS", "LayerState", "Level", "StreamState"]


@dataclass
class LayerState:
    """Views of one block's buffers for one stream. Shapes: N tokens, C channels, H heads, Dh = C / H."""

    qkv_reference: torch.Tensor  # [N, C]
    keys: torch.Tensor  # [H, N, Dh]
    values: torch.Tensor  # [H, N, Dh]
    attention_update: torch.Tensor  # [N, C]
    mlp_reference: torch.Tensor  # [N, C]
    mlp_update: torch.Tensor  # [N, C]
    queries: torch.Tensor | None = None  # [H, N, Dh] (qk and full levels)
    proj_reference: torch.Tensor | None = None  # [N, C]
    attention_logits: torch.Tensor | None = None  # [H, N, N] (qk level)
    exp_weights: torch.Tensor | None = None  # [H, N, N] (full level)
    row_offset: torch.Tensor | None = None  # [H, N]
    row_sum: torch.Tensor | None = None  # [H, N]
    weighted_values: torch.Tensor | None = None  # [H, N, Dh]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, C] -> [H, N, Dh] view."""
    n, c = rows.shape
    return rows.view(n, heads, c // heads).transpose(0, 1)


class StreamState:
    """One stream's slot in a pool. Release it (`release()`) when the stream ends, so another can use the slot."""

    def __init__(self, pool: StatePool, slot: int, frames_since_dense: int = 0, needs_dense: bool = True):
        self.pool, self.slot = pool, slot
        self.frames_since_dense = frames_since_dense
        self.needs_dense = needs_dense  # next step computes every token (new or flushed stream)

    @classmethod
    def create(
        cls, config: ViTConfig, level: Level = "tokenwise", device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> StreamState:
        """A state in a pool of its own (a runner's `new_state()` shares the runner's pool instead)."""
        pool = StatePool(config, level, slots=1, device=device, dtype=dtype)
        return cls(pool, pool.acquire())

    @property
    def level(self) -> str:
        return self.pool.level

    @property
    def num_tokens(self) -> int:
        return self.pool.config.num_tokens

    @property
    def layers(self) -> list[LayerState]:
        """Views of this slot's rows, layer by layer (fresh views: the pool may have grown since)."""
        heads, c = self.pool.config.num_heads, self.pool.config.embed_dim
        out = []
        for layer in self.pool.layers:
            rows = {name: tensor[self.slot] for name, tensor in layer.items()}
            kv = rows.pop("key_values")
            if "queries" in rows:
                rows["queries"] = _heads(rows["queries"], heads)
            out.append(LayerState(keys=_heads(kv[:, :c], heads), values=_heads(kv[:, c:], heads), **rows))
        return out

    def flush(self) -> None:
        """Forget the past: the next frame is computed densely and re-seeds every buffer."""
        self.needs_dense = True
        self.frames_since_dense = 0

    def clone(self) -> StreamState:
        """A copy in another slot of the same pool (a probe of another budget runs on it without touching this)."""
        slot = self.pool.acquire()
        self.pool.copy_slot(self.slot, slot)
        return StreamState(self.pool, slot, self.frames_since_dense, self.needs_dense)

    def release(self) -> None:
        """Give the slot back to the pool; the state must not be stepped again."""
        if self.slot >= 0:
            self.pool.release(self.slot)
            self.slot = -1

    def __del__(self):
        # a handle dropped without release() (a finished bench stream, a dropped probe) frees its slot too
        try:
            self.release()
        except Exception:  # noqa: BLE001 (interpreter shutdown: nothing to give back to)
            pass

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def breakdown(self) -> dict[str, int]:
        """Bytes per buffer kind, summed over layers."""
        return self.pool.slot_breakdown()

    @property
    def nbytes(self) -> int:
        return self.pool.bytes_per_slot
