"""OWLv2: our dense detector and its HF loader against transformers' Owlv2ForObjectDetection, the eventful vision
encoder against the dense one (full budgets, batches, one compiled graph), the query cache and the post-processing
(boxes in the pixels of a non-square frame)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.config import CLIP_MEAN, CLIP_STD, NAMED_CONFIGS, Owlv2Config, PreprocessConfig
from model.eventful import INT64_MAX, INT64_MIN, EventfulConfig, full_budget
from model.loaders import adapt_image_size, config_from_hf_owlv2, load_model, owlv2_hf_to_model_state_dict
from model.owlv2 import (
    EventfulOwlv2,
    Owlv2Detector,
    Owlv2Preprocessor,
    QueryCache,
    load_tokenizer,
    pad_to_square,
    pad_token_ids,
    postprocess_owlv2,
)
from model.policy import StreamBudget
from model.preprocess import Preprocessor
from tests.model.test_eventful import assert_alone_equals_batched, video

transformers = pytest.importorskip("transformers")

VOCAB = 40  # BOS = 38, EOS = 39 (the highest id: transformers pools the argmax of the ids), pad 0


def random_hf_owlv2(image_size: int = 64, seed: int = 0):
    """A tiny transformers OWLv2 with weights far from its init, so every term of the forward pass matters."""
    config = transformers.Owlv2Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=VOCAB - 2,
                         eos_token_id=VOCAB - 1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            elif p.dim() > 0:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3))
    return model


def query_ids(seed: int = 0, queries: int = 3, length: int = 16) -> torch.Tensor:
    """[Q, length]: BOS, 2..6 random tokens, EOS, then padding 0."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(queries):
        n = int(torch.randint(2, 7, (1,), generator=gen))
        rows.append([VOCAB - 2, *torch.randint(1, VOCAB - 2, (n,), generator=gen).tolist(), VOCAB - 1])
    return pad_token_ids(rows, length)


# --------------------------------------------------------------------------- dense, against transformers


