"""The API key a browser sends as `?token=<key>` stays out of the logs: uvicorn writes every request's path with
its query string (the access log for REST, `uvicorn.error` for WebSocket handshakes); a filter on those loggers
rewrites the token's value to `***` before any handler formats the record."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

TOKEN_PARAMETER = "token"
REDACTED = "***"
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error")

_QUERY_PARAMETER = re.compile(r"(?P<lead>[?&])(?P<name>[^=&#\s\"']+)=(?P<value>[^&#\s\"']*)")


def redact_token(text: str) -> str:
    """Every `token=<value>` query parameter in text (its name decoded as the server decodes it) -> `token=***`."""
    if "=" not in text:
        return text

    def replace(match: re.Match) -> str:
        if unquote_plus(match["name"]).lower() != TOKEN_PARAMETER:
            return match[0]
        return f"{match['lead']}{match['name']}={REDACTED}"

    return _QUERY_PARAMETER.sub(replace, text)


class TokenRedactingFilter(logging.Filter):
    """Redacts the token in a record's message and its string arguments, keeping the arguments' shape (uvicorn's
    access formatter unpacks them: client, method, path, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_token(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_token(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_token(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_token_redaction() -> None:
    """Put the filter on uvicorn's loggers (once). Logger filters survive uvicorn's own logging setup
    (`dictConfig` replaces handlers, not filters), so installing it before `uvicorn.run` covers the real server."""
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactingFilter) for f in logger.filters):
            logger.addFilter(TokenRedactingFilter())
