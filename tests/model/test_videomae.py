"""VideoMAE and Run-Length Tokenization: against transformers' VideoMAEForVideoClassification, packed batches
against clips run alone, and which tubelets RLT drops."""

from __future__ import annotations

import pytest
import torch

from model.config import NAMED_CONFIGS, PreprocessConfig, VideoConfig
from model.loaders import CheckpointError, load_model, videomae_hf_to_model_state_dict
from model.preprocess import Preprocessor, read_video_frames
from model.rlt import classify_clips, pack_tokens, run_length_tokenize, tubelet_changes
from model.videomae import VideoMAE, block_diagonal_mask

transformers = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
    num_frames=8, tubelet_size=2, num_labels=6,
)  # fmt: skip  # 4 tubelets x 4x4 cells = 64 tokens


def random_hf_videomae(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3))
    return model


def clips(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_dense_and_rlt_at_tau_zero_match_transformers(mean_pooling, tmp_path):
    hf = random_hf_videomae(use_mean_pooling=mean_pooling)
    hf.save_pretrained(tmp_path)  # transformers saves q_bias / v_bias, the checkpoints' layout
    ours = load_model(str(tmp_path))
    assert isinstance(ours, VideoMAE) and ours.config.use_mean_pooling == mean_pooling
    x = clips()
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    assert (ours(x) - expected).abs().max() <= 1e-4
    for attention in ("segments", "mask"):
        out = classify_clips(ours, x, tau=0.0, attention=attention)
        assert out.tokens_kept == [64, 64, 64]  # tau = 0 drops nothing
        assert (out.logits - expected).abs().max() <= 1e-4


def test_in_memory_layout_and_missing_keys():
    hf = random_hf_videomae()
    config = load_model_config()
    ours = videomae_hf_to_model_state_dict(hf.state_dict(), config)  # query.bias / value.bias names
    assert torch.equal(ours["blocks.0.attn.qkv.bias"][32:64], torch.zeros(32))  # no key bias in VideoMAE
    state = dict(hf.state_dict())
    del state["classifier.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): head\.bias"):
        videomae_hf_to_model_state_dict(state, config)


def load_model_config() -> VideoConfig:
    from model.loaders import config_from_hf_videomae

    return config_from_hf_videomae(transformers.VideoMAEConfig(**TINY).to_dict())


def partly_static_clips() -> torch.Tensor:
    """Three clips: fully static, half of the cells moving, everything moving (different kept lengths)."""
    gen = torch.Generator().manual_seed(3)
    frame = torch.randn(3, 32, 32, generator=gen)
    static = frame.expand(8, -1, -1, -1).clone()
    half = static.clone()
    half[:, :, :16] += torch.randn(8, 3, 16, 32, generator=gen)  # the top two rows of cells change every frame
    moving = torch.randn(8, 3, 32, 32, generator=gen)
    return torch.stack([static, half, moving])


def test_static_clip_keeps_only_the_first_tubelet():
    config = load_model_config()
    rlt = run_length_tokenize(partly_static_clips(), config, tau=0.1)
    cells, tubelets = 16, 4
    assert rlt.lengths == [cells, cells + 8 * (tubelets - 1), cells * tubelets]
    keep = rlt.keep.view(3, tubelets, cells)
    assert keep[0, 0].all() and not keep[0, 1:].any()  # static: only the first tubelet, at every position
    assert keep[1, 1:, :8].all() and not keep[1, 1:, 8:].any()
    runs = rlt.run_lengths.view(3, tubelets, cells)
    assert (runs[0, 0] == tubelets).all() and (runs[2] == 1).all()  # one kept token stands for the whole run
    assert (runs[1, 0, 8:] == tubelets).all() and (runs[1, :, :8] == 1).all()
    assert rlt.run_lengths.sum(dim=1).tolist() == [cells * tubelets] * 3  # every tubelet is accounted for once
    nothing_dropped = run_length_tokenize(partly_static_clips(), config, tau=0.0)
    assert nothing_dropped.lengths == [64, 64, 64]
    assert tubelet_changes(partly_static_clips(), config)[0].abs().max() == 0


@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_packed_batch_equals_each_clip_alone(attention, tmp_path):
    hf = random_hf_videomae()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    x = partly_static_clips()
    batched = classify_clips(model, x, tau=0.1, attention=attention)
    assert len(set(batched.tokens_kept)) == 3  # three different kept lengths in one packed batch
    for i in range(3):
        alone = classify_clips(model, x[i : i + 1], tau=0.1, attention="segments")
        assert alone.tokens_kept == [batched.tokens_kept[i]]
        assert (batched.logits[i] - alone.logits[0]).abs().max() <= 1e-5
    # the clip with nothing dropped is the dense model; the static one is not (its tokens were dropped)
    with torch.no_grad():
        dense = model(x)
    assert (batched.logits[2] - dense[2]).abs().max() <= 1e-4
    assert (batched.logits[0] - dense[0]).abs().max() > 1e-3


def test_block_diagonal_mask():
    mask = block_diagonal_mask([2, 1])
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_run_length_embedding_is_loaded_and_applied(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = random_hf_videomae()
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    length = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    weights["videomae.embeddings.length_embeddings"] = length
    save_file(weights, tmp_path / "model.safetensors")
    model = load_model(str(tmp_path))
    assert model.config.run_length_embedding and torch.equal(model.length_embed, length)
    x = partly_static_clips()[:1]
    rlt = run_length_tokenize(x, model.config, tau=0.1)
    packed = pack_tokens(model, x, rlt)  # the 16 first-tubelet tokens, each standing for a run of 4
    with torch.no_grad():
        assert torch.allclose(packed, model.embed(x)[0, :16] + length[3])


def test_named_videomae_and_real_video(real_video):
    assert NAMED_CONFIGS["videomae-base"].num_patches == 1568 and NAMED_CONFIGS["videomae-base"].embed_dim == 768
    model = load_model("videomae-small", image_size=(64, 64))
    config = model.config
    assert isinstance(model, VideoMAE) and config.num_patches == 8 * 4 * 4 and config.num_classes == 400
    pre = Preprocessor(PreprocessConfig(resize_shortest=None, resize_to=(64, 64), crop_size=None))
    frames = pre(read_video_frames(real_video, max_frames=32)).view(2, 16, 3, 64, 64)
    kept = {tau: classify_clips(model, frames, tau=tau).tokens_kept for tau in (0.0, 0.1, 0.5)}
    assert kept[0.0] == [128, 128]
    assert all(a >= b for a, b in zip(kept[0.1], kept[0.5], strict=True))
    assert min(kept[0.5]) >= 16  # the first tubelet always stays


def test_videomae_id_from_offline_cache(tmp_path, monkeypatch):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--testorg--tiny-videomae"
    snapshot = repo / "snapshots" / commit
    hf = random_hf_videomae()
    hf.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("testorg/tiny-videomae")
    x = clips(1)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max() <= 1e-4
