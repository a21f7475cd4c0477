"""`eventful-camera`: one camera streamed to eventful-serve, with a live status line, an optional annotated video and
reconnects with backoff when the server goes away.

Sources (all but the pattern through PyAV): a video file, a webcam device (`/dev/video0`, v4l2), an RTSP/HTTP URL,
or `pattern` (a generated test pattern). Frames are resized on the client (`--resize WxH`), JPEG-encoded and sent
over `ws://HOST:PORT/v1/streams/{id}`; answers are read concurrently and matched by frame index (docs/protocol.md).
A file is paced by its frames' timestamps (pts x time_base, not the container's declared rate, which can be wrong),
or at `--fps` when given; the pattern at `--fps` (10). Live sources are read as they come; with `--fps`, frames that
arrive before the next send slot are skipped. The annotated video keeps the source's timestamps.

The pure parts (URL derivation, backoff schedule, statistics, drawing, the in-order annotation queue) are separate
from the I/O (sources, the socket, the REST call, the encoder) so they unit-test.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clients.loadgen import percentiles, stream_url

GRACE_S = 3.0  # after the last frame: how long to wait for answers still in flight
ANSWER_TIMEOUT_S = 5.0  # a frame unanswered this long is written to the output without its own result
FATAL_CLOSE_CODES = {1008: "policy violation (API key)", 1009: "message too large", 4400: "invalid stream id"}
PATTERN_SIZE = (320, 240)
PATTERN_FPS = 10.0  # the pattern's rate, and a source's when neither its timestamps nor its header give one
MAX_TIMESTAMP_JUMP_S = 2.0  # a source timestamp this far ahead (or any step back): pacing starts over from it
LIVE_SCHEMES = {"rtsp", "rtsps", "rtmp", "rtmps", "udp", "rtp", "srt", "tcp"}


# ---- pure parts ----------------------------------------------------------------------------------


def parse_resize(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise ValueError(f"--resize needs WIDTHxHEIGHT (e.g. 640x480), got {text!r}")
    return int(width), int(height)


def rest_base_url(server: str) -> str:
    """The REST base URL of a server given as ws(s):// or http(s)://HOST:PORT[/...] -> http(s)://HOST:PORT."""
    parts = urlsplit(server)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"server URL must be ws://, wss://, http:// or https://HOST:PORT, got {server!r}")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def is_loopback(server: str) -> bool:
    host = urlsplit(server).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def backoff_delays(initial_s: float = 0.2, max_s: float = 5.0, factor: float = 2.0) -> Iterator[float]:
    """Reconnect waits: initial_s, doubling (by factor), capped at max_s, forever."""
    if initial_s <= 0 or max_s < initial_s or factor < 1:
        raise ValueError("backoff needs 0 < initial_s <= max_s and factor >= 1")
    delay = initial_s
    while True:
        yield delay
        delay = min(max_s, delay * factor)


def describe_outputs(outputs: dict[str, Any] | None) -> str:
    """One short line for a result's outputs: an action, a clip window's fill, a detection count, or the top-1 class
    and score."""
    outputs = outputs or {}
    action = outputs.get("action")
    if action:
        if isinstance(action, dict):
            score = action.get("score")
            return f"action: {action.get('label', '?')}" + (f" {score:.2f}" if isinstance(score, float) else "")
        return f"action: {action}"
    if "window" in outputs:  # a clip model filling its window (no action label on this frame)
        return f"clip window {outputs.get('window')}/{outputs.get('of', '?')}"
    if "boxes" in outputs:
        boxes = outputs.get("boxes") or []
        return f"{len(boxes)} detection{'s' if len(boxes) != 1 else ''}"
    top = outputs.get("top") or []
    if top:
        best = top[0]
        label = str(best.get("label", best.get("index", "?"))).split(",")[0]
        score = best.get("score")
        return f"{label} {score:.2f}" if isinstance(score, (int, float)) else label
    return ""


def box_to_pixels(box: list[float], width: int, height: int) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] in frame pixels, or normalised to 0..1 (every coordinate <= 1) -> pixels."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    if max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1.0:
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


_FONT_CACHE: dict[int, Any] = {}


def _font(size: int):
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            _FONT_CACHE[size] = ImageFont.load_default()
    return _FONT_CACHE[size]


BOX_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (255, 120, 255)]


