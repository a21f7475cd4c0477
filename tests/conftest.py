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
