"""Plain ViT/DeiT weights and the dense forward pass (the reference the eventful step must match)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ViTConfig
from model.kernels import linear, linear_gelu


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens via a strided convolution (bias=False: CLIP's). Refuses an input that does
    not give the model's patch count."""

    def __init__(self, config: ViTConfig, bias: bool = True):
        super().__init__()
        p = config.patch_size
        self.config = config
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=p, stride=p, bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: [B, 3, H, W] -> tokens: [B, N_patch, C]
        patches = self.proj(images).flatten(2).transpose(1, 2)
        if patches.shape[1] != self.config.num_patches:
            raise ValueError(
                f"input {tuple(images.shape[-2:])} gives {patches.shape[1]} patches; the model was built for "
                f"{self.config.image_size} ({self.config.num_patches} patches)"
            )
        return patches


class Attention(nn.Module):
    """Multi-head self-attention weights (fused qkv as in timm)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # qkv: [B, M, 3C] -> q, k, v: [B, H, M, Dh]
        b, m, _ = qkv.shape
        qkv = qkv.view(b, m, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, M, Dh] -> [B, M, C]
        b, h, m, d = x.shape
        return x.transpose(1, 2).reshape(b, m, h * d)


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear_gelu(x, self.fc1), self.fc2)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then + MLP(LN(.))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def attention_branch(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """What the attention adds to the residual stream. x: [B, N, C] -> [B, N, C]."""
        q, k, v = self.attn.split_heads(linear(self.norm1(x), self.attn.qkv))
        return linear(self.attn.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal)), self.attn.proj)

    def mlp_branch(self, y: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream. y: [B, N, C] -> [B, N, C]."""
        return self.mlp(self.norm2(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, C]
        x = x + self.attention_branch(x)
        return x + self.mlp_branch(x)


@torch.no_grad()
def init_random_weights(module: nn.Module, seed: int = 0) -> None:
    """Deterministic truncated-normal init of a module's weights, unit norms, zero biases (for named architectures
    without a checkpoint)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("bias") or "norm" in name:
            p.fill_(1.0 if ("norm" in name and name.endswith("weight")) else 0.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen).clamp_(-2, 2) * 0.02)


class TokenEncoder(nn.Module):
    """What EventfulViT calls of a transformer encoder: embed(images) -> tokens, then each of `blocks` followed by
    after_block, then forward_head(tokens). Subclasses hold the weights and define embed and forward_head."""

    def init_random_weights(self, seed: int = 0) -> None:
        init_random_weights(self, seed)

    def after_block(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """What happens to the residual stream between blocks (nothing here; YOLOS adds mid-position embeddings)."""
        return x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for i, block in enumerate(self.blocks):
            x = self.after_block(block(x), i)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class VisionTransformer(TokenEncoder):
    """ViT/DeiT classifier. Holds weights only; per-stream state lives in model.state."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if not config.class_token:
            raise ValueError("models without a class token are not supported (it is the always-updated token)")
        self.config = config
        c = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c)) if config.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c)) if config.distill_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, c))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.head = nn.Linear(c, config.num_classes) if config.num_classes else nn.Identity()
        self.head_dist = (
            nn.Linear(c, config.num_classes) if config.distill_token and config.num_classes else None
        )
        self.init_random_weights()

    def prefix_tokens(self) -> list[torch.Tensor]:
        """The learned tokens before the patches, each [1, n, C] (class, then distillation when present)."""
        return [t for t in (self.cls_token, self.dist_token) if t is not None]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # images: [B, 3, H, W] -> tokens: [B, N, C] (prefix tokens first)
        patches = self.patch_embed(images)
        b = patches.shape[0]
        prefix = [t.expand(b, -1, -1) for t in self.prefix_tokens()]
        return torch.cat([*prefix, patches], dim=1) + self.pos_embed

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the final prefix tokens. tokens: [B, P or N, C] -> [B, num_classes]."""
        prefix = self.norm(tokens[:, : self.config.num_prefix_tokens])
        logits = self.head(prefix[:, 0])
        if self.head_dist is not None:
            # DeiT distilled inference: average of the class and distillation heads.
            logits = (logits + self.head_dist(prefix[:, 1])) / 2
        return logits
