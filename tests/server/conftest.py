"""Server test helpers: a tiny random ViT (fast), encoded frames, an app with a TestClient."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model.chooser import AdaptiveSchedule
from model.config import PreprocessConfig, ViTConfig
from model.vit import VisionTransformer
from model.yolos import Detections
from server.app import create_app
from server.settings import Settings

# 4x4 = 16 patch tokens + class token; preprocessing resizes any frame to 32x32.
TINY = ViTConfig(
    image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=10,
    preprocess=PreprocessConfig(resize_shortest=None, resize_to=(32, 32), crop_size=None, interpolation="bilinear"),
)
API_KEY = "test-key"


@pytest.fixture(scope="session")
def tiny_model() -> VisionTransformer:
    model = VisionTransformer(TINY).eval().requires_grad_(False)
    with torch.no_grad():  # larger-than-init weights so that frames change the outputs visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


def encode(frame: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format=fmt)
    return buffer.getvalue()


def stream_frames(client, name: str, video) -> list[dict]:
    """Send a stream's frames over its WebSocket one at a time (each answered before the next is sent: nothing
    dropped); the messages answering them."""
    out = []
    with client.websocket_connect(f"/v1/streams/{name}") as ws:
        for frame in video:
            ws.send_bytes(encode(frame))
            out.append(ws.receive_json())
    return out


def stream_beside(client, name: str, other: str, video) -> list[dict]:
    """Send `video` on two streams at once, frame by frame; the messages answering stream `name`."""
    with client.websocket_connect(f"/v1/streams/{name}") as a, client.websocket_connect(f"/v1/streams/{other}") as b:
        out = []
        for frame in video:
            a.send_bytes(encode(frame))
            b.send_bytes(encode(frame))
            out.append(a.receive_json())
            b.receive_json()
    return out


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG whose IHDR declares width x height (no pixel data to speak of)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    """A drifting random video: each frame changes a patch of the previous one, plus a little sensor noise.

    The noise matters: without it most tokens change by exactly 0, and top-r then picks among exact ties,
    which a stream alone (top-k fast path) and inside a mixed-budget batch (stable sort) break differently.
    """
    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = []
    for _ in range(count):
        scene = scene.copy()
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        scene[y : y + 8, x : x + 8] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        noise = rng.integers(-2, 3, scene.shape)
        out.append(np.clip(scene.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return out


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def receive_until(ws, kind: str, limit: int = 50) -> tuple[dict, list[dict]]:
    """Messages up to and including the first of type `kind`: (that message, the ones before it)."""
    before = []
    for _ in range(limit):
        message = ws.receive_json()
        if message["type"] == kind:
            return message, before
        before.append(message)
    raise AssertionError(f"no {kind!r} message in {limit} messages: {before}")


def listed_detections(boxes: list[dict], label_names) -> Detections:
    """A result message's boxes ([{"label", "score", "box"}], frame pixels) as Detections, labels as indices."""
    names = list(label_names)
    return Detections(torch.tensor([b["score"] for b in boxes], dtype=torch.float32),
                      torch.tensor([names.index(b["label"]) for b in boxes], dtype=torch.long),
                      torch.tensor([b["box"] for b in boxes], dtype=torch.float32).reshape(-1, 4))


@pytest.fixture
def audit_log(monkeypatch) -> list[tuple]:
    """Every audit an adaptive stream records, as (the stream's frame index, the answer served, agreement, error),
    in order."""
    log: list[tuple] = []
    record = AdaptiveSchedule._record_audit

    def recording(self, served, dense, paid):
        record(self, served, dense, paid)
        log.append((self.frame, served, self.audit_agree[-1], self.audit_errors[-1]))

    monkeypatch.setattr(AdaptiveSchedule, "_record_audit", recording)
    return log


@pytest.fixture
def make_client(tiny_model) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) -> a started TestClient whose engine has loaded the tiny model."""
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        values = dict(budget_tokens=4, stream_ttl_s=0, batch_window_ms=2.0, top_k=3)
        values.update(overrides)
        app = create_app(Settings(**values), model=tiny_model)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        assert app.state.engine.wait_ready(30), "engine did not become ready"
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The server sets per-thread torch thread counts (the CLI pins its main thread to 1): undo it for other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_eventful_env(monkeypatch):
    """Settings read EVENTFUL_* variables: keep the developer's environment out of the tests."""
    import os

    for name in list(os.environ):
        if name.startswith("EVENTFUL_"):
            monkeypatch.delenv(name)
