"""The budget API: the global policy and per-stream overrides. Changes apply from each stream's next frame."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request, Response, status

from server.api.deps import EngineDep
from server.api.schemas import (
    STREAM_ID_PATTERN,
    AutoBudgetIn,
    BudgetIn,
    BudgetOut,
    ControllerOut,
    FixedBudgetIn,
    StreamBudgetIn,
    StreamBudgetOut,
    StreamOverrideOut,
    StreamPolicyIn,
    StreamPolicyOut,
)
from server.engine import Engine, GlobalBudget, StreamOverride
from server.engine.frame_policy import StreamPolicySpec

router = APIRouter(prefix="/v1", tags=["budget"])
StreamId = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="stream id as in the WebSocket path")]


JSON_MEDIA_TYPE = re.compile(r"application/(json|[^/;\s]+\+json)")


def require_json(request: Request) -> None:
    """A body in another media type (a form, text, none declared) is a 415 that says so, not a 422 about its shape."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not JSON_MEDIA_TYPE.fullmatch(media_type):
        got = f"got {media_type!r}" if media_type else "none given"
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be application/json ({got})")


JSON_BODY = {
    "dependencies": [Depends(require_json)],
    "responses": {415: {"description": "the body is not declared as JSON (Content-Type must be application/json)"}},
}


def _budget_out(engine: Engine) -> BudgetOut:
    view = engine.budget_view()  # the budget and the controller read together (the metrics show the same)
    budget, tokens = view.budget, view.tokens
    controller = None
    state = view.controller if budget.mode == "auto" else None
    if state is not None:
        controller = ControllerOut(
            target_latency_ms=1000 * state.target_s,
            measured_p95_ms=None if state.measured_p95_s is None else 1000 * state.measured_p95_s,
            step_budget_ms=1000 * state.step_budget_s, predicted_step_ms=1000 * state.predicted_step_s,
            level_tokens=state.level, tokens_mean=state.tokens_mean, tokens_min=state.tokens_min,
            tokens_max=state.tokens_max, streams=state.streams, saturated=state.saturated, reason=state.reason,
            max_batch=state.max_batch, busy_fraction=state.busy_fraction,
            max_age_ms=None if state.max_age_s is None else 1000 * state.max_age_s,
            capacity_ms=None if state.capacity_s is None else 1000 * state.capacity_s,
            step_noise=state.step_noise,
            cost_model_ms=tuple(1000 * v for v in state.cost_model),
        )
    return BudgetOut(
        mode=budget.mode, tokens=budget.tokens, fraction=budget.fraction, target_latency_ms=budget.target_latency_ms,
        min_tokens=budget.min_tokens, max_tokens=budget.max_tokens,
        effective_tokens=tokens, num_patches=engine.policy.num_patches, controller=controller,
    )


def _stream_budget_out(engine: Engine, stream_id: str) -> StreamBudgetOut:
    override, resolved = engine.stream_budget(stream_id)
    return StreamBudgetOut(
        stream_id=stream_id,
        override=None if override is None else StreamOverrideOut(
            tokens=override.tokens, fraction=override.fraction, max_tokens=override.max_tokens
        ),
        effective_tokens=resolved.tokens, source=resolved.source, num_patches=engine.policy.num_patches,
    )


@router.get("/budget", response_model=BudgetOut, summary="The global budget policy")
def get_budget(engine: EngineDep) -> BudgetOut:
    return _budget_out(engine)


