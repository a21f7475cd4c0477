"""Checkpoint loaders: timm files round-trip, clear errors, HF ids from an offline cache, the real DeiT-Tiny."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model.config import ViTConfig
from model.loaders import (
    CheckpointError,
    config_from_hf,
    config_from_timm_state_dict,
    load_model,
    resample_pos_embed,
    resolve_hf_id,
    timm_to_model_state_dict,
)
from model.preprocess import Preprocessor
from model.vit import VisionTransformer

CONFIG = ViTConfig(
    image_size=(32, 32), patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_dim=256, num_classes=10
)  # 16 patches; embed_dim // 64 = 2 heads, the timm default
DISTILLED = ViTConfig(
    image_size=(32, 32), patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=96, num_classes=7,
    distill_token=True,
)  # fmt: skip
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def random_vit(config: ViTConfig, seed: int = 1) -> VisionTransformer:
    model = VisionTransformer(config).eval()
    model.init_random_weights(seed)
    with torch.no_grad():  # non-trivial norms, biases and tokens
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


# --------------------------------------------------------------------------- timm layout


@pytest.mark.parametrize("layout", ["pth", "safetensors", "wrapped-pth"])
def test_timm_file_round_trip(layout, tmp_path):
    model = random_vit(CONFIG)
    state_dict = model.state_dict()
    if layout == "safetensors":
        path = tmp_path / "vit.safetensors"
        save_file(state_dict, path)
    else:
        path = tmp_path / "vit.pth"
        if layout == "wrapped-pth":  # a training checkpoint: DDP prefixes inside {"model": ...}
            state_dict = {"model": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": torch.tensor(3)}
        torch.save(state_dict, path)
    loaded = load_model(str(path))
    assert loaded.config == CONFIG
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.inference_mode():  # same kernels on both sides: the weights must be bit-identical
        assert torch.equal(loaded(IMAGES), model(IMAGES))


def test_timm_distilled_with_explicit_heads(tmp_path):
    model = random_vit(DISTILLED)
    torch.save(model.state_dict(), tmp_path / "deit.pt")
    loaded = load_model(str(tmp_path / "deit.pt"), num_heads=3)
    assert loaded.config == DISTILLED
    with torch.inference_mode():  # same kernels on both sides: the weights must be bit-identical
        assert torch.equal(loaded(IMAGES), model(IMAGES))


@pytest.mark.parametrize("image_size", [(48, 24), (16, 64)])  # (16, 64): 2x8 patches, as many as the 4x4 original
def test_timm_other_image_size_resamples_pos_embed(image_size, tmp_path):
    model = random_vit(CONFIG)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    loaded = load_model(str(tmp_path / "vit.pth"), image_size=image_size)
    grid = (image_size[0] // 8, image_size[1] // 8)
    assert loaded.config.image_size == image_size and loaded.config.grid_size == grid
    assert loaded.config.preprocess.resize_to == image_size and loaded.config.preprocess.crop_size is None
    expected = resample_pos_embed(model.pos_embed, grid, num_prefix_tokens=1)
    assert not torch.equal(expected[:, 1:5], model.pos_embed[:, 1:5])
    assert torch.equal(loaded.pos_embed, expected)
    assert loaded(torch.randn(1, 3, *image_size)).shape == (1, 10)


def test_timm_pos_embed_without_prefix_positions():
    """timm's no_embed_class layout (DeiT III): pos_embed covers patches only, prefix tokens get a zero position."""
    model = random_vit(CONFIG)
    state_dict = model.state_dict()
    state_dict["pos_embed"] = state_dict["pos_embed"][:, 1:]
    loaded = timm_to_model_state_dict(state_dict, config_from_timm_state_dict(state_dict))
    assert torch.equal(loaded["pos_embed"][:, 1:], model.pos_embed[:, 1:])
    assert not loaded["pos_embed"][:, :1].any()


def test_config_from_timm_state_dict_infers_architecture():
    config = config_from_timm_state_dict(random_vit(DISTILLED).state_dict(), num_heads=3)
    assert config == DISTILLED
    with pytest.raises(CheckpointError, match="num_heads"):
        config_from_timm_state_dict(random_vit(DISTILLED).state_dict())  # 48 // 64 = 0 heads


