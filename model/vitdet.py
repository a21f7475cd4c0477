"""ViTDet (Li et al., ECCV 2022): a plain ViT backbone with windowed attention, dense and eventful.

Weights only in the modules, as model/vit.py: patch embedding, absolute position embeddings (at the model's grid;
the loader resamples a checkpoint's), blocks with windowed or global attention and decomposed relative position
terms, MLP; no class token, no final norm, no head: the output is the feature map [B, C, H/p, W/p], as
transformers' VitDetModel returns it.

A windowed block pads the grid to whole windows and attends within each window; the padding tokens are zeros after
norm1 (as transformers), so their keys and values are the qkv bias. Keys and values of a windowed block are kept in
window-major order over the padded grid ([n_windows * window_tokens, 2C] per stream), so the keys of every window
are a view of the stream's rows.

`EventfulViTDet` is EventfulViT's step at the token-wise level with these blocks: the same gates, pool, shapes and
no host sync. A selected query of a global block attends over all N keys (as the ViT); the queries of a windowed
block are scattered into the padded window-major layout and attention runs over every window (rows of unselected
tokens are computed and dropped): gathering each query's window of keys instead would move W * window_tokens * 2C
elements per block (236 MB per stream and block for ViTDet-B at 448 with r = 196), more than the whole windowed
attention costs (about 4 % of a dense block's MACs at window 14).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ViTDetConfig
from model.eventful import EventfulConfig, EventfulViT, _Context, _Gate, _heads, _merge, _rows, _write_rows
from model.kernels import linear
from model.macs import embed_macs, gate_macs
from model.vit import Mlp, PatchEmbed, TokenEncoder

# --------------------------------------------------------------------------- layout helpers


def window_rows(config: ViTDetConfig, device: torch.device | None = None) -> torch.Tensor:
    """[N] the row of each raster-order token in the window-major layout of the grid padded to whole windows."""
    (gh, gw), ws, (_, nw) = config.grid_size, config.window_size, config.window_grid
    y, x = torch.arange(gh, device=device)[:, None], torch.arange(gw, device=device)[None, :]
    window = (y // ws) * nw + x // ws
    return (window * ws * ws + (y % ws) * ws + x % ws).flatten()


def relative_table(rel_pos: torch.Tensor, query_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Decomposed relative position embeddings for queries at query_pos [...] along one axis of `size` keys:
    rel_pos [2 * size - 1, Dh] -> [..., size, Dh] (rel_pos[q - k + size - 1], transformers' get_rel_pos)."""
    keys = torch.arange(size, device=query_pos.device)
    return rel_pos[query_pos[..., None] - keys + (size - 1)]


def relative_bias(q: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor) -> torch.Tensor:
    """Additive attention terms q . R_h[qy - ky] + q . R_w[qx - kx] over a key grid (kh, kw).

    q: [B, H, M, Dh] (unscaled queries); table_h: [M, kh, Dh] or [B, M, kh, Dh]; table_w likewise -> [B, H, M, kh*kw].
    """
    spec = "bhmd,mkd->bhmk" if table_h.dim() == 3 else "bhmd,bmkd->bhmk"
    rel_h = torch.einsum(spec, q, table_h)  # [B, H, M, kh]
    rel_w = torch.einsum(spec, q, table_w)  # [B, H, M, kw]
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)


# --------------------------------------------------------------------------- the dense backbone


