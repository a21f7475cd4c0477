"""YOLOS: our dense detector against transformers' YolosForObjectDetection, the eventful detector against our
dense one on a real video, and the post-processing."""

from __future__ import annotations

import pytest
import torch

from model.config import COCO_LABELS, NAMED_CONFIGS, DetectorConfig, PreprocessConfig
from model.eventful import EventfulConfig, EventfulViT, full_budget
from model.loaders import load_model
from model.macs import dense_macs
from model.policy import StreamBudget
from model.preprocess import Preprocessor, read_video_frames
from model.yolos import YolosDetector, box_iou, boxes_to_corners, postprocess_detections

transformers = pytest.importorskip("transformers")


def random_hf_yolos(mid: bool, seed: int = 0, **overrides):
    """A tiny transformers YOLOS with weights far from its init, so every term of the forward pass matters."""
    config = transformers.YolosConfig(
        **{
            **dict(
                hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=[48, 64],
                patch_size=8, num_detection_tokens=5, use_mid_position_embeddings=mid, num_labels=7,
            ),  # fmt: skip
            **overrides,
        }
    )
    torch.manual_seed(seed)
    model = transformers.YolosForObjectDetection(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3))
    return model


@pytest.mark.parametrize("mid", [False, True])
@pytest.mark.parametrize("image_size", [None, (64, 96)])
def test_dense_matches_transformers(mid, image_size, tmp_path):
    hf = random_hf_yolos(mid)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path), image_size=image_size)
    assert isinstance(ours, YolosDetector)
    assert ours.config.num_detection_tokens == 5 and ours.config.mid_position_embeddings == mid
    h, w = image_size or (48, 64)
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixel_values=images)  # transformers interpolates its position embeddings to (h, w)
    logits, boxes = ours(images)
    assert logits.shape == (2, 5, 8) and boxes.shape == (2, 5, 4)
    assert (logits - expected.logits).abs().max() <= 1e-4
    assert (boxes - expected.pred_boxes).abs().max() <= 1e-4


def test_postprocess_matches_transformers_processor():
    image_processor = transformers.YolosImageProcessor()
    gen = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(2, 6, 5, generator=gen)
    boxes = torch.rand(2, 6, 4, generator=gen) * 0.5 + 0.1
    sizes = [(240, 320), (480, 640)]

    class Outputs:
        pass

    outputs = Outputs()
    outputs.logits, outputs.pred_boxes = logits, boxes
    expected = image_processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=sizes)
    ours = postprocess_detections(logits, boxes, sizes, threshold=0.3, top_k=100)
    for mine, theirs in zip(ours, expected, strict=True):
        order = theirs["scores"].argsort(descending=True)
        assert torch.allclose(mine.scores, theirs["scores"][order])
        assert torch.equal(mine.labels, theirs["labels"][order])
        assert torch.allclose(mine.boxes, theirs["boxes"][order], atol=1e-4)
    top2 = postprocess_detections(logits, boxes, sizes, threshold=0.0, top_k=2)
    assert [len(d.scores) for d in top2] == [2, 2] and bool(top2[0].scores[0] >= top2[0].scores[1])
    listed = top2[0].to_list(("a", "b", "c", "d"))
    assert set(listed[0]) == {"label", "score", "box"} and len(listed[0]["box"]) == 4


def test_box_helpers():
    corners = boxes_to_corners(torch.tensor([[0.5, 0.5, 0.2, 0.4]]))
    assert torch.allclose(corners, torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))


def test_named_yolos_tiny():
    model = load_model("yolos-tiny", image_size=(96, 128))
    assert isinstance(model, YolosDetector)
    assert model.config.label_names == COCO_LABELS and model.config.num_classes == 91
    assert model.config.num_tokens == 1 + 100 + 6 * 8
    logits, boxes = model(torch.zeros(1, 3, 96, 128))
    assert logits.shape == (1, 100, 92) and boxes.shape == (1, 100, 4)
    assert NAMED_CONFIGS["yolos-small"].mid_position_embeddings


# --------------------------------------------------------------------------- eventful


VIDEO_CONFIG = DetectorConfig(
    image_size=(96, 128), patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_dim=128, layer_norm_eps=1e-12,
    num_classes=7, num_detection_tokens=10, mid_position_embeddings=True,
    preprocess=PreprocessConfig(resize_shortest=None, resize_to=(96, 128), crop_size=None, interpolation="bilinear"),
)  # fmt: skip


