"""Streams: the WebSocket frame endpoint and the stream list."""

from __future__ import annotations

import re
from dataclasses import asdict

from fastapi import APIRouter, HTTPException, WebSocket, status

from server.api.budget import StreamId
from server.api.connection import StreamConnection
from server.api.deps import AUTH, ConnectionsDep, EngineDep, SettingsDep, has_valid_key
from server.api.schemas import STREAM_ID_PATTERN, StreamOut, StreamsOut
from server.engine import StreamInfo

router = APIRouter(prefix="/v1", tags=["streams"], dependencies=AUTH)
ws_router = APIRouter(prefix="/v1")

CLOSE_POLICY_VIOLATION = 1008  # missing / wrong API key
CLOSE_INVALID_STREAM_ID = 4400


def _stream_out(info: StreamInfo) -> StreamOut:
    return StreamOut(**asdict(info))


@router.get("/streams", response_model=StreamsOut, summary="Every stream: counters, budget, latency, state bytes")
def list_streams(engine: EngineDep, settings: SettingsDep) -> StreamsOut:
    infos = engine.list_streams()
    return StreamsOut(
        streams=[_stream_out(i) for i in infos], active_streams=sum(i.connected for i in infos),
        max_streams=settings.max_streams, total_state_bytes=sum(i.state_bytes for i in infos),
    )


@router.get("/streams/{stream_id}", response_model=StreamOut, summary="One stream")
def get_stream(engine: EngineDep, stream_id: StreamId) -> StreamOut:
    info = engine.stream_info(stream_id)
    if info is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stream {stream_id!r} (not connected, not retained)")
    return _stream_out(info)


@ws_router.websocket("/streams/{stream_id}")
async def stream_socket(
    websocket: WebSocket, stream_id: str, engine: EngineDep, settings: SettingsDep, connections: ConnectionsDep,
) -> None:
    """Binary messages: JPEG/PNG frames. Text messages back: result / dropped / error (docs/protocol.md)."""
    await websocket.accept()
    if not has_valid_key(websocket, settings):
        await websocket.close(CLOSE_POLICY_VIOLATION, "missing or invalid API key")
        return
    if not re.fullmatch(STREAM_ID_PATTERN, stream_id):
        await websocket.close(CLOSE_INVALID_STREAM_ID, f"invalid stream id (allowed: {STREAM_ID_PATTERN})")
        return
    await StreamConnection(websocket, engine, stream_id, connections).serve()