class WindowAttention(nn.Module):
    """Fused qkv, projection and relative position embeddings of one block; windowed when window_size > 0."""

    def __init__(self, config: ViTDetConfig, windowed: bool):
        super().__init__()
        c, dh = config.embed_dim, config.head_dim
        self.config, self.windowed = config, windowed
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(c, 3 * c, bias=config.qkv_bias)
        self.proj = nn.Linear(c, c)
        if config.use_relative_position_embeddings:
            sh, sw = (config.window_size,) * 2 if windowed else config.grid_size
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * sh - 1, dh))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * sw - 1, dh))
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def to_windows(self, qkv: torch.Tensor) -> torch.Tensor:
        """[B, N, 3C] raster -> [B, N_pad, 3C] window-major; padding rows hold qkv of a zero token (the bias)."""
        b, _, d = qkv.shape
        fill = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(d)
        padded = fill.to(qkv.dtype).expand(b, self.config.padded_tokens, d).clone()
        return padded.index_copy_(1, window_rows(self.config, qkv.device), qkv)

    def window_attention(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Attention within every window. q: [B, N_pad, C], kv: [B, N_pad, 2C] window-major -> [B, N_pad, C]."""
        b, n_pad, c = q.shape
        ws, t, h = self.config.window_size, self.config.window_tokens, self.num_heads
        windows = b * (n_pad // t)
        qh = _heads(q.reshape(windows, t, c), h)  # [B * n_windows, H, T, Dh]
        k, v = _heads(kv[..., :c].reshape(windows, t, c), h), _heads(kv[..., c:].reshape(windows, t, c), h)
        bias = None
        if self.rel_pos_h is not None:
            local = torch.arange(t, device=q.device)
            bias = relative_bias(qh, relative_table(self.rel_pos_h, local // ws, ws),
                                 relative_table(self.rel_pos_w, local % ws, ws))  # [B * n_windows, H, T, T]
        return _merge(F.scaled_dot_product_attention(qh, k, v, attn_mask=bias)).reshape(b, n_pad, c)

    def global_attention(self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Queries at raster positions [B, M] (None: every token) over all N keys. q: [B, M, C], kv: [B, N, 2C]."""
        c, h = q.shape[-1], self.num_heads
        qh = _heads(q, h)  # [B, H, M, Dh]
        bias = None
        if self.rel_pos_h is not None:
            gh, gw = self.config.grid_size
            if positions is None:
                positions = torch.arange(q.shape[1], device=q.device)
            bias = relative_bias(qh, relative_table(self.rel_pos_h, positions // gw, gh),
                                 relative_table(self.rel_pos_w, positions % gw, gw))  # [B, H, M, N]
        return _merge(F.scaled_dot_product_attention(qh, _heads(kv[..., :c], h), _heads(kv[..., c:], h),
                                                     attn_mask=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, C] normed tokens -> attention output before proj [B, N, C]
        c = x.shape[-1]
        qkv = linear(x, self.qkv)  # [B, N, 3C]
        if not self.windowed:
            return self.global_attention(qkv[..., :c], qkv[..., c:], None)
        windows = self.to_windows(qkv)
        out = self.window_attention(windows[..., :c], windows[..., c:])  # [B, N_pad, C]
        return out.index_select(1, window_rows(self.config, x.device))


class ViTDetBlock(nn.Module):
    """Pre-norm block: x + proj(attention(LN(x))), then + MLP(LN(.)); attention windowed or global."""

    def __init__(self, config: ViTDetConfig, index: int):
        super().__init__()
        self.windowed = config.is_windowed(index)
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = WindowAttention(config, self.windowed)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, C]
        x = x + linear(self.attn(self.norm1(x)), self.attn.proj)
        return x + self.mlp(self.norm2(x))


class ViTDetBackbone(TokenEncoder):
    """ViTDet backbone weights. forward(images [B, 3, H, W]) -> feature map [B, C, H/p, W/p]."""

    def __init__(self, config: ViTDetConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = (nn.Parameter(torch.zeros(1, config.num_patches, config.embed_dim))
                          if config.use_absolute_position_embeddings else None)
        self.blocks = nn.ModuleList(ViTDetBlock(config, i) for i in range(config.depth))
        self.init_random_weights()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # images: [B, 3, H, W] -> tokens: [B, N, C] (raster order, no prefix tokens)
        patches = self.patch_embed(images)  # [B, N, C]
        return patches if self.pos_embed is None else patches + self.pos_embed

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The feature map: tokens [B, N, C] -> [B, C, H/p, W/p] (no norm, as transformers' VitDetModel)."""
        b, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.config.grid_size)


# --------------------------------------------------------------------------- MACs


def attention_macs(config: ViTDetConfig, windowed: bool, queries: int) -> int:
    """Q.K^T, A.V and the relative position terms of one block: a windowed block runs every window of the padded grid
    (whatever `queries`), a global one `queries` rows over all N keys."""
    n, c = config.num_tokens, config.embed_dim
    rel = config.use_relative_position_embeddings
    if windowed:
        return config.padded_tokens * c * (2 * config.window_tokens + (2 * config.window_size if rel else 0))
    return queries * c * (2 * n + (sum(config.grid_size) if rel else 0))


def vitdet_block_macs(config: ViTDetConfig, index: int, counts: list[int] | None = None) -> int:
    """One block's MACs: dense (counts None) or token-wise eventful with [n_qkv, n_proj, n_mlp] through its gates."""
    n, c, m = config.num_tokens, config.embed_dim, config.mlp_dim
    n_qkv, n_proj, n_mlp = counts or (n, n, n)
    macs = 3 * n_qkv * c * c + n_proj * c * c + 2 * n_mlp * c * m + attention_macs(config, config.is_windowed(index),
                                                                                    n_qkv)
    return macs if counts is None else macs + 2 * gate_macs(config)


def vitdet_dense_macs(config: ViTDetConfig) -> int:
    """MACs of one dense frame: patch embedding and blocks (no head)."""
    return embed_macs(config) + sum(vitdet_block_macs(config, i) for i in range(config.depth))


# --------------------------------------------------------------------------- the eventful step


class EventfulViTDet(EventfulViT):
    """EventfulViT's step over a ViTDetBackbone, token-wise level only. `StepOutput.logits` is the feature map
    [B, C, H/p, W/p] (the backbone's output); every token is a patch (no prefix token passes the gates)."""

    def __init__(self, model: ViTDetBackbone, config: EventfulConfig | None = None, slots: int = 1):
        config = config or EventfulConfig()
        if config.level != "tokenwise":
            raise ValueError(f"EventfulViTDet runs the token-wise level only, not {config.level!r}")
        super().__init__(model, config, slots)
        self._dense_frame_macs = vitdet_dense_macs(self.vit)
        self._fixed_macs = embed_macs(self.vit)
        self._window_rows = window_rows(self.vit, self._tiebreak.device)  # [N] raster -> window-major row

    def _frame_macs(self, counts: list[list[int]]) -> int:
        return self._fixed_macs + sum(
            vitdet_block_macs(self.vit, i, None if c == [self.vit.num_tokens] * 3 else c) for i, c in enumerate(counts)
        )

    def _seed_block(self, block: ViTDetBlock, x: torch.Tensor, layer: dict[str, torch.Tensor], slots):
        """The dense block, writing every buffer of the rows' slots. x: [B, N, C]."""
        normed, c, attn = self.config.gate_position == "normed", self.vit.embed_dim, block.attn
        h = block.norm1(x)
        _write_rows(layer["qkv_reference"], slots, h if normed else x)
        qkv = linear(h, attn.qkv)  # [B, N, 3C]
        if block.windowed:
            windows = attn.to_windows(qkv)  # [B, N_pad, 3C]
            _write_rows(layer["key_values"], slots, windows[..., c:])
            out = attn.window_attention(windows[..., :c], windows[..., c:]).index_select(1, self._window_rows)
        else:
            _write_rows(layer["key_values"], slots, qkv[..., c:])
            out = attn.global_attention(qkv[..., :c], qkv[..., c:], None)
        return self._seed_block_rest(block, x, out, layer, slots)

    def _sparse_block(self, block: ViTDetBlock, x: torch.Tensor, layer: dict[str, torch.Tensor], ctx: _Context,
                      valids: list[torch.Tensor]) -> torch.Tensor:
        # x: [B, N, C] current residual stream
        c, attn = self.vit.embed_dim, block.attn
        gate, h = self._gated_input(block.norm1, x, layer["qkv_reference"], ctx, valids)
        qkv = linear(h, attn.qkv)  # [B, W, 3C]
        if block.windowed:
            out = self._windowed_attention(attn, qkv, gate, layer["key_values"], ctx)
        else:
            gate.write(layer["key_values"], qkv.view(-1, 3 * c)[:, c:])
            out = attn.global_attention(qkv[..., :c], _rows(layer["key_values"], ctx.slots), gate.index)
        gate.write(layer["attention_update"], linear(out, attn.proj))
        return self._mlp_branch(block, x + _rows(layer["attention_update"], ctx.slots), layer, ctx, valids)

    def _windowed_attention(self, attn: WindowAttention, qkv: torch.Tensor, gate: _Gate, key_values: torch.Tensor,
                            ctx: _Context) -> torch.Tensor:
        """The selected tokens' keys and values into the slots' window-major rows, their queries scattered into the
        padded layout, attention over every window, the selected rows taken. qkv: [B, W, 3C] -> [B, W, C]."""
        b, w, _ = qkv.shape
        c, n, n_pad = self.vit.embed_dim, self.vit.num_tokens, self.vit.padded_tokens
        rows = self._window_rows[gate.index]  # [B, W] window-major row of each rank
        slot_rows = ctx.slot_rows // n * n_pad  # [B, 1] first row of each slot in a [(slots + 1) * N_pad] view
        scratch_row = (key_values.shape[0] - 1) * n_pad
        pool_rows = (rows + slot_rows if gate.valid is None else torch.where(gate.valid, rows + slot_rows, scratch_row)
                     ).flatten()
        key_values.view(-1, 2 * c).index_copy_(0, pool_rows, qkv.view(-1, 3 * c)[:, c:])
        batch_rows = (rows + torch.arange(b, device=rows.device)[:, None] * n_pad).flatten()  # [B * W], distinct
        queries = qkv.new_zeros(b * n_pad, c).index_copy_(0, batch_rows, qkv.view(-1, 3 * c)[:, :c])
        out = attn.window_attention(queries.view(b, n_pad, c), _rows(key_values, ctx.slots))  # [B, N_pad, C]
        return out.view(-1, c).index_select(0, batch_rows).view(b, w, c)


__all__ = [
    "EventfulViTDet", "ViTDetBackbone", "ViTDetBlock", "WindowAttention", "attention_macs", "relative_bias",
    "relative_table", "vitdet_block_macs", "vitdet_dense_macs", "window_rows",
]
