"""`eventful-loadgen`: N concurrent camera streams from video files against a live server, for a bounded time.

Frames are decoded with PyAV, resized on the client, JPEG-encoded once up front and replayed ping-pong (forward, then
backward, so a looped video has no scene cut). Each stream starts at its own offset. Two ways to send:

- paced (`--fps F`): a frame every 1/F s whether or not the last result came back, like a camera; the server drops
  stale frames, so `dropped` measures how far the server falls behind.
- closed loop (`--fps 0`): the next frame goes out when fewer than `--in-flight` frames are unanswered (1 by
  default); with 2 the server always has the stream's next frame waiting when a step ends, so the aggregate
  answered frames/s is its capacity for N streams, not bounded by network round trips.

Latency is measured on the client (send -> result received) and reported by the server (receive -> result sent,
with its decode / queue / step breakdown).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image

GRACE_S = 3.0  # after the last frame, how long to wait for outstanding answers


@dataclass(frozen=True)
class LoadConfig:
    server: str  # http://host:port or ws://host:port
    streams: int
    videos: list[str]
    fps: float = 10.0  # per stream; 0 = closed loop (next frame when fewer than in_flight are unanswered)
    in_flight: int = 1  # closed loop: frames sent and not yet answered, per stream
    duration_s: float = 10.0
    size: int | None = None  # resize so the short side is this many pixels (None: as decoded)
    jpeg_quality: int = 90
    max_frames: int = 300  # frames decoded per video (memory bound)
    api_key: str | None = None
    stream_prefix: str = "load"

    def __post_init__(self):
        if self.streams < 1:
            raise ValueError("streams must be >= 1")
        if not self.videos:
            raise ValueError("give at least one video")
        if self.fps < 0 or self.duration_s <= 0:
            raise ValueError("fps must be >= 0 and duration_s > 0")
        if self.in_flight < 1:
            raise ValueError("in_flight must be >= 1")


@dataclass
class StreamReport:
    stream_id: str
    frames_sent: int = 0
    results: int = 0
    dropped: int = 0
    errors: int = 0
    unanswered: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # client: send -> result received
    server_ms: list[float] = field(default_factory=list)  # server: receive -> result sent
    decode_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    updated_fractions: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    top1: list[int | None] = field(default_factory=list)  # per result, in frame order
    result_at: list[float] = field(default_factory=list)  # per result: perf_counter() when it arrived
    dense: list[bool] = field(default_factory=list)  # per result: computed densely (first frame, refresh)
    dropped_at: list[float] = field(default_factory=list)  # perf_counter() of every `dropped` answer
    closed: str | None = None  # why the connection ended early, if it did

    def summary(self) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "frames_sent": self.frames_sent,
            "results": self.results,
            "dropped": self.dropped,
            "errors": self.errors,
            "unanswered": self.unanswered,
            "error_codes": self.error_codes,
            "latency_ms": percentiles(self.latencies_ms),
            "server_latency_ms": percentiles(self.server_ms),
            "decode_ms": percentiles(self.decode_ms),
            "queue_ms": percentiles(self.queue_ms),
            "step_ms": percentiles(self.step_ms),
            "mean_budget": _mean(self.budgets),
            "mean_updated_fraction": _mean(self.updated_fractions),
            "mean_batch_size": _mean(self.batch_sizes),
            "closed": self.closed,
        }


@dataclass
class LoadReport:
    config: LoadConfig
    streams: list[StreamReport]
    elapsed_s: float

    def aggregate(self) -> dict[str, Any]:
        def merged(name: str) -> list[float]:
            return [v for s in self.streams for v in getattr(s, name)]

        results = sum(s.results for s in self.streams)
        return {
            "streams": len(self.streams),
            "frames_sent": sum(s.frames_sent for s in self.streams),
            "results": results,
            "dropped": sum(s.dropped for s in self.streams),
            "errors": sum(s.errors for s in self.streams),
            "unanswered": sum(s.unanswered for s in self.streams),
            "elapsed_s": self.elapsed_s,
            "fps_answered": results / self.elapsed_s if self.elapsed_s > 0 else 0.0,
            "latency_ms": percentiles(merged("latencies_ms")),
            "server_latency_ms": percentiles(merged("server_ms")),
            "decode_ms": percentiles(merged("decode_ms")),
            "queue_ms": percentiles(merged("queue_ms")),
            "step_ms": percentiles(merged("step_ms")),
            "mean_budget": _mean(merged("budgets")),
            "mean_updated_fraction": _mean(merged("updated_fractions")),
            "mean_batch_size": _mean(merged("batch_sizes")),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "aggregate": self.aggregate(),
            "streams": [s.summary() for s in self.streams],
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99]).tolist()
    return {"p50": p50, "p95": p95, "p99": p99, "mean": float(arr.mean())}


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


# ---- frames ------------------------------------------------------------------------------------


def encode_video(path: str | Path, size: int | None, quality: int, max_frames: int) -> list[bytes]:
    """Decode a video (PyAV), resize (short side = size), JPEG-encode every frame. Returns the JPEG bytes."""
    import av

    out: list[bytes] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_image()  # PIL RGB
            if size is not None:
                w, h = image.size
                scale = size / min(w, h)
                image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            out.append(buffer.getvalue())
            if len(out) >= max_frames:
                break
    if not out:
        raise ValueError(f"{path}: no video frames decoded")
    return out


def ping_pong(n: int, start: int):
    """Frame indices 0..n-1 forward then backward, forever, starting at `start` (no jump cut when looping)."""
    cycle = list(range(n)) + list(range(n - 2, 0, -1)) if n > 1 else [0]
    i = start % len(cycle)
    while True:
        yield cycle[i]
        i = (i + 1) % len(cycle)


# ---- one stream ----------------------------------------------------------------------------------


def stream_url(server: str, stream_id: str, api_key: str | None = None) -> str:
    """http(s)://host:port or ws(s)://host:port -> ws(s)://host:port/v1/streams/{id}."""
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"server URL must start with http://, https://, ws:// or wss://, got {server!r}")
    return urlunsplit((scheme, parts.netloc, f"/v1/streams/{stream_id}", "", ""))


