"""Liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse

from server.api.deps import EngineDep
from server.api.schemas import Health

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["metrics"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Health, summary="The model is loaded and the inference thread runs",
    responses={503: {"model": Health}},
)
def readyz(request: Request, engine: EngineDep):
    if engine.ready:
        weights = request.app.state.weights
        random = weights is not None and weights.weights == "random"
        return Health(status="ready", detail=f"serving {weights.description}" if random else None)
    if engine.load_error is not None:
        detail = f"model failed to load: {engine.load_error}"
    else:
        detail = "model loading" if not engine.wait_ready(0) else "inference thread stopped"
    return JSONResponse(Health(status="not ready", detail=detail).model_dump(), status.HTTP_503_SERVICE_UNAVAILABLE)


@metrics_router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response)
def metrics(request: Request, engine: EngineDep) -> Response:
    body, content_type = request.app.state.metrics.render(engine.snapshot())
    return Response(body, media_type=content_type)
