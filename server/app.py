"""`create_app()`: the FastAPI application. The lifespan starts the engine (which loads the model on its own
thread unless one is given) and stops it on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from model.eventful import EventfulConfig
from model.loaders import WeightsSource, load_model, weights_source
from model.videomae import VideoMAE
from model.vit import VisionTransformer
from model.yolos import YolosDetector
from server.api import budget, health, streams, web
from server.api import model as model_api
from server.api.access_log import install_token_redaction
from server.api.connection import Connections, IdleLimits
from server.api.deps import require_api_key
from server.engine import BudgetError, Engine, EngineConfig, EngineNotReady, GlobalBudget, ModelRunner
from server.engine.clip_runner import ClipRunner
from server.engine.decode import FrameLimits
from server.engine.detect_runner import DetectRunner
from server.metrics import Metrics
from server.settings import Settings

logger = logging.getLogger(__name__)

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
        limits=FrameLimits(
            settings.max_frame_bytes, settings.max_frame_width, settings.max_frame_height, settings.max_frame_pixels,
            settings.max_frame_aspect_ratio,
        ),
        torch_threads=settings.inference_threads,
        seeds_per_step=settings.seeds_per_step,
    )


def load_configured_model(settings: Settings) -> VisionTransformer:
    """settings.model, loaded; a warning when it is a named architecture (random weights)."""
    image_size = tuple(settings.image_size) if settings.image_size else None
    model = load_model(
        settings.model, image_size=image_size, device=settings.torch_device, dtype=settings.torch_dtype,
        num_heads=settings.num_heads, labels_path=settings.labels,
    )
    source = weights_source(settings.model)
    if source.weights == "random":
        logger.warning("serving %s; give --model a checkpoint file, a model directory or a Hugging Face id for real "
                       "outputs", source.description)
    return model


def configured_weights(settings: Settings) -> WeightsSource | None:
    """Where settings.model's weights come from (None for a spec that does not load: the engine reports why)."""
    try:
        return weights_source(settings.model)
    except FileNotFoundError:
        return None


def build_runner(settings: Settings, model: VisionTransformer | None = None) -> ModelRunner:
    """The model runner for these settings; loads the model unless one is given."""
    if model is None:
        model = load_configured_model(settings)
    eventful = EventfulConfig(
        level=settings.level, gate_position=settings.gate_position, refresh_interval=settings.refresh_interval,
        execution=settings.step_execution,
    )
    slots = settings.max_streams + 1  # every stream's state, and an adaptive stream's probe copy
    limits = engine_config(settings).limits
    if isinstance(model, VideoMAE):  # clip mode: a sliding window per stream, RLT, an action label every stride
        return ClipRunner(model, settings.rlt_tau, settings.clip_stride, top_k=settings.top_k, limits=limits)
    if isinstance(model, YolosDetector):  # detection: boxes in frame pixels
        return DetectRunner(model, eventful, settings.detect_threshold, settings.max_boxes, limits=limits,
                            slots=slots)
    return ModelRunner(model, eventful, top_k=settings.top_k, limits=limits, slots=slots)


def create_app(
    settings: Settings | None = None, *, model: VisionTransformer | None = None,
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

    @app.exception_handler(EngineNotReady)
    async def not_ready(request: Request, exc: EngineNotReady) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_503_SERVICE_UNAVAILABLE)

    return app


def _unprocessable(errors: list[dict]) -> JSONResponse:
    """422 with FastAPI's usual `detail` list plus one readable line naming the fields."""
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors]
    return JSONResponse({"detail": errors, "message": "; ".join(parts)}, 422)
