"""The API key given as `?token=` never reaches uvicorn's logs: access lines (REST) and WebSocket lines."""

from __future__ import annotations

import io
import logging

from uvicorn.logging import AccessFormatter, DefaultFormatter

from server.app import create_app
from server.settings import Settings
from tests.server.conftest import API_KEY

CLIENT = "127.0.0.1:50000"


def test_the_token_is_redacted_in_uvicorn_access_and_websocket_lines(tiny_model):
    create_app(Settings(api_key=API_KEY), model=tiny_model)  # as `eventful-serve` does before uvicorn starts
    output = io.StringIO()
    access_handler, error_handler = logging.StreamHandler(output), logging.StreamHandler(output)
    # uvicorn's own formats (uvicorn.config.LOGGING_CONFIG): the access formatter unpacks the record's args
    access_handler.setFormatter(
        AccessFormatter('%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    error_handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False))
    access, errors = logging.getLogger("uvicorn.access"), logging.getLogger("uvicorn.error")
    saved = [(logger, logger.level, logger.propagate) for logger in (access, errors)]
    access.addHandler(access_handler)
    errors.addHandler(error_handler)
    try:
        for logger in (access, errors):
            logger.setLevel(logging.INFO)
            logger.propagate = False
        for path in (f"/v1/streams?token={API_KEY}", f"/v1/budget?a=1&token={API_KEY}&b=2",
                     f"/v1/streams?%74oken={API_KEY}"):
            access.info('%s - "%s %s HTTP/%s" %d', CLIENT, "GET", path, "1.1", 200)  # as uvicorn's h11 protocol
        errors.info('%s - "WebSocket %s" [accepted]', CLIENT, f"/v1/streams/cam?token={API_KEY}")
        errors.info('%s - "WebSocket %s" 403', CLIENT, f"/v1/streams/cam?token={API_KEY}")
        errors.info(f"preformatted /v1/streams/cam?token={API_KEY}")
    finally:
        access.removeHandler(access_handler)
        errors.removeHandler(error_handler)
        for logger, level, propagate in saved:
            logger.setLevel(level)
            logger.propagate = propagate
    lines = output.getvalue().splitlines()
    assert lines == [
        f'INFO:     {CLIENT} - "GET /v1/streams?token=*** HTTP/1.1" 200 OK',
        f'INFO:     {CLIENT} - "GET /v1/budget?a=1&token=***&b=2 HTTP/1.1" 200 OK',
        f'INFO:     {CLIENT} - "GET /v1/streams?%74oken=*** HTTP/1.1" 200 OK',
        f'INFO:     {CLIENT} - "WebSocket /v1/streams/cam?token=***" [accepted]',
        f'INFO:     {CLIENT} - "WebSocket /v1/streams/cam?token=***" 403',
        "INFO:     preformatted /v1/streams/cam?token=***",
    ]
