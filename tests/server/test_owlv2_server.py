"""OWLv2 served end to end over the WebSocket (TestClient): per-stream text queries set by a control message or over
REST, results labelled with each stream's own queries, equal to the model's own detections, and the errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from bench.detect_bench import agreement
from model.config import CLIP_MEAN, CLIP_STD, Owlv2Config, PreprocessConfig
from model.owlv2 import Owlv2Detector, Owlv2Preprocessor, load_tokenizer, postprocess_owlv2
from model.yolos import Detections
from server.app import create_app
from server.engine.factory import build_runner
from server.engine.owlv2_runner import Owlv2Runner
from server.engine.queries import FallbackTokenizer, QueryError, check_query_texts
from server.settings import Settings
from tests.model.test_owlv2 import visible_owlv2
from tests.server.conftest import encode, frames, listed_detections

transformers = pytest.importorskip("transformers")

# 4x4 patches of 8 at 32x32 (frames are padded to a square, then resized), a one-block text encoder
CONFIG = Owlv2Config(
    image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, text_embed_dim=32,
    text_depth=1, text_heads=2, text_mlp_dim=64, vocab_size=40, projection_dim=32,
    preprocess=PreprocessConfig(resize_shortest=None, resize_to=(32, 32), crop_size=None, interpolation="bilinear",
                                mean=CLIP_MEAN, std=CLIP_STD),
)  # fmt: skip


def write_tokenizer(directory) -> str:
    """A CLIP BPE tokenizer over 16 tokens ('!' the pad, id 0; EOS the highest id), saved as save_pretrained does
    (as tests/model/test_owlv2.py)."""
    vocab = {"!": 0, "a": 1, "c": 2, "t": 3, "d": 4, "o": 5, "g": 6, "a</w>": 7, "t</w>": 8, "g</w>": 9, "ca": 10,
             "cat</w>": 11, "do": 12, "dog</w>": 13, "<|startoftext|>": 14, "<|endoftext|>": 15}
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!").save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def owlv2() -> Owlv2Detector:
    return visible_owlv2(CONFIG)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return write_tokenizer(tmp_path_factory.mktemp("owlv2") / "tokenizer")


@contextlib.contextmanager
def _client(model, tokenizer_dir, **settings) -> Iterator[TestClient]:
    base = dict(model="unused", device="cpu", budget_tokens=4, max_batch_size=4, batch_window_ms=1.0,
                tokenizer=tokenizer_dir, default_queries="cat,dog", detect_threshold=0.0, max_boxes=5)
    app = create_app(Settings(**{**base, **settings}), model=model)
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(30), "engine did not become ready"
        yield client


def _labels(message: dict) -> set[str]:
    assert message["type"] == "result", message
    return {b["label"] for b in message["outputs"]["boxes"]}


def _direct_detections(model: Owlv2Detector, tokenizer_dir: str, frame, queries: list[str], threshold=0.0,
                       top_k=5) -> Detections:
    """The model's own detections for one frame: dense encoder, text encoder, heads, post-processing."""
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenizer(queries, padding="max_length", max_length=CONFIG.max_text_tokens, return_tensors="pt")
    image = Owlv2Preprocessor(CONFIG)(frame)  # [1, 3, 32, 32]
    with torch.no_grad():
        logits, boxes = model(image, ids["input_ids"])
    height, width = frame.shape[:2]
    return postprocess_owlv2(logits, boxes, [(height, width)], threshold, top_k)[0]


def _direct(model: Owlv2Detector, tokenizer_dir: str, frame, queries: list[str], threshold=0.0, top_k=5) -> list:
    """The same as a result message lists them, labelled with the queries."""
    return _direct_detections(model, tokenizer_dir, frame, queries, threshold, top_k).to_list(queries)


def test_the_factory_builds_an_owlv2_runner_with_the_default_queries(owlv2, tokenizer_dir):
    runner = build_runner(Settings(model="unused", device="cpu", tokenizer=tokenizer_dir,
                                   default_queries=" cat , a dog,"), owlv2)
    assert type(runner) is Owlv2Runner and runner.task == "detect" and runner.audits_supported
    assert runner.default_queries == ("cat", "a dog")
    assert runner.check_queries(["a cat", "dog"]).token_ids == ((14, 7, 11, 15), (14, 13, 15))
    with pytest.raises(ValueError, match="--tokenizer"):  # a model given in-process: no tokenizer to guess
        build_runner(Settings(model="unused", device="cpu"), owlv2)
    with pytest.raises(ValueError, match="default-queries"):
        build_runner(Settings(model="unused", device="cpu", tokenizer=tokenizer_dir, default_queries=","), owlv2)


