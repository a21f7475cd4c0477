"""The scheduler: per stream the latest decoded frame wins; ready frames of different streams are batched.

Pure bookkeeping (no threads, no model): the engine calls it under its lock. It offers a batch of PendingFrames; the
planner (server/engine/planner.py) turns them into a StepPlan and the scheduler lets go of the frames it took
(`take`); a frame the planner holds back stays, and goes first next time (it was served longest ago).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PendingFrame:
    """A decoded, preprocessed frame waiting for the inference thread."""

    stream_id: str
    session: int  # which connection of the stream sent it
    frame: int  # index of the binary message on that connection
    image: torch.Tensor  # [3, H, W] preprocessed, on the CPU
    frame_size: tuple[int, int]  # (height, width) as decoded, before preprocessing
    received_at: float  # perf_counter() at message receipt
    queued_at: float  # perf_counter() when it became ready
    decode_seconds: float


class Scheduler:
    """Latest-frame-wins slots, one per stream, and the batching decision.

    A batch starts when no more company is coming (every stream expected to have a frame soon — one being
    decoded, or a live stream that sent recently — is ready, or max_batch_size are), or when the oldest ready
    frame has waited batch_window_s for company. Idle streams are never waited for. When more are ready than fit,
    the streams served longest ago go first (round robin), then the oldest frames.
    """

    def __init__(self, max_batch_size: int, batch_window_s: float):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self._ready: dict[str, PendingFrame] = {}
        self._served_at: dict[str, float] = {}  # stream -> when its last frame went into a batch

    def __len__(self) -> int:
        return len(self._ready)

    def put(self, frame: PendingFrame) -> PendingFrame | None:
        """Queue a frame; returns the frame of the same stream it supersedes (to be reported dropped)."""
        previous = self._ready.get(frame.stream_id)
        if previous is not None and previous.frame > frame.frame and previous.session == frame.session:
            return frame  # an older frame finishing late never replaces a newer one
        self._ready[frame.stream_id] = frame
        return previous

    def take(self, frames: list[PendingFrame], now: float) -> None:
        """Let go of frames a step answers (or sheds): their streams count as served now."""
        for frame in frames:
            if self._ready.get(frame.stream_id) is frame:
                del self._ready[frame.stream_id]
            self._served_at[frame.stream_id] = now

    def discard(self, stream_id: str) -> PendingFrame | None:
        """Forget a stream's waiting frame (its connection closed)."""
        self._served_at.pop(stream_id, None)
        return self._ready.pop(stream_id, None)

    def expire(self, received_before: float) -> list[PendingFrame]:
        """Take out the ready frames received before this time (load shedding: they have missed their target)."""
        late = [f for f in self._ready.values() if f.received_at < received_before]
        for frame in late:
            del self._ready[frame.stream_id]
        return late

    def is_ready(self, stream_id: str) -> bool:
        return stream_id in self._ready

    def next_batch(
        self, now: float, incoming: int = 0, window_s: float | None = None, max_batch: int | None = None,
        take: bool = True,
    ) -> list[PendingFrame] | float | None:
        """A batch to run now, or seconds to wait before asking again, or None when nothing is ready.
        take=False: offered only (the frames stay until `take`).

        incoming: streams with no ready frame but one expected soon (worth waiting for, within the window).
        window_s: the batching window for this decision (default batch_window_s).
        max_batch: a tighter limit than max_batch_size for this batch (the controller shedding load).
        """
        if not self._ready:
            return None
        limit = self.max_batch_size if max_batch is None else max(1, min(max_batch, self.max_batch_size))
        ready = sorted(self._ready.values(), key=lambda f: (self._served_at.get(f.stream_id, -1.0), f.queued_at))
        full = min(limit, len(ready) + incoming)
        window = self.batch_window_s if window_s is None else window_s
        wait = min(f.queued_at for f in ready) + window - now
        if len(ready) < full and wait > 0:
            return wait
        batch = ready[:limit]
        if take:
            self.take(batch, now)
        return batch
