"""Our dense VisionTransformer against transformers' ViT/DeiT with the same weights, loaded through load_model."""

from __future__ import annotations

import pytest
import torch

from model.loaders import load_model, resample_pos_embed

transformers = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    num_labels=10,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)
HF_CLASSES = {
    "vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
    "deit-teacher": (transformers.DeiTConfig, transformers.DeiTForImageClassificationWithTeacher),
    "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification),
}


def random_hf_model(kind: str, seed: int = 0, **overrides):
    """A transformers classifier with weights far from its init, so every term of the forward pass matters."""
    config_cls, model_cls = HF_CLASSES[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
    return model


def hf_logits(model, images: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=images, **kwargs).logits


@pytest.mark.parametrize("kind", sorted(HF_CLASSES))
def test_dense_matches_transformers(kind, tmp_path):
    hf = random_hf_model(kind)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    assert ours.config.layer_norm_eps == 1e-12 and ours.norm.eps == 1e-12
    assert ours.config.distill_token == kind.startswith("deit")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert (ours(images) - hf_logits(hf, images)).abs().max() <= 1e-4


def test_backbone_without_classifier_matches_vit_model(tmp_path):
    """A bare ViTModel (pooler ignored): our head is the identity, so logits are the final normed class token."""
    torch.manual_seed(0)
    hf = transformers.ViTModel(transformers.ViTConfig(**TINY)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    assert ours.config.num_classes == 0 and ours.config.label_names is None
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = hf(pixel_values=images).last_hidden_state[:, 0]
    assert (ours(images) - reference).abs().max() <= 1e-4


def test_layer_norm_eps_is_honoured(tmp_path):
    """Near-constant tokens make LayerNorm's eps decide the output: 1e-12 and 1e-6 give different logits."""
    hf = random_hf_model("vit")
    with torch.no_grad():
        for p in hf.vit.embeddings.parameters():
            p.mul_(1e-4)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = hf_logits(hf, images)
    assert (ours(images) - reference).abs().max() <= 1e-4
    for module in ours.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    assert (ours(images) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
@pytest.mark.parametrize("image_size", [(64, 48), (24, 16)])
def test_other_input_size_matches_interpolate_pos_encoding(kind, image_size, tmp_path):
    """Upsampled and downsampled grids: HF's bicubic (align_corners=False, no antialias) is ours exactly."""
    hf = random_hf_model(kind)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path), image_size=image_size)
    assert ours.config.image_size == image_size
    assert ours.config.preprocess.resize_to == image_size and ours.config.preprocess.crop_size is None
    images = torch.randn(2, 3, *image_size, generator=torch.Generator().manual_seed(3))
    reference = hf_logits(hf, images, interpolate_pos_encoding=True)
    assert (ours(images) - reference).abs().max() <= 1e-4


def test_resample_pos_embed_same_grid_is_identity():
    pos_embed = torch.randn(1, 2 + 6 * 4, 8)
    assert resample_pos_embed(pos_embed, (6, 4), num_prefix_tokens=2, old_grid=(6, 4)) is pos_embed
    there = resample_pos_embed(pos_embed, (12, 8), num_prefix_tokens=2, old_grid=(6, 4))
    assert there.shape == (1, 2 + 12 * 8, 8) and torch.equal(there[:, :2], pos_embed[:, :2])


@pytest.mark.slow
def test_vit_base_sized_matches_transformers(tmp_path):
    """ViT-B/16 at 224 with 1000 labels (random init, safetensors) agrees in float32."""
    config = transformers.ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        num_labels=1000,
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # larger-than-init weights so logits are not all near zero
        hf.classifier.weight.normal_(0, 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_model(str(tmp_path))
    assert ours.config.num_classes == 1000 and ours.config.depth == 12
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    assert (ours(images) - hf_logits(hf, images)).abs().max() <= 1e-4