def test_query_limits():
    assert check_query_texts(["  person ", "car"]) == ("person", "car")
    for bad, field in [([], "queries"), ("person", "queries"), (["a"] * 17, "queries"), ([""], "queries.0"),
                       (["ok", "   "], "queries.1"), (["x" * 65], "queries.0"), ([3], "queries.0"), (None, "queries")]:
        with pytest.raises(QueryError) as err:
            check_query_texts(bad)
        assert err.value.field == field


def test_the_fallback_tokenizer_is_deterministic_and_ends_with_the_highest_id():
    tokenizer = FallbackTokenizer(49408)
    ids = tokenizer("A red forklift!")
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 2 + 4 and max(ids[1:-1]) < 49406
    assert tokenizer("a red forklift !") == ids and tokenizer("a blue forklift") != ids


def test_two_streams_with_their_own_queries_and_results_equal_the_model_s(owlv2, tokenizer_dir):
    """Every frame dense (a full budget): each result equals the model called directly on that frame with the
    stream's queries; the control message is answered with the queries in effect."""
    video_a, video_b = frames(3, height=48, width=64), frames(3, height=40, width=30, seed=5)
    with _client(owlv2, tokenizer_dir, budget_fraction=1.0, budget_tokens=None) as client:
        with client.websocket_connect("/v1/streams/a") as ws_a, client.websocket_connect("/v1/streams/b") as ws_b:
            ws_a.send_json({"type": "queries", "queries": ["cat", " a cat "]})
            assert ws_a.receive_json() == {"type": "queries", "queries": ["cat", "a cat"]}
            ws_b.send_json({"type": "queries", "queries": ["dog", "a dog"]})
            assert ws_b.receive_json() == {"type": "queries", "queries": ["dog", "a dog"]}
            for frame_a, frame_b in zip(video_a, video_b, strict=True):
                ws_a.send_bytes(encode(frame_a))
                ws_b.send_bytes(encode(frame_b))
                got_a, got_b = ws_a.receive_json(), ws_b.receive_json()
                assert _labels(got_a) <= {"cat", "a cat"} and _labels(got_b) <= {"dog", "a dog"}
                for got, frame, queries in ((got_a, frame_a, ["cat", "a cat"]), (got_b, frame_b, ["dog", "a dog"])):
                    want = _direct(owlv2, tokenizer_dir, frame, queries)
                    assert len(got["outputs"]["boxes"]) == 5
                    for g, w in zip(got["outputs"]["boxes"], want, strict=True):
                        assert g["label"] == w["label"]
                        assert g["score"] == pytest.approx(w["score"], abs=2e-4)
                        assert g["box"] == pytest.approx(w["box"], abs=0.2)  # frame pixels, rounded to 0.1
        assert client.get("/v1/streams/a/queries").json() == {"stream_id": "a", "queries": ["cat", "a cat"],
                                                              "source": "stream"}


def test_queries_change_mid_stream_and_bad_ones_leave_the_stream_usable(owlv2, tokenizer_dir):
    video = frames(8, height=48, width=64)
    with _client(owlv2, tokenizer_dir) as client:
        runner = client.app.state.engine.runner
        with client.websocket_connect("/v1/streams/cam") as ws:
            ws.send_bytes(encode(video[0]))
            assert _labels(ws.receive_json()) <= {"cat", "dog"}  # the default queries
            encodes = runner.query_encodes
            ws.send_json({"type": "queries", "queries": ["a dog"]})
            assert ws.receive_json()["type"] == "queries"
            for frame in video[1:4]:
                ws.send_bytes(encode(frame))
                message = ws.receive_json()
                assert _labels(message) == {"a dog"} and not message["dense"]  # the state goes on
            assert runner.query_encodes == encodes + 1  # encoded once per change, not per frame
            for bad, code in [({"type": "queries", "queries": []}, "invalid_queries"),
                              ({"type": "queries", "queries": ["cat", 7]}, "invalid_queries"),
                              ({"type": "queries"}, "invalid_queries"),
                              ({"type": "queries", "queries": ["x" * 65]}, "invalid_queries"),
                              ({"type": "queries", "queries": [" ".join(["cat"] * 15)]}, "invalid_queries")]:
                ws.send_json(bad)
                error = ws.receive_json()
                assert (error["type"], error["frame"], error["code"]) == ("error", None, code), error
            assert "tokens" in error["message"]  # the last one: 17 tokens with BOS and EOS, the encoder takes 16
            ws.send_bytes(encode(video[4]))
            assert _labels(ws.receive_json()) == {"a dog"}  # unchanged by the refused queries
            ws.send_json({"type": "queries", "queries": ["cat"]})
            assert ws.receive_json() == {"type": "queries", "queries": ["cat"]}
            ws.send_bytes(encode(video[5]))
            assert _labels(ws.receive_json()) == {"cat"}