@router.put(
    "/budget", response_model=BudgetOut, summary="Set the global budget policy", **JSON_BODY,
    description=(
        "`{\"mode\": \"fixed\", \"tokens\": R}` or `{\"mode\": \"fixed\", \"fraction\": F}`, or "
        "`{\"mode\": \"auto\", \"target_latency_ms\": T}` (optionally `min_tokens`, `max_tokens`): the budget "
        "controller then sets every stream's tokens each round to hold the p95 end-to-end latency at the target, "
        "honouring per-stream overrides and caps; `controller` in the response shows its state, including "
        "`saturated` when even `min_tokens` cannot meet the target (frames are then shed)."
    ),
)
def put_budget(engine: EngineDep, body: Annotated[BudgetIn, Body()]) -> BudgetOut:
    policy = body.root
    if isinstance(policy, FixedBudgetIn):
        engine.set_global_budget(GlobalBudget("fixed", tokens=policy.tokens, fraction=policy.fraction))
    elif isinstance(policy, AutoBudgetIn):
        engine.set_global_budget(GlobalBudget(
            "auto", target_latency_ms=policy.target_latency_ms, min_tokens=policy.min_tokens,
            max_tokens=policy.max_tokens,
        ))
    return _budget_out(engine)


@router.get("/streams/{stream_id}/budget", response_model=StreamBudgetOut, summary="A stream's budget")
def get_stream_budget(engine: EngineDep, stream_id: StreamId) -> StreamBudgetOut:
    return _stream_budget_out(engine, stream_id)


@router.put(
    "/streams/{stream_id}/budget", response_model=StreamBudgetOut, summary="Override or cap a stream's budget",
    **JSON_BODY,
    description=(
        "`{\"tokens\": R}` or `{\"fraction\": F}` replace the global budget for this stream; `{\"max_tokens\": R}` "
        "caps it. Overrides are kept by stream id, whether or not the stream is connected."
    ),
)
def put_stream_budget(engine: EngineDep, stream_id: StreamId, body: StreamBudgetIn) -> StreamBudgetOut:
    engine.set_stream_budget(
        stream_id, StreamOverride(tokens=body.tokens, fraction=body.fraction, max_tokens=body.max_tokens)
    )
    return _stream_budget_out(engine, stream_id)


@router.delete(
    "/streams/{stream_id}/budget", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a stream's override",
    responses={404: {"description": "the stream has no override"}},
)
def delete_stream_budget(engine: EngineDep, stream_id: StreamId) -> Response:
    if not engine.clear_stream_budget(stream_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"stream {stream_id!r} has no budget override")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/streams/{stream_id}/policy", response_model=StreamPolicyOut, summary="A stream's frame policy")
def get_stream_policy(engine: EngineDep, stream_id: StreamId) -> StreamPolicyOut:
    return StreamPolicyOut(**engine.stream_policy(stream_id))


@router.put(
    "/streams/{stream_id}/policy", response_model=StreamPolicyOut, summary="Set a stream's frame policy",
    **JSON_BODY,
    description=(
        "`{\"policy\": \"adaptive\", \"ratio\": 3}` serves the stream at a third of the dense compute, choosing "
        "between frame skipping and keyframe + sparse from dense audits (`audit_share`, default 0.02 of its "
        "compute; a classifier's audits compare logits, a detector's its detections); `min_top1_agreement` / "
        "`max_rel_l2` (classifiers) or `min_box_f1` (detectors) set a fidelity floor the stream is given more compute "
        "for, or reports it cannot meet (`floor_met`, `floor_error`). `{\"policy\": \"skip\", \"interval\": 4}`, "
        "`{\"policy\": \"keyframe\", \"interval\": 4}` and `{\"policy\": \"eventful\"}` (the default) are fixed. "
        "Clip models take `adaptive` without a ratio (audits; a floor lowers the stream's own RLT tau). "
        "`report_fidelity` (adaptive): each result message of the stream carries its fidelity estimate. `explore` "
        "(adaptive): `trial` (default) or `probe`, how keyframe + sparse candidates are measured."
    ),
)
def put_stream_policy(engine: EngineDep, stream_id: StreamId, body: StreamPolicyIn) -> StreamPolicyOut:
    spec = StreamPolicySpec(
        policy=body.policy, ratio=body.ratio, interval=body.interval, audit_share=body.audit_share,
        min_top1_agreement=body.min_top1_agreement, max_rel_l2=body.max_rel_l2, min_box_f1=body.min_box_f1,
        report_fidelity=body.report_fidelity, explore=body.explore,
    )
    return StreamPolicyOut(**engine.set_stream_policy(stream_id, spec))
