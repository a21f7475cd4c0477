"""Request and response bodies of the REST API (pydantic: invalid input is a 422 naming the field)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator
from pydantic_core import PydanticCustomError

STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


class _Strict(BaseModel):
    """Request bodies: no unknown fields, and strict types (`true` is not 1 token, `"64"` is not 64; a JSON integer
    is still a float)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class FixedBudgetIn(_Strict):
    """Every stream without an override gets this many patch tokens per gate (or this fraction of them)."""

    mode: Literal["fixed"]
    tokens: int | None = Field(None, ge=0, description="patch tokens per gate, 0..num_patches")
    fraction: float | None = Field(None, ge=0.0, le=1.0, description="fraction of the patch tokens per gate")

    @model_validator(mode="after")
    def _exactly_one(self) -> FixedBudgetIn:
        if (self.tokens is None) == (self.fraction is None):
            raise ValueError("fixed mode takes exactly one of the fields tokens, fraction")
        return self


class AutoBudgetIn(_Strict):
    """Hold a p95 end-to-end latency target: the controller sets every stream's tokens each round."""

    mode: Literal["auto"]
    target_latency_ms: float = Field(..., gt=0, le=60_000, description="p95 end-to-end latency target in ms")
    min_tokens: int | None = Field(None, ge=0, description="the controller's floor (default 0)")
    max_tokens: int | None = Field(None, ge=0, description="the controller's ceiling (default num_patches)")


BUDGET_MODES = ("fixed", "auto")


class BudgetIn(RootModel[Annotated[FixedBudgetIn | AutoBudgetIn, Field(discriminator="mode")]]):
    """The global budget policy; `mode` (required) says which fields follow."""

    @model_validator(mode="before")
    @classmethod
    def _require_mode(cls, value: Any) -> Any:
        """Name the field when `mode` is missing or unknown (the discriminator alone says "Unable to extract tag")."""
        if isinstance(value, dict):
            modes = ", ".join(BUDGET_MODES)
            if "mode" not in value:
                raise PydanticCustomError("missing", "field 'mode' is required: one of {modes}", {"modes": modes})
            if value["mode"] not in BUDGET_MODES:
                raise PydanticCustomError(
                    "literal_error", "field 'mode' must be one of {modes}, not {mode}",
                    {"modes": modes, "mode": repr(value["mode"])},
                )
        return value


class ControllerOut(BaseModel):
    """The budget controller's state (auto mode)."""

    target_latency_ms: float
    measured_p95_ms: float | None = Field(description="p95 end-to-end latency over about the last second")
    step_budget_ms: float = Field(description="what the next model step may take to hold the target")
    predicted_step_ms: float = Field(description="the learned cost model's prediction for the chosen budgets")
    level_tokens: int = Field(description="tokens per gate a stream without an override or cap gets")
    tokens_mean: float | None = Field(description="over the streams of the last decision")
    tokens_min: int | None
    tokens_max: int | None
    streams: int = Field(description="streams in the last decision (active ones)")
    saturated: bool = Field(description="the minimum budget cannot meet the target; frames are being shed")
    reason: str | None = Field(description="why it is saturated")
    max_batch: int | None = Field(description="streams per step while shedding load")
    max_age_ms: float | None = Field(
        None, description="while shedding with full batches: frames older than this when a step starts are dropped")
    capacity_ms: float | None = Field(
        None, description="the step budget held to this share of the cameras' frame period (frames that come together "
        "must be served before the next ones come); null when the capacity does not limit it")
    busy_fraction: float = Field(description="share of the last second the model spent in steps")
    step_noise: float = Field(0.0, description="the model step time's spread around the cost model (std of its log)")
    cost_model_ms: tuple[float, float, float] = Field(
        description="step_ms = a + b * streams + c * tokens / num_patches: (a, b, c)")


class BudgetOut(BaseModel):
    mode: Literal["fixed", "auto"]
    tokens: int | None = None
    fraction: float | None = None
    target_latency_ms: float | None = None
    effective_tokens: int = Field(description="patch tokens per gate streams without an override get now")
    num_patches: int = Field(description="patch tokens per frame of the loaded model (the dense budget)")
    min_tokens: int | None = None
    max_tokens: int | None = None
    controller: ControllerOut | None = Field(None, description="auto mode: what the budget controller sees and does")