def test_missing_key_is_named(tmp_path):
    state_dict = random_vit(CONFIG).state_dict()
    del state_dict["blocks.1.mlp.fc2.bias"]
    torch.save(state_dict, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.mlp\.fc2\.bias"):
        load_model(str(tmp_path / "vit.pth"))


def test_wrong_shape_and_unexpected_keys_are_named():
    state_dict = random_vit(CONFIG).state_dict()
    state_dict["blocks.0.ls1.gamma"] = torch.ones(128)  # a LayerScale model: not ours
    wrong = ViTConfig(**{**CONFIG.__dict__, "mlp_dim": 512})
    with pytest.raises(CheckpointError) as err:
        timm_to_model_state_dict(state_dict, wrong)
    message = str(err.value)
    assert "blocks.0.mlp.fc1.weight (checkpoint (256, 128), model (512, 128))" in message
    assert "unexpected keys (1): blocks.0.ls1.gamma" in message


def test_spec_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="named architecture.*deit-tiny-patch16-224"):
        load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match="tried: a checkpoint file.*nothing there"):
        load_model(str(tmp_path / "missing.pth"))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty-dir"))


def test_named_architecture_is_deterministic():
    first, second = load_model("deit-tiny-patch16-224"), load_model("DeiT-Tiny-Patch16-224")
    assert first.config == ViTConfig.from_name("deit-tiny-patch16-224")
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


# --------------------------------------------------------------------------- Hugging Face layout


def tiny_hf_vit(path, labels: list[str]):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(path)
    return model


def test_hf_id_from_offline_cache(tmp_path, monkeypatch):
    """huggingface_hub's cache layout: models--org--name/refs/main -> snapshots/<commit>/ with the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--testorg--tiny-vit"
    snapshot = repo / "snapshots" / commit
    labels = ["cat", "dog", "car"]
    tiny_hf_vit(snapshot, labels)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert resolve_hf_id("testorg/tiny-vit") == snapshot
    assert resolve_hf_id("testorg/tiny-vit", revision=commit) == snapshot
    by_id, by_dir = load_model("testorg/tiny-vit"), load_model(str(snapshot))
    assert by_id.config.label_names == tuple(labels)
    assert torch.equal(by_id(IMAGES), by_dir(IMAGES))
    with pytest.raises(FileNotFoundError, match="testorg/other.*HF_HUB_OFFLINE"):
        resolve_hf_id("testorg/other")


def test_hf_errors_name_keys_and_settings(tmp_path):
    from safetensors.torch import load_file

    tiny_hf_vit(tmp_path, ["a", "b"])
    weights = load_file(tmp_path / "model.safetensors")
    del weights["vit.encoder.layer.1.output.dense.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.mlp\.fc2\.bias"):
        load_model(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="gelu_new"):
        config_from_hf({**config, "hidden_act": "gelu_new"})
    with pytest.raises(CheckpointError, match="model_type 'swin'"):
        config_from_hf({**config, "model_type": "swin"})


def test_hf_preprocessor_configs():
    vit = {"model_type": "vit", "image_size": 224}
    # facebook/deit-*-224 ship {"size": 256, "crop_size": 224}: HF's DeiT processor resizes to 256x256 (no aspect).
    deit_pre = {
        "feature_extractor_type": "DeiTFeatureExtractor", "size": 256, "crop_size": 224, "do_center_crop": True,
        "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }  # fmt: skip
    pre = config_from_hf({**vit, "model_type": "deit"}, deit_pre).preprocess
    assert (pre.resize_to, pre.resize_shortest, pre.crop_size) == ((256, 256), None, (224, 224))
    assert pre.interpolation == "bicubic" and pre.mean == (0.485, 0.456, 0.406)
    google_pre = {"do_normalize": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                  "resample": 2, "size": {"height": 224, "width": 224}}  # fmt: skip
    pre = config_from_hf(vit, google_pre).preprocess
    assert (pre.resize_to, pre.crop_size, pre.interpolation, pre.mean) == ((224, 224), None, "bilinear", (0.5,) * 3)
    short = config_from_hf(vit, {"size": {"shortest_edge": 256}, "resample": 0, "do_normalize": False}).preprocess
    assert (short.resize_shortest, short.resize_to, short.interpolation, short.std) == (256, None, "nearest", (1,) * 3)
    with pytest.raises(CheckpointError, match="resample code 1"):
        config_from_hf(vit, {"resample": 1})


# --------------------------------------------------------------------------- the real DeiT-Tiny


def test_real_deit_tiny_classifies_images(shared_file):
    weights = shared_file("weights/deit_tiny_patch16_224.pth")
    model = load_model(str(weights), labels_path=shared_file("weights/imagenet_synsets.txt"))
    assert model.config.num_heads == 3 and len(model.config.label_names) == 1000
    assert model.config.label_names[0] == "tench, Tinca tinca"
    preprocess = Preprocessor(model.config.preprocess)
    frames = [np.asarray(Image.open(shared_file(f"data/images/{n}.png")).convert("RGB")) for n in ("chelsea", "coffee")]
    top1 = model(preprocess(frames)).argmax(-1).tolist()
    assert 281 <= top1[0] <= 285
    assert top1[1] == 967 and "espresso" in model.config.label_names[967]
