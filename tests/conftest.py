"""Shared fixtures: the optional ../shared folder (real weights, images, videos)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """<repo>/../shared, or skip: it holds real data that is not part of the project."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent (real weights/images/videos live there, outside the project)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def shared_file(shared_dir: Path):
    """Path to a file under ../shared, or skip naming the missing file."""

    def get(relative: str) -> Path:
        path = shared_dir / relative
        if not path.is_file():
            pytest.skip(f"{path} is absent from the shared folder")
        return path

    return get


def write_test_video(path: Path, frames: int = 30, size: tuple[int, int] = (240, 320), fps: int = 30) -> Path:
    """A short H.264 clip with PyAV: a textured background and a square moving across it (a static camera)."""
    import av
    import numpy as np

    h, w = size
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(frames):
            image = background.copy()
            x = (t * 7) % (w - 40)
            image[h // 3 : h // 3 + 40, x : x + 40] = (250, 40, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def real_video(tmp_path_factory) -> Path:
    """../shared/data/videos/realshort.mp4 (36 real frames), or a generated clip of the same size when absent."""
    path = SHARED_DIR / "data" / "videos" / "realshort.mp4"
    if path.is_file():
        return path
    return write_test_video(tmp_path_factory.mktemp("video") / "generated.mp4", frames=36)
