"""The real console command: `python -m server.cli` (what `eventful-serve` runs) under uvicorn on 127.0.0.1,
spoken to over a real WebSocket (the `websockets` client) and scraped over HTTP. Bounded in time, cleaned up."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bench.live_server import free_port, live_server  # noqa: F401 (re-exported for other tests)
from model.eventful import EventfulViT
from model.loaders import load_model
from model.policy import StreamBudget
from model.preprocess import Preprocessor, read_video_frames
from tests.server.conftest import API_KEY, encode, frames

REPO_ROOT = Path(__file__).resolve().parents[2]
RECV_TIMEOUT_S = 30.0


def ws_url(base: str, stream_id: str, token: str | None = None) -> str:
    url = base.replace("http://", "ws://") + f"/v1/streams/{stream_id}"
    return f"{url}?token={token}" if token else url


def recv_json(ws) -> dict:
    return json.loads(ws.recv(timeout=RECV_TIMEOUT_S))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> Path:
    """The tiny test model as a timm-layout checkpoint file, loadable by `--model`."""
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.pth"
    torch.save(tiny_model.state_dict(), path)
    return path


def test_live_server_streams_png_frames_and_serves_metrics(tiny_checkpoint, tmp_path):
    args = ["--model", str(tiny_checkpoint), "--num-heads", "2", "--image-size", "32", "--budget-tokens", "4",
            "--top-k", "3", "--log-level", "warning"]
    video = frames(5)
    with live_server(args, tmp_path / "server.log", env={"EVENTFUL_API_KEY": API_KEY}) as base:
        # without the key: a real close frame with 1008 and a reason
        with connect(ws_url(base, "live"), proxy=None) as ws, pytest.raises(ConnectionClosed) as refused:
            ws.recv(timeout=RECV_TIMEOUT_S)
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 1008

        with connect(ws_url(base, "live", API_KEY), proxy=None) as ws, \
                connect(ws_url(base, "other", API_KEY), proxy=None) as other:
            results = []
            for t, frame in enumerate(video):
                ws.send(encode(frame))
                other.send(encode(frame))
                results.append(recv_json(ws))
                assert recv_json(other)["frame"] == t
            # malformed input against the real process: errors, and everything keeps working
            ws.send(b"\xff\xd8\xff\xe0 truncated jpeg")
            assert recv_json(ws)["code"] == "undecodable"
            ws.send("not json")
            assert recv_json(ws)["code"] == "invalid_message"
            ws.send(encode(video[0]))
            after = recv_json(ws)
        assert [m["type"] for m in results] == ["result"] * 5
        assert [m["frame"] for m in results] == list(range(5))
        assert [m["budget"] for m in results] == [16, 4, 4, 4, 4]
        assert after["type"] == "result" and after["frame"] == 6 and not after["dense"]

        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=base, trust_env=False, timeout=10) as http:
            metrics = http.get("/metrics").text  # exempt from the key by default
            assert http.get("/v1/streams").status_code == 401
            assert http.put("/v1/budget", json={"mode": "fixed", "tokens": 6}, headers=headers).status_code == 200
            openapi = http.get("/openapi.json").json()
    assert "eventful_frames_processed_total 11.0" in metrics
    assert 'eventful_decode_errors_total{code="undecodable"} 1.0' in metrics
    assert "eventful_frame_latency_seconds_count 11.0" in metrics
    assert "/v1/budget" in openapi["paths"]


def test_live_server_answers_every_video_frame_as_the_model_does(shared_dir, tmp_path):
    """realshort.mp4 over a real WebSocket, one frame at a time: every frame answered, and the top-5 equal the
    eventful model called directly on the same decoded frames with the same budget (the server adds no error).
    Uses the real DeiT-Tiny checkpoint from ../shared when present, else random DeiT-Tiny weights."""
    video_path = shared_dir / "data" / "videos" / "realshort.mp4"
    if not video_path.is_file():
        pytest.skip(f"{video_path} is absent")
    weights = shared_dir / "weights" / "deit_tiny_patch16_224.pth"
    labels = shared_dir / "weights" / "imagenet_synsets.txt"
    if weights.is_file() and labels.is_file():
        spec, extra = str(weights), ["--labels", str(labels)]
    else:
        spec, extra, labels = "deit-tiny-patch16-224", [], None
    budget = 50
    decoded = read_video_frames(video_path)
    args = ["--model", spec, *extra, "--budget-tokens", str(budget), "--top-k", "5", "--log-level", "warning"]
    with live_server(args, tmp_path / "server.log") as base:
        with connect(ws_url(base, "video"), proxy=None, max_size=None) as ws:
            served = []
            for frame in decoded:
                ws.send(encode(frame))  # PNG: lossless, so the server decodes exactly these pixels
                served.append(recv_json(ws))

    model = load_model(spec, labels_path=labels)
    runner = EventfulViT(model)
    state = runner.new_state()
    preprocess = Preprocessor(model.config.preprocess)
    assert [m["type"] for m in served] == ["result"] * len(decoded)
    assert [m["frame"] for m in served] == list(range(len(decoded)))
    for t, (frame, message) in enumerate(zip(decoded, served, strict=True)):
        out = runner.step(preprocess(frame), [state], [StreamBudget(tokens=budget)])
        scores, indices = out.logits.softmax(-1)[0].topk(5)
        top = message["outputs"]["top"]
        assert [e["index"] for e in top] == indices.tolist(), t
        np.testing.assert_allclose([e["score"] for e in top], scores.tolist(), atol=1e-5, err_msg=f"frame {t}")
        assert message["dense"] == out.dense_frame[0]
        assert message["updated_fraction"] == pytest.approx(out.updated_fraction[0].item(), abs=1e-6)
        if model.config.label_names:
            assert top[0]["label"] == model.config.label_names[indices[0]]


def test_live_server_keeps_the_api_key_out_of_its_log(tiny_checkpoint, tmp_path):
    """`?token=` (REST and WebSocket) is written to the real process's log as `token=***`."""
    args = ["--model", str(tiny_checkpoint), "--num-heads", "2", "--image-size", "32", "--log-level", "info"]
    log_path = tmp_path / "server.log"
    with live_server(args, log_path, env={"EVENTFUL_API_KEY": API_KEY}) as base:
        with httpx.Client(base_url=base, trust_env=False, timeout=10) as http:
            assert http.get(f"/v1/streams?token={API_KEY}").status_code == 200
        with connect(ws_url(base, "logged", API_KEY), proxy=None) as ws:
            ws.send(encode(frames(1)[0]))
            assert recv_json(ws)["type"] == "result"
    log = log_path.read_text()
    assert '"GET /v1/streams?token=*** HTTP/1.1" 200' in log
    assert '"WebSocket /v1/streams/logged?token=***" [accepted]' in log
    assert API_KEY not in log


