"""Detection (YOLOS) and clip (VideoMAE + RLT) models served end to end over the WebSocket (TestClient); YOLOS
streams under the adaptive policy, audited by box F1 against the dense detections, and clip streams audited against
the plain model (every tubelet), a floor lowering their own tau."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from bench.detect_bench import agreement
from model.clip_audit import ClipAudits
from model.config import DetectorConfig, PreprocessConfig, VideoConfig
from model.rlt import classify_clips
from model.videomae import VideoMAE
from model.yolos import YolosDetector, postprocess_detections
from server.app import create_app
from server.engine.clip_runner import ClipRunner, ClipWindow
from server.engine.detect_runner import DetectRunner
from server.engine.factory import build_runner
from server.settings import Settings
from tests.server.conftest import encode, frames, listed_detections, stream_beside, stream_frames

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


def test_an_adaptive_detector_stream_s_audits_are_box_f1_against_the_dense_model_on_that_frame(detector, audit_log):
    """Each audit's recorded F1 and error equal matching the detections the stream was served on that frame against
    the dense model's own detections of it (bench/detect_bench's agreement)."""
    video = frames(60, height=48, width=64, seed=11)
    body = {"policy": "adaptive", "ratio": 2, "audit_share": 0.5, "min_box_f1": 0.05}
    with _client(detector, detect_threshold=0.0, max_boxes=5, stream_ttl_s=60) as client:
        put = client.put("/v1/streams/det/policy", json=body)
        assert put.status_code == 200, put.text
        messages = stream_frames(client, "det", video)
        view = client.get("/v1/streams/det/policy").json()
        listed = client.get("/v1/streams").json()["streams"]
        metrics = client.get("/metrics").text
    assert [m["type"] for m in messages] == ["result"] * 60
    runner = build_runner(Settings(model="unused", device="cpu"), detector)
    audited_sparse = []
    for t, served, f1, error in audit_log:
        # what the audit compared is what the stream was served on that frame
        listed_boxes = listed_detections(messages[t]["outputs"]["boxes"], DETECTOR.label_names)
        assert torch.equal(served.labels, listed_boxes.labels)
        assert torch.allclose(served.boxes, listed_boxes.boxes, atol=0.051)  # the message rounds to 0.1 px
        logits, boxes = detector(runner.preprocessor(video[t]))
        dense = postprocess_detections(logits, boxes, [(48, 64)], threshold=0.0, top_k=5)[0]
        expected = agreement([dense], [served])
        assert f1 == pytest.approx(1.0 if expected["f1"] is None else expected["f1"]), t
        mean_iou = expected["mean_iou"] if expected["mean_iou"] is not None else float(expected["f1"] is None)
        assert error == pytest.approx(1.0 - mean_iou, abs=1e-5), t
        if not messages[t]["dense"]:
            audited_sparse.append(error)
    assert audited_sparse and max(audited_sparse) > 1e-3  # audits of frames not served densely, boxes that moved
    fidelity = view["fidelity"]
    assert set(fidelity) == {"audits", "source", "box_f1", "box_f1_interval", "mean_iou", "mean_iou_interval"}
    assert fidelity["audits"] == len(audit_log) and 0 <= fidelity["box_f1"] <= 1 and 0 <= fidelity["mean_iou"] <= 1
    assert view["setting"]["min_box_f1"] == 0.05 and view["floor_met"] is True
    assert next(s for s in listed if s["stream_id"] == "det")["policy"]["fidelity"]["box_f1"] == fidelity["box_f1"]
    counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("eventful_")}
    # the audits that ran the dense model (a dense frame's audit is free and not counted)
    assert counts["eventful_audit_box_f1_count"] == counts["eventful_audits_total"] >= len(audited_sparse)
    assert counts["eventful_audit_logit_rel_l2_count"] == 0


def test_a_detector_stream_s_audits_leave_another_stream_s_results_as_they_are(detector):
    """An adaptive stream's audits (dense steps of its own, reseeding its state) change nothing another stream is
    served: its boxes equal those it gets alone."""
    video = frames(12, height=48, width=64, seed=12)
    with _client(detector, detect_threshold=0.0, max_boxes=5) as client:
        alone = stream_frames(client, "plain", video)
        body = {"policy": "adaptive", "ratio": 2, "audit_share": 0.5}
        assert client.put("/v1/streams/audited/policy", json=body).status_code == 200
        together = stream_beside(client, "plain2", "audited", video)
    for got, want in zip(together, alone, strict=True):
        assert got["dense"] == want["dense"] and got["budget"] == want["budget"]
        assert [b["label"] for b in got["outputs"]["boxes"]] == [b["label"] for b in want["outputs"]["boxes"]]
        for c, d in zip(got["outputs"]["boxes"], want["outputs"]["boxes"], strict=True):
            assert c["box"] == pytest.approx(d["box"], abs=0.2) and c["score"] == pytest.approx(d["score"], abs=1e-3)


@pytest.mark.parametrize(
    "model,body,field",
    [
        ("detector", {"policy": "adaptive", "ratio": 2, "min_box_f1": 1.5}, "min_box_f1"),
        ("detector", {"policy": "adaptive", "ratio": 2, "min_box_f1": -0.1}, "min_box_f1"),
        ("detector", {"policy": "adaptive", "ratio": 2, "min_top1_agreement": 0.9}, "min_top1_agreement"),
        ("detector", {"policy": "adaptive", "ratio": 2, "max_rel_l2": 0.5}, "max_rel_l2"),  # a classifier's
        ("detector", {"policy": "skip", "interval": 2, "min_box_f1": 0.5}, "min_box_f1"),  # a floor needs audits
        ("clip_model", {"policy": "skip", "interval": 2}, "policy"),  # RLT decides what a clip computes
        ("clip_model", {"policy": "keyframe", "interval": 4}, "policy"),
        ("clip_model", {"policy": "adaptive", "ratio": 2}, "ratio"),
        ("clip_model", {"policy": "adaptive", "explore": "trial"}, "explore"),
        ("clip_model", {"policy": "adaptive", "explore": "probe"}, "explore"),
        ("clip_model", {"policy": "adaptive", "min_box_f1": 0.5}, "min_box_f1"),
        ("clip_model", {"policy": "adaptive", "audit_share": 0.6}, "audit_share"),
        ("clip_model", {"policy": "adaptive", "min_top1_agreement": 1.5}, "min_top1_agreement"),
    ],
)
def test_bad_detector_and_clip_policies_are_422_naming_the_field(request, model, body, field):
    with _client(request.getfixturevalue(model)) as client:
        response = client.put("/v1/streams/s/policy", json=body)
        assert response.status_code == 422, response.text
        assert field in response.json()["message"]
        assert client.get("/v1/streams/s/policy").json()["policy"] == "eventful"  # nothing changed


@pytest.fixture
def clip_audit_log(monkeypatch) -> list[tuple]:
    """Every clip audit, as (the stream's clip index, its tau then, the logits served, the audit's dense logits)."""
    log: list[tuple] = []
    after = ClipAudits.after_clip

    def recording(self, served, macs, dense_fn):
        clip, tau, seen = self.clips, self.tau, []

        def dense():
            seen.append(dense_fn())
            return seen[-1]

        spent = after(self, served, macs, dense)
        if seen:
            log.append((clip, tau, served, seen[0]))
        return spent

    monkeypatch.setattr(ClipAudits, "after_clip", recording)
    return log


def test_an_adaptive_clip_stream_s_audits_compare_its_clip_with_the_plain_model_on_that_window(clip_model,
                                                                                              clip_audit_log):
    """Each audit compares the logits the stream was served for a clip (RLT at the stream's tau) with the plain
    model's (every tubelet) on the same window; the view and the metrics count them."""
    video = frames(100, height=48, width=64, seed=21)
    with _client(clip_model, clip_stride=1, rlt_tau=0.1) as client:
        put = client.put("/v1/streams/clip/policy", json={"policy": "adaptive", "audit_share": 0.5})
        assert put.status_code == 200, put.text
        messages = stream_frames(client, "clip", video)
        view = client.get("/v1/streams/clip/policy").json()
        metrics = client.get("/metrics").text
    runner = build_runner(Settings(model="unused", device="cpu"), clip_model)
    images = runner.preprocessor(video)  # [100, 3, 32, 32]
    assert len(clip_audit_log) >= 3
    for clip, tau, served, dense in clip_audit_log:
        t = clip + 3  # stride 1: the first clip is due on frame 3 (a 4-frame window)
        window = images[t - 3 : t + 1][None]
        assert tau == 0.1  # no floor: the server's tau throughout
        assert torch.allclose(served, classify_clips(clip_model, window, tau).logits[0], atol=1e-5)
        assert torch.allclose(dense, classify_clips(clip_model, window, 0.0).logits[0], atol=1e-5)
        assert messages[t]["outputs"]["action"]["score"] == pytest.approx(float(served.softmax(-1).max()), abs=1e-5)
    assert any(not torch.allclose(s, d, atol=1e-4) for _, _, s, d in clip_audit_log)  # RLT dropped something
    errors = [float((s - d).norm() / d.norm()) for _, _, s, d in clip_audit_log]
    fidelity = view["fidelity"]
    assert view["policy"] == "adaptive" and view["serving"] == "rlt(tau=0.1)" and view["floor_met"] is True
    assert view["explore"] is None  # (no keyframe candidates: RLT decides what a clip computes)
    assert fidelity["audits"] == len(clip_audit_log) and fidelity["source"] == "audits"
    assert fidelity["rel_l2"] == pytest.approx(sum(errors) / len(errors), rel=1e-5)
    low, high = fidelity["rel_l2_interval"]
    assert low <= fidelity["rel_l2"] <= high and fidelity["top1_interval"][0] <= fidelity["top1_agreement"] <= 1
    counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("eventful_")}
    assert counts["eventful_audits_total"] == counts["eventful_audit_logit_rel_l2_count"] == len(clip_audit_log)


