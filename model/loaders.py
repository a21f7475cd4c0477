"""Checkpoint loaders: timm and Hugging Face ViT/DeiT layouts -> VisionTransformer, and the load_model entry point.

Each layout has one pure converter (state dict in, our state dict out, validated against VisionTransformer(config))
and one config reader; the I/O functions only read files and call them.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from model.config import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NAMED_CONFIGS,
    DetectorConfig,
    Owlv2Config,
    PreprocessConfig,
    VideoConfig,
    ViTConfig,
    ViTDetConfig,
)
from model.vit import VisionTransformer

HF_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint (or its config) does not fit the VisionTransformer it is loaded into."""


# --------------------------------------------------------------------------- shared helpers


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bicubic resampling of the patch part of pos_embed [1, P + gh*gw, C] to new_grid; prefix positions kept.

    Same convention as timm's resample_abs_pos_embed and HF's interpolate_pos_encoding (align_corners=False,
    computed in float32; no antialias, as HF). Returns pos_embed itself when the grid is unchanged.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, c = patches.shape[1], patches.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patch positions are not a square grid; pass old_grid")
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not hold the {n} patch positions of pos_embed")
    if old_grid == new_grid:
        return pos_embed
    grid = patches.reshape(1, *old_grid, c).permute(0, 3, 1, 2).float()  # [1, C, gh, gw]
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def _fit_pos_embed(pos_embed: torch.Tensor, config: ViTConfig, old_grid: tuple[int, int] | None) -> torch.Tensor:
    """Bring a checkpoint's pos_embed [1, N, C] to config's grid (and prefix count when it has none)."""
    n, p = pos_embed.shape[1], config.num_prefix_tokens
    if old_grid is not None:
        pos_prefix = n - old_grid[0] * old_grid[1]
    elif math.isqrt(n - p) ** 2 == n - p:  # a square grid, as timm assumes
        pos_prefix = p
    elif n == config.num_tokens:
        pos_prefix, old_grid = p, config.grid_size
    elif p and math.isqrt(n) ** 2 == n:
        pos_prefix = 0
    else:
        raise CheckpointError(
            f"cannot infer the position-embedding grid of pos_embed {tuple(pos_embed.shape)} "
            f"({p} prefix tokens); the checkpoint grid is not square: pass old_grid / image_size"
        )
    if pos_prefix not in (p, 0):
        raise CheckpointError(f"pos_embed {tuple(pos_embed.shape)} does not fit grid {old_grid} + {p} prefix tokens")
    if pos_prefix == 0 and p:
        # timm's no_embed_class layout (e.g. DeiT III): prefix tokens carry no position, i.e. a zero one.
        pos_embed = torch.cat([pos_embed.new_zeros(1, p, pos_embed.shape[2]), pos_embed], dim=1)
    return resample_pos_embed(pos_embed, config.grid_size, p, old_grid)


def model_class(config: ViTConfig) -> type[nn.Module]:
    """The module a config describes: YolosDetector, VideoMAE, ViTDetBackbone, Owlv2Detector or VisionTransformer."""
    from model.videomae import VideoMAE
    from model.yolos import YolosDetector

    if isinstance(config, Owlv2Config):
        from model.owlv2 import Owlv2Detector

        return Owlv2Detector
    if isinstance(config, DetectorConfig):
        return YolosDetector
    if isinstance(config, VideoConfig):
        return VideoMAE
    if isinstance(config, ViTDetConfig):
        from model.vitdet import ViTDetBackbone

        return ViTDetBackbone
    return VisionTransformer


def build_model(config: ViTConfig) -> nn.Module:
    """The model of this config with deterministic random weights (named architectures)."""
    return model_class(config)(config)


@functools.lru_cache(maxsize=8)
def _meta_model(config: ViTConfig) -> VisionTransformer:
    """Parameter-free template of the model of config (shapes only; deep-copied to build models)."""
    with torch.device("meta"):
        return build_model(config)


def _expected_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown}, ... ({len(items) - limit} more)" if len(items) > limit else shown


def _validate(state_dict: Mapping[str, torch.Tensor], config: ViTConfig, layout: str, unmapped: Iterable[str] = ()):
    """Raise CheckpointError naming every missing key, unexpected key and shape mismatch."""
    expected = _expected_shapes(config)
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(set(unmapped) | (state_dict.keys() - expected.keys()))
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {expected[k]})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = [
        f"{what} ({len(keys)}): {_listing(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{layout} checkpoint does not fit the model: " + "; ".join(problems))


def _num_heads(embed_dim: int, num_heads: int | None) -> int:
    heads = num_heads if num_heads is not None else embed_dim // 64
    if heads <= 0 or embed_dim % heads:
        raise CheckpointError(f"cannot split embed dim {embed_dim} into {heads} heads; pass num_heads")
    return heads


def adapt_image_size(config: ViTConfig, image_size: tuple[int, int] | None) -> ViTConfig:
    """config at another input size; preprocessing then resizes the whole frame to image_size (no crop).

    A checkpoint's own pipeline (e.g. resize 256 + crop 224) would produce the wrong size, and for
    streaming the full frame is what we want: resize_to=image_size, crop removed, same filter/mean/std.
    """
    if image_size is None:
        return config
    image_size = (int(image_size[0]), int(image_size[1]))
    pre = config.preprocess
    fixed = pre.crop_size if pre.crop_size is not None else pre.resize_to
    if fixed is None or tuple(fixed) != image_size:
        pre = replace(pre, resize_shortest=None, resize_to=image_size, crop_size=None)
    return replace(config.with_image_size(image_size), preprocess=pre)


