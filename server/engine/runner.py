"""The runners: each owns a model family on its device; turns bytes into model input and plans into results.

`Runner` is all the engine and the API use of one; every family implements it (ModelRunner: classifiers,
DetectRunner: detectors, Owlv2Runner: open-vocabulary detectors, ClipRunner: clips), and server/engine/factory.py
builds the one a model spec needs.
`prepare` runs on decode threads (Pillow decode + preprocessing, CPU); `execute` runs on the one inference thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from model.eventful import EventfulConfig, EventfulViT, StepOutput, StepShape, batch_bucket, token_bucket
from model.fidelity import Fidelity, LogitFidelity
from model.policy import StreamBudget
from model.preprocess import Preprocessor
from model.state import StreamState
from model.vit import VisionTransformer
from server.engine.decode import FrameLimits, FrameRejected, decode_image
from server.engine.planner import RunnerFacts, StepPlan
from server.engine.queries import QueriesUnsupported, StreamQueries

log = logging.getLogger("eventful.engine")

Task = Literal["classify", "detect", "clip"]


@dataclass(frozen=True)
class PreparedFrame:
    image: torch.Tensor  # [3, H, W] float32 model input, on the CPU
    frame_size: tuple[int, int]  # decoded (height, width)
    decode_seconds: float


@dataclass(frozen=True)
class FrameOutput:
    """One stream's result from a step (plain Python values)."""

    budget_tokens: int  # tokens per gate used (num_patches when the frame ran densely)
    dense: bool
    updated_fraction: float
    macs: int
    outputs: dict[str, Any]
    answer: Any = None  # on the CPU, what audits compare (Runner.fidelity): class logits [K], or Detections
    shadow_answer: Any = None  # the same of the shadow step (PlannedFrame.shadow)
    shadow_macs: int = 0


@dataclass(frozen=True)
class StepResult:
    outputs: list[FrameOutput]  # in plan order
    started_at: float  # perf_counter() when the step began
    step_seconds: float
    dense_macs: int  # of one frame


@dataclass(frozen=True)
class WarmupTimings:
    """Warm steps timed at start-up: the budget controller's first figures for this model on this device."""

    dense_s: dict[int, float]  # batch size -> seconds of one plain dense step
    eventful: list[tuple[int, int, float]]  # other steps: (batch size, sum of FrameOutput.budget_tokens, seconds)


@runtime_checkable
class Runner(RunnerFacts, Protocol):
    """What the engine and the API use of a runner, and all they use (the planner's part is RunnerFacts:
    num_patches, dense_first_frame, plain_dense, fidelity, config, new_state)."""

    task: Task  # what the outputs are: class top-k, boxes, clip actions
    device: torch.device
    dtype: torch.dtype

    @property
    def refresh_interval(self) -> int | None:
        """Frames after which a stream's state reseeds (None: never, or no state to reseed)."""

    @property
    def execution(self) -> str | None:
        """How eventful steps execute (eager, compile, graph, compile-graph); None: no eventful step."""

    @property
    def pool_bytes(self) -> int | None:
        """Bytes of the per-stream state pool on the device; None: states are allocated per stream."""

    @property
    def graph_bytes(self) -> int | None:
        """Device memory the captured step graphs hold (captured at start-up); None: nothing is captured."""

    def prepare(self, data: bytes) -> PreparedFrame:
        """Encoded bytes -> model input (decode threads). Raises FrameRejected for bad frames."""

    def execute(self, plan: StepPlan) -> StepResult:
        """One batched step over the plan's frames (the inference thread)."""

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> WarmupTimings:
        """Steps run before serving at these batch sizes; their timings are the budget controller's first figures."""

    @property
    def default_queries(self) -> tuple[str, ...] | None:
        """The text queries of streams that set none; None: the model takes no text queries."""

    @property
    def tokenizer(self) -> Any:
        """What turns text queries into tokens (`kind`: clip | fallback, `source`); None: no text queries."""

    def check_queries(self, queries: Any) -> StreamQueries:
        """Queries as a stream sets them (a JSON list of strings), checked and tokenized (any thread). Raises
        QueriesUnsupported, or QueryError (server/engine/queries.py) naming the query out of the limits."""


