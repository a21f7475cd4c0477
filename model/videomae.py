"""VideoMAE (Tong et al., NeurIPS 2022) video classifier: weights only, dense and packed (ragged) forward passes.

Tubelets of tubelet_size x patch x patch pixels are embedded by a Conv3d, fixed sinusoidal position embeddings
are added, the ViT blocks run, and the classifier reads the mean of the tokens (fc_norm, then head) as
transformers' VideoMAEForVideoClassification does. `forward_packed` runs several clips with different token
counts as one flat [L, C] sequence (Run-Length Tokenization keeps a different number of tokens per clip):
every token-wise layer runs on the packed tokens, attention is block-diagonal (one segment per clip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VideoConfig
from model.kernels import linear
from model.vit import Block, init_random_weights


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """transformers' get_sinusoid_encoding_table (computed in float64, returned float32): [1, positions, dim]."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angles = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)  # [positions, dim]
    angles[:, 0::2] = torch.sin(angles[:, 0::2])
    angles[:, 1::2] = torch.cos(angles[:, 1::2])
    return angles.float().unsqueeze(0)


class TubeletEmbed(nn.Module):
    """Non-overlapping tubelets -> tokens via a strided Conv3d; token order (tubelet, row, column)."""

    def __init__(self, config: VideoConfig):
        super().__init__()
        t, p = config.tubelet_size, config.patch_size
        self.proj = nn.Conv3d(config.in_chans, config.embed_dim, kernel_size=(t, p, p), stride=(t, p, p))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        # clips: [B, T, 3, H, W] -> tokens: [B, T/t * H/p * W/p, C]
        return self.proj(clips.transpose(1, 2)).flatten(2).transpose(1, 2)


def segment_bounds(lengths: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive segments of these lengths in a packed sequence."""
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    return bounds


def block_diagonal_mask(lengths: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """[L, L] boolean mask, True where query and key belong to the same segment (for SDPA's attn_mask)."""
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return segment[:, None] == segment[None, :]


class VideoMAE(nn.Module):
    """VideoMAE classifier. Holds weights only (the position table is a non-persistent buffer)."""

    def __init__(self, config: VideoConfig):
        super().__init__()
        self.config = config
        c = config.embed_dim
        self.patch_embed = TubeletEmbed(config)
        self.register_buffer("pos_embed", sinusoid_position_table(config.num_patches, c), persistent=False)
        # RLT's run-length embedding: row r - 1 is added to a kept token that stands for r repeated tubelets
        self.length_embed = nn.Parameter(torch.zeros(config.num_tubelets, c)) if config.run_length_embedding else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        if config.use_mean_pooling:
            self.fc_norm, self.norm = nn.LayerNorm(c, eps=config.fc_norm_eps), None
        else:
            self.fc_norm, self.norm = None, nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.head = nn.Linear(c, config.num_classes) if config.num_classes else nn.Identity()
        self.init_random_weights()

    def init_random_weights(self, seed: int = 0) -> None:
        init_random_weights(self, seed)

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        # clips: [B, T, 3, H, W] -> tokens: [B, N, C] (no length embedding: every run has length 1)
        if tuple(clips.shape[1:]) != (self.config.num_frames, self.config.in_chans, *self.config.image_size):
            raise ValueError(
                f"clips of shape {tuple(clips.shape[1:])} do not fit the model "
                f"({self.config.num_frames}, {self.config.in_chans}, {self.config.image_size[0]}, "
                f"{self.config.image_size[1]})"
            )
        return self.patch_embed(clips) + self.pos_embed

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.embed(clips)
        if self.length_embed is not None:
            x = x + self.length_embed[0]
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: [B, C] (mean of the final tokens, or the first token) -> logits [B, classes]."""
        return self.head(self.fc_norm(pooled) if self.fc_norm is not None else self.norm(pooled))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Dense: every tubelet of every clip. clips: [B, T, 3, H, W] normalised frames -> logits [B, classes]."""
        x = self.forward_features(clips)  # [B, N, C]
        return self.forward_head(x.mean(dim=1) if self.fc_norm is not None else x[:, 0])

    def forward_packed(self, tokens: torch.Tensor, lengths: list[int], attention: str = "segments") -> torch.Tensor:
        """Clips of different token counts, packed without padding. tokens: [L, C] (clip after clip, embedded),
        lengths: tokens per clip (sum L) -> logits [B, classes].

        attention="segments": scaled_dot_product_attention per clip on slices of the packed q/k/v;
        attention="mask": one call over all L tokens with a block-diagonal boolean mask.
        """
        if sum(lengths) != tokens.shape[0] or min(lengths, default=1) < 1:
            raise ValueError(f"segment lengths {lengths} do not cover {tokens.shape[0]} packed tokens")
        bounds = segment_bounds(lengths)
        mask = block_diagonal_mask(lengths, tokens.device) if attention == "mask" else None
        if attention not in ("segments", "mask"):
            raise ValueError(f"attention must be 'segments' or 'mask', got {attention!r}")
        x = tokens
        for block in self.blocks:
            x = _packed_block(block, x, bounds, mask)
        if self.fc_norm is not None:
            segment = torch.repeat_interleave(
                torch.arange(len(lengths), device=x.device), torch.tensor(lengths, device=x.device)
            )  # [L]
            sums = x.new_zeros(len(lengths), x.shape[1]).index_add_(0, segment, x)  # [B, C]
            pooled = sums / x.new_tensor(lengths)[:, None]
        else:
            pooled = x[[start for start, _ in bounds]]
        return self.forward_head(pooled)


def _packed_block(
    block: Block, x: torch.Tensor, bounds: list[tuple[int, int]], mask: torch.Tensor | None
) -> torch.Tensor:
    # x: [L, C] packed tokens of every clip
    attn = block.attn
    q, k, v = attn.split_heads(linear(block.norm1(x), attn.qkv).unsqueeze(0))  # each [1, H, L, Dh]
    if mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [1, H, L, Dh]
    else:
        out = torch.cat(
            [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in bounds], dim=2
        )
    x = x + linear(attn.merge_heads(out)[0], attn.proj)
    return x + block.mlp(block.norm2(x))


__all__ = ["TubeletEmbed", "VideoMAE", "block_diagonal_mask", "segment_bounds", "sinusoid_position_table"]