def test_a_clip_stream_s_floor_lowers_its_own_tau_and_leaves_another_stream_s_clips_as_they_are(clip_model):
    """A floor the server's tau misses walks the stream's tau down its ladder (its audits measure each rung),
    while a plain stream beside it is served exactly what it is served alone."""
    video = frames(150, height=48, width=64, seed=22)
    body = {"policy": "adaptive", "audit_share": 0.5, "max_rel_l2": 1e-6}
    with _client(clip_model, clip_stride=1, rlt_tau=0.1) as client:
        alone = stream_frames(client, "plain", video)
        assert client.put("/v1/streams/audited/policy", json=body).status_code == 200
        together = stream_beside(client, "plain2", "audited", video)
        view = client.get("/v1/streams/audited/policy").json()
    for got, want in zip(together, alone, strict=True):  # packed with another clip: equal to float rounding
        got, want = got["outputs"], want["outputs"]
        assert set(got) == set(want) and got.get("window") == want.get("window")
        assert got.get("tokens_kept") == want.get("tokens_kept")
        assert [c["label"] for c in got.get("top", [])] == [c["label"] for c in want.get("top", [])]
        assert [c["score"] for c in got.get("top", [])] == pytest.approx([c["score"] for c in want.get("top", [])])
    assert view["tau"] < 0.1 and view["serving"] == f"rlt(tau={view['tau']:g})"
    assert view["setting"]["max_rel_l2"] == 1e-6
