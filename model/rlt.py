"""Run-Length Tokenization (Choudhury et al., NeurIPS 2024) for VideoMAE clips.

Each tubelet is compared with the tubelet at the same grid position one step earlier in time: the mean absolute
difference of their normalised pixels (both frames of the tubelet, all channels). A tubelet whose difference
is below tau repeats its predecessor and is dropped before the transformer; the first tubelet of a clip is
always kept, and tau = 0 keeps everything (the plain model). A kept token stands for itself and the run of
dropped tubelets right after it at its position; with a learned run-length embedding (only when the weights
have one) row (run length - 1) is added to it. Clips keep different numbers of tokens; they are packed one
after another into one [L, C] sequence (no padding) and run by `VideoMAE.forward_packed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import VideoConfig
from model.videomae import VideoMAE

DEFAULT_TAU = 0.1


def tubelet_changes(clips: torch.Tensor, config: VideoConfig) -> torch.Tensor:
    """Mean |difference| of each tubelet against the previous tubelet at the same position.

    clips: [B, T, 3, H, W] normalised frames -> [B, T/t - 1, gh * gw] (for tubelets 1 .. T/t - 1).
    """
    b, t, c, h, w = clips.shape
    ts, p = config.tubelet_size, config.patch_size
    gh, gw = h // p, w // p
    x = clips.reshape(b, t // ts, ts, c, gh, p, gw, p)
    diff = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(2, 3, 5, 7))  # [B, T/t - 1, gh, gw]
    return diff.flatten(2)


@dataclass
class RunLengthTokens:
    """Which tubelets a clip keeps and the run each kept one stands for."""

    keep: torch.Tensor  # [B, N] bool, in token order (tubelet, row, column)
    run_lengths: torch.Tensor  # [B, N] long: 1 + dropped repeats right after a kept token; 0 where dropped

    @property
    def lengths(self) -> list[int]:
        """Kept tokens per clip."""
        return self.keep.sum(dim=1).tolist()

    @property
    def kept_fraction(self) -> list[float]:
        n = self.keep.shape[1]
        return [k / n for k in self.lengths]


def run_length_tokenize(clips: torch.Tensor, config: VideoConfig, tau: float = DEFAULT_TAU) -> RunLengthTokens:
    """Keep masks and run lengths for a batch of clips. clips: [B, T, 3, H, W]; tau >= 0."""
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    b = clips.shape[0]
    cells = config.tokens_per_tubelet
    keep = torch.ones(b, config.num_tubelets, cells, dtype=torch.bool, device=clips.device)
    if tau > 0:
        keep[:, 1:] = tubelet_changes(clips, config) >= tau
    runs = torch.zeros(b, config.num_tubelets, cells, dtype=torch.long, device=clips.device)
    streak = torch.zeros(b, cells, dtype=torch.long, device=clips.device)  # dropped tubelets after t
    for t in reversed(range(config.num_tubelets)):
        runs[:, t] = torch.where(keep[:, t], streak + 1, 0)
        streak = torch.where(keep[:, t], 0, streak + 1)
    return RunLengthTokens(keep.flatten(1), runs.flatten(1))


def pack_tokens(model: VideoMAE, clips: torch.Tensor, rlt: RunLengthTokens) -> torch.Tensor:
    """Embedded kept tokens of every clip, clip after clip: [L, C] (L = sum of kept tokens)."""
    x = model.embed(clips)  # [B, N, C]
    if model.length_embed is not None:
        index = (rlt.run_lengths - 1).clamp(0, model.length_embed.shape[0] - 1)
        x = x + model.length_embed[index]
    return x[rlt.keep]


@dataclass
class ClipOutput:
    logits: torch.Tensor  # [B, classes]
    tokens_kept: list[int]  # per clip
    num_tokens: int  # tokens of one clip without RLT
    macs: list[int]  # per clip

    @property
    def kept_fraction(self) -> list[float]:
        return [k / self.num_tokens for k in self.tokens_kept]


def clip_macs(config: VideoConfig, tokens: int) -> int:
    """MACs of one clip with `tokens` kept tokens: tubelet embedding (every tubelet), blocks, head."""
    c, m = config.embed_dim, config.mlp_dim
    embed = config.num_patches * config.in_chans * config.tubelet_size * config.patch_size**2 * c
    block = 4 * tokens * c * c + 2 * tokens * tokens * c + 2 * tokens * c * m
    return embed + config.depth * block + c * config.num_classes


@torch.inference_mode()
def classify_clips(
    model: VideoMAE, clips: torch.Tensor, tau: float = DEFAULT_TAU, attention: str = "segments"
) -> ClipOutput:
    """RLT, then one packed forward pass over every clip's kept tokens. clips: [B, T, 3, H, W]."""
    rlt = run_length_tokenize(clips, model.config, tau)
    lengths = rlt.lengths
    logits = model.forward_packed(pack_tokens(model, clips, rlt), lengths, attention=attention)
    n = model.config.num_patches
    return ClipOutput(logits, lengths, n, [clip_macs(model.config, k) for k in lengths])


__all__ = [
    "DEFAULT_TAU", "ClipOutput", "RunLengthTokens", "classify_clips", "clip_macs", "pack_tokens",
    "run_length_tokenize", "tubelet_changes",
]