# --------------------------------------------------------------------------- timm layout


def unwrap_state_dict(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Strip training wrappers: {"model": sd} / {"state_dict": sd} and DDP's "module." prefix."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"checkpoint entries that are not tensors: {_listing(not_tensors)}")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def config_from_timm_state_dict(
    state_dict: Mapping, num_heads: int | None = None, image_size: tuple[int, int] | None = None
) -> ViTConfig:
    """Infer the ViTConfig of a timm ViT/DeiT state dict (heads default to embed_dim // 64, as in timm's models)."""
    sd = unwrap_state_dict(state_dict)
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise CheckpointError(f"not a timm ViT checkpoint: missing key {key} (keys: {_listing(sorted(sd))})")
    embed_dim, in_chans, patch, patch_w = sd["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise CheckpointError(f"non-square patches {patch}x{patch_w} are not supported")
    class_token, distill_token = "cls_token" in sd, "dist_token" in sd
    if not class_token:
        raise CheckpointError(
            "missing key cls_token: only ViTs with a class token are supported (global-pool heads are not)"
        )
    num_prefix = int(class_token) + int(distill_token)
    n = sd["pos_embed"].shape[1]
    side = math.isqrt(n - num_prefix)
    if side * side != n - num_prefix:
        side = math.isqrt(n)  # timm no_embed_class: pos_embed covers the patches only
        if side * side != n:
            raise CheckpointError(f"pos_embed {tuple(sd['pos_embed'].shape)} is not a square grid; pass image_size")
    config = ViTConfig(
        image_size=(side * patch, side * patch),
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))),
        num_heads=_num_heads(embed_dim, num_heads),
        mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        layer_norm_eps=1e-6,
        class_token=class_token,
        distill_token=distill_token,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        preprocess=PreprocessConfig(),
    )
    return adapt_image_size(config, image_size)