def test_rest_queries_set_before_connect_apply_and_errors(owlv2, tokenizer_dir):
    video = frames(2, height=48, width=64)
    with _client(owlv2, tokenizer_dir) as client:
        assert client.get("/v1/streams/later/queries").json() == {"stream_id": "later", "queries": ["cat", "dog"],
                                                                  "source": "default"}
        put = client.put("/v1/streams/later/queries", json=["a cat", "a dog"])
        assert put.status_code == 200 and put.json()["queries"] == ["a cat", "a dog"]
        for body, field in [([], "queries"), (["ok", ""], "queries.1"), (["y" * 65], "queries.0"),
                            ([" ".join(["dog"] * 15)], "queries.0")]:
            response = client.put("/v1/streams/later/queries", json=body)
            assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", field]
            assert field in response.json()["message"]
        assert client.put("/v1/streams/later/queries", json=["a", 3]).status_code == 422  # not a string
        assert client.put("/v1/streams/later/queries", content="cat", headers={"content-type": "text/plain"}
                          ).status_code == 415
        with client.websocket_connect("/v1/streams/later") as ws:
            for frame in video:
                ws.send_bytes(encode(frame))
                assert _labels(ws.receive_json()) <= {"a cat", "a dog"}
        assert client.delete("/v1/streams/later/queries").status_code == 204
        assert client.delete("/v1/streams/later/queries").status_code == 404
        assert client.get("/v1/streams/later/queries").json()["source"] == "default"


def test_an_adaptive_stream_is_audited_with_its_own_queries_and_reports_box_f1(owlv2, tokenizer_dir, audit_log):
    """Under `adaptive`, each audit's F1 and error equal matching what the stream was served against the model's own
    dense detections of that frame for the stream's queries (in another order than the default's: an audit with the
    default queries would label the boxes otherwise); GET /v1/streams shows box_f1 and mean_iou."""
    queries = ["dog", "cat"]
    video = frames(40, height=48, width=64, seed=13)
    with _client(owlv2, tokenizer_dir, stream_ttl_s=60) as client:
        assert client.put("/v1/streams/cam/queries", json=queries).status_code == 200
        put = client.put("/v1/streams/cam/policy", json={"policy": "adaptive", "ratio": 2, "audit_share": 0.5,
                                                          "min_box_f1": 0.1})
        assert put.status_code == 200, put.text
        messages = []
        with client.websocket_connect("/v1/streams/cam") as ws:
            for frame in video:
                ws.send_bytes(encode(frame))
                messages.append(ws.receive_json())
        listed = client.get("/v1/streams").json()["streams"]
        for body, field in [({"policy": "adaptive", "ratio": 2, "min_top1_agreement": 0.5}, "min_top1_agreement"),
                            ({"policy": "adaptive", "ratio": 2, "min_box_f1": 2}, "min_box_f1")]:
            response = client.put("/v1/streams/cam/policy", json=body)
            assert response.status_code == 422 and field in response.json()["message"]
    assert _labels(messages[0]) <= set(queries)
    audited_sparse = []
    for t, served, f1, error in audit_log:
        listed_boxes = listed_detections(messages[t]["outputs"]["boxes"], queries)
        assert torch.equal(served.labels, listed_boxes.labels)  # what the audit compared is what was served
        assert torch.allclose(served.boxes, listed_boxes.boxes, atol=0.051)
        expected = agreement([_direct_detections(owlv2, tokenizer_dir, video[t], queries)], [served])
        assert f1 == pytest.approx(1.0 if expected["f1"] is None else expected["f1"]), t
        mean_iou = expected["mean_iou"] if expected["mean_iou"] is not None else float(expected["f1"] is None)
        assert error == pytest.approx(1.0 - mean_iou, abs=1e-4), t
        if not messages[t]["dense"]:
            audited_sparse.append(t)
    assert audited_sparse, "no audit of a frame not served densely"
    policy = next(s for s in listed if s["stream_id"] == "cam")["policy"]
    assert policy["policy"] == "adaptive" and policy["fidelity"]["audits"] == len(audit_log)
    assert 0 <= policy["fidelity"]["box_f1"] <= 1 and 0 <= policy["fidelity"]["mean_iou"] <= 1
    assert "top1_agreement" not in policy["fidelity"] and "rel_l2" not in policy["fidelity"]


