"""`create_app()`: the FastAPI application. The lifespan starts the engine (which loads the model on its own
thread unless one is given, and builds its runner: server/engine/factory.py) and stops it on shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from server.api import budget, health, streams, web
from server.api import model as model_api
from server.api.access_log import install_token_redaction
from server.api.connection import Connections, IdleLimits
from server.api.deps import require_api_key
from server.engine import BudgetError, Engine, EngineConfig, EngineNotReady, GlobalBudget, QueriesUnsupported
from server.engine.factory import build_runner, configured_weights, frame_limits
from server.metrics import Metrics
from server.settings import Settings

if TYPE_CHECKING:
    from torch import nn

DESCRIPTION = """Real-time streaming inference with Eventful Transformers.

Stream frames over the WebSocket `/v1/streams/{stream_id}` (binary JPEG/PNG messages in, JSON results out;
see docs/protocol.md); steer the compute budget with `/v1/budget` and `/v1/streams/{stream_id}/budget`."""


def engine_config(settings: Settings) -> EngineConfig:
    if settings.budget_mode == "auto":
        default = GlobalBudget(
            "auto", target_latency_ms=settings.target_latency_ms, min_tokens=settings.budget_min_tokens,
            max_tokens=settings.budget_max_tokens,
        )
    elif settings.budget_tokens is not None:
        default = GlobalBudget("fixed", tokens=settings.budget_tokens)
    else:
        default = GlobalBudget("fixed", fraction=settings.budget_fraction)
    return EngineConfig(
        max_streams=settings.max_streams,
        max_batch_size=settings.max_batch_size,
        batch_window_s=settings.batch_window_ms / 1000,
        stream_ttl_s=settings.stream_ttl_s,
        decode_threads=settings.decode_threads,
        default_budget=default,
        target_latency_s=settings.target_latency_ms / 1000,
        limits=frame_limits(settings),
        torch_threads=settings.inference_threads,
        seeds_per_step=settings.seeds_per_step,
    )


def create_app(
    settings: Settings | None = None, *, model: nn.Module | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The application. model: an already loaded model (else settings.model is loaded on the engine thread);
    registry: where metrics are registered (a fresh CollectorRegistry by default)."""
    settings = settings or Settings()
    install_token_redaction()  # ?token=<key> is written to uvicorn's logs as token=***
    metrics = Metrics(registry or CollectorRegistry(), settings.target_latency_ms / 1000, settings.max_batch_size)
    engine = Engine(engine_config(settings), lambda: build_runner(settings, model), stats=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="eventful-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.connections = Connections(
        IdleLimits(settings.idle_timeout_s, settings.first_frame_grace_s, settings.max_idle_streams)
    )
    app.state.model_spec = settings.model if model is None else None
    app.state.weights = configured_weights(settings) if model is None else None  # GET /v1/model, /readyz

    auth = [Depends(require_api_key)]
    app.include_router(health.router, dependencies=auth if settings.health_require_key else [])
    app.include_router(health.metrics_router, dependencies=auth if settings.metrics_require_key else [])
    app.include_router(budget.router, dependencies=auth)
    app.include_router(model_api.router, dependencies=auth)
    app.include_router(streams.router)
    app.include_router(streams.ws_router)
    app.include_router(web.router)  # the browser camera page at /, open (it asks for the key itself)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors())
        return _unprocessable(errors)

    @app.exception_handler(BudgetError)
    async def budget_error(request: Request, exc: BudgetError) -> JSONResponse:
        loc = ["body"] if exc.field == "body" else ["body", exc.field]
        return _unprocessable([{"loc": loc, "msg": exc.message, "type": "value_error"}])

    @app.exception_handler(QueriesUnsupported)
    async def queries_unsupported(request: Request, exc: QueriesUnsupported) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status.HTTP_409_CONFLICT)

    @app.exception_handler(EngineNotReady)
    async def not_ready(request: Request, exc: EngineNotReady) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_503_SERVICE_UNAVAILABLE)

    return app


def _unprocessable(errors: list[dict]) -> JSONResponse:
    """422 with FastAPI's usual `detail` list plus one readable line naming the fields."""
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors]
    return JSONResponse({"detail": errors, "message": "; ".join(parts)}, 422)
