"""Per-stream records: eventful state (created on the first frame, on the model's device), counters, latencies.

A record lives while its stream is connected and, after a disconnect, for `ttl_s` more seconds so that a quick
reconnect under the same stream id resumes without a dense frame, as long as its slot is not needed: at most
`max_streams` records are held in all. Not thread-safe: the engine holds its lock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model.state import StreamState
from server.engine.messages import StreamMessage

# WebSocket close codes the API uses when a stream is refused.
CLOSE_TRY_AGAIN_LATER = 1013  # server at its stream limit, or the model is still loading
CLOSE_STREAM_IN_USE = 4409  # another connection is streaming under this id


class StreamRefused(Exception):
    """A connection the engine will not take; `code` and `reason` go into the WebSocket close frame."""

    def __init__(self, code: int, reason: str, kind: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.kind = kind  # short label for metrics: "max_streams", "in_use", "not_ready"


@dataclass
class RawFrame:
    frame: int
    data: bytes
    received_at: float


@dataclass(eq=False)
class Session:
    """One connection's view of its stream: where results go, and its decode pipeline (one frame at a time)."""

    id: int
    stream_id: str
    deliver: Callable[[StreamMessage], None]  # thread-safe, non-blocking
    closed: bool = False
    decoding: bool = False  # a frame of this session is being decoded
    waiting: RawFrame | None = None  # the newest frame received while decoding (latest wins)
    last_received_at: float = -math.inf  # perf_counter() of its latest binary message

    def send(self, message: StreamMessage) -> None:
        if self.closed:
            return
        try:
            self.deliver(message)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.closed = True


@dataclass(eq=False)
class StreamRecord:
    stream_id: str
    session: Session | None = None  # the connected session, None while retained for a resume
    state: StreamState | None = None
    state_bytes: int = 0
    frame_size: tuple[int, int] | None = None  # decoded size of the last frame stepped
    disconnected_at: float | None = None
    frames_received: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    frames_failed: int = 0
    budget_tokens: int | None = None  # used by the last processed frame
    frames_reused: int = 0  # answered with the last result again (skip, adaptive)
    schedule: Any = None  # its frame policy at run time (server.engine.frame_policy.StreamSchedule), if set
    last_result: tuple[dict, Any] | None = None  # (outputs, logits [K]) of its last computed frame
    probe_state: StreamState | None = None  # adaptive policy: a copy of `state` a candidate budget runs on
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=512))  # seconds, newest last

    @property
    def connected(self) -> bool:
        return self.session is not None

    def latency_quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class StreamRegistry:
    def __init__(self, max_streams: int, ttl_s: float):
        self.max_streams = max_streams
        self.ttl_s = ttl_s
        self.records: dict[str, StreamRecord] = {}
        self._next_session = 0

    def open(self, stream_id: str, deliver: Callable[[StreamMessage], None]) -> tuple[StreamRecord, Session]:
        """Attach a new connection; resumes a retained record. Raises StreamRefused."""
        record = self.records.get(stream_id)
        if record is not None and record.connected:
            raise StreamRefused(CLOSE_STREAM_IN_USE, f"stream {stream_id!r} is already connected", "in_use")
        if self.connected_count >= self.max_streams:
            raise StreamRefused(
                CLOSE_TRY_AGAIN_LATER, f"server is at its limit of {self.max_streams} streams", "max_streams"
            )
        if record is None:
            self._make_room()
            record = self.records[stream_id] = StreamRecord(stream_id)
        self._next_session += 1
        record.session = Session(self._next_session, stream_id, deliver)
        record.disconnected_at = None
        return record, record.session

    def _make_room(self) -> None:
        """Before a new record: at most max_streams records (states) in all. Retained states use free stream slots
        only; the oldest give way to a stream that connects (there is one to free: fewer than max_streams are
        connected)."""
        excess = len(self.records) + 1 - self.max_streams
        if excess > 0:
            retained = sorted((r for r in self.records.values() if not r.connected), key=lambda r: r.disconnected_at)
            for old in retained[:excess]:
                del self.records[old.stream_id]

    def close(self, session: Session, now: float) -> None:
        """Detach a connection; its stream's state is freed now (ttl 0) or kept for ttl_s."""
        session.closed = True
        record = self.records.get(session.stream_id)
        if record is None or record.session is not session:
            return
        record.session = None
        record.disconnected_at = now
        if self.ttl_s <= 0:
            del self.records[session.stream_id]

    def reap(self, now: float) -> list[str]:
        """Free retained records older than ttl_s."""
        expired = [
            r.stream_id for r in self.records.values()
            if not r.connected and r.disconnected_at is not None and now - r.disconnected_at >= self.ttl_s
        ]
        for stream_id in expired:
            del self.records[stream_id]
        return expired

    def next_expiry(self, now: float) -> float | None:
        """Seconds until the next retained record expires."""
        times = [r.disconnected_at + self.ttl_s - now for r in self.records.values() if not r.connected]
        return max(0.0, min(times)) if times else None

    @property
    def connected_count(self) -> int:
        return sum(r.connected for r in self.records.values())

    @property
    def retained_count(self) -> int:
        return sum(not r.connected for r in self.records.values())

    @property
    def state_bytes(self) -> int:
        return sum(r.state_bytes for r in self.records.values())