def draw_result(image: Image.Image, result: dict[str, Any] | None, stale: bool = False,
                note: str | None = None) -> Image.Image:
    """A copy of `image` with the result drawn on it: the caption (top-1 label and score, action, or detection
    count) in a banner at the top, detection boxes with their labels, and the budget. `stale`: the result is an
    earlier frame's (this frame was dropped or not answered); `note` replaces the caption when there is no result."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width, height = out.size
    size = max(10, height // 24)
    font = _font(size)
    caption = note or ""
    if result is not None:
        outputs = result.get("outputs") or {}
        for i, det in enumerate(outputs.get("boxes") or []):
            if not isinstance(det, dict) or len(det.get("box") or []) < 4:
                continue
            x0, y0, x1, y1 = box_to_pixels(det["box"], width, height)
            colour = BOX_COLOURS[i % len(BOX_COLOURS)]
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=max(2, height // 160))
            score = det.get("score")
            label = f"{det.get('label', '?')}" + (f" {score:.2f}" if isinstance(score, (int, float)) else "")
            ty = max(0, y0 - size - 2)
            draw.rectangle(draw.textbbox((x0, ty), label, font=font), fill=colour)
            draw.text((x0, ty), label, fill=(0, 0, 0), font=font)
        caption = describe_outputs(outputs) or caption
        budget = result.get("budget")
        if budget is not None:
            caption = f"{caption}  [r={budget}{' dense' if result.get('dense') else ''}]"
        if stale:
            caption = f"{caption} (previous)"
    if caption:
        left, top, right, bottom = draw.textbbox((4, 2), caption, font=font)
        draw.rectangle([0, 0, min(width, right + 4), bottom + 3], fill=(0, 0, 0))
        draw.text((4, 2), caption, fill=(255, 255, 255) if not stale else (190, 190, 190), font=font)
    return out


def pattern_frame(index: int, width: int = PATTERN_SIZE[0], height: int = PATTERN_SIZE[1]) -> Image.Image:
    """A test-pattern frame: a fixed coarse texture (a static camera) with a square moving across it and the index."""
    rng = np.random.default_rng(0)
    block = 16
    texture = rng.integers(40, 216, (math.ceil(height / block), math.ceil(width / block), 3), dtype=np.uint8)
    pixels = texture.repeat(block, 0).repeat(block, 1)[:height, :width].copy()
    side = max(8, min(width, height) // 5)
    span = max(1, width - side)
    x = (index * 6) % (2 * span)
    x = x if x < span else 2 * span - x  # bounce, no jump
    y = height // 2 - side // 2
    pixels[y : y + side, x : x + side] = (240, 40, 40)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).text((4, height - 14), f"pattern {index}", fill=(255, 255, 255), font=_font(10))
    return image


@dataclass
class CameraStats:
    """Everything the status line and the summary say; fed by the client, clock given by the caller."""

    window_s: float = 3.0  # for the live rates and latency quantiles
    frames_read: int = 0  # frames taken from the source (sent or lost in a gap)
    frames_sent: int = 0
    results: int = 0
    dropped: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # client: send -> result received
    server_latencies_ms: list[float] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    updated_fractions: list[float] = field(default_factory=list)
    connects: int = 0
    reconnects: int = 0
    gaps: list[float] = field(default_factory=list)  # seconds disconnected, one per completed gap
    frames_lost_in_gaps: int = 0  # read from the source while disconnected: never sent
    unanswered_at_disconnect: int = 0  # sent, then the connection closed before their answer
    unanswered: int = 0  # sent on the last connection and not answered by the end
    source_frames_skipped: int = 0  # live source: frames that came before the next send slot
    connections: list[dict[str, int]] = field(default_factory=list)  # per connection: sent / results / ...
    last_result: dict[str, Any] | None = None
    started_at: float | None = None
    ended_at: float | None = None
    disconnected_since: float | None = None
    _sent_times: deque = field(default_factory=deque, repr=False)
    _result_times: deque = field(default_factory=deque, repr=False)
    _recent_latency: deque = field(default_factory=lambda: deque(maxlen=200), repr=False)

    def start(self, now: float) -> None:
        self.started_at = now

    def _count(self, key: str) -> None:
        if self.connections:
            self.connections[-1][key] += 1

    def on_sent(self, now: float) -> None:
        self.frames_sent += 1
        self._count("frames_sent")
        self._sent_times.append(now)

    def on_result(self, message: dict[str, Any], latency_ms: float | None, now: float) -> None:
        self.results += 1
        self._count("results")
        self._result_times.append(now)
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)
            self._recent_latency.append((now, latency_ms))
        if message.get("latency_ms") is not None:
            self.server_latencies_ms.append(float(message["latency_ms"]))
        if message.get("budget") is not None:
            self.budgets.append(int(message["budget"]))
        if message.get("updated_fraction") is not None:
            self.updated_fractions.append(float(message["updated_fraction"]))
        self.last_result = message

    def on_dropped(self, now: float) -> None:
        self.dropped += 1
        self._count("dropped")

    def on_error(self, code: str, now: float) -> None:
        self.errors += 1
        self._count("errors")
        self.error_codes[code] = self.error_codes.get(code, 0) + 1

    def on_connected(self, now: float) -> None:
        self.connects += 1
        self.connections.append({"frames_sent": 0, "results": 0, "dropped": 0, "errors": 0})
        if self.connects > 1:
            self.reconnects += 1
        if self.disconnected_since is not None:
            self.gaps.append(now - self.disconnected_since)
            self.disconnected_since = None

    def on_disconnected(self, now: float, unanswered: int) -> None:
        self.unanswered_at_disconnect += unanswered
        if self.disconnected_since is None and self.connects > 0:  # before the first connection: not a gap
            self.disconnected_since = now

    def gap_s(self, now: float | None = None) -> float:
        """Seconds disconnected after the first connection (a gap still open counts up to `now`)."""
        open_gap = now - self.disconnected_since if (now is not None and self.disconnected_since is not None
                                                      and self.connects > 0) else 0.0
        return sum(self.gaps) + open_gap

    def _rate(self, times: deque, now: float) -> float:
        while times and times[0] < now - self.window_s:
            times.popleft()
        if not times or self.started_at is None:
            return 0.0
        span = min(self.window_s, now - self.started_at)
        return len(times) / span if span > 0 else 0.0

    def status_line(self, now: float) -> str:
        recent = [ms for t, ms in self._recent_latency if t >= now - self.window_s]
        lat = percentiles(recent)
        last = self.last_result or {}

        def ms(v):
            return f"{v:.0f}" if v is not None else "-"

        parts = [
            f"sent {self._rate(self._sent_times, now):4.1f} fps",
            f"results {self._rate(self._result_times, now):4.1f} fps",
            f"dropped {self.dropped}" + (f" errors {self.errors}" if self.errors else ""),
            f"latency p50 {ms(lat['p50'])} / p95 {ms(lat['p95'])} ms",
            f"budget {last.get('budget', '-')}",
            f"updated {last['updated_fraction']:.2f}" if last.get("updated_fraction") is not None else "updated -",
        ]
        caption = describe_outputs(last.get("outputs"))
        if caption:
            parts.append(caption)
        if self.disconnected_since is not None:
            parts.append(f"DISCONNECTED {now - self.disconnected_since:.1f} s")
        return " | ".join(parts)

    def summary(self, now: float) -> dict[str, Any]:
        end = self.ended_at if self.ended_at is not None else now
        elapsed = end - self.started_at if self.started_at is not None else 0.0
        lat = percentiles(self.latencies_ms)
        server = percentiles(self.server_latencies_ms)
        last = self.last_result or {}
        return {
            "frames_read": self.frames_read,
            "frames_sent": self.frames_sent,
            "results": self.results,
            "dropped": self.dropped,
            "errors": self.errors,
            "error_codes": self.error_codes,
            "unanswered": self.unanswered,
            "elapsed_s": elapsed,
            "fps_sent": self.frames_sent / elapsed if elapsed > 0 else 0.0,
            "fps_answered": self.results / elapsed if elapsed > 0 else 0.0,
            "latency_ms": {"p50": lat["p50"], "p95": lat["p95"], "mean": lat["mean"]},
            "server_latency_ms": {"p50": server["p50"], "p95": server["p95"], "mean": server["mean"]},
            "mean_budget": float(np.mean(self.budgets)) if self.budgets else None,
            "mean_updated_fraction": float(np.mean(self.updated_fractions)) if self.updated_fractions else None,
            "last_caption": describe_outputs(last.get("outputs")) or None,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "gap_s": self.gap_s(end),
            "gaps": len(self.gaps) + (1 if self.disconnected_since is not None and self.connects else 0),
            "frames_lost_in_gaps": self.frames_lost_in_gaps,
            "unanswered_at_disconnect": self.unanswered_at_disconnect,
            "source_frames_skipped": self.source_frames_skipped,
            "connections": [dict(c) for c in self.connections],
        }


def format_summary(summary: dict[str, Any]) -> str:
    def ms(v):
        return f"{v:.1f}" if v is not None else "-"

    lat, server = summary["latency_ms"], summary["server_latency_ms"]
    lines = [
        f"frames: read {summary['frames_read']}, sent {summary['frames_sent']}, results {summary['results']}, "
        f"dropped {summary['dropped']}, errors {summary['errors']}, unanswered {summary['unanswered']}",
        f"rate: {summary['fps_sent']:.1f} sent / {summary['fps_answered']:.1f} results frames/s "
        f"over {summary['elapsed_s']:.1f} s",
        f"latency (client): p50 {ms(lat['p50'])} ms, p95 {ms(lat['p95'])} ms; "
        f"server: p50 {ms(server['p50'])} ms, p95 {ms(server['p95'])} ms",
        f"budget: mean {ms(summary['mean_budget'])} tokens, updated fraction {ms(summary['mean_updated_fraction'])}",
        f"connection: {summary['reconnects']} reconnect(s), {summary['gap_s']:.1f} s disconnected, "
        f"{summary['frames_lost_in_gaps']} frame(s) not sent during gaps, "
        f"{summary['unanswered_at_disconnect']} unanswered at a disconnect",
    ]
    if summary.get("error_codes"):
        lines.append(f"error codes: {summary['error_codes']}")
    if summary["dropped"] and summary["frames_sent"]:
        lines.append(f"WARNING: {100 * summary['dropped'] / summary['frames_sent']:.0f} % of the frames sent were "
                     "dropped by the server (sent faster than it processes them): lower --fps or the budget")
    if summary.get("output"):
        lines.append(f"output: {summary['output']} ({summary.get('frames_written', 0)} frames)")
    if summary.get("failure"):
        lines.append(f"FAILED: {summary['failure']}")
    return "\n".join(lines)


class AnnotationQueue:
    """Frames waiting for their answer, released in source order once answered (or given up on).

    Each released frame comes with what to draw: its own result, or (dropped, error, not sent, unanswered) the
    latest result of an earlier frame, marked stale. A frame is whatever the caller adds (an image, or an image with
    its timestamp); the queue only holds it."""

    def __init__(self, timeout_s: float = ANSWER_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._pending: deque[tuple[int, Any, float]] = deque()  # (seq, frame, added at)
        self._answers: dict[int, dict[str, Any] | None] = {}
        self._last_result: dict[str, Any] | None = None
        self._last_action: Any = None

    def _hold_action(self, result: dict[str, Any]) -> dict[str, Any]:
        """A clip model labels its full window every stride frames and answers the frames between with the window
        fill only: those frames are drawn with the latest action (until the window starts over)."""
        outputs = result.get("outputs") or {}
        if outputs.get("action"):
            self._last_action = outputs["action"]
        elif "window" in outputs:
            if outputs.get("window") != outputs.get("of"):
                self._last_action = None  # the window was flushed: filling again
            elif self._last_action is not None:
                return {**result, "outputs": {**outputs, "action": self._last_action}}
        return result

    def add(self, seq: int, frame: Any, now: float) -> None:
        self._pending.append((seq, frame, now))

    def answer(self, seq: int, message: dict[str, Any] | None) -> None:
        """message: a result; None: this frame has no result of its own (dropped, error, not sent, lost)."""
        self._answers[seq] = message if message is not None and message.get("type") == "result" else None

    def __len__(self) -> int:
        return len(self._pending)

    def release(self, now: float, flush: bool = False) -> list[tuple[Any, dict[str, Any] | None, bool]]:
        """(frame, result, stale) for every head frame that is answered, timed out, or all of them when flush."""
        out = []
        while self._pending:
            seq, frame, added = self._pending[0]
            if seq not in self._answers and not flush and now - added < self.timeout_s:
                break
            self._pending.popleft()
            own = self._answers.pop(seq, None)
            if own is not None:
                own = self._hold_action(own)
                self._last_result = own
                out.append((frame, own, False))
            else:
                out.append((frame, self._last_result, True))
        return out


# ---- sources -------------------------------------------------------------------------------------


class TimedFrame(NamedTuple):
    """A source frame and its time on the source's timeline, seconds (pts x time_base, from the first frame on);
    None when the source has no timestamps."""

    image: Image.Image
    time_s: float | None


@dataclass
class FrameSource:
    """Frames from somewhere: `frames` yields TimedFrames; `rate` is the frame rate the container declares (None when
    unknown; it can disagree with the timestamps); a live source delivers at its own pace, others are paced by
    sleeping."""

    name: str
    frames: Iterator[TimedFrame]
    rate: float | None
    live: bool
    close: Callable[[], None] = lambda: None


def _pyav_frames(holder: dict[str, Any], loop: bool, reopen: Callable[[], Any] | None) -> Iterator[TimedFrame]:
    """Decode holder["container"]; with loop, reopen it at the end (holder keeps the open one, for closing). Times
    count from the first frame and go on across loops (each pass starts one frame interval after the last frame)."""
    offset_s = 0.0  # this pass's start on the timeline: 0, then one interval after the previous pass's last frame
    last_s = interval_s = None
    while True:
        container = holder["container"]
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        got = False
        pass_start: float | None = None
        for frame in container.decode(stream):
            got = True
            time_s = None
            if frame.pts is not None and frame.time_base is not None:
                pts_s = float(frame.pts * frame.time_base)
                if pass_start is None:
                    pass_start = pts_s
                    if last_s is not None:
                        offset_s = last_s + (interval_s or 1.0 / PATTERN_FPS)
                time_s = offset_s + pts_s - pass_start
                if last_s is not None and time_s > last_s:
                    interval_s = time_s - last_s
                last_s = time_s
            yield TimedFrame(frame.to_image(), time_s)
        if not loop or not got or reopen is None:
            return
        container.close()
        holder["container"] = reopen()


def open_source(spec: str, loop: bool = False) -> FrameSource:
    """'pattern', a video file, a v4l2 device (/dev/videoN) or a URL (rtsp://, http(s)://, ...) PyAV can open."""
    if spec == "pattern":
        def pattern() -> Iterator[TimedFrame]:
            index = 0
            while True:
                yield TimedFrame(pattern_frame(index), None)  # paced at --fps (PATTERN_FPS)
                index += 1
        return FrameSource("pattern", pattern(), None, live=False)

    import av

    if spec.startswith("/dev/video"):
        try:
            container = av.open(spec, format="v4l2")
        except (av.FFmpegError, ValueError) as err:  # this PyAV build may lack v4l2: let FFmpeg guess
            try:
                container = av.open(spec)
            except av.FFmpegError:
                raise ValueError(f"cannot open camera {spec}: {err}") from err
        live, reopen = True, None
    elif "://" in spec:
        scheme = spec.split("://", 1)[0].lower()
        options = {"rtsp_transport": "tcp"} if scheme.startswith("rtsp") else {}
        try:
            container = av.open(spec, options=options, timeout=10.0)
        except av.FFmpegError as err:
            raise ValueError(f"cannot open stream {spec}: {err}") from err
        # a camera feed (RTSP, RTMP, UDP, SRT, an HTTP stream without an end) comes at its own pace; a file
        # behind an HTTP URL (known duration) is paced like a local file
        live = scheme in LIVE_SCHEMES or container.duration is None
        reopen = None if live else (lambda: av.open(spec, options=options, timeout=10.0))
    else:
        if not Path(spec).is_file():
            raise ValueError(f"no such video file: {spec}")
        try:
            container = av.open(spec)
        except av.FFmpegError as err:
            raise ValueError(f"cannot open video {spec}: {err}") from err
        live = False

        def reopen():
            return av.open(spec)
    if not container.streams.video:
        container.close()
        raise ValueError(f"{spec}: no video stream")
    rate = container.streams.video[0].average_rate
    holder = {"container": container}

    return FrameSource(spec, _pyav_frames(holder, loop and not live, reopen), float(rate) if rate else None, live,
                       close=lambda: holder["container"].close())


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---- output video --------------------------------------------------------------------------------


class AnnotatedWriter:
    """Annotated frames -> a video file (PyAV; H.264 when available, else MPEG-4), opened on the first frame. Each
    frame is written at its source time (so the video plays at the source's speed, gaps and all); `fps` is the
    nominal rate, used for frames without a time."""

    TIME_BASE = Fraction(1, 1000)  # milliseconds

    def __init__(self, path: str | Path, fps: float):
        self.path = Path(path)
        self.fps = fps if fps > 0 else PATTERN_FPS
        self.frames_written = 0
        self._container = None
        self._stream = None
        self._size: tuple[int, int] | None = None
        self._first_s: float | None = None
        self._last_pts: int | None = None

    def _open(self, width: int, height: int) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
        self._stream.codec_context.time_base = self.TIME_BASE  # frames carry their own pts: variable rate is fine
        self._size = (width - width % 2, height - height % 2)  # yuv420p needs even sizes
        self._stream.width, self._stream.height = self._size
        self._stream.pix_fmt = "yuv420p"

    def write(self, image: Image.Image, time_s: float | None = None) -> None:
        """One frame at `time_s` on the source's timeline (None: one nominal interval after the previous frame)."""
        import av

        if self._container is None:
            self._open(*image.size)
        if image.size != self._size:
            image = image.resize(self._size, Image.BILINEAR)
        frame = av.VideoFrame.from_image(image.convert("RGB"))
        step = max(1, round(1 / (self.fps * self.TIME_BASE)))  # one nominal interval, in TIME_BASE units
        if time_s is None:
            pts = 0 if self._last_pts is None else self._last_pts + step
        else:
            if self._first_s is None:
                self._first_s = time_s
            pts = round((time_s - self._first_s) / self.TIME_BASE)
            if self._last_pts is not None and pts <= self._last_pts:  # a step back in the source: keep going on
                pts = self._last_pts + step
        frame.pts, frame.time_base = pts, self.TIME_BASE
        self._last_pts = pts
        self._container.mux(self._stream.encode(frame))
        self.frames_written += 1

    def close(self) -> None:
        if self._container is not None:
            self._container.mux(self._stream.encode())
            self._container.close()
            self._container = None


# ---- REST ----------------------------------------------------------------------------------------


def rest_call(base: str, method: str, path: str, body: dict[str, Any] | None = None, api_key: str | None = None,
              timeout_s: float = 5.0) -> dict[str, Any]:
    """One JSON REST call; raises RuntimeError with the status and body on failure."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            raw = response.read()
            return json.loads(raw) if raw else {}
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise RuntimeError(f"{method} {path}: HTTP {err.code}: {detail}") from err
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{method} {path}: {type(err).__name__}: {err}") from err


def queries_message(queries: list[str]) -> dict[str, Any]:
    """The control message that sets this stream's text queries (OWLv2 models)."""
    return {"type": "queries", "queries": list(queries)}


def parse_queries(text: str) -> list[str]:
    """'person, car' -> ['person', 'car']."""
    queries = [part.strip() for part in text.split(",") if part.strip()]
    if not queries:
        raise argparse.ArgumentTypeError("give at least one query, e.g. 'person,car'")
    return queries


def set_stream_budget(base: str, stream_id: str, tokens: int, api_key: str | None = None) -> dict[str, Any]:
    """PUT /v1/streams/{id}/budget {"tokens": R}; returns the server's answer."""
    return rest_call(base, "PUT", f"/v1/streams/{stream_id}/budget", {"tokens": tokens}, api_key)


# ---- the client ----------------------------------------------------------------------------------


@dataclass
class CameraConfig:
    server: str  # ws(s):// or http(s)://HOST:PORT
    source: str = "pattern"
    stream_id: str = "camera"
    fps: float | None = None  # None: the source's rate (10 for the pattern and unknown rates)
    resize: tuple[int, int] | None = None
    jpeg_quality: int = 85
    api_key: str | None = None
    budget: int | None = None
    queries: list[str] | None = None  # text queries (OWLv2 models): sent as a control message on every connect
    output: str | None = None
    frames: int | None = None  # stop after this many source frames
    duration_s: float | None = None  # stop after this many seconds of streaming
    loop: bool = False  # a video file restarts at its end
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    give_up_after_s: float = 60.0  # disconnected this long (or never connected): stop with an error
    status_interval_s: float = 0.5

    def __post_init__(self):
        if self.fps is not None and self.fps <= 0:
            raise ValueError("fps must be > 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be 1..100")
        if self.frames is not None and self.frames < 1:
            raise ValueError("frames must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be > 0")
        if self.budget is not None and self.budget < 0:
            raise ValueError("budget must be >= 0")
        rest_base_url(self.server)
        stream_url(self.server, self.stream_id)
        next(backoff_delays(self.backoff_initial_s, self.backoff_max_s))


class CameraClient:
    """Streams one source until it ends, a bound is reached or stop() is called; reconnects with backoff."""

    def __init__(self, config: CameraConfig, log: Callable[[str], None] | None = None,
                 status: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.stats = CameraStats()
        self.clock = clock
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._status = status
        self._stop = threading.Event()
        self._ws = None
        self._in_flight: dict[int, tuple[int, float]] = {}  # connection frame index -> (source seq, sent at)
        self._next_index = 0
        self._sending: int | None = None  # connection frame index whose ws.send() is awaited right now
        self._send_orphaned = False  # that frame was unanswered when its connection closed mid-send
        self._send_answered = False  # that frame's answer came before ws.send() returned
        self._connected: asyncio.Event | None = None  # created in run() (needs the running loop)
        self._answered: asyncio.Event | None = None
        self._failure: str | None = None
        self._annotations = AnnotationQueue()
        self._writer: AnnotatedWriter | None = None
        self._budget_answer: dict[str, Any] | None = None
        self._warned_dropped = False
        self._first_time_s: float | None = None  # the first and the latest source timestamp read
        self._last_time_s: float | None = None
        self._timed_frames = 0  # frames read that had a timestamp

    def stop(self) -> None:
        """Thread-safe: finish the current frame, wait for answers in flight, close, summarise."""
        self._stop.set()

    @property
    def connected(self) -> bool:
        return self._ws is not None

    # -- connection --

    async def _open(self):
        from websockets.asyncio.client import connect

        config = self.config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
        kwargs = {"proxy": None} if is_loopback(config.server) else {}
        return await connect(
            stream_url(config.server, config.stream_id), additional_headers=headers, max_size=2**24,
            open_timeout=5, ping_interval=5, ping_timeout=10, close_timeout=2, **kwargs,
        )

    async def _maintain(self) -> None:
        """Connect, read answers until the connection ends, reconnect with backoff; sets _failure when it gives up."""
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        config = self.config
        delays = backoff_delays(config.backoff_initial_s, config.backoff_max_s)
        trying_since = self.clock()
        while not self._stop.is_set():
            try:
                ws = await self._open()
            except InvalidStatus as err:
                status_code = err.response.status_code
                if status_code in (401, 403):
                    self._failure = f"server refused the connection: HTTP {status_code}"
                    return
                error = f"HTTP {status_code}"
            except Exception as err:  # refused, timed out, bad handshake: all retried
                error = f"{type(err).__name__}: {err}"
            else:
                await self._on_connected(ws)
                delays = backoff_delays(config.backoff_initial_s, config.backoff_max_s)
                code, reason = None, ""
                try:
                    await self._receive(ws)
                except ConnectionClosed:
                    pass
                finally:
                    code, reason = ws.close_code, ws.close_reason or ""
                    self._on_disconnected()
                if self._stop.is_set():
                    return
                if code in FATAL_CLOSE_CODES:
                    self._failure = f"server closed the stream: {code} {FATAL_CLOSE_CODES[code]} ({reason})"
                    return
                self._log(f"server went away (close {code}{': ' + reason if reason else ''}); reconnecting")
                trying_since = self.clock()
                continue
            waited = self.clock() - trying_since
            if waited >= config.give_up_after_s:
                self._failure = f"no connection to {config.server} for {waited:.0f} s (last: {error})"
                return
            delay = min(next(delays), max(0.05, config.give_up_after_s - waited))
            self._log(f"cannot connect ({error}); retrying in {delay:.1f} s")
            await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        end = self.clock() + seconds
        while not self._stop.is_set() and self.clock() < end:
            await asyncio.sleep(min(0.05, max(0.0, end - self.clock())))

    async def _on_connected(self, ws) -> None:
        now = self.clock()
        first = self.stats.connects == 0
        gap = None if self.stats.disconnected_since is None else now - self.stats.disconnected_since
        if self.config.budget is not None:  # (again after a reconnect: a restarted server has lost the override)
            try:
                self._budget_answer = await asyncio.to_thread(
                    set_stream_budget, rest_base_url(self.config.server), self.config.stream_id, self.config.budget,
                    self.config.api_key,
                )
            except RuntimeError as err:
                self._log(f"could not set the budget: {err}")
        if self.config.queries:  # (again after a reconnect: a restarted server has lost them)
            await ws.send(json.dumps(queries_message(self.config.queries)))
        self._next_index = 0  # a new connection counts frames from 0
        self._in_flight.clear()
        self._ws = ws
        self.stats.on_connected(self.clock())
        if self._connected is not None:
            self._connected.set()
        if not first:
            self._log(f"reconnected to {self.config.server} after {gap or 0.0:.1f} s "
                      f"(reconnect {self.stats.reconnects})")

    def _on_disconnected(self) -> None:
        self._ws = None
        if self._sending is not None and self._in_flight.pop(self._sending, None) is not None:
            self._send_orphaned = True  # counted by _send once ws.send() returns: sent, or lost in the gap
        unanswered = len(self._in_flight)
        for seq, _ in self._in_flight.values():
            self._annotations.answer(seq, None)
        self._in_flight.clear()
        if not self._stop.is_set():
            self.stats.on_disconnected(self.clock(), unanswered)
        else:
            self.stats.unanswered += unanswered
        if self._answered is not None:
            self._answered.set()

    async def _receive(self, ws) -> None:
        async for text in ws:
            if isinstance(text, bytes):
                continue
            now = self.clock()
            try:
                message = json.loads(text)
            except ValueError:
                continue
            kind = message.get("type")
            if kind == "queries":
                self._log(f"queries: {', '.join(map(str, message.get('queries') or []))}")
                continue
            if kind == "error" and message.get("frame") is None:  # about a control message (the queries)
                self._log(f"server: {message.get('code')}: {message.get('message')}")
                continue
            if kind not in ("result", "dropped", "error") or message.get("frame") is None:
                continue
            entry = self._in_flight.pop(message["frame"], None)
            if entry is None:
                continue
            if message["frame"] == self._sending:
                self._send_answered = True
            seq, sent_at = entry
            if kind == "result":
                self.stats.on_result(message, 1000 * (now - sent_at), now)
            elif kind == "dropped":
                self.stats.on_dropped(now)
                if not self._warned_dropped:
                    self._warned_dropped = True
                    self._log(f"warning: the server dropped frame {message['frame']} (a newer frame came before it "
                              "was processed): frames are sent faster than the server answers; lower --fps or the "
                              "budget (the summary counts the drops)")
            else:
                self.stats.on_error(str(message.get("code", "unknown")), now)
            self._annotations.answer(seq, message)
            if self._answered is not None:
                self._answered.set()

    # -- sending --

    async def _send(self, seq: int, jpeg: bytes) -> bool:
        """Send one frame on the current connection; False when there is none (the frame is lost in the gap)."""
        from websockets.exceptions import ConnectionClosed

        ws = self._ws
        if ws is None:
            return False
        index = self._next_index
        self._next_index += 1
        self._in_flight[index] = (seq, self.clock())  # before the await: its answer may come before send returns
        self._sending, self._send_orphaned, self._send_answered = index, False, False
        try:
            await ws.send(jpeg)
        except ConnectionClosed:
            if not self._send_answered:  # (an answered frame did leave, whatever the close says)
                if self._ws is ws:
                    self._in_flight.pop(index, None)
                return False
        finally:
            self._sending = None
        self.stats.on_sent(self.clock())
        if self._send_orphaned:  # the connection closed while this frame was written: it left, its answer can't come
            if self._stop.is_set():
                self.stats.unanswered += 1
            else:
                self.stats.unanswered_at_disconnect += 1
            self._annotations.answer(seq, None)
        return True

    async def _write_ready(self, flush: bool = False) -> None:
        ready = self._annotations.release(self.clock(), flush=flush)
        if self._writer is None or not ready:
            return

        def write():
            for (image, time_s), result, stale in ready:
                self._writer.write(draw_result(image, result, stale=stale and result is not None,
                                               note=None if result is not None else "no result yet"), time_s)

        await asyncio.to_thread(write)

    async def _status_loop(self) -> None:
        while not self._stop.is_set():
            if self._status is not None and self.stats.started_at is not None:
                self._status(self.stats.status_line(self.clock()))
            await asyncio.sleep(self.config.status_interval_s)

    async def run(self) -> dict[str, Any]:
        """Stream until done; returns the summary (with `failure` set when the client gave up)."""
        config = self.config
        self._connected = asyncio.Event()
        self._answered = asyncio.Event()
        source = await asyncio.to_thread(open_source, config.source, config.loop)
        if self.config.output:
            self._writer = AnnotatedWriter(self.config.output, config.fps or source.rate or PATTERN_FPS)
        maintainer = asyncio.create_task(self._maintain())
        status_task = asyncio.create_task(self._status_loop())
        try:
            # wait for the first connection before reading (a file's first frames are not lost to start-up)
            while not self._connected.is_set() and not maintainer.done() and not self._stop.is_set():
                await asyncio.sleep(0.02)
            if self._connected.is_set():
                await self._stream(source, maintainer)
                await self._drain(maintainer)
        finally:
            self._stop.set()
            self.stats.ended_at = self.clock()
            if self._ws is not None:
                await self._ws.close()
            for task in (maintainer, status_task):
                task.cancel()
            await asyncio.gather(maintainer, status_task, return_exceptions=True)
            if self._ws is not None:  # the maintainer was cancelled before it saw the close
                self._on_disconnected()
            source.close()
            await self._write_ready(flush=True)
            if self._writer is not None:
                await asyncio.to_thread(self._writer.close)
        summary = self.stats.summary(self.clock())
        summary.update(stream_id=config.stream_id, server=config.server, source=config.source,
                       pacing="fps" if config.fps else ("source" if source.live else "timestamps"),
                       fps_target=config.fps or self._timestamp_rate() or source.rate or PATTERN_FPS,
                       source_declared_fps=source.rate)
        if self._budget_answer is not None:
            summary["budget_set"] = self._budget_answer
        if self._writer is not None:
            summary.update(output=str(self._writer.path), frames_written=self._writer.frames_written)
        if self._failure:
            summary["failure"] = self._failure
        return summary

    def _timestamp_rate(self) -> float | None:
        """Frames per second by the source's timestamps so far (None before two timed frames)."""
        if self._timed_frames < 2 or self._last_time_s <= self._first_time_s:
            return None
        return (self._timed_frames - 1) / (self._last_time_s - self._first_time_s)

    def _note_timestamp(self, time_s: float, source: FrameSource) -> None:
        """Count a source timestamp; say once when the timestamps and the container's declared rate disagree."""
        if self._first_time_s is None:
            self._first_time_s = time_s
        self._last_time_s = time_s
        self._timed_frames += 1
        rate = self._timestamp_rate()
        if self._timed_frames == 10 and rate and source.rate and abs(rate / source.rate - 1) > 0.1:
            self._log(f"note: {source.name} declares {source.rate:g} fps but its timestamps advance at {rate:.3g} fps; "
                      "the frames are sent (and written) by their timestamps")

    async def _stream(self, source: FrameSource, maintainer: asyncio.Task) -> None:
        """Read, pace, send. A file goes by its timestamps (or at --fps: every frame, 1/fps apart); a frame that is
        late by more than one interval moves the schedule on (at most one frame of catch-up). A live source is sent
        as it comes, or, with --fps, frames that come before the next slot are skipped."""
        config = self.config
        fixed_period = 1.0 / config.fps if config.fps else None
        nominal_period = fixed_period or 1.0 / (source.rate or PATTERN_FPS)
        start = self.clock()
        self.stats.start(start)
        next_slot = start  # a live source at --fps
        offset = None  # a file: a frame with pacing time t is due at clock offset + t
        previous_t = source_t = None
        frames = source.frames
        while not self._stop.is_set() and not maintainer.done():
            if config.frames is not None and self.stats.frames_read >= config.frames:
                break
            if config.duration_s is not None and self.clock() - start >= config.duration_s:
                break
            item = await asyncio.to_thread(next, frames, None)
            if item is None:
                break
            image, time_s = item
            # the source's timeline (the annotated video's): its timestamps, else one nominal interval per frame
            if time_s is not None:
                self._note_timestamp(time_s, source)
                source_t = time_s
            else:
                source_t = 0.0 if source_t is None else source_t + nominal_period
            now = self.clock()
            if source.live:
                if fixed_period is not None:
                    if now < next_slot:
                        self.stats.source_frames_skipped += 1
                        continue
                    next_slot = max(next_slot + fixed_period, now - fixed_period)  # at most one slot of catch-up
            else:
                t = self.stats.frames_read * fixed_period if fixed_period else source_t
                interval = fixed_period or (t - previous_t if previous_t is not None and t > previous_t
                                            else nominal_period)
                if offset is None or (previous_t is not None and t < previous_t) \
                        or offset + t - now > MAX_TIMESTAMP_JUMP_S:
                    offset = now - t  # the first frame, or a jump in the timestamps: start the schedule here
                await asyncio.sleep(max(0.0, offset + t - now))
                now = self.clock()
                offset = max(offset, now - t - interval)  # late: the next frame may go at once, then on schedule
                previous_t = t
            if config.resize is not None and image.size != config.resize:
                image = image.resize(config.resize, Image.BILINEAR)
            seq = self.stats.frames_read
            self.stats.frames_read += 1
            if self._writer is not None:
                self._annotations.add(seq, TimedFrame(image, source_t), now)
            jpeg = await asyncio.to_thread(encode_jpeg, image, config.jpeg_quality)
            if not await self._send(seq, jpeg):
                self.stats.frames_lost_in_gaps += 1
                self._annotations.answer(seq, None)
            await self._write_ready()

    async def _drain(self, maintainer: asyncio.Task) -> None:
        """After the last frame: wait (bounded) for the answers still in flight."""
        end = self.clock() + GRACE_S
        while self._in_flight and self._ws is not None and not maintainer.done() and self.clock() < end:
            self._answered.clear()
            try:
                await asyncio.wait_for(self._answered.wait(), timeout=max(0.01, end - self.clock()))
            except (TimeoutError, asyncio.TimeoutError):
                break


# ---- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventful-camera", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="pattern",
                        help="video file, /dev/videoN, rtsp:// or http(s):// URL, or 'pattern' (default)")
    parser.add_argument("--server", default="ws://127.0.0.1:8000", help="ws://HOST:PORT (or http://)")
    parser.add_argument("--stream-id", default="camera")
    parser.add_argument("--fps", type=float, default=None,
                        help="frames/s to send, every frame 1/F apart (default: a file by its frames' timestamps, "
                             "a live source as it comes, the pattern at 10)")
    parser.add_argument("--resize", type=parse_resize, default=None, metavar="WxH", help="resize frames to WxH")
    parser.add_argument("--jpeg-quality", type=int, default=85)
    parser.add_argument("--api-key", default=None, help="API key (default: EVENTFUL_API_KEY)")
    parser.add_argument("--budget", type=int, default=None, metavar="R",
                        help="set this stream's budget to R tokens per gate (PUT /v1/streams/{id}/budget)")
    parser.add_argument("--queries", type=parse_queries, default=None, metavar="TEXT,TEXT",
                        help="text queries for an OWLv2 server, comma-separated (e.g. 'person,car'): sent as the "
                             "queries control message after connecting; boxes are labelled with them")
    parser.add_argument("--output", default=None, help="write the annotated video here (e.g. annotated.mp4)")
    parser.add_argument("--frames", type=int, default=None, help="stop after N source frames")
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds of streaming")
    parser.add_argument("--loop", action="store_true", help="restart a video file at its end")
    parser.add_argument("--reconnect-max-wait", type=float, default=5.0,
                        help="longest wait between reconnect attempts, seconds (from 0.2 s, doubling)")
    parser.add_argument("--give-up-after", type=float, default=60.0,
                        help="stop when disconnected this many seconds in a row")
    parser.add_argument("--quiet", action="store_true", help="no live status line")
    parser.add_argument("--json", default=None, help="write the summary here")
    return parser


class StatusPrinter:
    """The live status line: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream=sys.stderr, every_s: float = 2.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._width = 0

    def status(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            self.stream.flush()
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            print(line, file=self.stream, flush=True)

    def log(self, text: str) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        print(text, file=self.stream, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when frames were answered, 1 when the client gave up or nothing was answered, 2 for bad arguments."""
    args = build_parser().parse_args(argv)
    try:
        config = CameraConfig(
            server=args.server, source=args.source, stream_id=args.stream_id, fps=args.fps, resize=args.resize,
            jpeg_quality=args.jpeg_quality, api_key=args.api_key or os.environ.get("EVENTFUL_API_KEY"),
            budget=args.budget, queries=args.queries, output=args.output, frames=args.frames, duration_s=args.duration,
            loop=args.loop,
            backoff_max_s=max(0.2, args.reconnect_max_wait), give_up_after_s=args.give_up_after,
        )
        if config.source != "pattern" and "://" not in config.source and not config.source.startswith("/dev/") \
                and not Path(config.source).is_file():
            raise ValueError(f"no such video file: {config.source}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    printer = StatusPrinter()
    client = CameraClient(config, log=printer.log, status=None if args.quiet else printer.status)

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, client.stop)
                except (NotImplementedError, RuntimeError):  # no loop signal handlers (Windows): a plain one
                    signal.signal(sig, lambda *_: loop.call_soon_threadsafe(client.stop))
        return await client.run()

    try:
        summary = asyncio.run(run())
    except ValueError as err:  # the source could not be opened
        printer.log(f"error: {err}")
        return 2
    printer.log("")
    print(format_summary(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 1 if summary.get("failure") or summary["results"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