@pytest.mark.parametrize("image_size", [None, (96, 80)])
def test_dense_matches_transformers_through_the_hf_loader(image_size, tmp_path):
    """Saved at 64 x 64; at another (non-square) size transformers interpolates its position embeddings and box
    bias at run time (interpolate_pos_encoding), our loader resamples them once."""
    hf = random_hf_owlv2()
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path), image_size=image_size)
    assert isinstance(ours, Owlv2Detector) and ours.config.num_prefix_tokens == 1
    h, w = image_size or (64, 64)
    assert ours.config.num_tokens == 1 + (h // 8) * (w // 8)
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    ids = query_ids()
    with torch.no_grad():
        expected = hf(input_ids=ids.repeat(2, 1), pixel_values=images, interpolate_pos_encoding=image_size is not None)
        logits, boxes = ours(images, ids)
        features = ours.forward_head(ours.forward_features(images))
        objectness = ours.objectness(features)
        queries = ours.encode_text(ids)
    assert logits.shape == expected.logits.shape == (2, (h // 8) * (w // 8), 3)
    assert (logits - expected.logits).abs().max() <= 1e-4
    assert (boxes - expected.pred_boxes).abs().max() <= 1e-4
    assert (objectness - expected.objectness_logits).abs().max() <= 1e-4
    assert (features - expected.image_embeds.flatten(1, 2)).abs().max() <= 1e-4
    assert (queries - expected.text_embeds[0]).abs().max() <= 1e-5
    assert float(boxes.std()) > 0.05 and float(logits.std()) > 0.1  # the comparison is not between constants


def test_queries_are_independent_of_padding_length_and_batch(tmp_path):
    hf = random_hf_owlv2()
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    ids = query_ids(seed=3, queries=4)
    with torch.no_grad():
        full = ours.encode_text(ids)
        short = ours.encode_text(ids[:, :9])  # every query ends by token 8
        one = ours.encode_text(ids[2:3])
    assert (full - short).abs().max() <= 1e-5 and (full[2:3] - one).abs().max() <= 1e-5
    assert torch.allclose(full.norm(dim=-1), torch.ones(4))


def test_loader_refuses_other_activations(tmp_path):
    hf = random_hf_owlv2()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quick_gelu"):
        load_model(str(tmp_path))


def test_named_architecture_is_the_released_layout():
    """transformers' OWLv2 defaults with the 960 px vision input (google/owlv2-base-patch16-ensemble's config.json)
    read back as the named architecture."""
    hf_config = transformers.Owlv2Config(vision_config=dict(image_size=960, patch_size=16))
    assert config_from_hf_owlv2(hf_config.to_dict()) == NAMED_CONFIGS["owlv2-base-patch16"]


@pytest.mark.slow
def test_owlv2_base_matches_transformers_at_320():
    """OWLv2-B/16 (ViT-B vision encoder, CLIP-B text encoder) with its 60 x 60 position grid resampled to 20 x 20,
    converted in memory, against transformers interpolating at run time."""
    torch.manual_seed(0)
    hf = transformers.Owlv2ForObjectDetection(transformers.Owlv2Config(vision_config=dict(image_size=960))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "position_embedding" in name or "class_embedding" in name:
                p.normal_(0, 0.2)
    config = NAMED_CONFIGS["owlv2-base-patch16"].with_image_size((320, 320))
    ours = Owlv2Detector(config).eval()
    ours.load_state_dict(owlv2_hf_to_model_state_dict(hf.state_dict(), config, old_grid=(60, 60)))
    images = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(4))
    ids = pad_token_ids([[49406, 320, 2368, 49407], [49406, 1929, 49407]], 16)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=images, interpolate_pos_encoding=True)
        logits, boxes = ours(images, ids)
        features = ours.forward_head(ours.forward_features(images))
    assert (features - expected.image_embeds.flatten(1, 2)).abs().max() <= 1e-4
    assert (boxes - expected.pred_boxes).abs().max() <= 1e-4
    # transformers' init gives logits up to ~3,000 (large per-patch scales): fp32 rounding of the cosines, times
    # that scale, is the difference, so the bound is relative
    scale = float(expected.logits.abs().max())
    assert (logits - expected.logits).abs().max() <= 1e-5 * max(scale, 10.0)


def test_named_owlv2_base():
    config = NAMED_CONFIGS["owlv2-base-patch16"]
    assert isinstance(config, Owlv2Config) and config.grid_size == (60, 60) and config.num_tokens == 3601
    assert (config.text_embed_dim, config.text_depth, config.max_text_tokens) == (512, 12, 16)
    model = load_model("owlv2-base-patch16", image_size=(128, 128))
    assert isinstance(model, Owlv2Detector) and model.config.num_tokens == 1 + 64
    assert model.config.preprocess.resize_to == (128, 128) and model.config.preprocess.mean == CLIP_MEAN
    with torch.no_grad():
        logits, boxes = model(torch.zeros(1, 3, 128, 128), pad_token_ids([[49406, 320, 49407]], 16))
    assert logits.shape == (1, 64, 1) and boxes.shape == (1, 64, 4)


# --------------------------------------------------------------------------- the eventful vision encoder

# 48x64 frames (tests/model/test_eventful.py's video) at patch 8: a 6x8 grid + the class token
CONFIG = Owlv2Config(
    image_size=(48, 64), patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_dim=128, text_embed_dim=32,
    text_depth=2, text_heads=2, text_mlp_dim=64, vocab_size=VOCAB, projection_dim=32,
    preprocess=PreprocessConfig(resize_shortest=None, resize_to=(48, 64), crop_size=None, interpolation="bilinear",
                                mean=CLIP_MEAN, std=CLIP_STD),
)  # fmt: skip
LEVELS = ["tokenwise", "qk", "full"]


def visible_owlv2(config: Owlv2Config) -> Owlv2Detector:
    """An OWLv2 with larger-than-init random weights (seeded), so that frames and queries change its outputs
    visibly."""
    torch.manual_seed(0)
    model = Owlv2Detector(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3))
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def owlv2() -> Owlv2Detector:
    return visible_owlv2(CONFIG)


def dense(model: Owlv2Detector, frames: torch.Tensor, queries: torch.Tensor):
    with torch.no_grad():
        features = model.forward_head(model.forward_features(frames))
        return features, model.class_logits(features, queries), model.boxes(features)


@pytest.mark.parametrize("level", LEVELS)
def test_full_budget_equals_dense_frame_after_frame(owlv2, level):
    """Stream A at full budget runs beside a sparse stream B, so it takes the gather/scatter path with every token
    selected (not the dense shortcut); its features, logits and boxes equal the dense model's on every frame."""
    runner = EventfulOwlv2(owlv2, EventfulConfig(level=level))
    states = [runner.new_state(), runner.new_state()]
    frames, others = video(), video(seed=9)
    queries = owlv2.encode_text(query_ids(queries=4)[:, :8])
    features, logits, boxes = dense(owlv2, frames, queries)
    n = CONFIG.num_patches
    for t in range(len(frames)):
        out = runner.step(torch.stack([frames[t], others[t]]), states, [full_budget(n), StreamBudget(tokens=6)])
        step_logits, step_boxes = runner.detect(out.logits, torch.stack([queries, queries.flip(0)]))
        assert out.logits.shape == (2, n, CONFIG.embed_dim) and step_logits.shape == (2, n, 4)
        assert (out.logits[0] - features[t]).abs().max() <= 1e-4
        assert (step_logits[0] - logits[t]).abs().max() <= 1e-4  # per-stream queries: [B, Q, D]
        assert (step_logits[1] - runner.detect(out.logits[1:], queries.flip(0))[0][0]).abs().max() <= 1e-5
        assert (step_boxes[0] - boxes[t]).abs().max() <= 1e-4
        assert out.macs[0] == out.dense_macs
        assert int(out.updated_tokens[1].min()) >= 1  # the class token passes every gate of the sparse stream
        if t > 0:
            assert int(out.updated_tokens[1, :, 0].max()) == 1 + 6 and out.macs[1] < out.dense_macs


def test_sparse_frames_drift_and_a_seed_restores_exactness(owlv2):
    runner = EventfulOwlv2(owlv2)
    state = runner.new_state()
    frames = video()
    queries = owlv2.encode_text(query_ids()[:, :8])
    features, logits, _ = dense(owlv2, frames, queries)
    for t in range(5):
        out = runner.step(frames[t : t + 1], [state], [StreamBudget(tokens=8)])
    assert (out.logits[0] - features[4]).abs().max() > 1e-3  # only 8 of 48 patches per gate: an approximation
    runner.step(frames[5:6], [state], [full_budget(CONFIG.num_patches)], seeds=[True])
    again = runner.step(frames[5:6], [state], [StreamBudget(tokens=8)], seeds=[False])  # nothing changed: exact
    assert (runner.detect(again.logits, queries)[0][0] - logits[5]).abs().max() <= 1e-4


def test_a_stream_alone_equals_the_same_stream_in_a_batch(owlv2):
    runner = EventfulOwlv2(owlv2, EventfulConfig(level="tokenwise"))
    assert_alone_equals_batched(
        runner, [StreamBudget(tokens=5), StreamBudget(tokens=20), StreamBudget(threshold=0.3, tokens=12)], 6)


@pytest.mark.parametrize("level", LEVELS)
def test_every_step_kind_compiles_into_one_graph(owlv2, level):
    """No graph break in the sparse, seeding and plain steps (dynamo, fullgraph), and the traced step computes what
    the eager one does (on copies of the same pool)."""
    runner = EventfulOwlv2(owlv2, EventfulConfig(level=level), slots=2)
    states = [runner.new_state() for _ in range(2)]
    runner.step(torch.stack([video(seed=40)[0], video(seed=41)[0]]), states, [StreamBudget(tokens=4)] * 2)
    frame = torch.stack([video(seed=40)[1], video(seed=41)[1]])
    slots = torch.tensor([s.slot for s in states])
    width = 1 + 8
    limits = torch.full((2, width), INT64_MAX)
    limits[0, :] = INT64_MIN  # row 0: r = 8; row 1: r = 3
    limits[1, : 1 + 3] = INT64_MIN
    for kind, fn in (("sparse", runner._sparse_step), ("seed", runner._seed_step), ("plain", runner._plain_step)):
        eager_layers = [{k: t.clone() for k, t in layer.items()} for layer in runner.pool.layers]
        traced_layers = [{k: t.clone() for k, t in layer.items()} for layer in runner.pool.layers]
        torch._dynamo.reset()
        with torch.inference_mode():
            expected = fn(frame, slots, limits, eager_layers)
            traced = torch.compile(fn, fullgraph=True, dynamic=False, backend="eager")(frame, slots, limits,
                                                                                       traced_layers)
        assert (expected[1] - traced[1]).abs().max() <= 1e-5, kind
        for a, b in zip(eager_layers, traced_layers, strict=True):
            for name in a:
                assert (a[name] - b[name]).abs().max() <= 1e-5, (kind, name)


# --------------------------------------------------------------------------- queries


def tiny_tokenizer_dir(tmp_path):
    """A CLIP BPE tokenizer over a 16-token vocabulary ('!' is 0, the pad; EOS the highest id), saved as a
    directory the way save_pretrained writes one."""
    vocab = {"!": 0, "a": 1, "c": 2, "t": 3, "d": 4, "o": 5, "g": 6, "a</w>": 7, "t</w>": 8, "g</w>": 9, "ca": 10,
             "cat</w>": 11, "do": 12, "dog</w>": 13, "<|startoftext|>": 14, "<|endoftext|>": 15}
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!").save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def test_query_cache_encodes_once_per_change(owlv2):
    cache = QueryCache(owlv2)
    first = cache.update([[38, 5, 7, 39], [38, 9, 39]])
    assert cache.encodes == 1 and first.shape == (2, CONFIG.projection_dim)
    assert cache.update([[38, 5, 7, 39], [38, 9, 39]]) is first and cache.encodes == 1  # same list: no encode
    second = cache.update([[38, 9, 39]])
    assert cache.encodes == 2 and torch.allclose(second, first[1:])
    assert cache.labels == ("38 9 39",)
    cache.update([[38, 5, 7, 39], [38, 9, 39]], labels=["a cat", "a dog"])
    assert cache.encodes == 3 and cache.labels == ("a cat", "a dog")
    with pytest.raises(ValueError, match="tokenizer"):
        cache.update(["a cat"])


def test_string_queries_through_a_local_tokenizer(owlv2, tmp_path):
    tokenizer = load_tokenizer(tiny_tokenizer_dir(tmp_path))
    cache = QueryCache(owlv2, tokenizer)
    by_text = cache.update(["a cat", "dog"])
    assert cache.labels == ("a cat", "dog") and cache.encodes == 1
    by_ids = QueryCache(owlv2).update([[14, 7, 11, 15], [14, 13, 15]])
    assert (by_text - by_ids).abs().max() <= 1e-6
    cache.update(["a cat", "dog"])
    assert cache.encodes == 1
    long = pad_token_ids([[14, *range(1, 20), 15]], 16)  # truncated to 15 tokens + EOS
    assert long[0].tolist() == [14, *range(1, 15), 15]


# --------------------------------------------------------------------------- frames in, detections out


def test_postprocess_matches_transformers_and_maps_boxes_to_non_square_frames():
    gen = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(2, 6, 3, generator=gen)
    boxes = torch.rand(2, 6, 4, generator=gen) * 0.4 + 0.1
    sizes = [(60, 100), (120, 90)]  # landscape and portrait: padded to 100 x 100 and 120 x 120

    class Outputs:
        pass

    outputs = Outputs()
    outputs.logits, outputs.pred_boxes = logits, boxes
    expected = transformers.Owlv2ImageProcessor().post_process_object_detection(outputs, threshold=0.3,
                                                                                target_sizes=sizes)
    ours = postprocess_owlv2(logits, boxes, sizes, threshold=0.3)
    for mine, theirs in zip(ours, expected, strict=True):
        order = theirs["scores"].argsort(descending=True)
        assert len(mine.scores) > 0
        assert torch.allclose(mine.scores, theirs["scores"][order])
        assert torch.equal(mine.labels, theirs["labels"][order])
        assert torch.allclose(mine.boxes, theirs["boxes"][order], atol=1e-4)
    # an object at x 20..40, y 30..50 of a 60 x 100 frame: in the padded 100 x 100 square, (0.3, 0.4, 0.2, 0.2)
    one = postprocess_owlv2(torch.tensor([[[5.0, -5.0]]]), torch.tensor([[[0.3, 0.4, 0.2, 0.2]]]), [(60, 100)])[0]
    assert torch.allclose(one.boxes, torch.tensor([[20.0, 30.0, 40.0, 50.0]]), atol=1e-4)
    listed = one.to_list(("a cat", "a dog"))
    assert listed == [{"label": "a cat", "score": round(float(torch.sigmoid(torch.tensor(5.0))), 4),
                       "box": [20.0, 30.0, 40.0, 50.0]}]


def test_preprocessor_pads_frames_to_a_square_before_the_resize():
    config = adapt_image_size(CONFIG, (48, 48))
    gen = np.random.default_rng(0)
    frame = gen.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # landscape: padded below to 50 x 50
    images = Owlv2Preprocessor(config)(frame)
    padded = pad_to_square(torch.from_numpy(frame).permute(2, 0, 1))
    assert padded.shape == (50, 50, 3) and int(padded[30:].abs().sum()) == 0
    assert torch.equal(padded[:30], torch.from_numpy(frame))
    assert images.shape == (1, 3, 48, 48)
    assert torch.equal(images, Preprocessor(config.preprocess)(padded.numpy()))
    black = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(images[0, :, -1, -1], black, atol=1e-6)  # the padding is black, then normalised
