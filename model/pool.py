"""The state pool: every stream's eventful buffers, one [slots + 1, ...] tensor per layer and buffer kind.

Like a paged KV cache: the tensors are allocated once, a stream owns a slot index, and a step gathers and
scatters through the slot indices of its streams (the batch is never re-stacked or reordered, so addresses stay
fixed and a step can be captured). The last slot is scratch: the padding rows of a batch bucket read and write it.
The pool grows (doubling, copying every slot) only when asked for more slots than it has; `generation` counts the
growths, so captured steps know when their addresses moved.
"""

from __future__ import annotations

from typing import Literal

import torch

from model.config import ViTConfig, ViTDetConfig

Level = Literal["tokenwise", "qk", "full"]
LEVELS: tuple[str, ...] = ("tokenwise", "qk", "full")


def buffer_shapes(config: ViTConfig, level: str) -> dict[str, tuple[int, ...]]:
    """Per-slot shape of each buffer of one layer. N tokens, C channels, H heads, Dh = C / H.

    Keys and values live together as one [N, 2C] row per token (keys, then values, heads in order), so the
    tokens a gate selects are written with one row index for every buffer; `LayerState` gives [H, N, Dh] views.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    n, c, h, dh = config.num_tokens, config.embed_dim, config.num_heads, config.head_dim
    shapes = {
        "qkv_reference": (n, c),  # gate reference: the block input the qkv projection last saw
        "key_values": (n, 2 * c),  # keys then values of every token
        "attention_update": (n, c),  # attention branch output (after proj) per token
        "mlp_reference": (n, c),  # gate reference: the MLP input last seen
        "mlp_update": (n, c),  # MLP branch output per token
    }
    if level in ("qk", "full"):
        shapes["queries"] = (n, c)  # columns of Q.K^T need every query
        shapes["proj_reference"] = (n, c)  # gate reference: the attention output proj last saw
    if level == "qk":
        shapes["attention_logits"] = (h, n, n)  # Q.K^T * scale
    if level == "full":
        shapes["exp_weights"] = (h, n, n)  # exp(logits - row_offset)
        shapes["row_offset"] = (h, n)
        shapes["row_sum"] = (h, n)  # sum of exp_weights over keys
        shapes["weighted_values"] = (h, n, dh)  # exp_weights @ values
    return shapes


def layer_buffer_shapes(config: ViTConfig, level: str) -> list[dict[str, tuple[int, ...]]]:
    """Per layer, the per-slot shape of each buffer: `buffer_shapes`, except that a windowed block of a ViTDet keeps
    its keys and values in window-major order over the grid padded to whole windows ([N_pad, 2C]: the keys of every
    window are a view of the slot's rows, the padding rows the keys and values of a zero token)."""
    shapes = buffer_shapes(config, level)
    if not isinstance(config, ViTDetConfig):
        return [shapes] * config.depth
    windowed = {**shapes, "key_values": (config.padded_tokens, 2 * config.embed_dim)}
    return [windowed if config.is_windowed(i) else shapes for i in range(config.depth)]


class StatePool:
    """Slot-addressed buffers for up to `slots` streams of one model and level, plus one scratch slot."""

    def __init__(
        self, config: ViTConfig, level: str = "tokenwise", slots: int = 1, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if slots < 1:
            raise ValueError(f"a state pool needs at least one slot, got {slots}")
        self.config, self.level = config, level
        self.device, self.dtype = torch.device(device), dtype
        self.shapes = buffer_shapes(config, level)
        self.layer_shapes = layer_buffer_shapes(config, level)
        self.generation = 0
        self.layers: list[dict[str, torch.Tensor]] = self._allocate(slots)  # per layer: name -> [slots + 1, ...]
        self._free = list(range(slots))  # lowest first
        self._used: set[int] = set()

    def _allocate(self, slots: int) -> list[dict[str, torch.Tensor]]:
        return [
            {name: torch.zeros((slots + 1, *shape), device=self.device, dtype=self.dtype)
             for name, shape in shapes.items()}
            for shapes in self.layer_shapes
        ]

    @property
    def capacity(self) -> int:
        """Slots streams can own (the scratch slot excluded)."""
        return self.layers[0]["qkv_reference"].shape[0] - 1

    @property
    def scratch(self) -> int:
        """The slot padding rows read and write."""
        return self.capacity

    @property
    def in_use(self) -> int:
        return len(self._used)

    def acquire(self) -> int:
        """A free slot (the lowest); the pool doubles when none is left."""
        if not self._free:
            self.grow(2 * self.capacity)
        slot = self._free.pop(0)
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not in use")
        self._used.remove(slot)
        self._free.append(slot)
        self._free.sort()

    def grow(self, slots: int) -> None:
        """Room for `slots` streams: new tensors, every slot copied (the scratch slot is not)."""
        old, old_capacity = self.layers, self.capacity
        if slots <= old_capacity:
            return
        self.layers = self._allocate(slots)
        for new_layer, old_layer in zip(self.layers, old, strict=True):
            for name, tensor in old_layer.items():
                new_layer[name][:old_capacity].copy_(tensor[:old_capacity])
        self._free.extend(range(old_capacity, slots))
        self.generation += 1

    def copy_slot(self, source: int, target: int) -> None:
        for layer in self.layers:
            for tensor in layer.values():
                tensor[target].copy_(tensor[source])

    def slot_breakdown(self) -> dict[str, int]:
        """Bytes of one slot per buffer kind, summed over layers."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return {name: size * sum(_numel(shapes[name]) for shapes in self.layer_shapes) for name in self.shapes}

    @property
    def bytes_per_slot(self) -> int:
        return sum(self.slot_breakdown().values())

    @property
    def nbytes(self) -> int:
        """Every slot's bytes, the scratch slot included: what the pool holds on its device."""
        return self.bytes_per_slot * (self.capacity + 1)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
