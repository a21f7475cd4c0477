"""The browser camera page: `GET /` is clients/web/index.html, `GET /web/{name}` its script and style sheet.

Static files only, open without an API key (the page asks for the key and sends it with its own REST and WebSocket
calls). The files ship inside the `clients` package (package data), so an installed server finds them too."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

router = APIRouter(tags=["web"], include_in_schema=False)

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
NO_CACHE = {"Cache-Control": "no-cache"}


def web_dir() -> Path:
    """clients/web, wherever the clients package is installed."""
    return Path(str(files("clients") / "web"))


def _file(name: str) -> FileResponse:
    path = web_dir() / name
    suffix = path.suffix
    # only plain files directly in clients/web with a known type: no path tricks, nothing else served
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such file: {name}")
    return FileResponse(path, media_type=MEDIA_TYPES[suffix], headers=NO_CACHE)


@router.get("/")
def index() -> FileResponse:
    return _file("index.html")


@router.get("/web/{name}")
def static_file(name: str) -> FileResponse:
    return _file(name)
