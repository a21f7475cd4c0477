"""ViTDet: the dense backbone and its loader against transformers' VitDetModel, and the eventful token-wise step
against the dense backbone (full budgets, batches, gate counts, one compiled graph)."""

from __future__ import annotations

import pytest
import torch

from model.config import NAMED_CONFIGS, ViTDetConfig
from model.eventful import INT64_MAX, INT64_MIN, EventfulConfig, full_budget
from model.loaders import CheckpointError, load_model, vitdet_hf_to_model_state_dict
from model.policy import StreamBudget
from model.pool import StatePool
from model.vitdet import EventfulViTDet, ViTDetBackbone, vitdet_dense_macs, window_rows
from tests.model.test_eventful import assert_alone_equals_batched, video

transformers = pytest.importorskip("transformers")

# 48x64 frames (tests/model/test_eventful.py's video) at patch 8: a 6x8 grid, windows of 4 padded to 8x8
CONFIG = ViTDetConfig(
    image_size=(48, 64), patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_dim=128, window_size=4,
    window_block_indices=(0, 2),
)  # fmt: skip


@pytest.fixture(scope="module")
def vitdet() -> ViTDetBackbone:
    torch.manual_seed(0)
    model = ViTDetBackbone(CONFIG).eval()
    with torch.no_grad():  # larger-than-init weights so changes propagate visibly
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5) if p.dim() > 1 else 0.3 * torch.randn_like(p))
    return model.requires_grad_(False)


def random_hf_vitdet(seed: int = 0, **overrides):
    """A transformers VitDetModel with weights far from its init, so every term of the forward pass matters."""
    options = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=[64, 96],
                   pretrain_image_size=32, patch_size=16, window_size=4, window_block_indices=[0, 2],
                   use_relative_position_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.VitDetModel(transformers.VitDetConfig(**{**options, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3))
    return model


def hf_features(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=images).last_hidden_state


# --------------------------------------------------------------------------- dense, against transformers


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])  # 4x4 and 4x6 grids, windows of 4 (the second padded)
def test_dense_matches_transformers_through_the_hf_loader(size, tmp_path):
    hf = random_hf_vitdet(image_size=list(size))
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    assert isinstance(ours, ViTDetBackbone) and ours.config.num_prefix_tokens == 0
    assert ours.config.window_block_indices == (0, 2) and ours.config.layer_norm_eps == 1e-6
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    reference = hf_features(hf, images)
    assert ours(images).shape == reference.shape == (2, 64, size[0] // 16, size[1] // 16)
    assert (ours(images) - reference).abs().max() <= 1e-4


def test_loader_resamples_positions_to_another_input_size(tmp_path):
    """Saved for 64x64, run at 64x96: transformers resamples the position embeddings (bicubic, from the pretraining
    grid) and the global block's relative positions (linear) at run time; our loader does it once."""
    hf = random_hf_vitdet(image_size=64, window_block_indices=[1], num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path), image_size=(64, 96))
    assert ours.blocks[0].attn.rel_pos_w.shape[0] == 2 * 6 - 1 and ours.blocks[1].attn.rel_pos_w.shape[0] == 7
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    assert (ours(images) - hf_features(hf, images)).abs().max() <= 1e-4


def test_without_relative_positions_and_residual_blocks_refused(tmp_path):
    hf = random_hf_vitdet(use_relative_position_embeddings=False)
    hf.save_pretrained(tmp_path / "plain")
    ours = load_model(str(tmp_path / "plain"))
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    assert (ours(images) - hf_features(hf, images)).abs().max() <= 1e-4
    random_hf_vitdet(residual_block_indices=[1]).save_pretrained(tmp_path / "residual")
    with pytest.raises(CheckpointError, match="residual conv blocks"):
        load_model(str(tmp_path / "residual"))


@pytest.mark.slow
def test_vitdet_base_matches_transformers_at_448():
    """ViTDet-B (768 wide, 12 blocks, windows of 14, global blocks 2, 5, 8, 11) at 448x448, converted in memory."""
    windowed = [0, 1, 3, 4, 6, 7, 9, 10]
    hf = transformers.VitDetModel(transformers.VitDetConfig(
        image_size=448, pretrain_image_size=224, window_size=14, window_block_indices=windowed,
        use_relative_position_embeddings=True)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "rel_pos" in name or "position" in name:
                p.normal_(0, 0.2)
    config = NAMED_CONFIGS["vitdet-base-patch16-1024"].with_image_size((448, 448))
    ours = ViTDetBackbone(config)
    ours.load_state_dict(vitdet_hf_to_model_state_dict(hf.state_dict(), config))
    images = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(images) - hf_features(hf, images)).abs().max() <= 1e-4


def test_named_architecture_and_state_bytes():
    model = load_model("vitdet-base-patch16-1024", image_size=(448, 448))
    config = model.config
    assert isinstance(model, ViTDetBackbone) and config.grid_size == (28, 28) and config.num_tokens == 784
    assert [i for i in range(12) if not config.is_windowed(i)] == [2, 5, 8, 11]
    assert model.blocks[2].attn.rel_pos_h.shape == (55, 64) and model.blocks[0].attn.rel_pos_h.shape == (27, 64)
    for size, padded in ((672, 42 * 42), (1024, 70 * 70)):  # 42 = 3 windows of 14; 64 padded to 70
        sized = config.with_image_size((size, size))
        n, c = sized.num_tokens, sized.embed_dim
        assert sized.padded_tokens == padded
        # per block 4NC (references, updates) + 2C per key row: N rows (global) or N_pad rows (windowed), float32
        expected = 4 * (12 * 4 * n * c + 4 * 2 * n * c + 8 * 2 * padded * c)
        assert StatePool(sized, "tokenwise").bytes_per_slot == expected


