"""`eventful-serve`: the streaming server. Flags override EVENTFUL_* environment variables."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
from types import UnionType
from typing import TYPE_CHECKING, Literal, Union, get_args, get_origin

import uvicorn
from pydantic import ValidationError

from server.settings import Flag, Settings

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from server.api.connection import Connections

SWITCH_INTERVAL_S = 0.0005


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field, read from the field: name, type, choices, default and help."""
    parser = argparse.ArgumentParser(
        prog="eventful-serve", description=__doc__,
        epilog="Every setting has an environment variable: EVENTFUL_ + its first flag name in capitals, '-' as '_' "
               "(--max-streams: EVENTFUL_MAX_STREAMS). Flags win over the environment, the environment over defaults.",
    )
    for name, field in Settings.model_fields.items():
        add_setting(parser, name, field)
    return parser


def add_setting(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    """--field-name (and the field's Flag aliases). The default stays None, so a flag not given leaves the setting
    to the environment; types argparse has no converter for (a size, a secret) reach the field's validation as the
    string given, and the field parses it (e.g. image_size: '224' or '432x768')."""
    flag = next((m for m in field.metadata if isinstance(m, Flag)), Flag())
    names = ["--" + name.replace("_", "-"), *flag.aliases]
    options: dict = dict(dest=name, default=None, help=help_text(field))
    if flag.metavar is not None:
        options["metavar"] = flag.metavar
    annotation = without_none(field.annotation)
    if annotation is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif get_origin(annotation) is Literal:
        choices = get_args(annotation)
        options.update(choices=choices, type=type(choices[0]))
    elif annotation in (int, float):
        options["type"] = annotation
    parser.add_argument(*names, **options)


def without_none(annotation):
    """`X | None` -> X; anything else as it is."""
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def help_text(field: FieldInfo) -> str:
    """The field's description and its default (None, the 'not set' default, is explained by the description)."""
    text = (field.description or "").replace("%", "%%")
    default = field.default
    if isinstance(default, bool):
        return f"{text} (default: {'on' if default else 'off'})"
    if default is None:
        return text
    return f"{text} (default: {f'{default:g}' if isinstance(default, float) else default})"


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags over EVENTFUL_* environment variables over defaults: only the flags given reach Settings, as init
    arguments, which pydantic-settings ranks above the environment. Raises pydantic's ValidationError."""
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