def test_the_model_view_names_the_default_queries_and_the_tokenizer(owlv2, tokenizer_dir):
    with _client(owlv2, tokenizer_dir) as client:
        model = client.get("/v1/model").json()
    assert model["default_queries"] == ["cat", "dog"]
    assert model["tokenizer"] == {"kind": "clip", "source": str(tokenizer_dir)}


def test_models_without_text_queries_say_so(tiny_model):
    app = create_app(Settings(model="unused", device="cpu"), model=tiny_model)
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(30)
        model = client.get("/v1/model").json()
        assert model["default_queries"] is None and model["tokenizer"] is None
        for response in (client.get("/v1/streams/cam/queries"), client.put("/v1/streams/cam/queries", json=["cat"]),
                         client.delete("/v1/streams/cam/queries")):
            assert response.status_code == 409 and "no text queries" in response.json()["detail"]
        with client.websocket_connect("/v1/streams/cam") as ws:
            ws.send_json({"type": "queries", "queries": ["cat"]})
            error = ws.receive_json()
            assert (error["code"], error["frame"]) == ("queries_unsupported", None)
            assert "no text queries" in error["message"]
            ws.send_bytes(encode(frames(1)[0]))
            assert ws.receive_json()["type"] == "result"


def test_tokenizer_from_the_model_directory_or_the_fallback_only_for_random_weights(tmp_path):
    """An HF OWLv2 directory with tokenizer files needs no --tokenizer; one without refuses to load (hashed ids
    under real weights would detect nonsense); the named random-weight architecture falls back, marked."""
    from tests.model.test_owlv2 import random_hf_owlv2

    random_hf_owlv2().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="--tokenizer"):
        build_runner(Settings(model=str(tmp_path / "bare"), device="cpu", default_queries="cat"))
    runner = build_runner(Settings(model=str(tmp_path / "bare"), device="cpu", default_queries="cat",
                                   tokenizer=write_tokenizer(tmp_path / "tok")))
    assert runner.tokenizer.kind == "clip"
    random_hf_owlv2().save_pretrained(tmp_path / "full")
    write_tokenizer(tmp_path / "full")
    runner = build_runner(Settings(model=str(tmp_path / "full"), device="cpu", default_queries="a cat,dog"))
    assert runner.tokenizer.kind == "clip" and runner.tokenizer.source == str(tmp_path / "full")
    assert runner.check_queries(["a cat"]).token_ids == ((14, 7, 11, 15),)
    named = build_runner(Settings(model="owlv2-base-patch16", image_size="64", device="cpu"))
    assert isinstance(named, Owlv2Runner) and named.tokenizer.kind == "fallback"
    assert named.default_queries == ("person", "car")
    assert named.check_queries(["forklift"]).token_ids[0][-1] == 49407


def test_new_queries_restart_an_adaptive_streams_measuring(owlv2, tokenizer_dir, audit_log):
    """What an adaptive stream measured compares answers to its old queries: new ones (or clearing them) start its
    schedule afresh, with a dense frame, while the same queries set again change nothing."""
    video = frames(24, height=48, width=64, seed=5)
    with _client(owlv2, tokenizer_dir, stream_ttl_s=60) as client:
        assert client.put("/v1/streams/cam/queries", json=["dog", "cat"]).status_code == 200
        assert client.put("/v1/streams/cam/policy", json={"policy": "adaptive", "ratio": 3,
                                                           "audit_share": 0.5}).status_code == 200
        with client.websocket_connect("/v1/streams/cam") as ws:
            def serve(frame):
                ws.send_bytes(encode(frame))
                return ws.receive_json()

            served = [serve(frame) for frame in video[:10]]
            assert not all(m["dense"] for m in served[1:])  # frames are reused or sparse between keyframes
            before = client.get("/v1/streams/cam/policy").json()
            assert before["fidelity"] is not None  # the schedule runs and measures
            assert client.put("/v1/streams/cam/queries", json=["dog", "cat"]).status_code == 200  # the same
            assert client.get("/v1/streams/cam/policy").json()["fidelity"] is not None  # measuring goes on
            for change in (lambda: client.put("/v1/streams/cam/queries", json=["a bird"]),
                           lambda: client.delete("/v1/streams/cam/queries")):
                assert change().status_code in (200, 204)
                assert client.get("/v1/streams/cam/policy").json()["fidelity"] is None  # nothing measured yet
                first = serve(video[10])
                assert first["dense"]  # the new schedule's first frame is a keyframe