# --------------------------------------------------------------------------- the eventful step


def test_only_the_token_wise_level():
    model = ViTDetBackbone(CONFIG)
    for level in ("qk", "full"):
        with pytest.raises(ValueError, match="token-wise level only"):
            EventfulViTDet(model, EventfulConfig(level=level))


def test_pool_keeps_windowed_keys_window_major_with_the_padding_rows_of_a_zero_token(vitdet):
    runner = EventfulViTDet(vitdet, slots=2)
    state = runner.new_state()
    frames = video()
    layers = runner.pool.layers
    assert layers[0]["key_values"].shape == (3, 64, 128) and layers[1]["key_values"].shape == (3, 48, 128)
    runner.step(frames[:1], [state], [StreamBudget(tokens=6)])
    runner.step(frames[1:2], [state], [StreamBudget(tokens=6)])
    padding = sorted(set(range(64)) - set(window_rows(CONFIG).tolist()))
    assert len(padding) == 16
    bias = vitdet.blocks[0].attn.qkv.bias[64:]
    assert torch.equal(layers[0]["key_values"][state.slot, padding], bias.expand(16, -1))


@pytest.mark.parametrize("gate_position", ["normed", "residual"])
def test_full_budget_equals_dense_frame_after_frame(vitdet, gate_position):
    runner = EventfulViTDet(vitdet, EventfulConfig(gate_position=gate_position))
    state, other = runner.new_state(), runner.new_state()
    frames, others = video(), video(seed=9)
    dense = vitdet(frames)
    for t in range(len(frames)):  # beside a sparse stream: the full budget runs the eventful step, not the plain one
        out = runner.step(torch.stack([frames[t], others[t]]), [state, other],
                          [full_budget(CONFIG.num_patches), StreamBudget(tokens=5)])
        assert (out.logits[:1] - dense[t : t + 1]).abs().max() <= 1e-4
        assert out.updated_tokens[0].min() == CONFIG.num_tokens
        assert out.macs[0] == out.dense_macs == vitdet_dense_macs(CONFIG)


def test_sparse_budget_after_a_full_budget_frame_is_exact(vitdet):
    runner = EventfulViTDet(vitdet)
    state = runner.new_state()
    frames = video()
    sparse = StreamBudget(tokens=6)
    for t in range(4):  # drift: the sparse frames differ from dense
        out = runner.step(frames[t : t + 1], [state], [sparse])
    assert (out.logits - vitdet(frames[3:4])).abs().max() > 1e-3
    runner.step(frames[4:5], [state], [full_budget(CONFIG.num_patches)], seeds=[True])
    again = runner.step(frames[4:5], [state], [sparse], seeds=[False])  # nothing changed since: exact
    assert not again.dense_frame[0] and again.macs[0] < again.dense_macs
    assert (again.logits - vitdet(frames[4:5])).abs().max() <= 1e-4


def test_a_stream_alone_equals_the_same_stream_in_a_batch_of_three(vitdet):
    runner = EventfulViTDet(vitdet)
    assert_alone_equals_batched(
        runner, [StreamBudget(tokens=5), StreamBudget(tokens=20), StreamBudget(threshold=0.3, tokens=12)], 6)


def test_selected_tokens_per_gate_follow_the_budget(vitdet):
    runner = EventfulViTDet(vitdet)
    state, capped = runner.new_state(), runner.new_state()
    frames = video()
    runner.step(frames[:1], [state], [StreamBudget(tokens=7)])
    runner.step(frames[:1], [capped], [StreamBudget(tokens=7)])
    out = runner.step(frames[1:2], [state], [StreamBudget(tokens=7)])
    assert out.updated_tokens[0].tolist() == [[7, 7, 7]] * CONFIG.depth
    smaller = runner.step(frames[2:3], [state], [StreamBudget(tokens=3)])
    assert out.dense_macs > out.macs[0] > smaller.macs[0]
    out = runner.step(frames[1:2], [capped], [StreamBudget(threshold=0.5, tokens=9)])
    counts = out.updated_tokens[0]
    assert (counts <= 9).all() and torch.equal(counts[:, 0], counts[:, 1])  # token-wise: proj follows qkv


def _trace(fn, *args):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False, backend="eager")(*args)


@pytest.mark.parametrize("rows", [1, 2])
def test_every_step_kind_compiles_into_one_graph(vitdet, rows):
    runner = EventfulViTDet(vitdet, slots=rows)
    pool = runner.pool
    states = [runner.new_state() for _ in range(rows)]
    runner.step(torch.stack([video(seed=40 + j)[0] for j in range(rows)]), states, [StreamBudget(tokens=4)] * rows)
    slots = torch.tensor([s.slot for s in states])
    limits = torch.full((rows, 9), INT64_MAX)
    limits[0, :7] = INT64_MIN  # row 0: r = 7; the others r = 3
    limits[1:, :3] = INT64_MIN
    frame = torch.stack([video(seed=40 + j)[1] for j in range(rows)])
    for kind, fn in (("sparse", runner._sparse_step), ("seed", runner._seed_step), ("plain", runner._plain_step)):
        eager_layers = [{k: t.clone() for k, t in layer.items()} for layer in pool.layers]
        traced_layers = [{k: t.clone() for k, t in layer.items()} for layer in pool.layers]
        with torch.inference_mode():
            expected = fn(frame, slots, limits, eager_layers)
            traced = _trace(fn, frame, slots, limits, traced_layers)
        assert (expected[1] - traced[1]).abs().max() <= 1e-5, kind
        for a, b in zip(eager_layers, traced_layers, strict=True):
            for name in a:
                assert (a[name] - b[name]).abs().max() <= 1e-5, (kind, name)
