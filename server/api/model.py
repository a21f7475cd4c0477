"""The loaded model: `GET /v1/model` (its architecture, and whether its weights are a checkpoint or random)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.deps import EngineDep
from server.api.schemas import ModelOut, TokenizerOut

router = APIRouter(prefix="/v1", tags=["model"])


@router.get("/model", response_model=ModelOut, summary="The loaded model and where its weights come from",
            responses={503: {"description": "the model is not loaded yet"}})
def get_model(request: Request, engine: EngineDep) -> ModelOut:
    runner = engine.runner  # EngineNotReady (503) while loading
    config = runner.config
    weights = request.app.state.weights  # the factory's configured_weights: None for a model given in-process
    tokenizer = runner.tokenizer
    return ModelOut(
        model=request.app.state.model_spec, weights=weights.weights if weights else "unknown",
        weights_source=weights.source if weights else None, task=runner.task, image_size=tuple(config.image_size),
        patch_size=config.patch_size, num_patches=runner.num_patches, num_classes=config.num_classes,
        device=str(runner.device), dtype=str(runner.dtype).removeprefix("torch."), execution=runner.execution,
        state_pool_bytes=runner.pool_bytes, captured_graph_bytes=runner.graph_bytes,
        default_queries=list(runner.default_queries) if runner.default_queries is not None else None,
        tokenizer=TokenizerOut(kind=tokenizer.kind, source=tokenizer.source) if tokenizer is not None else None,
    )
