"""The server on CUDA against the server on the CPU: same frames, same answers (skipped without a CUDA device)."""

from __future__ import annotations

import copy

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.server.conftest import encode, frames

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _results(model, device: str, videos: dict[str, list]) -> dict[str, list[dict]]:
    settings = Settings(budget_tokens=4, stream_ttl_s=0, batch_window_ms=2.0, top_k=3, device=device)
    with TestClient(create_app(settings, model=model)) as client:
        assert client.app.state.engine.wait_ready(60)
        names = list(videos)
        sockets = {name: client.websocket_connect(f"/v1/streams/{name}") for name in names}
        for ws in sockets.values():
            ws.__enter__()
        try:
            out: dict[str, list[dict]] = {name: [] for name in names}
            for t in range(len(next(iter(videos.values())))):  # lockstep, as in the CPU tests
                for name in names:
                    sockets[name].send_bytes(encode(videos[name][t]))
                for name in names:
                    out[name].append(sockets[name].receive_json())
        finally:
            for ws in sockets.values():
                ws.__exit__(None, None, None)
    return out


def test_streams_on_cuda_get_the_answers_they_get_on_the_cpu(tiny_model):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        videos = {f"cam{i}": frames(6, seed=i) for i in range(3)}
        on_cpu = _results(tiny_model, "cpu", videos)
        on_cuda = _results(copy.deepcopy(tiny_model).to("cuda"), "cuda", videos)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    for name in videos:
        assert [m["type"] for m in on_cuda[name]] == ["result"] * 6, on_cuda[name]
        for a, b in zip(on_cpu[name], on_cuda[name], strict=True):
            assert a["budget"] == b["budget"] and a["dense"] == b["dense"]
            assert [t["index"] for t in a["outputs"]["top"]] == [t["index"] for t in b["outputs"]["top"]]
            assert [t["score"] for t in b["outputs"]["top"]] == pytest.approx(
                [t["score"] for t in a["outputs"]["top"]], abs=1e-4)
