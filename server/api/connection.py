"""One WebSocket stream: frames in, messages out. The connection owns its outbound queue and writer task and
cleans both up (and detaches from the engine) in `finally`. It never touches tensors: bytes go to the engine,
plain result dataclasses come back and are written as JSON (docs/protocol.md). `Connections` holds an app's open
connections: how many wait for their first frame, and closing them all when the server shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.websockets import WebSocket

from server.engine import (
    Engine,
    FrameDropped,
    FrameError,
    FrameResult,
    QueriesUnsupported,
    QueryError,
    StreamHandle,
    StreamMessage,
    StreamRefused,
)

log = logging.getLogger("eventful.api")

MAX_UNSENT_MESSAGES = 256  # a client that stops reading its results is disconnected past this many
MAX_CONTROL_MESSAGE_CHARS = 4096  # longer text messages are answered invalid_message without being parsed
CONTROL_BURST = 32  # text (control) messages a connection may send at once ...
CONTROL_RATE_PER_S = 10.0  # ... and on average; past that they are not processed (one rate_limited error a run)
CLOSE_POLICY_VIOLATION = 1008
CLOSE_SERVICE_RESTART = 1012  # the server is shutting down
CLOSE_IDLE = 4408  # no frame in time
SHUTDOWN_REASON = "server shutting down; reconnect in a few seconds"


def encode(message: StreamMessage | dict[str, Any], latency_s: float | None = None) -> str:
    """An engine message (or a ready protocol dict) -> the JSON text of the wire protocol."""
    if isinstance(message, FrameResult):
        timing = message.timing
        payload: dict[str, Any] = {
            "type": "result",
            "frame": message.frame,
            "budget": message.budget_tokens,
            "dense": message.dense,
            "reused": message.reused,
            "updated_fraction": message.updated_fraction,
            "latency_ms": 1000 * (latency_s or 0.0),
            "batch_size": message.batch_size,
            "timing": {
                "decode_ms": 1000 * timing.decode_seconds,
                "queue_ms": 1000 * timing.queue_seconds,
                "step_ms": 1000 * timing.step_seconds,
            },
            "outputs": message.outputs,
        }
        if message.fidelity is not None:
            payload["fidelity"] = message.fidelity
    elif isinstance(message, FrameDropped):
        payload = {"type": "dropped", "frame": message.frame}
    elif isinstance(message, FrameError):
        payload = {"type": "error", "frame": message.frame, "code": message.code, "message": message.message}
    else:
        payload = message
    return json.dumps(payload)


class TokenBucket:
    """`burst` tokens at most, refilled at `rate_per_s`; `take()` spends one if there is one."""

    def __init__(self, burst: int, rate_per_s: float):
        self.burst, self.rate_per_s = burst, rate_per_s
        self.tokens = float(burst)
        self._updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(frozen=True)
class IdleLimits:
    """When a connection that sends no frames is closed (CLOSE_IDLE), so that idle sockets cannot hold the stream
    slots that cameras need."""

    idle_timeout_s: float = 30.0  # no binary message for this long (since it connected or its last frame)
    first_frame_grace_s: float = 2.0  # a new connection has this long for its first frame ...
    max_idle: int = 4  # ... after which at most this many connections may wait without one


class Connections:
    """The open stream connections of one app. Thread-safe: the TestClient runs each connection on an event loop
    of its own (uvicorn runs them all on one)."""

    def __init__(self, limits: IdleLimits | None = None):
        self.limits = limits or IdleLimits()
        self.closing = False  # the server is shutting down: new connections are closed at once
        self._open: set[StreamConnection] = set()
        self._idle: set[StreamConnection] = set()  # past the grace without a first frame
        self._lock = threading.Lock()

    def add(self, connection: StreamConnection) -> None:
        with self._lock:
            self._open.add(connection)

    def discard(self, connection: StreamConnection) -> None:
        with self._lock:
            self._open.discard(connection)
            self._idle.discard(connection)

    def mark_idle(self, connection: StreamConnection) -> bool:
        """The connection's grace passed without a frame: True if it may go on waiting (room among the idle)."""
        with self._lock:
            if len(self._idle) >= self.limits.max_idle:
                return False
            self._idle.add(connection)
            return True

    def discard_idle(self, connection: StreamConnection) -> None:
        with self._lock:
            self._idle.discard(connection)

    @property
    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    async def close_all(self, code: int = CLOSE_SERVICE_RESTART, reason: str = SHUTDOWN_REASON) -> None:
        """Close every connection (on shutdown; all on the calling event loop) and every new one from now on."""
        with self._lock:
            self.closing = True
            connections = list(self._open)
        await asyncio.gather(*(c.close(code, reason) for c in connections))