class FrameRunner:
    """What every runner shares: the model's preprocessing behind frame limits, its device, dtype and labels."""

    task: ClassVar[Task]
    dense_first_frame = True  # a stream's first frame computes every token (it seeds the stream's state)
    plain_dense = True  # a step whose budgets are all full runs the plain dense model
    fidelity: ClassVar[Fidelity | None] = None  # how an audit compares a served answer with the dense one
    rlt_tau: float | None = None  # clip models only (Run-Length Tokenization)
    config: Any  # the model's config (model.config.ViTConfig or a subclass)
    device: torch.device
    dtype: torch.dtype
    labels: list[str]
    limits: FrameLimits

    def __init__(self, model: nn.Module, top_k: int = 5, limits: FrameLimits | None = None):
        self.model = model
        self.config = model.config
        self.preprocessor = Preprocessor(self.config.preprocess)
        self.limits = limits or FrameLimits()
        self.top_k = min(top_k, self.config.num_classes)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        names = self.config.label_names
        self.labels = list(names) if names else [f"class_{i}" for i in range(self.config.num_classes)]

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    @property
    def audits_supported(self) -> bool:
        """Whether the adaptive policy's audits can compare this runner's answers (it has a fidelity measure)."""
        return self.fidelity is not None

    default_queries = None  # no text queries (open-vocabulary detectors have them)
    tokenizer = None

    def check_queries(self, queries: Any) -> StreamQueries:
        raise QueriesUnsupported()

    def prepare(self, data: bytes) -> PreparedFrame:
        """Encoded bytes -> model input. Raises FrameRejected (protocol error code) for bad frames."""
        start = time.perf_counter()
        rgb = decode_image(data, self.limits)  # [H, W, 3] uint8
        height, width = rgb.shape[:2]
        out_size = self.config.preprocess.output_size((height, width))
        if tuple(out_size) != tuple(self.config.image_size):
            raise FrameRejected(
                "unsupported_size",
                f"a {width}x{height} frame preprocesses to {out_size[1]}x{out_size[0]}, the model takes "
                f"{self.config.image_size[1]}x{self.config.image_size[0]}",
            )
        try:
            image = self.preprocessor(rgb)[0]  # [3, H', W']
        except ValueError as err:  # e.g. a crop larger than the resized frame
            raise FrameRejected("unsupported_size", str(err)) from None
        return PreparedFrame(image, (height, width), time.perf_counter() - start)