async def run_stream(config: LoadConfig, index: int, frames: list[bytes], deadline: float) -> StreamReport:
    """Stream frames until the deadline; returns what came back."""
    from websockets.asyncio.client import connect

    report = StreamReport(f"{config.stream_prefix}-{index}")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    sent_at: dict[int, float] = {}
    answered = asyncio.Event()  # closed loop: set when the frame in flight is answered
    order = ping_pong(len(frames), start=index * max(1, len(frames) // max(1, config.streams)))

    async def receive(ws) -> None:
        async for text in ws:
            now = time.perf_counter()
            message = json.loads(text)
            frame = message.get("frame")
            kind = message.get("type")
            if kind == "result":
                report.results += 1
                report.latencies_ms.append(1000 * (now - sent_at.pop(frame, now)))
                report.server_ms.append(message["latency_ms"])
                timing = message.get("timing") or {}
                report.decode_ms.append(timing.get("decode_ms", 0.0))
                report.queue_ms.append(timing.get("queue_ms", 0.0))
                report.step_ms.append(timing.get("step_ms", 0.0))
                report.budgets.append(message["budget"])
                report.updated_fractions.append(message["updated_fraction"])
                report.batch_sizes.append(message.get("batch_size", 1))
                top = (message.get("outputs") or {}).get("top") or []
                report.top1.append(top[0]["index"] if top else None)
                report.result_at.append(now)
                report.dense.append(bool(message.get("dense", False)))
            elif kind == "dropped":
                report.dropped += 1
                report.dropped_at.append(now)
                sent_at.pop(frame, None)
            elif kind == "error":
                report.errors += 1
                code = message.get("code", "unknown")
                report.error_codes[code] = report.error_codes.get(code, 0) + 1
                sent_at.pop(frame, None)
            else:
                continue
            answered.set()

    try:
        async with connect(
            stream_url(config.server, report.stream_id), additional_headers=headers,
            max_size=2**24, open_timeout=10, ping_interval=None,
        ) as ws:
            receiver = asyncio.create_task(receive(ws))
            period = 1.0 / config.fps if config.fps > 0 else 0.0
            next_send = time.perf_counter()
            while time.perf_counter() < deadline and not receiver.done():
                if period:
                    await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
                    next_send += period
                frame_index = report.frames_sent
                sent_at[frame_index] = time.perf_counter()  # before the await: the answer may beat send's return
                try:
                    await ws.send(frames[next(order)])
                except Exception:
                    sent_at.pop(frame_index, None)  # never left: neither sent nor unanswered
                    raise
                report.frames_sent += 1
                if not period and not await _until_fewer_in_flight(sent_at, config.in_flight, answered, deadline):
                    break
            # wait for the answers still in flight
            grace_end = time.perf_counter() + GRACE_S
            while sent_at and time.perf_counter() < grace_end and not receiver.done():
                await asyncio.sleep(0.01)
            receiver.cancel()
            try:
                await receiver
            except asyncio.CancelledError:
                pass
            except Exception as err:  # the connection closed under the receiver
                report.closed = f"{type(err).__name__}: {err}"
    except Exception as err:
        report.closed = f"{type(err).__name__}: {err}"
    report.unanswered = len(sent_at)
    return report


async def _until_fewer_in_flight(
    sent_at: dict[int, float], in_flight: int, answered: asyncio.Event, deadline: float
) -> bool:
    """Closed loop: wait until fewer than in_flight frames are unanswered. False when the deadline came first."""
    while len(sent_at) >= in_flight:
        answered.clear()  # no await between the check and the clear: the receiver cannot slip in
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(answered.wait(), timeout=remaining + GRACE_S)
        except TimeoutError:
            return False
    return time.perf_counter() < deadline


async def run_load(config: LoadConfig, encoded: dict[str, list[bytes]] | None = None) -> LoadReport:
    """Run every stream concurrently for config.duration_s. `encoded` reuses frames encoded before (path -> JPEGs)."""
    if encoded is None:
        encoded = load_frames(config)
    start = time.perf_counter()
    deadline = start + config.duration_s
    reports = await asyncio.gather(
        *(
            run_stream(config, i, encoded[config.videos[i % len(config.videos)]], deadline)
            for i in range(config.streams)
        )
    )
    return LoadReport(config, list(reports), config.duration_s)


def load_frames(config: LoadConfig) -> dict[str, list[bytes]]:
    unique = dict.fromkeys(config.videos)
    return {v: encode_video(v, config.size, config.jpeg_quality, config.max_frames) for v in unique}


# ---- command line --------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    rows = [*report["streams"], {"stream_id": "all", **report["aggregate"]}]
    head = f"{'stream':<14}{'sent':>7}{'results':>9}{'dropped':>9}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    lines = [head, "-" * len(head)]
    for row in rows:
        lat = row["latency_ms"]

        def fmt(v):
            return f"{v:9.1f}" if v is not None else f"{'-':>9}"

        lines.append(
            f"{row['stream_id']:<14}{row['frames_sent']:>7}{row['results']:>9}{row['dropped']:>9}{row['errors']:>8}"
            f"{fmt(lat['p50'])}{fmt(lat['p95'])}{fmt(lat['p99'])}"
        )
    agg = report["aggregate"]
    lines.append(
        f"answered {agg['fps_answered']:.1f} frames/s over {agg['elapsed_s']:.1f} s; "
        f"mean budget {agg['mean_budget'] if agg['mean_budget'] is None else round(agg['mean_budget'], 1)}, "
        f"mean batch {agg['mean_batch_size'] if agg['mean_batch_size'] is None else round(agg['mean_batch_size'], 2)}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventful-loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="http://HOST:PORT or ws://HOST:PORT")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--video", nargs="+", required=True, help="video files; stream i uses video i mod count")
    parser.add_argument("--fps", type=float, default=10.0, help="frames/s per stream; 0 = closed loop")
    parser.add_argument("--in-flight", type=int, default=1,
                        help="closed loop: unanswered frames per stream (2 keeps the server busy between answers)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--size", type=int, default=None, help="resize frames so the short side is this (pixels)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--api-key", default=None, help="API key (or EVENTFUL_API_KEY)")
    parser.add_argument("--stream-prefix", default="load")
    parser.add_argument("--json", default=None, help="write the report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    try:
        config = LoadConfig(
            server=args.server, streams=args.streams, videos=args.video, fps=args.fps, duration_s=args.duration,
            in_flight=args.in_flight,
            size=args.size, jpeg_quality=args.jpeg_quality, api_key=args.api_key or os.environ.get("EVENTFUL_API_KEY"),
            stream_prefix=args.stream_prefix,
        )
        stream_url(config.server, "x")
        for video in config.videos:
            if not Path(video).is_file():
                raise ValueError(f"no such video file: {video}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = asyncio.run(run_load(config)).to_json()
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    failed = [s for s in report["streams"] if s["closed"]]
    for s in failed:
        print(f"stream {s['stream_id']} ended early: {s['closed']}", file=sys.stderr)
    return 1 if failed or report["aggregate"]["results"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
