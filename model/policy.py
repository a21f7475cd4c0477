"""Token selection policies: which tokens a gate updates, per stream, for a batch of streams."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StreamBudget:
    """One stream's budget for one frame.

    tokens: top-r policy, at most r patch tokens per gate (prefix tokens are always updated on top).
    threshold: threshold policy, update patch tokens whose RMS change is >= threshold (0 updates all).
    Both set: threshold, capped at `tokens`. Neither set: every token (dense).
    """

    tokens: int | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 0):
            raise ValueError(f"budget tokens must be a non-negative integer, got {self.tokens!r}")
        if self.threshold is not None and not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ValueError(f"budget threshold must be a finite number >= 0, got {self.threshold!r}")

    @classmethod
    def dense(cls) -> StreamBudget:
        return cls()

    def is_dense_for(self, num_patches: int) -> bool:
        """True when this budget selects every token whatever the change (so the step may run densely)."""
        tokens_all = self.tokens is None or self.tokens >= num_patches
        threshold_all = self.threshold is None or self.threshold == 0
        return tokens_all and threshold_all


@dataclass
class Selection:
    """Tokens chosen by one gate for a batch of B streams (prefix tokens always included).

    Flat form (for token-wise ops): batch_idx, token_idx, slot_idx: [T], grouped by stream.
    Padded form (for per-stream attention): padded [B, R] token indices, valid [B, R]; padding repeats
    the stream's first selected token, so gathers and plain writes through it are harmless.
    """

    batch_idx: torch.Tensor
    token_idx: torch.Tensor
    slot_idx: torch.Tensor
    padded: torch.Tensor
    valid: torch.Tensor
    counts: list[int]  # selected tokens per stream (incl. prefix tokens)
    everything: bool  # every token of every stream selected
    _flat: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def uniform(self) -> bool:
        """Every stream has R selected tokens: the flat form is the padded form flattened (reshapes, no copies)."""
        return self.padded.shape[1] * self.padded.shape[0] == self.batch_idx.numel()

    def flat_index(self, n: int, heads: int | None = None) -> torch.Tensor:
        """Row indices into a [B * N, ...] view ([T]), or into a [B * heads * N, ...] view ([T, heads])."""
        key = (n,) if heads is None else (n, heads)
        if key not in self._flat:
            if heads is None:
                self._flat[key] = self.batch_idx * n + self.token_idx
            else:
                h = torch.arange(heads, device=self.batch_idx.device)
                self._flat[key] = (self.batch_idx[:, None] * heads + h) * n + self.token_idx[:, None]
        return self._flat[key]

    @property
    def total(self) -> int:
        return int(self.batch_idx.numel())

    @property
    def single(self) -> bool:
        """One stream: flat and padded forms coincide (T == R), so conversions are views."""
        return self.padded.shape[0] == 1

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Selected rows of a [B, N, ...] tensor -> [T, ...]."""
        if self.single:
            return tokens[0].index_select(0, self.token_idx)
        if tokens.is_contiguous():
            return tokens.flatten(0, 1).index_select(0, self.flat_index(tokens.shape[1]))
        return tokens[self.batch_idx, self.token_idx]

    def scatter(self, tokens: torch.Tensor, values: torch.Tensor) -> None:
        """Write [T, ...] values into the selected rows of a [B, N, ...] tensor, in place."""
        if self.single:
            tokens[0].index_copy_(0, self.token_idx, values)
        elif tokens.is_contiguous():
            tokens.flatten(0, 1).index_copy_(0, self.flat_index(tokens.shape[1]), values)
        else:
            tokens[self.batch_idx, self.token_idx] = values

    def scatter_heads(self, buffer: torch.Tensor, values: torch.Tensor) -> None:
        """Write [T, H, Dh] per-token heads into a contiguous [B, H, N, Dh] buffer, in place."""
        b, heads, n, dh = buffer.shape
        if self.single:
            buffer[0].index_copy_(1, self.token_idx, values.transpose(0, 1))
        else:
            index = self.flat_index(n, heads).flatten()  # [T * H]
            buffer.view(b * heads * n, dh).index_copy_(0, index, values.reshape(-1, dh))

    def to_padded(self, flat: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, R, ...] (padding rows are zero)."""
        if self.single:
            return flat.unsqueeze(0)
        b, r = self.padded.shape
        if self.uniform:
            return flat.view(b, r, *flat.shape[1:])
        out = flat.new_zeros((b, r, *flat.shape[1:]))
        out[self.batch_idx, self.slot_idx] = flat
        return out

    def from_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, R, ...] -> [T, ...]."""
        if self.single:
            return padded[0]
        if self.uniform:
            return padded.reshape(-1, *padded.shape[2:])
        return padded[self.batch_idx, self.slot_idx]


