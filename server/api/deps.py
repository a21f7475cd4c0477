"""Dependencies: the engine, the settings, and API-key auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, status
from starlette.requests import HTTPConnection

from server.api.connection import Connections
from server.engine import Engine
from server.settings import Settings


def get_engine(connection: HTTPConnection) -> Engine:
    return connection.app.state.engine


def get_settings(connection: HTTPConnection) -> Settings:
    return connection.app.state.settings


def get_connections(connection: HTTPConnection) -> Connections:
    return connection.app.state.connections


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ConnectionsDep = Annotated[Connections, Depends(get_connections)]


def has_valid_key(connection: HTTPConnection, settings: Settings) -> bool:
    """True when no key is configured, or the request carries it (Bearer header or `token` query parameter)."""
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value().encode()
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    supplied = value.strip() if scheme.lower() == "bearer" else connection.query_params.get("token")
    return supplied is not None and secrets.compare_digest(supplied.encode(), expected)


def require_api_key(connection: HTTPConnection, settings: SettingsDep) -> None:
    if not has_valid_key(connection, settings):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>' or ?token=<key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


AUTH = [Depends(require_api_key)]