class StreamConnection:
    """Reads binary frames (and small JSON control messages), writes results / dropped / error messages."""

    def __init__(self, websocket: WebSocket, engine: Engine, stream_id: str, connections: Connections | None = None):
        self.websocket = websocket
        self.engine = engine
        self.stream_id = stream_id
        self.connections = connections or Connections()
        self.outbound: asyncio.Queue[StreamMessage | dict[str, Any]] = asyncio.Queue()
        self.frames = 0  # binary messages received on this connection = the next frame index
        self._handle: StreamHandle | None = None
        self._writer: asyncio.Task | None = None
        self.overflowed = False  # more than MAX_UNSENT_MESSAGES waited: the client is not reading
        self._control_budget = TokenBucket(CONTROL_BURST, CONTROL_RATE_PER_S)
        self._control_limited = False  # the last text message was over the rate limit (its error was sent)
        self._opened_at = self._last_frame_at = time.monotonic()
        self._idle = False  # waiting for its first frame past the grace (counted by `connections`)
        self._closed = False

    async def serve(self) -> None:
        """Accepted socket in, closed socket out."""
        if self.connections.closing:
            await self.websocket.close(code=CLOSE_SERVICE_RESTART, reason=SHUTDOWN_REASON)
            return
        loop = asyncio.get_running_loop()
        try:
            self._handle = self.engine.open_stream(self.stream_id, partial(loop.call_soon_threadsafe, self._enqueue))
        except StreamRefused as refused:
            await self.websocket.close(code=refused.code, reason=refused.reason)
            return
        self.connections.add(self)
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.stream_id}")
        try:
            await self._read_loop()
        finally:
            self._detach()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer

    async def close(self, code: int, reason: str) -> None:
        """Close the socket with a code and reason. The stream id and its slot are free at once (the client may
        take a while to answer the close frame)."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        with contextlib.suppress(Exception):  # the client may be gone already
            await self.websocket.close(code=code, reason=reason)

    def _detach(self) -> None:
        if self._handle is not None:
            self.engine.close_stream(self._handle)
            self._handle = None
        self.connections.discard(self)

    def _enqueue(self, message: StreamMessage | dict[str, Any]) -> None:
        """Queue a message for the writer; past the bound the connection is marked for closing (memory stays
        bounded however slowly a client reads)."""
        if self.outbound.qsize() >= MAX_UNSENT_MESSAGES:
            self.overflowed = True
            return
        self.outbound.put_nowait(message)

    async def _read_loop(self) -> None:
        while not self._closed:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), self._deadline() - time.monotonic())
            except TimeoutError:
                await self._on_timeout()
                continue
            received_at = time.perf_counter()
            if message["type"] == "websocket.disconnect" or self._closed:  # closed by another task meanwhile
                return
            if self.overflowed:
                reason = f"results are not being read ({MAX_UNSENT_MESSAGES} unsent messages)"
                log.warning("stream %s: %s; closing", self.stream_id, reason)
                await self.close(CLOSE_POLICY_VIOLATION, reason)
                return
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                self._last_frame_at = time.monotonic()
                if self._idle:
                    self._idle = False
                    self.connections.discard_idle(self)
                frame, self.frames = self.frames, self.frames + 1
                self.engine.submit_frame(self._handle, frame, data, received_at)
            elif text is not None:
                self._on_text(text)

    def _deadline(self) -> float:
        """When the next idle check is due (time.monotonic())."""
        idle_at = self._last_frame_at + self.connections.limits.idle_timeout_s
        if self.frames == 0 and not self._idle:
            return min(idle_at, self._opened_at + self.connections.limits.first_frame_grace_s)
        return idle_at

    async def _on_timeout(self) -> None:
        """No frame by the deadline: close after the idle timeout, or at the end of the first frame's grace when
        too many connections already wait for theirs."""
        limits = self.connections.limits
        if time.monotonic() >= self._last_frame_at + limits.idle_timeout_s:
            reason = f"idle: no frame in {limits.idle_timeout_s:g} s"
        elif self.connections.mark_idle(self):
            self._idle = True
            return
        else:
            reason = (f"idle: no frame within {limits.first_frame_grace_s:g} s of connecting, and the limit of "
                      f"{limits.max_idle} connections waiting longer is reached")
        log.info("stream %s: %s; closing", self.stream_id, reason)
        await self.close(CLOSE_IDLE, reason)

    def _on_text(self, text: str) -> None:
        """Text messages are JSON control messages: {"type": "ping"} (answered with a pong) and {"type": "queries",
        "queries": [...]} (answered with the queries in effect, or an error). Over the
        rate limit a message is not processed: the first of a run gets a rate_limited error, the rest nothing (a
        client is never closed for its own control messages)."""
        if not self._control_budget.take():
            if not self._control_limited:
                self._control_limited = True
                self._enqueue(_error(
                    "rate_limited", f"at most {CONTROL_BURST} control messages at once and {CONTROL_RATE_PER_S:g} "
                    "a second; messages over the limit are not answered"))
            return
        self._control_limited = False
        if len(text) > MAX_CONTROL_MESSAGE_CHARS:
            self._enqueue(_error(
                "invalid_message", f"control messages are at most {MAX_CONTROL_MESSAGE_CHARS} characters"))
            return
        try:
            request = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            self._enqueue(_error("invalid_message", "text messages must be JSON; frames are binary messages"))
            return
        kind = request.get("type") if isinstance(request, dict) else None
        if kind == "ping":
            self._enqueue({"type": "pong", "frames": self.frames})
        elif kind == "queries":
            self._enqueue(self._set_queries(request.get("queries")))
        else:
            self._enqueue(_error("invalid_message", 'unknown control message; they are {"type": "ping"} and '
                                 '{"type": "queries", "queries": [...]}'))

    def _set_queries(self, queries: Any) -> dict[str, Any]:
        """The stream's text queries from its next frame on: {"type": "queries", "queries": [...]} back, or an
        error (`invalid_queries`, `queries_unsupported`); the stream goes on either way."""
        try:
            view = self.engine.set_stream_queries(self.stream_id, queries)
        except QueryError as err:
            return _error("invalid_queries", f"{err.field}: {err.message}")
        except QueriesUnsupported as err:
            return _error("queries_unsupported", str(err))
        return {"type": "queries", "queries": view["queries"]}

    async def _write_loop(self) -> None:
        while True:
            message = await self.outbound.get()
            latency_s = time.perf_counter() - message.received_at if isinstance(message, FrameResult) else None
            try:
                await self.websocket.send_text(encode(message, latency_s))
            except Exception as err:  # the client went away; the read loop sees the disconnect
                log.debug("stream %s: send failed: %s", self.stream_id, err)
                return
            if latency_s is not None:
                self.engine.record_latency(self._handle, latency_s)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "frame": None, "code": code, "message": message}