class StreamBudgetIn(_Strict):
    """Per-stream override: a budget of its own (tokens or fraction) or a cap on the global one (max_tokens)."""

    tokens: int | None = Field(None, ge=0)
    fraction: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> StreamBudgetIn:
        given = [name for name in ("tokens", "fraction", "max_tokens") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of the fields tokens, fraction, max_tokens")
        return self


class StreamPolicyIn(_Strict):
    """A stream's frame policy: which frames run densely, sparsely or not at all (see docs/protocol.md)."""

    policy: Literal["eventful", "skip", "keyframe", "adaptive"] = Field(
        description="eventful: every frame at the token budget (default); skip: dense every k-th frame, the last "
        "result reused between; keyframe: dense every `interval` frames, the token budget between; adaptive: "
        "chosen per stream from dense audits at a compute `ratio` (clip models: no ratio, their clips audited "
        "against the plain model and a floor held by keeping more tubelets)")
    ratio: float | None = Field(None, ge=1.0, le=64.0, description="skip / adaptive: dense MACs over the stream's")
    interval: int | None = Field(None, ge=1, le=256, description="keyframe (or skip): frames per dense frame")
    audit_share: float = Field(0.02, ge=0.0, le=0.5, description="adaptive: share of its compute spent on audits")
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0,
                                             description="adaptive, classifiers and clip models: fidelity floor")
    max_rel_l2: float | None = Field(None, gt=0.0, le=10.0,
                                     description="adaptive, classifiers and clip models: fidelity floor (logits)")
    min_box_f1: float | None = Field(None, ge=0.0, le=1.0, description="adaptive, detectors: fidelity floor (box F1 "
                                     "against the dense detections at IoU 0.5)")
    report_fidelity: bool = Field(False, description="adaptive: each result message of the stream carries its "
                                  "fidelity estimate (`fidelity`, as in the policy view; refreshed every 10 frames)")
    explore: Literal["probe", "trial"] | None = Field(
        None, description="adaptive (frame models): how a keyframe + sparse candidate is measured. trial (the "
        "default, null): it is served for a cycle or two, measured on its keyframes (finds one within about a hundred "
        "frames; serves a few worse frames where none is better); probe: its sparse steps run unserved on a copy of "
        "the stream's state, paid from the audit share (never serves an unmeasured candidate; finds a better one "
        "after hundreds of frames)")


class StreamPolicyOut(BaseModel):
    stream_id: str
    policy: str
    setting: dict[str, Any]
    serving: str | None = Field(None, description="the policy serving now (adaptive: its current choice)")
    explore: str | None = Field(None, description="adaptive (frame models): the exploration in effect (`setting` "
                                "shows null where the operator left the default)")
    effective_ratio: float | None = Field(None, description="adaptive: the compute ratio now (a floor may lower it)")
    tau: float | None = Field(None, description="adaptive on a clip model: the stream's RLT tau now (a floor may "
                              "lower it)")
    fidelity: dict[str, Any] | None = Field(None, description="adaptive: the audited fidelity estimate (classifiers "
                                            "and clip models: top1_agreement, rel_l2; detectors: box_f1, mean_iou; "
                                            "with intervals)")
    floor_met: bool | None = None
    floor_error: str | None = None


class StreamOverrideOut(BaseModel):
    tokens: int | None = None
    fraction: float | None = None
    max_tokens: int | None = None


class StreamBudgetOut(BaseModel):
    stream_id: str
    override: StreamOverrideOut | None
    effective_tokens: int = Field(description="patch tokens per gate the stream's next frame gets")
    source: Literal["global", "override", "cap"]
    num_patches: int


class StreamOut(BaseModel):
    stream_id: str
    connected: bool
    frames_received: int
    frames_processed: int
    frames_dropped: int
    frames_failed: int
    budget_tokens: int = Field(description="patch tokens per gate its next frame gets")
    budget_source: Literal["global", "override", "cap"]
    last_budget_tokens: int | None = Field(description="tokens per gate its last processed frame used")
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    state_bytes: int
    frame_size: tuple[int, int] | None = Field(description="(height, width) of its last processed frame")
    frames_reused: int = Field(0, description="frames answered with its last result again (skip, adaptive)")
    policy: StreamPolicyOut | None = Field(None, description="its frame policy and, if adaptive, its fidelity")


class StreamsOut(BaseModel):
    streams: list[StreamOut]
    active_streams: int
    max_streams: int
    total_state_bytes: int


class TokenizerOut(BaseModel):
    kind: Literal["clip", "fallback"] = Field(
        description="clip: a CLIP tokenizer from local files; fallback: built-in hashed words (random weights only)")
    source: str = Field(description="the tokenizer's directory, or what the fallback is")


class ModelOut(BaseModel):
    """The loaded model: what it is and where its weights come from."""

    model: str | None = Field(description="--model as given (null: the application was given a model object)")
    weights: Literal["checkpoint", "random", "unknown"] = Field(
        description="random: a named architecture with deterministic random weights (its outputs mean nothing); "
        "checkpoint: loaded from weights_source; unknown: a model object given in-process")
    weights_source: str | None = Field(
        description="the checkpoint file or model directory (resolved path), the Hugging Face id, or the "
        "architecture's name")
    task: Literal["classify", "detect", "clip"]
    image_size: tuple[int, int] = Field(description="model input (height, width)")
    patch_size: int
    num_patches: int = Field(description="patch tokens per frame (per clip for a clip model): the dense budget")
    num_classes: int
    device: str
    dtype: str
    execution: str | None = Field(
        None, description="how eventful steps run: eager, compile or graph (null for clip models)")
    captured_graph_bytes: int | None = Field(
        None, description="device memory the step shapes captured at start-up hold (execution graph or compile-graph; "
        "null otherwise)")
    state_pool_bytes: int | None = Field(
        None, description="bytes of the state pool on the device: every stream slot and the scratch slot, allocated "
        "at start-up for --max-streams (null for clip models, whose windows are per stream)")
    default_queries: list[str] | None = Field(
        None, description="open-vocabulary detectors: the queries of streams that set none (null: no text queries)")
    tokenizer: TokenizerOut | None = Field(None, description="open-vocabulary detectors: what tokenizes the queries")



class Health(BaseModel):
    status: str
    detail: str | None = None


class StreamQueriesOut(BaseModel):
    """A stream's text queries (open-vocabulary models): its own, or the server's default."""

    stream_id: str
    queries: list[str] = Field(description="the texts its results are labelled with, in order")
    source: Literal["stream", "default"] = Field(description="set for this stream, or --default-queries")
