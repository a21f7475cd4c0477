"""Multiply-accumulate counts, dense and eventful, computed from shapes and selection sizes."""

from __future__ import annotations

from model.config import DetectorConfig, ViTConfig


def embed_macs(config: ViTConfig) -> int:
    return config.num_patches * config.in_chans * config.patch_size**2 * config.embed_dim


def head_macs(config: ViTConfig) -> int:
    c = config.embed_dim
    if isinstance(config, DetectorConfig):  # class and box MLPs (3 layers each) on every detection token
        return config.num_detection_tokens * (4 * c * c + c * (config.num_classes + 1) + c * 4)
    return config.num_prefix_tokens * c * config.num_classes


def dense_block_macs(config: ViTConfig) -> int:
    n, c, m = config.num_tokens, config.embed_dim, config.mlp_dim
    return 3 * n * c * c + 2 * n * n * c + n * c * c + 2 * n * c * m


def dense_macs(config: ViTConfig) -> int:
    """MACs of one dense frame: patch embedding, blocks (linears + Q.K^T + A.V), head."""
    return embed_macs(config) + config.depth * dense_block_macs(config) + head_macs(config)


def gate_macs(config: ViTConfig) -> int:
    """Change-norm cost of one gate (one multiply-add per element of [N, C])."""
    return config.num_tokens * config.embed_dim


def eventful_block_macs(config: ViTConfig, level: str, n_qkv: int, n_proj: int, n_mlp: int) -> int:
    """MACs of one eventful block given how many tokens each gate let through (incl. gate overhead)."""
    n, c, m = config.num_tokens, config.embed_dim, config.mlp_dim
    macs = 3 * n_qkv * c * c + n_proj * c * c + 2 * n_mlp * c * m
    if level == "tokenwise":
        macs += 2 * n_qkv * n * c + 2 * gate_macs(config)  # attention rows of the updated queries
    elif level == "qk":
        macs += 2 * n_qkv * n * c + n * n * c + 3 * gate_macs(config)  # Q.K^T rows + columns, dense A.V
    else:
        macs += 5 * n_qkv * n * c + 3 * gate_macs(config)  # rows, columns and the A.V delta both ways
    return macs