class ModelRunner(FrameRunner):
    """A VisionTransformer behind EventfulViT and the classifier read-out (top-k); `read_out` is what other
    eventful models (detectors) change."""

    task = "classify"
    fidelity = LogitFidelity()
    eventful_class: ClassVar[type[EventfulViT]] = EventfulViT  # the eventful step around the model

    def __init__(
        self, model: VisionTransformer, eventful: EventfulConfig | None = None, top_k: int = 5,
        limits: FrameLimits | None = None, slots: int = 8,
    ):
        super().__init__(model, top_k, limits)
        # the state pool: `slots` streams' buffers allocated once (it grows, copying, only past that)
        self.eventful = self.eventful_class(model, eventful, slots=slots)

    def new_state(self) -> StreamState:
        """A slot of the pool; it returns to the pool when the state is released or dropped."""
        return self.eventful.new_state()

    @property
    def pool_bytes(self) -> int:
        """Bytes of the state pool on the device (every slot, used or not)."""
        return self.eventful.pool.nbytes

    @property
    def graph_bytes(self) -> int | None:
        """Device memory the captured step graphs hold (None unless steps are captured: graph, compile-graph)."""
        return self.eventful.graph_bytes if self.eventful.bucketed else None

    @property
    def refresh_interval(self) -> int | None:
        return self.eventful.config.refresh_interval

    @property
    def execution(self) -> str:
        return self.eventful.config.execution

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] CPU float32 -> the model's device and dtype (pinned, non-blocking copy on CUDA)."""
        if self.device.type == "cuda":
            return images.pin_memory().to(self.device, non_blocking=True).to(self.dtype)
        return images.to(self.dtype)

    def execute(self, plan: StepPlan) -> StepResult:
        """One batched eventful step over the plan's streams, then the model's read-out per frame."""
        start = time.perf_counter()
        images = self._to_device(torch.stack([p.image for p in plan.frames]))  # [B, 3, H, W]
        shadows: dict[int, tuple[torch.Tensor, int]] = {}
        for j, planned in enumerate(plan.frames):
            if planned.shadow is not None and not planned.state.needs_dense:  # measured on the old state, first
                shadow = self.eventful.step(images[j : j + 1], [planned.state], [planned.shadow], seeds=[False])
                shadows[j] = (self.read_out(shadow, StepPlan([planned]))[1][0], shadow.macs[0])
        for planned in plan.frames:
            if planned.flush:
                planned.state.flush()
        out = self.eventful.step(images, [p.state for p in plan.frames], [p.budget for p in plan.frames],
                                 seeds=[p.seed for p in plan.frames])  # the plan decides; the model obeys
        results, answers = self.read_out(out, plan)
        fractions = out.updated_fraction.tolist()
        outputs = []
        for j, planned in enumerate(plan.frames):
            tokens = planned.budget.tokens
            used = self.num_patches if out.dense_frame[j] or tokens is None else min(tokens, self.num_patches)
            shadow_answer, shadow_macs = shadows.get(j, (None, 0))
            outputs.append(FrameOutput(used, out.dense_frame[j], fractions[j], out.macs[j], results[j], answers[j],
                                       shadow_answer, shadow_macs))
        return StepResult(outputs, start, time.perf_counter() - start, out.dense_macs)

    def read_out(self, out: StepOutput, plan: StepPlan) -> tuple[list[dict[str, Any]], list[Any]]:
        """Per frame, the `outputs` of its result (the classifier's top-k classes) and its answer as audits compare
        it (its logits [K] on the CPU)."""
        logits = out.logits.float()  # [B, K]
        scores, indices = logits.softmax(dim=-1).topk(self.top_k, dim=-1)  # [B, k]
        results = [
            {"top": [{"label": self.labels[i], "index": i, "score": s}
                     for s, i in zip(scores[j].tolist(), indices[j].tolist(), strict=True)]}
            for j in range(len(plan.frames))
        ]
        return results, list(logits.cpu())

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> WarmupTimings:
        """Per batch size, on blank frames with throwaway states: a dense then a sparse step (first-call allocations,
        kernel selection and, on a GPU, lazy kernel loading happen here, not in the first frames served), then timed
        warm steps: sparse ones at an eighth and at half the tokens, and one plain dense step. The controller starts
        from these figures: a cost model fitted on its prior alone took r = 141 at a 4-stream join on this CPU
        (predicted 68 ms, live ~300 ms), and first steps timed cold would teach it a device far slower than it is."""
        h, w = self.config.image_size
        n = self.num_patches
        sparse = StreamBudget(tokens=max(1, n // 4))
        dense_seconds, eventful = {}, []
        shapes = self.step_shapes(max(batch_sizes))
        self.eventful.prepare(shapes)
        if shapes:
            graphs = self.graph_bytes
            captured = "" if graphs is None else f", the captured graphs hold {graphs / 2**20:.0f} MB"
            log.info("%s: %d step shapes ready%s", self.execution, len(shapes), captured)
        for batch in batch_sizes:
            image = torch.rand(batch, 3, h, w, device=self.device, dtype=self.dtype)
            states = [self.new_state() for _ in range(batch)]
            self.eventful.step(image, states, [StreamBudget.dense()] * batch)
            self.eventful.step(image.flip(-1), states, [sparse] * batch)
            for k, tokens in enumerate(sorted({max(1, n // 8), max(1, n // 2)})):
                frame = image.flip(-2) if k % 2 == 0 else image  # every token changed: top-r updates exactly r
                start = time.perf_counter()
                self.eventful.step(frame, states, [StreamBudget(tokens=tokens)] * batch).logits.sum().item()
                eventful.append((batch, batch * tokens, time.perf_counter() - start))
            start = time.perf_counter()
            self.eventful.step(image, states, [StreamBudget.dense()] * batch).logits.sum().item()  # .item(): synced
            dense_seconds[batch] = time.perf_counter() - start
        return WarmupTimings(dense_seconds, eventful)

    def step_shapes(self, max_batch: int) -> list[StepShape]:
        """The shapes compiled or captured at start-up, so that no frame waits for a compile or a capture: none when
        eager; compiled (dynamic sizes), each step kind at one stream and at two (dynamo's two specialisations, about
        a minute each on a CPU, which then serve every batch and width); captured, every batch bucket up to
        max_batch x every token bucket."""
        execution = self.execution
        if execution == "eager":
            return []
        n, np_, prefix = self.config.num_tokens, self.num_patches, self.config.num_prefix_tokens
        if execution == "compile":
            batches = [b for b in (1, 2) if b <= max_batch]
            return [StepShape(b, width, kind) for b in batches
                    for kind, width in (("plain", n), ("seed", n), ("sparse", prefix + min(8, np_)))]
        batches = sorted({batch_bucket(b) for b in range(1, max_batch + 1)})
        shapes = [StepShape(b, n, kind) for b in batches for kind in ("plain", "seed")]
        widths = sorted({prefix + token_bucket(r, np_) for r in range(np_)})
        shapes += [StepShape(b, width, "sparse") for b in batches for width in widths]
        return shapes