def test_live_server_rate_limits_a_ping_burst_without_closing(tiny_checkpoint, tmp_path):
    """2000 pings at once over a real socket from a client that reads: never closed as a slow reader."""
    args = ["--model", str(tiny_checkpoint), "--num-heads", "2", "--image-size", "32", "--log-level", "warning"]
    with live_server(args, tmp_path / "server.log") as base, connect(ws_url(base, "pings"), proxy=None) as ws:
        for _ in range(2000):
            ws.send('{"type": "ping"}')
        ws.send(encode(frames(1)[0]))
        kinds = []
        while not kinds or kinds[-1] != "result":
            message = recv_json(ws)
            kinds.append(message["type"] if message["type"] != "error" else message["code"])
            assert len(kinds) <= 2001
    assert set(kinds) == {"pong", "rate_limited", "result"}


def test_live_server_closes_streams_with_1012_and_a_reason_on_sigterm(tiny_checkpoint, tmp_path):
    args = ["--model", str(tiny_checkpoint), "--num-heads", "2", "--image-size", "32", "--log-level", "warning"]
    started = []
    with pytest.raises(RuntimeError, match="the server died"):  # this test stops it
        with live_server(args, tmp_path / "server.log", on_start=started.append) as base:
            with connect(ws_url(base, "bye"), proxy=None) as ws:
                ws.send(encode(frames(1)[0]))
                assert recv_json(ws)["type"] == "result"
                started[0].send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    recv_json(ws)
            started[0].wait(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert closed.value.rcvd.reason == "server shutting down; reconnect in a few seconds"
