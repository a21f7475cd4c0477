"""Streams: the WebSocket frame endpoint and the stream list."""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Response, WebSocket, status
from pydantic import StrictStr

from server.api.budget import JSON_BODY, StreamId
from server.api.connection import StreamConnection
from server.api.deps import AUTH, ConnectionsDep, EngineDep, SettingsDep, has_valid_key
from server.api.schemas import STREAM_ID_PATTERN, StreamOut, StreamQueriesOut, StreamsOut
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


QUERY_ERRORS = {
    409: {"description": "the loaded model has no text queries (only OWLv2 models do)"},
    503: {"description": "the model is not loaded yet"},
}
QueryList = Annotated[list[StrictStr], Body(
    description="1 to 16 texts, each 1 to 64 characters after stripping and at most the text encoder's tokens "
    "(16 with BOS and EOS for OWLv2)", examples=[["person", "forklift"]])]


@router.get("/streams/{stream_id}/queries", response_model=StreamQueriesOut, responses=QUERY_ERRORS,
            summary="A stream's text queries (OWLv2)")
def get_stream_queries(engine: EngineDep, stream_id: StreamId) -> StreamQueriesOut:
    return StreamQueriesOut(**engine.stream_queries(stream_id))


@router.put(
    "/streams/{stream_id}/queries", response_model=StreamQueriesOut, summary="Set a stream's text queries (OWLv2)",
    description="From the stream's next frame on, its boxes answer these queries and are labelled with them; kept by "
    "stream id, so they may be set before the stream connects. The same as the control message "
    '`{"type": "queries", "queries": [...]}`.',
    dependencies=JSON_BODY["dependencies"], responses={**JSON_BODY["responses"], **QUERY_ERRORS},
)
def put_stream_queries(engine: EngineDep, stream_id: StreamId, queries: QueryList) -> StreamQueriesOut:
    return StreamQueriesOut(**engine.set_stream_queries(stream_id, queries))


@router.delete("/streams/{stream_id}/queries", status_code=204, responses=QUERY_ERRORS,
               summary="Back to the default queries")
def delete_stream_queries(engine: EngineDep, stream_id: StreamId) -> Response:
    if not engine.clear_stream_queries(stream_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"stream {stream_id!r} has no queries of its own")
    return Response(status_code=204)


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
