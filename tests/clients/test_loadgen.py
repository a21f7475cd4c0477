"""The load generator against a real server on 127.0.0.1: every frame accounted for, and the same counts as the
server's own /v1/streams view."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bench.live_server import live_server
from clients.loadgen import LoadConfig, main, ping_pong, run_load, stream_url

SERVER_ARGS = ["--model", "deit-tiny-patch16-224", "--budget-tokens", "50", "--threads", "1", "--log-level", "warning"]


def test_ping_pong_has_no_jump_cut():
    order = ping_pong(4, start=0)
    assert [next(order) for _ in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    steps = [abs(a - b) for a, b in zip(list(range(4)) + [2, 1], list(range(1, 4)) + [2, 1, 0], strict=True)]
    assert max(steps) == 1
    assert next(ping_pong(1, start=5)) == 0


def test_stream_url_and_config_checks():
    assert stream_url("http://127.0.0.1:8000", "cam-1") == "ws://127.0.0.1:8000/v1/streams/cam-1"
    assert stream_url("https://example.org", "a") == "wss://example.org/v1/streams/a"
    with pytest.raises(ValueError, match="server URL"):
        stream_url("ftp://x", "a")
    with pytest.raises(ValueError, match="streams"):
        LoadConfig(server="http://x", streams=0, videos=["v.mp4"])
    assert main(["--server", "http://127.0.0.1:1", "--video", "/no/such/video.mp4"]) == 2


def test_closed_and_paced_load_match_the_server_counts(real_video, tmp_path):
    with live_server(SERVER_ARGS, tmp_path / "server.log") as base:
        closed = asyncio.run(run_load(LoadConfig(base, streams=2, videos=[str(real_video)], fps=0, duration_s=2.0,
                                                 stream_prefix="closed")))
        out = tmp_path / "paced.json"
        assert main(["--server", base, "--streams", "3", "--video", str(real_video), "--fps", "15",
                     "--duration", "2", "--stream-prefix", "paced", "--json", str(out)]) == 0
        with httpx.Client(base_url=base, trust_env=False) as http:
            server_view = {s["stream_id"]: s for s in http.get("/v1/streams").json()["streams"]}
    for stream in closed.streams:
        assert stream.closed is None and stream.unanswered == 0 and stream.errors == 0
        assert stream.results == stream.frames_sent > 5  # closed loop: one in flight, nothing dropped
        seen = server_view[stream.stream_id]
        assert seen["frames_received"] == stream.frames_sent and seen["frames_processed"] == stream.results
        assert len(stream.top1) == stream.results and all(i is not None for i in stream.top1)
    paced = json.loads(out.read_text())
    assert paced["aggregate"]["streams"] == 3
    for stream in paced["streams"]:
        assert stream["frames_sent"] >= 20  # 15 fps for 2 s
        assert stream["results"] + stream["dropped"] + stream["errors"] == stream["frames_sent"]
        seen = server_view[stream["stream_id"]]
        assert seen["frames_received"] == stream["frames_sent"]
        assert seen["frames_processed"] == stream["results"] and seen["frames_dropped"] == stream["dropped"]
        assert stream["latency_ms"]["p50"] > 0 and stream["server_latency_ms"]["p50"] > 0