def timm_to_model_state_dict(
    state_dict: Mapping, config: ViTConfig, old_grid: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """timm ViT/DeiT state dict -> ours (same names), pos_embed resampled to config.grid_size, validated.

    old_grid: the checkpoint's patch grid, only needed when it is not square and differs from config's.
    """
    sd = unwrap_state_dict(state_dict)
    expected = _expected_shapes(config)
    # Heads the config leaves out (features-only model, or no distillation head) are dropped, not errors.
    sd = {k: v for k, v in sd.items() if not (k.split(".")[0] in ("head", "head_dist") and k not in expected)}
    if "pos_embed" in sd:
        sd["pos_embed"] = _fit_pos_embed(sd["pos_embed"], config, old_grid)
    _validate(sd, config, "timm")
    return sd


# --------------------------------------------------------------------------- Hugging Face layout

_HF_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2}
_HF_QKV.update({"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2})  # transformers 5 in memory
_HF_BLOCK = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_IGNORED = re.compile(r"^(pooler\.|embeddings\.mask_token$)")  # ViTModel's pooler, masked-image-modeling token
# Image-processor defaults of transformers' ViTImageProcessor / DeiTImageProcessor (used for absent keys).
_HF_PRE_DEFAULTS = {
    "vit": dict(size={"height": 224, "width": 224}, resample=2, do_center_crop=False, crop_size=None),
    "deit": dict(size={"height": 256, "width": 256}, resample=3, do_center_crop=True, crop_size=224),
}


def _hf_hw(value, what: str) -> tuple[int, int]:
    """HF size value (int, [h, w] or {"height", "width"}) -> (h, w); ints are square as in ViT/DeiT processors."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, Mapping) and {"height", "width"} <= value.keys():
        return int(value["height"]), int(value["width"])
    raise CheckpointError(f"unsupported {what} {value!r} in the preprocessor config")


def _preprocess_from_hf(pre: Mapping | None, model_type: str, image_size: tuple[int, int]) -> PreprocessConfig:
    """What transformers' ViT/DeiT image processor does, as a PreprocessConfig.

    Without a preprocessor config we use the processor class defaults scaled to the model's image size
    (ViT: resize to it; DeiT: resize to 256/224 of it, then crop it), so a 224 model gets HF's exact defaults.
    """
    if pre is None:
        h, w = image_size
        if model_type == "deit":
            return PreprocessConfig(
                resize_shortest=None, resize_to=(h * 256 // 224, w * 256 // 224), crop_size=(h, w),
                interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            )  # fmt: skip
        return PreprocessConfig(
            resize_shortest=None, resize_to=(h, w), crop_size=None,
            interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        )  # fmt: skip
    kind = str(pre.get("image_processor_type") or pre.get("feature_extractor_type") or model_type).lower()
    defaults = _HF_PRE_DEFAULTS["deit" if "deit" in kind else "vit"]

    def pick(key: str, default=None):
        return pre[key] if pre.get(key) is not None else defaults.get(key, default)

    if pick("do_rescale", True) and not math.isclose(float(pick("rescale_factor", 1 / 255)), 1 / 255):
        raise CheckpointError(f"unsupported rescale_factor {pre['rescale_factor']} (only 1/255)")
    if not pick("do_rescale", True):
        raise CheckpointError("preprocessor config with do_rescale=false (0..255 inputs) is not supported")
    resample = int(pick("resample"))
    if resample not in _HF_PIL_RESAMPLE:
        raise CheckpointError(f"unsupported PIL resample code {resample}; supported: {_HF_PIL_RESAMPLE}")
    resize_shortest = resize_to = None
    if pick("do_resize", True):
        size = pick("size")
        if isinstance(size, Mapping) and "shortest_edge" in size:
            if size.get("longest_edge") is not None:
                raise CheckpointError(f"unsupported size {size!r}: longest_edge caps are not supported")
            resize_shortest = int(size["shortest_edge"])
        else:
            resize_to = _hf_hw(size, "size")
    crop_size = _hf_hw(pick("crop_size"), "crop_size") if pick("do_center_crop", False) else None
    normalize = pick("do_normalize", True)
    mean = tuple(float(v) for v in pick("image_mean", (0.5, 0.5, 0.5))) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(v) for v in pick("image_std", (0.5, 0.5, 0.5))) if normalize else (1.0, 1.0, 1.0)
    return PreprocessConfig(
        resize_shortest=resize_shortest,
        resize_to=resize_to,
        crop_size=crop_size,
        interpolation=_HF_PIL_RESAMPLE[resample],
        mean=mean,
        std=std,
    )


def config_from_hf(
    config_json: Mapping,
    preprocessor_json: Mapping | None = None,
    state_dict_keys: Iterable[str] | None = None,
) -> ViTConfig:
    """ViTConfig of a Hugging Face ViT/DeiT model from its config.json (+ preprocessor_config.json).

    state_dict_keys decide the distillation token and whether there is a classifier at all (ViTModel has
    none); without them a "deit" model is assumed to have the token and every model a classifier.
    """
    common = _hf_common(config_json, ("vit", "deit"))
    model_type = config_json["model_type"]
    image_size = _hf_hw(config_json.get("image_size", 224), "image_size")
    keys = None if state_dict_keys is None else set(state_dict_keys)
    if keys is None:
        distill, has_head = model_type == "deit", True
    else:
        distill = any(k.endswith("embeddings.distillation_token") for k in keys)
        has_head = bool(keys & {"classifier.weight", "cls_classifier.weight"})
    if not has_head:  # a bare ViTModel / DeiTModel: features only
        common.update(num_classes=0, label_names=None)
    return ViTConfig(
        image_size=image_size,
        qkv_bias=bool(config_json.get("qkv_bias", True)),
        class_token=True,
        distill_token=distill,
        preprocess=_preprocess_from_hf(preprocessor_json, model_type, image_size),
        **common,
    )


def _hf_encoder_state_dict(
    named: Mapping[str, tuple[str, torch.Tensor]], key_bias: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ViT encoder part of an HF state dict ({name without the model prefix: (original key, tensor)}) in our
    names: embeddings, blocks (q/k/v fused into qkv), final layernorm. Returns (ours, original keys not mapped).

    key_bias=False (VideoMAE: the key projection has no bias) fills the key part of the fused bias with zeros.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, tuple[str, torch.Tensor]]] = {}
    unmapped: list[str] = []
    for name, (key, value) in named.items():
        if _HF_IGNORED.match(name):
            continue
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value
            continue
        block = re.fullmatch(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)", name)
        if block:
            i, module, param = int(block.group(1)), block.group(2), block.group(3)
            if module in _HF_QKV:
                qkv.setdefault((i, param), {})[_HF_QKV[module]] = (key, value)
                continue
            if module in _HF_BLOCK:
                out[f"blocks.{i}.{_HF_BLOCK[module]}.{param}"] = value
                continue
        unmapped.append(key)
    for (i, param), parts in sorted(qkv.items()):
        if param == "bias" and not key_bias and set(parts) == {0, 2}:
            parts = {**parts, 1: ("", torch.zeros_like(parts[0][1]))}
        if len(parts) == 3:
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts[j][1] for j in range(3)], dim=0)  # [3C(, C)]
        else:
            unmapped.extend(k for k, _ in parts.values())  # partial q/k/v: reported, and qkv shows as missing
    return out, unmapped


def hf_to_model_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ViTConfig, old_grid: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """HF ViT/DeiT state dict (ViTForImageClassification, DeiTForImageClassification[WithTeacher], ViTModel,
    DeiTModel; on-disk or transformers-5 in-memory names) -> ours: q/k/v fused into qkv, pos_embed resampled.

    DeiTForImageClassification has a distillation token but classifies from the class token only; our model
    averages two heads, so its classifier is folded in exactly as head = 2 * classifier, head_dist = 0.
    """
    rest: dict[str, tuple[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("vit.").removeprefix("deit.")
        head = re.fullmatch(r"(classifier|cls_classifier|distillation_classifier)\.(weight|bias)", name)
        if head:
            out[("head_dist." if head.group(1) == "distillation_classifier" else "head.") + head.group(2)] = value
        else:
            rest[name] = (key, value)
    encoder, unmapped = _hf_encoder_state_dict(rest)
    out.update(encoder)
    has_cls_only_head = "head.weight" in out and not any(k.startswith("distillation_classifier.") for k in state_dict)
    if config.distill_token and "head_dist.weight" in _expected_shapes(config) and has_cls_only_head:
        # DeiTForImageClassification: logits = classifier(cls) == (2*classifier(cls) + 0*dist) / 2, exactly.
        for param in ("weight", "bias"):
            if f"head.{param}" in out:
                out[f"head_dist.{param}"] = torch.zeros_like(out[f"head.{param}"])
                out[f"head.{param}"] = out[f"head.{param}"] * 2
    if "pos_embed" in out:
        out["pos_embed"] = _fit_pos_embed(out["pos_embed"], config, old_grid)
    _validate(out, config, "Hugging Face", unmapped)
    return out


# --------------------------------------------------------------------------- Hugging Face YOLOS / VideoMAE layouts


def _hf_common(config_json: Mapping, model_types: tuple[str, ...]) -> dict:
    """The ViT fields of an HF config.json shared by ViT, YOLOS and VideoMAE (checked: model type, GELU, heads)."""
    model_type = config_json.get("model_type")
    if model_type not in model_types:
        raise CheckpointError(f"unsupported Hugging Face model_type {model_type!r}; expected one of {model_types}")
    act = config_json.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"unsupported hidden_act {act!r}: the model uses exact (erf) GELU, 'gelu'")
    patch = config_json.get("patch_size", 16)
    if not isinstance(patch, int):
        ph, pw = _hf_hw(patch, "patch_size")
        if ph != pw:
            raise CheckpointError(f"non-square patches {patch} are not supported")
        patch = ph
    hidden = int(config_json.get("hidden_size", 768))
    heads = int(config_json.get("num_attention_heads", 12))
    if hidden % heads:
        raise CheckpointError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    id2label = config_json.get("id2label") or {}
    return dict(
        patch_size=patch, in_chans=int(config_json.get("num_channels", 3)), embed_dim=hidden,
        depth=int(config_json.get("num_hidden_layers", 12)), num_heads=heads,
        mlp_dim=int(config_json.get("intermediate_size", 3072)),
        layer_norm_eps=float(config_json.get("layer_norm_eps", 1e-12)),
        num_classes=len(id2label) or int(config_json.get("num_labels", 2)),
        label_names=tuple(str(id2label[k]) for k in sorted(id2label, key=int)) if id2label else None,
    )  # fmt: skip


def config_from_hf_yolos(config_json: Mapping, preprocessor_json: Mapping | None = None) -> DetectorConfig:
    """DetectorConfig of an HF YolosForObjectDetection config.json. The native input size is the checkpoint's
    position grid (image_size // patch_size, as transformers interpolates from); frames are resized whole to the
    input size (bilinear, the processor's mean/std, ImageNet by default)."""
    common = _hf_common(config_json, ("yolos",))
    if not config_json.get("qkv_bias", True):
        raise CheckpointError("YOLOS checkpoints without qkv biases are not supported")
    h, w = _hf_hw(config_json.get("image_size", [512, 864]), "image_size")
    p = common["patch_size"]
    image_size = (h // p * p, w // p * p)
    pre = preprocessor_json or {}
    mean = tuple(float(v) for v in pre.get("image_mean") or IMAGENET_MEAN)
    std = tuple(float(v) for v in pre.get("image_std") or IMAGENET_STD)
    resample = _HF_PIL_RESAMPLE.get(int(pre.get("resample", 2)), "bilinear")
    return DetectorConfig(
        image_size=image_size, qkv_bias=True, class_token=True, distill_token=False,
        num_detection_tokens=int(config_json.get("num_detection_tokens", 100)),
        mid_position_embeddings=bool(config_json.get("use_mid_position_embeddings", True)),
        preprocess=PreprocessConfig(
            resize_shortest=None, resize_to=image_size, crop_size=None, interpolation=resample, mean=mean, std=std
        ),
        **common,
    )  # fmt: skip


def _yolos_positions(pos: torch.Tensor, config: DetectorConfig, old_grid: tuple[int, int]) -> torch.Tensor:
    """HF position embeddings [1, 1 + Np + D, C] ([cls, patches, det]) -> ours [1, 1 + D + Np', C] at config's grid."""
    d = config.num_detection_tokens
    if pos.shape[1] != 1 + d + old_grid[0] * old_grid[1]:
        raise CheckpointError(
            f"position embeddings {tuple(pos.shape)} do not fit grid {old_grid} + 1 class + {d} detection tokens"
        )
    ours = torch.cat([pos[:, :1], pos[:, pos.shape[1] - d :], pos[:, 1 : pos.shape[1] - d]], dim=1)
    return resample_pos_embed(ours, config.grid_size, 1 + d, old_grid)


def yolos_hf_to_model_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: DetectorConfig, old_grid: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """HF YolosForObjectDetection state dict -> ours: q/k/v fused, the detection tokens moved next to the class
    token, position embeddings (and mid-position embeddings) reordered and resampled to config's grid, validated.

    old_grid: the checkpoint's position grid (config.json image_size // patch_size); default config's grid.
    """
    old_grid = tuple(old_grid or config.grid_size)
    out: dict[str, torch.Tensor] = {}
    rest: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("vit.")
        head = re.fullmatch(r"(class_labels_classifier|bbox_predictor)\.layers\.(\d+)\.(weight|bias)", name)
        if head:
            module = "class_head" if head.group(1) == "class_labels_classifier" else "box_head"
            out[f"{module}.layers.{head.group(2)}.{head.group(3)}"] = value
        elif name == "embeddings.detection_tokens":
            out["det_token"] = value
        elif name in ("encoder.mid_position_embeddings", "encoder.interpolation.mid_position_embeddings"):
            out["mid_pos_embed"] = torch.stack([_yolos_positions(layer, config, old_grid) for layer in value])
        elif name == "embeddings.position_embeddings":
            out["pos_embed"] = _yolos_positions(value, config, old_grid)
        else:
            rest[name] = (key, value)
    encoder, unmapped = _hf_encoder_state_dict(rest)
    out.update(encoder)
    _validate(out, config, "Hugging Face YOLOS", unmapped)
    return out


def config_from_hf_videomae(config_json: Mapping, preprocessor_json: Mapping | None = None) -> VideoConfig:
    """VideoConfig of an HF VideoMAEForVideoClassification config.json (+ preprocessor_config.json)."""
    common = _hf_common(config_json, ("videomae",))
    image_size = _hf_hw(config_json.get("image_size", 224), "image_size")
    if preprocessor_json is not None:
        preprocess = _preprocess_from_hf(preprocessor_json, "videomae", image_size)
    else:  # VideoMAEImageProcessor defaults: short side 224 bilinear, centre crop 224, ImageNet mean/std
        preprocess = PreprocessConfig(resize_shortest=image_size[0], crop_size=image_size, interpolation="bilinear")
    return VideoConfig(
        image_size=image_size, qkv_bias=bool(config_json.get("qv_bias", config_json.get("qkv_bias", True))),
        num_frames=int(config_json.get("num_frames", 16)), tubelet_size=int(config_json.get("tubelet_size", 2)),
        use_mean_pooling=bool(config_json.get("use_mean_pooling", True)), preprocess=preprocess, **common,
    )  # fmt: skip


_VIDEOMAE_LENGTH_KEYS = ("embeddings.length_embeddings", "length_embed")


def videomae_hf_to_model_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: VideoConfig
) -> dict[str, torch.Tensor]:
    """HF VideoMAE state dict (VideoMAEForVideoClassification or VideoMAEModel; q_bias / v_bias as saved by
    transformers 4 or query.bias / value.bias) -> ours: q/k/v fused with a zero key bias, validated.

    A run-length embedding [T/t, C] is read from `videomae.embeddings.length_embeddings` (or `length_embed`)
    when the config has one (see with_length_embedding)."""
    out: dict[str, torch.Tensor] = {}
    rest: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("videomae.")
        name = re.sub(r"attention\.attention\.q_bias$", "attention.attention.query.bias", name)
        name = re.sub(r"attention\.attention\.v_bias$", "attention.attention.value.bias", name)
        head = re.fullmatch(r"(classifier|fc_norm)\.(weight|bias)", name)
        if head:
            out[f"{'head' if head.group(1) == 'classifier' else 'fc_norm'}.{head.group(2)}"] = value
        elif name in _VIDEOMAE_LENGTH_KEYS:
            out["length_embed"] = value
        else:
            rest[name] = (key, value)
    encoder, unmapped = _hf_encoder_state_dict(rest, key_bias=False)
    out.update(encoder)
    _validate(out, config, "Hugging Face VideoMAE", unmapped)
    return out


def config_from_hf_vitdet(config_json: Mapping) -> ViTDetConfig:
    """ViTDetConfig of an HF VitDetModel / VitDetBackbone config.json (input size: its image_size, whose grid the
    global blocks' relative position embeddings are sized for). Residual conv blocks are refused (not in ViTDet-B)."""
    if config_json.get("residual_block_indices"):
        raise CheckpointError(f"residual_block_indices {config_json['residual_block_indices']}: residual conv blocks "
                              "are not supported (ViTDet-B has none)")
    common = _hf_common({"layer_norm_eps": 1e-6, **config_json, "intermediate_size": 0}, ("vitdet",))
    image_size = _hf_hw(config_json.get("image_size", 224), "image_size")
    window_size = int(config_json.get("window_size", 0))
    return ViTDetConfig(
        image_size=image_size, qkv_bias=bool(config_json.get("qkv_bias", True)),
        window_size=window_size,
        window_block_indices=tuple(int(i) for i in config_json.get("window_block_indices", ())),
        use_relative_position_embeddings=bool(config_json.get("use_relative_position_embeddings", False)),
        use_absolute_position_embeddings=bool(config_json.get("use_absolute_position_embeddings", True)),
        preprocess=PreprocessConfig(resize_shortest=None, resize_to=image_size, crop_size=None,
                                    interpolation="bilinear"),
        **{**common, "mlp_dim": int(config_json.get("mlp_ratio", 4)) * common["embed_dim"], "num_classes": 0,
           "label_names": None},
    )  # fmt: skip


def resample_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resampling of relative position embeddings [L, Dh] to [length, Dh] (transformers' get_rel_pos)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    grid = rel_pos.float().reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1)  # [1, Dh, L]
    return F.interpolate(grid, size=length, mode="linear").reshape(-1, length).permute(1, 0).to(rel_pos.dtype)


_HF_VITDET = {
    "embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.projection.bias": "patch_embed.proj.bias",
}
_HF_VITDET_BLOCK = {"attention.qkv": "attn.qkv", "attention.proj": "attn.proj", "attention.rel_pos_h": "attn.rel_pos_h",
                    "attention.rel_pos_w": "attn.rel_pos_w"}


def vitdet_hf_to_model_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ViTDetConfig
) -> dict[str, torch.Tensor]:
    """HF VitDetModel / VitDetBackbone state dict -> ours: the position embeddings' class position dropped and the
    pretraining grid resampled (bicubic) to config's grid, the global blocks' relative position embeddings resampled
    (linear) to config's grid, as transformers does at run time; validated."""
    expected = _expected_shapes(config)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        name = key.removeprefix("vitdet.")
        block = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|rel_pos_h|rel_pos_w)", name)
        if name in _HF_VITDET:
            out[_HF_VITDET[name]] = value
        elif name == "embeddings.position_embeddings":  # [1, 1 + g*g, C]: a class position, then a square grid
            out["pos_embed"] = resample_pos_embed(value[:, 1:], config.grid_size, 0)
        elif block and block.group(3).startswith("rel_pos"):
            ours = f"blocks.{block.group(1)}.attn.{block.group(3)}"
            length = expected[ours][0] if ours in expected else value.shape[0]
            out[ours] = resample_rel_pos(value, length)
        elif block:
            module = block.group(2)
            ours = _HF_VITDET_BLOCK.get(module, module)  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
            out[f"blocks.{block.group(1)}.{ours}.{block.group(3)}"] = value
        else:
            unmapped.append(key)
    _validate(out, config, "Hugging Face ViTDet", unmapped)
    return out


# --------------------------------------------------------------------------- Hugging Face OWLv2 layout


def config_from_hf_owlv2(config_json: Mapping) -> Owlv2Config:
    """Owlv2Config of an HF Owlv2ForObjectDetection config.json (vision_config, text_config, projection_dim). The input
    size is the vision config's image_size (960 for the released checkpoints); frames are padded to a square and
    resized whole to it (bilinear, CLIP mean/std), as Owlv2ImageProcessor."""
    if config_json.get("model_type") != "owlv2":
        model_type = config_json.get("model_type")
        raise CheckpointError(f"unsupported Hugging Face model_type {model_type!r}; expected 'owlv2'")
    vision, text = config_json.get("vision_config") or {}, config_json.get("text_config") or {}
    for part, sub in (("vision", vision), ("text", text)):
        if sub.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise CheckpointError(f"unsupported {part} hidden_act {sub['hidden_act']!r}: OWLv2 uses 'quick_gelu'")
    image_size = _hf_hw(vision.get("image_size", 768), "image_size")
    patch = vision.get("patch_size", 16)
    if not isinstance(patch, int):
        ph, pw = _hf_hw(patch, "patch_size")
        if ph != pw:
            raise CheckpointError(f"non-square patches {patch} are not supported")
        patch = ph
    hidden, heads = int(vision.get("hidden_size", 768)), int(vision.get("num_attention_heads", 12))
    text_hidden, text_heads = int(text.get("hidden_size", 512)), int(text.get("num_attention_heads", 8))
    for width, count in ((hidden, heads), (text_hidden, text_heads)):
        if width % count:
            raise CheckpointError(f"hidden_size {width} is not divisible by num_attention_heads {count}")
    return Owlv2Config(
        image_size=image_size, patch_size=patch, in_chans=int(vision.get("num_channels", 3)), embed_dim=hidden,
        depth=int(vision.get("num_hidden_layers", 12)), num_heads=heads,
        mlp_dim=int(vision.get("intermediate_size", 3072)), layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
        text_embed_dim=text_hidden, text_depth=int(text.get("num_hidden_layers", 12)), text_heads=text_heads,
        text_mlp_dim=int(text.get("intermediate_size", 2048)), vocab_size=int(text.get("vocab_size", 49408)),
        max_text_tokens=int(text.get("max_position_embeddings", 16)),
        projection_dim=int(config_json.get("projection_dim", 512)),
        text_layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)),
        preprocess=PreprocessConfig(resize_shortest=None, resize_to=image_size, crop_size=None,
                                    interpolation="bilinear", mean=CLIP_MEAN, std=CLIP_STD),
    )  # fmt: skip


_HF_OWLV2_TOP = {
    "owlv2.vision_model.embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "owlv2.vision_model.pre_layernorm.weight": "pre_norm.weight",
    "owlv2.vision_model.pre_layernorm.bias": "pre_norm.bias",
    "owlv2.vision_model.post_layernorm.weight": "norm.weight",
    "owlv2.vision_model.post_layernorm.bias": "norm.bias",
    "layer_norm.weight": "merge_norm.weight",
    "layer_norm.bias": "merge_norm.bias",
    "owlv2.text_model.embeddings.token_embedding.weight": "text.token_embed.weight",
    "owlv2.text_model.final_layer_norm.weight": "text.norm.weight",
    "owlv2.text_model.final_layer_norm.bias": "text.norm.bias",
    "owlv2.text_projection.weight": "text.proj.weight",
}
_HF_OWLV2_BLOCK = {"self_attn.out_proj": "attn.proj", "layer_norm1": "norm1", "layer_norm2": "norm2",
                   "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_OWLV2_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
# CLIP's image-text contrastive parts, unused by detection
_HF_OWLV2_IGNORED = ("owlv2.visual_projection.weight", "owlv2.logit_scale")


def owlv2_hf_to_model_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Owlv2Config, old_grid: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """HF Owlv2ForObjectDetection state dict -> ours: q/k/v fused into qkv (vision and text blocks), the class
    embedding as a [1, 1, C] token, position embeddings resampled (bicubic, as transformers' interpolate_pos_encoding)
    from old_grid (default: square) to config's grid, heads under their names; validated."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}  # our fused name -> {q 0, k 1, v 2: (key, tensor)}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        block = re.fullmatch(r"owlv2\.(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in _HF_OWLV2_IGNORED:
            continue
        if key in _HF_OWLV2_TOP:
            out[_HF_OWLV2_TOP[key]] = value
        elif key == "owlv2.vision_model.embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "owlv2.vision_model.embeddings.position_embedding.weight":  # [1 + g*g, C]
            out["pos_embed"] = resample_pos_embed(value[None], config.grid_size, 1, old_grid)
        elif key == "owlv2.text_model.embeddings.position_embedding.weight":
            out["text.pos_embed"] = value
        elif re.fullmatch(r"(class_head|box_head|objectness_head)\.\w+\.(weight|bias)", key):
            out[key] = value
        elif block and block.group(3) in _HF_OWLV2_QKV:
            name = f"{'text.' if block.group(1) == 'text' else ''}blocks.{block.group(2)}.attn.qkv.{block.group(4)}"
            qkv.setdefault(name, {})[_HF_OWLV2_QKV[block.group(3)]] = (key, value)
        elif block and block.group(3) in _HF_OWLV2_BLOCK:
            prefix = "text." if block.group(1) == "text" else ""
            out[f"{prefix}blocks.{block.group(2)}.{_HF_OWLV2_BLOCK[block.group(3)]}.{block.group(4)}"] = value
        else:
            unmapped.append(key)
    for name, parts in sorted(qkv.items()):
        if len(parts) == 3:
            out[name] = torch.cat([parts[j][1] for j in range(3)], dim=0)  # [3C(, C)]
        else:
            unmapped.extend(k for k, _ in parts.values())
    _validate(out, config, "Hugging Face OWLv2", unmapped)
    return out


# --------------------------------------------------------------------------- I/O


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch file (.pth/.pt/.bin/.ckpt, loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(str(path))
        if path.suffix in _TORCH_SUFFIXES:
            return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    raise CheckpointError(f"unsupported checkpoint file type {path.suffix!r} ({path}); use .safetensors or .pth/.pt")


def read_label_names(path: str | Path) -> tuple[str, ...]:
    """One class name per line; a leading WordNet id ("n01440764 tench, Tinca tinca") is dropped."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return tuple(re.sub(r"^n\d{8}\s+", "", line) for line in lines if line)


def _with_labels(config: ViTConfig, labels_path: str | Path | None) -> ViTConfig:
    if labels_path is None:
        return config
    labels = read_label_names(labels_path)
    if len(labels) != config.num_classes:
        raise CheckpointError(f"{labels_path} has {len(labels)} labels but the model has {config.num_classes} classes")
    return replace(config, label_names=labels)


def _build(config: ViTConfig, state_dict: dict[str, torch.Tensor]) -> VisionTransformer:
    """VisionTransformer(config) holding state_dict's tensors (no random init), float32, eval, no grads."""
    model = copy.deepcopy(_meta_model(config))
    model.config = config  # the cached template may differ in label_names (not part of config equality)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if isinstance(config, VideoConfig):  # the fixed position table is a buffer, not a weight: compute it
        from model.videomae import sinusoid_position_table

        model.pos_embed = sinusoid_position_table(config.num_patches, config.embed_dim)
    return model.float().eval().requires_grad_(False)


def load_timm_checkpoint(
    path: str | Path,
    num_heads: int | None = None,
    image_size: tuple[int, int] | None = None,
    labels_path: str | Path | None = None,
) -> VisionTransformer:
    """A timm-layout ViT/DeiT checkpoint file -> VisionTransformer (float32, CPU, eval)."""
    state_dict = unwrap_state_dict(read_state_dict(path))
    native = config_from_timm_state_dict(state_dict, num_heads)
    config = _with_labels(adapt_image_size(native, image_size), labels_path)
    return _build(config, timm_to_model_state_dict(state_dict, config, old_grid=native.grid_size))


def load_hf_directory(path: str | Path, image_size: tuple[int, int] | None = None) -> VisionTransformer:
    """A Hugging Face ViT/DeiT/YOLOS/VideoMAE/ViTDet/OWLv2 model directory (config.json + model.safetensors or .bin)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (not a Hugging Face model directory)")
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    config_json = json.loads((path / "config.json").read_text(encoding="utf-8"))
    pre_path = path / "preprocessor_config.json"
    pre_json = json.loads(pre_path.read_text(encoding="utf-8")) if pre_path.is_file() else None
    state_dict = read_state_dict(weights)
    if config_json.get("model_type") == "owlv2":
        native = config_from_hf_owlv2(config_json)
        config = adapt_image_size(native, image_size)
        return _build(config, owlv2_hf_to_model_state_dict(state_dict, config, old_grid=native.grid_size))
    if config_json.get("model_type") == "yolos":
        native = config_from_hf_yolos(config_json, pre_json)
        config = adapt_image_size(native, image_size)
        return _build(config, yolos_hf_to_model_state_dict(state_dict, config, old_grid=native.grid_size))
    if config_json.get("model_type") == "vitdet":
        config = adapt_image_size(config_from_hf_vitdet(config_json), image_size)
        return _build(config, vitdet_hf_to_model_state_dict(state_dict, config))
    if config_json.get("model_type") == "videomae":
        native = config_from_hf_videomae(config_json, pre_json)
        if any(k.removeprefix("videomae.") in _VIDEOMAE_LENGTH_KEYS for k in state_dict):
            native = replace(native, run_length_embedding=True)
        config = adapt_image_size(native, image_size)
        return _build(config, videomae_hf_to_model_state_dict(state_dict, config))
    native = config_from_hf(config_json, pre_json, state_dict.keys())
    config = adapt_image_size(native, image_size)
    return _build(config, hf_to_model_state_dict(state_dict, config, old_grid=native.grid_size))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_hf_id(model_id: str, revision: str | None = None) -> Path:
    """Local snapshot folder of a Hugging Face model id: the cache first, the Hub only when not cached and online.

    HF_HUB_CACHE (or HF_HOME) and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are read at call time (huggingface_hub
    reads its own constants at import). Only config, preprocessor config and one weights file are fetched.
    """
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE
    )
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)

    def usable(folder: str) -> bool:
        return (Path(folder) / "config.json").is_file() and any((Path(folder) / n).is_file() for n in HF_FILES[2:])

    where = f"{model_id!r} (revision {revision or 'main'})"
    try:
        folder = snapshot_download(
            model_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(HF_FILES), local_files_only=True
        )
        if usable(folder):
            return Path(folder)
        reason = f"the cached snapshot {folder} lacks config.json or weights"
    except HFValidationError as err:
        raise FileNotFoundError(f"{model_id!r} is not a valid Hugging Face model id: {err}") from err
    except LocalEntryNotFoundError:
        reason = f"not in the Hugging Face cache {cache_dir}"
    if offline:
        raise FileNotFoundError(f"{where}: {reason}, and HF_HUB_OFFLINE is set so nothing is downloaded")
    try:
        folder = snapshot_download(model_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(HF_FILES[:3]))
        if not (Path(folder) / "model.safetensors").is_file():
            hf_hub_download(model_id, "pytorch_model.bin", revision=revision, cache_dir=cache_dir)
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise FileNotFoundError(f"{where}: {reason}, and downloading failed: {err}") from err
    if not usable(folder):
        raise FileNotFoundError(f"{where}: the Hub snapshot {folder} has no config.json or weights we can load")
    return Path(folder)


@dataclass(frozen=True)
class WeightsSource:
    """Which form of load_model's spec a string is, and so where the model's weights come from."""

    form: Literal["timm_file", "hf_directory", "named", "hf_id"]
    weights: Literal["checkpoint", "random"]  # a named architecture has deterministic random weights
    source: str  # the checkpoint file or HF directory (resolved), the HF id, or the architecture's name

    @property
    def description(self) -> str:
        if self.weights == "random":
            return f"random weights (the named architecture {self.source!r}: no checkpoint, its outputs mean nothing)"
        kind = {"timm_file": "checkpoint file", "hf_directory": "model directory", "hf_id": "Hugging Face model"}
        return f"weights from the {kind[self.form]} {self.source}"


def weights_source(spec: str) -> WeightsSource:
    """Where load_model(spec) takes the weights from, in its order: a file, a directory, a named architecture, a
    Hugging Face id. Looks only at the local file system. Raises FileNotFoundError when spec is none of them."""
    path = Path(spec).expanduser()
    if path.is_file():
        return WeightsSource("timm_file", "checkpoint", str(path.resolve()))
    if path.is_dir():
        return WeightsSource("hf_directory", "checkpoint", str(path.resolve()))
    if spec.lower() in NAMED_CONFIGS:
        return WeightsSource("named", "random", spec.lower())
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.endswith((".safetensors", *_TORCH_SUFFIXES)):
        return WeightsSource("hf_id", "checkpoint", spec)
    raise FileNotFoundError(
        f"cannot load model {spec!r}; tried: a checkpoint file or model directory at {path.resolve()} (nothing "
        f"there); a named architecture (known: {', '.join(sorted(NAMED_CONFIGS))}); a Hugging Face id "
        "('org/name', not a file name)"
    )


def load_model(
    spec: str,
    image_size: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    num_heads: int | None = None,
    labels_path: str | Path | None = None,
) -> VisionTransformer:
    """The one entry point: spec is a checkpoint file (timm layout), an HF model directory, a named
    architecture from NAMED_CONFIGS (deterministic random weights) or a Hugging Face id ("org/name").

    image_size other than the checkpoint's resamples pos_embed and makes preprocessing resize whole frames
    to image_size (see adapt_image_size). num_heads applies to timm files and named architectures;
    labels_path (one name per line) overrides the label names.
    """
    source = weights_source(spec)
    path = Path(spec).expanduser()
    if source.form == "timm_file":
        model = load_timm_checkpoint(path, num_heads=num_heads, image_size=image_size, labels_path=labels_path)
    elif source.form == "hf_directory":
        model = load_hf_directory(path, image_size=image_size)
    elif source.form == "named":
        config = NAMED_CONFIGS[spec.lower()]
        if num_heads is not None:
            config = replace(config, num_heads=num_heads)
        model = build_model(adapt_image_size(config, image_size))
    else:
        try:
            folder = resolve_hf_id(spec)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"cannot load model {spec!r}: it is not an existing file or directory, not a named architecture, "
                f"and as a Hugging Face id: {err}"
            ) from err
        model = load_hf_directory(folder, image_size=image_size)
    if labels_path is not None and source.form != "timm_file":
        model.config = _with_labels(model.config, labels_path)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
