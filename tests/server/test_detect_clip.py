"""Detection (YOLOS) and clip (VideoMAE + RLT) models served end to end over the WebSocket (TestClient)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from model.config import DetectorConfig, PreprocessConfig, VideoConfig
from model.rlt import classify_clips
from model.videomae import VideoMAE
from model.yolos import YolosDetector, postprocess_detections
from server.app import create_app
from server.engine.clip_runner import ClipRunner, ClipWindow
from server.engine.detect_runner import DetectRunner
from server.engine.factory import build_runner
from server.settings import Settings
from tests.server.conftest import encode, frames

RESIZE = PreprocessConfig(resize_shortest=None, resize_to=(32, 32), crop_size=None, interpolation="bilinear")
DETECTOR = DetectorConfig(
    image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=3,
    label_names=("N/A", "cat", "dog"), num_detection_tokens=6, mid_position_embeddings=True, preprocess=RESIZE,
)  # fmt: skip
CLIP = VideoConfig(
    image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=4,
    label_names=("walk", "run", "jump", "sit"), num_frames=4, tubelet_size=2, preprocess=RESIZE,
)  # fmt: skip


def _scaled(model):
    model = model.eval().requires_grad_(False)
    with torch.no_grad():  # larger-than-init weights so that frames change the outputs visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def detector() -> YolosDetector:
    return _scaled(YolosDetector(DETECTOR))


@pytest.fixture(scope="module")
def clip_model() -> VideoMAE:
    return _scaled(VideoMAE(CLIP))


@contextlib.contextmanager
def _client(model, **settings) -> Iterator[TestClient]:
    """A started TestClient whose engine has loaded the model (connections before that are refused)."""
    base = dict(model="unused", device="cpu", budget_tokens=4, max_batch_size=4, batch_window_ms=1.0)
    app = create_app(Settings(**{**base, **settings}), model=model)
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(30), "engine did not become ready"
        yield client


def test_build_runner_picks_the_runner_by_model_kind(detector, clip_model):
    settings = Settings(model="unused", device="cpu")
    assert type(build_runner(settings, detector)) is DetectRunner
    assert type(build_runner(settings, clip_model)) is ClipRunner


def test_detection_boxes_over_the_websocket(detector):
    video = frames(4, height=48, width=64)  # decoded 64x48: boxes come back in these pixels
    with _client(detector, detect_threshold=0.0, max_boxes=5) as client:
        with client.websocket_connect("/v1/streams/det") as ws:
            messages = []
            for frame in video:
                ws.send_bytes(encode(frame))
                messages.append(ws.receive_json())
    assert [m["type"] for m in messages] == ["result"] * 4
    assert messages[0]["dense"] and [m["budget"] for m in messages[1:]] == [4, 4, 4]
    # the first (dense) frame's boxes equal the dense model's, post-processed in frame pixels
    image = build_runner(Settings(model="unused", device="cpu"), detector).preprocessor(video[0])
    logits, boxes = detector(image)
    expected = postprocess_detections(logits, boxes, [(48, 64)], threshold=0.0, top_k=5)[0].to_list(
        DETECTOR.label_names
    )
    for m in messages:
        listed = m["outputs"]["boxes"]
        assert len(listed) == 5
        for box in listed:
            assert set(box) == {"label", "score", "box"} and box["label"] in ("N/A", "cat", "dog")
            x0, y0, x1, y1 = box["box"]
            assert -64 <= x0 <= x1 <= 128 and -48 <= y0 <= y1 <= 96  # frame pixels, not normalised
    first = messages[0]["outputs"]["boxes"]
    assert [b["label"] for b in first] == [b["label"] for b in expected]
    for got, want in zip(first, expected, strict=True):  # pytest.approx takes flat sequences only (pytest >= 9.2)
        assert got["score"] == pytest.approx(want["score"])
        assert got["box"] == pytest.approx(want["box"])


def test_clip_actions_every_stride_over_the_websocket(clip_model):
    video = frames(10, height=48, width=64)
    with _client(clip_model, clip_stride=3, rlt_tau=0.0) as client:
        with client.websocket_connect("/v1/streams/clip") as ws:
            messages = []
            for frame in video:
                ws.send_bytes(encode(frame))
                messages.append(ws.receive_json())
    outputs = [m["outputs"] for m in messages]
    assert [o.get("window") for o in outputs[:3]] == [1, 2, 3]  # the window fills: 4 frames per clip
    labelled = [i for i, o in enumerate(outputs) if "action" in o]
    assert labelled == [3, 6, 9]  # full at frame 3, then every 3rd frame
    runner = build_runner(Settings(model="unused", device="cpu", rlt_tau=0.0), clip_model)
    images = runner.preprocessor(video)  # [10, 3, 32, 32]
    for i in labelled:
        action, top = outputs[i]["action"], outputs[i]["top"]
        assert action["label"] == top[0]["label"] and action["label"] in CLIP.label_names
        expected = classify_clips(clip_model, images[i - 3 : i + 1][None], 0.0).logits.softmax(-1)[0]
        assert action["score"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert outputs[i]["tokens_kept"] == outputs[i]["tokens"] == CLIP.num_patches  # tau 0 keeps all
    assert all(o == {"window": 4, "of": 4} for i, o in enumerate(outputs) if i > 3 and i not in labelled)


def test_clip_window_is_a_ring_buffer_and_rlt_drops_a_static_stream(clip_model):
    window = ClipWindow.create(4, (32, 32))
    assert window.nbytes == 4 * 3 * 32 * 32 * 4
    for value in range(6):
        window.push(torch.full((3, 32, 32), float(value)))
    assert window.clip()[:, 0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]  # oldest first
    window.flush()
    assert window.filled == 0
    still = encode(frames(1, height=48, width=64)[0])
    with _client(clip_model, clip_stride=1, rlt_tau=0.1) as client:
        with client.websocket_connect("/v1/streams/still") as ws:
            messages = []
            for _ in range(5):
                ws.send_bytes(still)
                messages.append(ws.receive_json())
    labelled = [m["outputs"] for m in messages if "action" in m["outputs"]]
    assert len(labelled) == 2
    assert all(o["tokens_kept"] == 16 for o in labelled)  # a still camera: only the first tubelet's 16 tokens