def select_tokens(change: torch.Tensor, budgets: list[StreamBudget], num_prefix: int) -> Selection:
    """Choose tokens from per-token change scores.

    change: [B, N] change score per token (prefix tokens first, never dropped).
    """
    b, n = change.shape
    device = change.device
    num_patches = n - num_prefix
    if all(budget.is_dense_for(num_patches) for budget in budgets):
        keep = torch.ones(b, n, dtype=torch.bool, device=device)
        return _selection_from_mask(keep, everything=True)

    patch_change = change[:, num_prefix:].float()  # [B, Np]
    if all(bud.threshold is None for bud in budgets) and len({bud.tokens for bud in budgets}) == 1:
        return _uniform_top_r(patch_change, budgets[0].tokens, num_prefix)
    ranked, order = patch_change.sort(dim=1, descending=True, stable=True)
    caps = torch.tensor(
        [num_patches if bud.tokens is None else min(bud.tokens, num_patches) for bud in budgets], device=device
    )
    thresholds = torch.tensor(
        [-math.inf if bud.threshold is None else bud.threshold for bud in budgets], device=device
    )
    rank = torch.arange(num_patches, device=device)
    keep_ranked = (rank[None, :] < caps[:, None]) & (ranked >= thresholds[:, None])  # [B, Np]
    keep_patches = torch.zeros_like(keep_ranked).scatter_(1, order, keep_ranked)
    keep = torch.cat([torch.ones(b, num_prefix, dtype=torch.bool, device=device), keep_patches], dim=1)
    return _selection_from_mask(keep, everything=bool(keep.all()))


def _uniform_top_r(patch_change: torch.Tensor, r: int, num_prefix: int) -> Selection:
    """Fast path: every stream keeps its top r patch tokens (no masks, no data-dependent shapes)."""
    b, num_patches = patch_change.shape
    device = patch_change.device
    r = min(r, num_patches)
    width = num_prefix + r
    batch_idx, slot_idx, valid, prefix = _uniform_scaffold(b, width, num_prefix, device)
    top = _unique_keys(patch_change).topk(r, dim=1, sorted=False).indices  # [B, r]
    padded = torch.cat([prefix, top + num_prefix], dim=1)  # [B, R]: prefix tokens, then the top r
    return Selection(batch_idx, padded.flatten(), slot_idx, padded, valid, [width] * b, everything=False)


def _unique_keys(patch_change: torch.Tensor) -> torch.Tensor:
    """Scores [B, Np] (>= 0) -> int64 keys in the same order with ties broken towards the lower token index.

    topk's choice among equal scores is unspecified (and depends on the batch around a row); these keys make
    the top-r set the same as the stable sort of the general path, so a stream gets the same tokens alone or
    in any batch. Non-negative float32 bit patterns order like the floats."""
    num_patches = patch_change.shape[1]
    bits = patch_change.contiguous().view(torch.int32).to(torch.int64)  # [B, Np]
    index = torch.arange(num_patches, device=patch_change.device)
    return bits * num_patches + (num_patches - 1 - index)


@functools.lru_cache(maxsize=256)
def _uniform_scaffold(b: int, width: int, num_prefix: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index tensors shared by every uniform top-r selection of this shape (never written to)."""
    batch_idx = torch.arange(b, device=device).repeat_interleave(width)
    slot_idx = torch.arange(width, device=device).repeat(b)
    valid = torch.ones(b, width, dtype=torch.bool, device=device)
    prefix = torch.arange(num_prefix, device=device).expand(b, -1)
    return batch_idx, slot_idx, valid, prefix


def _selection_from_mask(keep: torch.Tensor, everything: bool) -> Selection:
    # keep: [B, N] bool
    b, n = keep.shape
    device = keep.device
    batch_idx, token_idx = keep.nonzero(as_tuple=True)  # row-major: grouped by stream, tokens ascending
    counts_t = keep.sum(dim=1)
    counts = counts_t.tolist()
    if min(counts) == 0:
        raise ValueError("a stream selected no token; models need at least one always-updated prefix token")
    r = max(counts)
    offsets = torch.cumsum(counts_t, 0) - counts_t
    slot_idx = torch.arange(batch_idx.numel(), device=device) - offsets[batch_idx]
    first = token_idx[offsets]  # [B] first selected token of each stream
    padded = first[:, None].expand(b, r).clone()
    padded[batch_idx, slot_idx] = token_idx
    valid = torch.zeros(b, r, dtype=torch.bool, device=device)
    valid[batch_idx, slot_idx] = True
    return Selection(batch_idx, token_idx, slot_idx, padded, valid, counts, everything)