@pytest.fixture(scope="module")
def detector_and_frames(real_video):
    model = YolosDetector(VIDEO_CONFIG).eval().requires_grad_(False)
    model.init_random_weights(3)
    with torch.no_grad():  # larger-than-init weights so changes propagate visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    frames = Preprocessor(VIDEO_CONFIG.preprocess)(read_video_frames(real_video, max_frames=12))
    with torch.no_grad():
        dense_logits, dense_boxes = model(frames)
    return model, frames, dense_logits, dense_boxes


@pytest.mark.parametrize("level", ["tokenwise", "qk", "full"])
def test_eventful_full_budget_equals_dense_on_real_video(detector_and_frames, level):
    """Stream A at full budget runs inside a batch with a sparse stream B, so it takes the gather/scatter path with
    every token selected (not the dense shortcut); its logits and boxes equal the dense model's on every frame."""
    model, frames, dense_logits, dense_boxes = detector_and_frames
    runner = EventfulViT(model, EventfulConfig(level=level))
    states = [runner.new_state(), runner.new_state()]
    n = VIDEO_CONFIG.num_patches
    for t in range(len(frames)):
        pair = torch.stack([frames[t], frames[t]])
        out = runner.step(pair, states, [full_budget(n), StreamBudget(tokens=n // 4)])
        boxes = model.forward_boxes(out.tokens)
        assert (out.logits[0] - dense_logits[t]).abs().max() <= 1e-4
        assert (boxes[0] - dense_boxes[t]).abs().max() <= 1e-4
        # detection (and class) tokens pass every gate of the sparse stream
        assert int(out.updated_tokens[1].min()) >= 1 + VIDEO_CONFIG.num_detection_tokens
        if t > 0:
            assert int(out.updated_tokens[1, :, 0].max()) == 1 + VIDEO_CONFIG.num_detection_tokens + n // 4


def test_eventful_sparse_budget_approximates_and_saves_macs(detector_and_frames):
    model, frames, dense_logits, dense_boxes = detector_and_frames
    runner = EventfulViT(model)
    state = runner.new_state()
    n = VIDEO_CONFIG.num_patches
    errors, macs = [], []
    for t in range(len(frames)):
        out = runner.step(frames[t : t + 1], [state], [StreamBudget(tokens=n // 2)])
        errors.append(float((model.forward_boxes(out.tokens)[0] - dense_boxes[t]).abs().max()))
        macs.append(out.macs[0])
    assert errors[0] <= 1e-4 and max(errors[1:]) > 1e-6  # first frame dense, then approximate
    assert max(macs[1:]) < dense_macs(VIDEO_CONFIG) == macs[0]
    # plain dense shortcut (every stream at full budget) equals dense too
    out = runner.step(frames[-1:], [state], [full_budget(n)])
    assert (out.logits[0] - dense_logits[-1]).abs().max() <= 1e-4


# --------------------------------------------------------------------------- loaders


def test_hf_layouts_old_mid_key_and_offline_cache(tmp_path, monkeypatch):
    """Mid-position embeddings as encoder.mid_position_embeddings (on disk) or encoder.interpolation.* (in memory,
    transformers 5) both load; a YOLOS id resolves
    through huggingface_hub's offline cache layout (models--org--name/refs/main -> snapshots/<commit>/)."""
    from safetensors.torch import load_file, save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--testorg--tiny-yolos"
    snapshot = repo / "snapshots" / commit
    hf = random_hf_yolos(mid=True)
    hf.save_pretrained(snapshot)
    weights = load_file(snapshot / "model.safetensors")
    names = ["vit.encoder.mid_position_embeddings", "vit.encoder.interpolation.mid_position_embeddings"]
    saved = names[0] if names[0] in weights else names[1]
    weights[names[1 - names.index(saved)]] = weights.pop(saved)  # the other layout of the two
    save_file(weights, snapshot / "model.safetensors")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("testorg/tiny-yolos")
    assert isinstance(model, YolosDetector) and model.config.label_names == tuple(hf.config.id2label.values())
    images = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(pixel_values=images)
    logits, boxes = model(images)
    assert (logits - expected.logits).abs().max() <= 1e-4 and (boxes - expected.pred_boxes).abs().max() <= 1e-4


def test_yolos_checkpoint_errors_name_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    from model.loaders import CheckpointError

    random_hf_yolos(mid=False).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["bbox_predictor.layers.2.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): box_head\.layers\.2\.bias"):
        load_model(str(tmp_path))
