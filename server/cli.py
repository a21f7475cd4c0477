"""`eventful-serve`: the streaming server. Flags override EVENTFUL_* environment variables."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from server.settings import Settings

if TYPE_CHECKING:
    from server.api.connection import Connections

SWITCH_INTERVAL_S = 0.0005

FLAGS: list[tuple[str, dict]] = [
    ("--model", dict(help="checkpoint file (timm), HF directory, HF id or named architecture (EVENTFUL_MODEL)")),
    ("--labels", dict(help="class names file for timm checkpoints")),
    ("--image-size", dict(help="model input size, e.g. 224 or 432x768")),
    ("--num-heads", dict(type=int, help="attention heads (timm files do not record it)")),
    ("--device", dict(help="auto (cuda when present, else cpu), cpu, cuda, cuda:N")),
    ("--dtype", dict(choices=["auto", "float32", "float16", "bfloat16"],
                     help="model and state dtype (auto: bfloat16 on CUDA, float32 on the CPU)")),
    ("--execution", dict(choices=["auto", "eager", "compile", "graph", "compile-graph"],
                         help="eventful steps eager, compiled per shape, captured as CUDA graphs, or compiled and "
                              "captured (auto: graph on CUDA, eager on the CPU)")),
    ("--level", dict(choices=["tokenwise", "qk", "full"])),
    ("--gate-position", dict(choices=["residual", "normed"])),
    ("--refresh-interval", dict(type=int, help="force a dense frame every K frames per stream")),
    ("--threads", dict(type=int, dest="torch_threads", help="torch CPU threads")),
    ("--budget-tokens", dict(type=int, help="default budget: patch tokens per gate")),
    ("--budget-fraction", dict(type=float, help="default budget as a fraction of the patch tokens (0.25)")),
    ("--budget-mode", dict(choices=["fixed", "auto"], help="fixed budget (default) or the latency controller")),
    ("--target-latency-ms", dict(type=float, help="p95 latency target (auto mode, SLO, metrics buckets; 100)")),
    ("--budget-min-tokens", dict(type=int, help="auto mode: the controller's floor (0)")),
    ("--budget-max-tokens", dict(type=int, help="auto mode: the controller's ceiling (all patch tokens)")),
    ("--top-k", dict(type=int)),
    ("--detect-threshold", dict(type=float, help="YOLOS: detection score threshold (0.5)")),
    ("--max-boxes", dict(type=int, help="YOLOS: at most this many boxes per frame (100)")),
    ("--clip-stride", dict(type=int, help="VideoMAE: an action label every this many frames (8)")),
    ("--rlt-tau", dict(type=float, help="VideoMAE: Run-Length Tokenization threshold, 0 = off (0.1)")),
    ("--max-streams", dict(type=int)),
    ("--max-batch-size", dict(type=int)),
    ("--batch-window-ms", dict(type=float)),
    ("--stream-ttl-s", dict(type=float, help="keep a disconnected stream's state this long for a resume")),
    ("--decode-threads", dict(type=int)),
    ("--seeds-per-step", dict(type=int, help="stream-seeding (dense first) frames per eventful step; others wait (1)")),
    ("--idle-timeout-s", dict(type=float, help="close a connection that sends no frame this long (30)")),
    ("--first-frame-grace-s", dict(type=float, help="a new connection's time for its first frame (2)")),
    ("--max-idle-streams", dict(type=int, help="connections that may wait past the grace for a first frame (4)")),
    ("--max-frame-bytes", dict(type=int)),
    ("--max-frame-width", dict(type=int)),
    ("--max-frame-height", dict(type=int)),
    ("--max-frame-pixels", dict(type=int)),
    ("--max-frame-aspect-ratio", dict(type=float, help="long side / short side of a frame at most (8)")),
    ("--api-key", dict(help="require this key (prefer EVENTFUL_API_KEY: flags show up in process lists)")),
    ("--host", dict()),
    ("--port", dict(type=int)),
    ("--log-level", dict(choices=["critical", "error", "warning", "info", "debug"])),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventful-serve", description=__doc__,
        epilog="Every flag has an environment variable: EVENTFUL_ + the flag name in capitals, '-' as '_'.",
    )
    for flag, options in FLAGS:
        parser.add_argument(flag, default=None, **options)
    parser.add_argument("--metrics-require-key", action="store_true", default=None,
                        help="/metrics needs the API key too")
    parser.add_argument("--health-require-key", action="store_true", default=None,
                        help="/healthz and /readyz need the API key too")
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags over EVENTFUL_* environment variables over defaults. Raises pydantic's ValidationError."""
    args = build_parser().parse_args(argv)
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        print(f"error: {problems}", file=sys.stderr)
        return 2

    import torch

    # The inference thread gets the intra-op threads; this (event loop) thread does no tensor work and must not
    # start an OpenMP team of its own (e.g. through an import-time kernel check): with more OpenMP workers than
    # cores, libgomp throttles its spin-waits and every fine-grained eventful step gets ~2x slower.
    torch.set_num_threads(1)
    # The inference thread releases the GIL in every torch op and needs it back for the next one; when the event
    # loop holds it, the default 5 ms switch interval can stall a step that long. 0.5 ms bounds the stall.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    from server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    engine = app.state.engine
    engine.start()  # loads the model on the inference thread; fail fast, before the port is opened
    if not engine.wait_loaded():
        print(f"error: {engine.load_error}", file=sys.stderr)
        engine.stop()
        return 2
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        ws_max_size=2 * settings.max_frame_bytes,  # larger frames get a polite frame_too_large error first
    )
    server = StreamClosingServer(config, app.state.connections)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3  # 3: uvicorn's exit status when it cannot start (e.g. the port is taken)


class StreamClosingServer(uvicorn.Server):
    """uvicorn's Server, except that on shutdown the stream connections are closed first, with 1012 and a reason
    (uvicorn's own 1012 close has none): it stops listening, closes the streams, then shuts down as usual."""

    def __init__(self, config: uvicorn.Config, connections: Connections):
        super().__init__(config)
        self.connections = connections

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listening in self.servers:
            listening.close()
        await self.connections.close_all()
        await super().shutdown(sockets)


if __name__ == "__main__":
    sys.exit(main())
