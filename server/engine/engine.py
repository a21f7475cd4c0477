"""The engine: one inference thread owns the model; frames from every stream flow through it.

A frame's way: `submit` (event loop) -> decode thread (`Runner.prepare`) -> `Scheduler.put` (latest wins)
-> inference thread: `Scheduler.next_batch` offers frames -> `Planner` (server/engine/planner.py) decides the
round: budgets (in auto mode the `BudgetController` first), seeds, reuse, what waits -> one `StepPlan` ->
`Runner.execute` -> FrameResult delivered to the stream's connection. The event loop only does bookkeeping
under a short lock; decoding and the model run on their own threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from model.policy import StreamBudget
from server.engine.budget import BudgetPolicy, GlobalBudget, ResolvedBudget, StreamOverride
from server.engine.controller import BudgetController, ControllerConfig, ControllerState
from server.engine.decode import FrameLimits, FrameRejected, check_size
from server.engine.frame_policy import PolicyError, StreamPolicySpec
from server.engine.messages import FrameDropped, FrameError, FrameResult, FrameTiming, StreamMessage
from server.engine.planner import FULL, PlannedFrame, Planner, Round, StepPlan
from server.engine.queries import QueriesUnsupported, QueryError, StreamQueries
from server.engine.registry import (
    CLOSE_TRY_AGAIN_LATER,
    RawFrame,
    Session,
    StreamRecord,
    StreamRefused,
    StreamRegistry,
)
from server.engine.runner import Runner, StepResult
from server.engine.scheduler import PendingFrame, Scheduler
from server.engine.stats import (
    AuditStats,
    EngineSnapshot,
    FrameEvent,
    LatencyStats,
    NullStats,
    StatsSink,
    StepStats,
)

log = logging.getLogger("eventful.engine")

MAX_STREAM_POLICIES = 1024  # frame policies kept by stream id (set before or while a stream is connected)
MAX_STREAM_QUERIES = 1024  # text query lists kept by stream id (likewise)
ACTIVE_STREAM_S = 1.0  # a stream that sent a frame this recently is expected to send again (batching)
WINDOW_STEP_FRACTION = 0.25  # wait for expected company up to this fraction of a recent step (at least the window)


def _single_threaded_torch() -> None:
    """Decode threads preprocess with torch on one intra-op thread: the inference thread's OpenMP team must not
    compete with theirs for cores (fine-grained eventful steps stall badly when a worker is descheduled)."""
    torch.set_num_threads(1)


class EngineNotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


@dataclass(frozen=True)
class EngineConfig:
    max_streams: int = 16
    max_batch_size: int = 8
    batch_window_s: float = 0.005
    stream_ttl_s: float = 10.0
    decode_threads: int = 2
    default_budget: GlobalBudget = GlobalBudget("fixed", fraction=0.25)
    target_latency_s: float = 0.1  # the SLO in fixed mode (measured against, not held); auto mode brings its own
    limits: FrameLimits = field(default_factory=FrameLimits)
    torch_threads: int | None = None
    seeds_per_step: int = 1  # frames that seed a stream's state (dense) per eventful step; the rest wait a step


@dataclass(frozen=True)
class StreamInfo:
    """What GET /v1/streams shows for one stream."""

    stream_id: str
    connected: bool
    frames_received: int
    frames_processed: int
    frames_dropped: int
    frames_failed: int
    budget_tokens: int  # what its next frame would get
    budget_source: str
    last_budget_tokens: int | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    state_bytes: int
    frame_size: tuple[int, int] | None
    frames_reused: int = 0  # frames answered with the stream's last result again (skip, adaptive)
    policy: dict | None = None  # the frame policy and, for adaptive streams, the fidelity estimate


@dataclass(frozen=True)
class BudgetView:
    """The global budget as the API and the metrics show it, read at one instant (see Engine.budget_view)."""

    budget: GlobalBudget
    tokens: int  # what a stream without an override gets now
    controller: ControllerState | None  # None before the model is loaded


@dataclass(eq=False)
class StreamHandle:
    """What a connection holds: its session in the engine (opaque to the API)."""

    stream_id: str
    _session: Session


class Engine:
    """Owns the model runner, the scheduler, the stream registry and the budget policy."""

    def __init__(self, config: EngineConfig, load_runner: Callable[[], Runner], stats: StatsSink | None = None):
        self.config = config
        self.stats: StatsSink = stats or NullStats()
        self._load_runner = load_runner
        self._cond = threading.Condition()
        self._scheduler = Scheduler(config.max_batch_size, config.batch_window_s)
        self._registry = StreamRegistry(config.max_streams, config.stream_ttl_s)
        self._decode_pool = ThreadPoolExecutor(
            config.decode_threads, thread_name_prefix="eventful-decode", initializer=_single_threaded_torch
        )
        self._torch_threads = config.torch_threads or torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="eventful-inference", daemon=True)
        self._runner: Runner | None = None
        self._policy: BudgetPolicy | None = None
        self._controller: BudgetController | None = None  # observes always; decides in auto mode
        self._planner: Planner | None = None
        self._shed_limit: int | None = None  # streams per step while the controller sheds load
        self._shed_age: float | None = None  # ... or the age (s) past which a frame is dropped before a step
        self._ready = threading.Event()
        self._recent_step_s = 0.0  # moving average of model step time (batching window)
        # audited frames whose policy bookkeeping (with the audit's dense step) waits for idle time, by stream: each
        # settles before that stream's next frame is planned, run if it fits the latency target, else skipped
        self._deferred_audits: dict[str, _DeferredAudit] = {}
        self._audit_s = 0.0  # moving average of an audit's dense step (does one fit before a due batch?)
        self._last_arrival_at: float | None = None  # perf_counter() of the latest frame from any stream
        self._stream_policies: dict[str, StreamPolicySpec] = {}  # frame policies set over REST, by stream id
        self._stream_queries: dict[str, StreamQueries] = {}  # text queries set over REST or a control message
        self._started = False
        self._stopping = False
        self._paused = False
        self.load_error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the inference thread, which loads the model (idempotent)."""
        with self._cond:
            if not self._started:
                self._started = True
                self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (True) or failed to load / timed out (False; see load_error)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.load_error is not None or (deadline is not None and time.monotonic() > deadline):
                return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._thread.is_alive()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def pause(self) -> None:
        """Stop taking new steps (frames still arrive and supersede each other); for tests and maintenance."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def queued_frames(self) -> int:
        """Decoded frames waiting for a step (at most one per stream)."""
        with self._cond:
            return len(self._scheduler)

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            raise EngineNotReady("the model is not loaded yet")
        return self._runner

    @property
    def policy(self) -> BudgetPolicy:
        if self._policy is None:
            raise EngineNotReady("the model is not loaded yet")
        return self._policy

    # ---- streams (called from the event loop) ----------------------------------------------

    def open_stream(self, stream_id: str, deliver: Callable[[StreamMessage], None]) -> StreamHandle:
        """Attach a connection. deliver(message) must be thread-safe and must not block. Raises StreamRefused."""
        with self._cond:
            try:
                if not self.ready:
                    reason = "the model failed to load" if self.load_error else "the model is still loading"
                    raise StreamRefused(CLOSE_TRY_AGAIN_LATER, reason, "not_ready")
                _, session = self._registry.open(stream_id, deliver)
            except StreamRefused as refused:
                self.stats.refused(refused.kind)
                raise
        return StreamHandle(stream_id, session)

    def close_stream(self, handle: StreamHandle) -> None:
        """Detach a connection; its waiting frame is discarded, its state freed or kept for the TTL."""
        with self._cond:
            session = handle._session
            record = self._registry.records.get(session.stream_id)
            pending = self._scheduler.discard(session.stream_id) if record and record.session is session else None
            dropped = [pending] if pending is not None else []
            if session.waiting is not None:
                dropped.append(session.waiting)
                session.waiting = None
            if record is not None:
                record.frames_dropped += len(dropped)
            self._registry.close(session, time.perf_counter())
            self._cond.notify_all()
        for _ in dropped:
            self.stats.frame(FrameEvent("dropped"))

    def submit_frame(self, handle: StreamHandle, frame: int, data: bytes, received_at: float) -> None:
        """A binary message arrived: decode it on a decode thread (one at a time per stream, latest wins)."""
        session = handle._session
        self.stats.frame(FrameEvent("received"))
        try:
            check_size(data, self.config.limits)
        except FrameRejected as rejected:
            with self._cond:
                self._count_received(session)
                self._fail(session, frame, rejected.code, rejected.message)
            return
        raw = RawFrame(frame, data, received_at)
        with self._cond:
            self._count_received(session)
            session.last_received_at = received_at
            self._last_arrival_at = received_at
            if self._controller is not None:
                self._controller.observe_arrival(received_at, session.stream_id)
            if session.closed:
                return
            if not session.decoding:
                session.decoding = True
                self._decode_pool.submit(self._decode, session, raw)
                return
            superseded, session.waiting = session.waiting, raw
        if superseded is not None:
            self._dropped(session, superseded.frame)

    def record_latency(self, handle: StreamHandle, seconds: float) -> None:
        """The connection sent a result: end-to-end latency (receive -> sent)."""
        with self._cond:
            record = self._registry.records.get(handle.stream_id)
            if record is not None and record.session is handle._session:
                record.latencies.append(seconds)
            if self._controller is not None:
                self._controller.observe_latency(time.perf_counter(), seconds)
        self.stats.latency(LatencyStats(seconds))

    # ---- views -----------------------------------------------------------------------------

    def list_streams(self) -> list[StreamInfo]:
        with self._cond:
            records = list(self._registry.records.values())
            return [self._info(r) for r in records]

    def stream_info(self, stream_id: str) -> StreamInfo | None:
        with self._cond:
            record = self._registry.records.get(stream_id)
            return self._info(record) if record is not None else None

    def snapshot(self) -> EngineSnapshot:
        with self._cond:
            policy = self._policy
            view = self._budget_view(time.perf_counter())
            connected = [r.stream_id for r in self._registry.records.values() if r.connected]
            tokens = [policy.resolve(i).tokens for i in connected] if policy else []
            auto = view is not None and view.budget.mode == "auto"
            state = view.controller if view is not None else None
            return EngineSnapshot(
                ready=self.ready,
                active_streams=self._registry.connected_count,
                retained_streams=self._registry.retained_count,
                state_bytes=self._registry.state_bytes,
                pool_bytes=(self._runner.pool_bytes or 0) if self._runner is not None else 0,
                budget_tokens=view.tokens if view else 0,
                num_patches=policy.num_patches if policy else 0,
                target_latency_s=state.target_s if auto and state else 0.0,
                measured_p95_s=state.measured_p95_s if state else None,
                stream_tokens=(sum(tokens) / len(tokens), min(tokens), max(tokens)) if tokens else None,
                saturated=bool(auto and state and state.saturated),
                floor_unmet_streams=sum(1 for r in self._registry.records.values()
                                        if r.schedule is not None and r.schedule.floor_error is not None),
            )

    def controller_state(self) -> ControllerState | None:
        """The budget controller's view now, as budget_view shows it (None before the model is loaded)."""
        with self._cond:
            view = self._budget_view(time.perf_counter())
            return view.controller if view is not None else None

    def budget_view(self) -> BudgetView:
        """The global budget and the controller's state at one instant: what GET /v1/budget and the metrics show.
        Raises EngineNotReady before the model is loaded."""
        with self._cond:
            view = self._budget_view(time.perf_counter())
        if view is None:
            raise EngineNotReady("the model is not loaded yet")
        return view

    def _budget_view(self, now: float) -> BudgetView | None:
        """Under the lock. Without traffic (no frame from any stream in the controller's window, about 1 s) nothing
        of the last decision is shown: no measured p95 (not one of frames from seconds ago), no streams, tokens or
        saturation; in auto mode the budget is the level the controller holds, which its next decision starts
        from."""
        policy, controller = self._policy, self._controller
        if policy is None or controller is None:
            return None
        budget, tokens = policy.get_global()
        state = controller.state(now)
        if self._last_arrival_at is None or now - self._last_arrival_at > controller.config.window_s:
            state = replace(state, measured_p95_s=None, tokens_mean=None, tokens_min=None, tokens_max=None, streams=0,
                            saturated=False, reason=None, max_batch=None, max_age_s=None)
            if budget.mode == "auto":
                tokens = state.level
        return BudgetView(budget, tokens, state)

    def _info(self, record: StreamRecord) -> StreamInfo:
        resolved = self._policy.resolve(record.stream_id) if self._policy else ResolvedBudget(0, "global")
        p50, p95 = record.latency_quantile(0.5), record.latency_quantile(0.95)
        return StreamInfo(
            stream_id=record.stream_id,
            connected=record.connected,
            frames_received=record.frames_received,
            frames_processed=record.frames_processed,
            frames_dropped=record.frames_dropped,
            frames_failed=record.frames_failed,
            budget_tokens=resolved.tokens,
            budget_source=resolved.source,
            last_budget_tokens=record.budget_tokens,
            latency_p50_ms=None if p50 is None else 1000 * p50,
            latency_p95_ms=None if p95 is None else 1000 * p95,
            state_bytes=record.state_bytes,
            frame_size=record.frame_size,
            frames_reused=record.frames_reused,
            policy=self._policy_view(record.stream_id, record),
        )

    # ---- budget (delegates to the policy; BudgetError for values out of range) ---------------

    def global_budget(self) -> tuple[GlobalBudget, int]:
        return self.policy.get_global()

    def set_global_budget(self, budget: GlobalBudget) -> tuple[GlobalBudget, int]:
        policy = self.policy
        with self._cond:
            policy.set_global(budget)
            if self._controller is not None:
                self._controller.reconfigure(self._controller_config(policy), policy.get_global()[1])
            self._shed_limit = self._shed_age = None
        return policy.get_global()

    def _controller_config(self, policy: BudgetPolicy) -> ControllerConfig:
        budget = policy.get_global()[0]
        if budget.mode != "auto":  # observing only: its p95 is reported against the configured SLO
            return ControllerConfig(self.config.target_latency_s, policy.num_patches)
        low, high = policy.auto_range(budget)
        return ControllerConfig(budget.target_latency_ms / 1000, policy.num_patches, min_tokens=low, max_tokens=high)

    def stream_budget(self, stream_id: str) -> tuple[StreamOverride | None, ResolvedBudget]:
        return self.policy.get_override(stream_id), self.policy.resolve(stream_id)

    def set_stream_budget(self, stream_id: str, override: StreamOverride) -> ResolvedBudget:
        self.policy.set_override(stream_id, override)
        return self.policy.resolve(stream_id)

    def clear_stream_budget(self, stream_id: str) -> bool:
        return self.policy.clear_override(stream_id)

    # ---- frame policies (skip, keyframe, adaptive; PolicyError for values out of range) --------

    def set_stream_policy(self, stream_id: str, spec: StreamPolicySpec) -> dict:
        """Set a stream's frame policy (it takes effect on its next frame; a changed policy starts afresh)."""
        spec.check_fidelity(self.runner.fidelity, self.runner.rlt_tau)
        with self._cond:
            if spec.policy == "eventful":
                self._stream_policies.pop(stream_id, None)
            else:
                if stream_id not in self._stream_policies and len(self._stream_policies) >= MAX_STREAM_POLICIES:
                    raise PolicyError("stream_id", f"at most {MAX_STREAM_POLICIES} streams may have a frame policy")
                self._stream_policies[stream_id] = spec
            self._restart_schedule(stream_id)
            return self._policy_view(stream_id, self._registry.records.get(stream_id))

    def _restart_schedule(self, stream_id: str) -> None:
        """The stream's frame policy starts afresh on its next frame (a dense one): a new spec, or new queries that
        make what it measured (answers to the old ones) meaningless. Called with the lock held."""
        record = self._registry.records.get(stream_id)
        if record is not None:
            record.schedule = None

    def stream_policy(self, stream_id: str) -> dict:
        with self._cond:
            return self._policy_view(stream_id, self._registry.records.get(stream_id))

    def _policy_view(self, stream_id: str, record: StreamRecord | None) -> dict:
        spec = self._stream_policies.get(stream_id, StreamPolicySpec())
        if record is not None and record.schedule is not None and record.schedule.spec == spec:
            return {"stream_id": stream_id, **record.schedule.view()}
        # (before the stream's next frame starts its schedule: the setting, and the exploration it will run)
        return {"stream_id": stream_id, "policy": spec.policy, "setting": asdict(spec),
                "explore": spec.explore_in_effect(self.runner.rlt_tau)}

    # ---- text queries (open-vocabulary models; QueriesUnsupported otherwise, QueryError out of the limits) ----

    def set_stream_queries(self, stream_id: str, queries: object) -> dict:
        """Set a stream's text queries (a list of strings), checked and tokenized now; encoded on the inference
        thread before the stream's next frame (connected or not: they apply when it connects)."""
        checked = self.runner.check_queries(queries)
        with self._cond:
            if stream_id not in self._stream_queries and len(self._stream_queries) >= MAX_STREAM_QUERIES:
                raise QueryError("stream_id", f"at most {MAX_STREAM_QUERIES} streams may have queries of their own")
            if self._stream_queries.get(stream_id) != checked:
                self._restart_schedule(stream_id)
            self._stream_queries[stream_id] = checked
        return self.stream_queries(stream_id)

    def clear_stream_queries(self, stream_id: str) -> bool:
        """Back to the default queries; False when the stream had none of its own."""
        self._queries_supported()
        with self._cond:
            cleared = self._stream_queries.pop(stream_id, None) is not None
            if cleared:
                self._restart_schedule(stream_id)
            return cleared

    def stream_queries(self, stream_id: str) -> dict:
        """{"stream_id", "queries", "source": "stream" | "default"}."""
        default = self._queries_supported()
        with self._cond:
            own = self._stream_queries.get(stream_id)
        if own is None:
            return {"stream_id": stream_id, "queries": list(default), "source": "default"}
        return {"stream_id": stream_id, "queries": list(own.texts), "source": "stream"}

    def _queries_supported(self) -> tuple[str, ...]:
        default = self.runner.default_queries
        if default is None:
            raise QueriesUnsupported()
        return default

    # ---- decode threads --------------------------------------------------------------------

    def _decode(self, session: Session, raw: RawFrame) -> None:
        try:
            prepared = self.runner.prepare(raw.data)
        except FrameRejected as rejected:
            with self._cond:
                self._fail(session, raw.frame, rejected.code, rejected.message)
        except Exception as err:  # a decoder bug must not take the stream down
            log.exception("decoding frame %d of stream %s failed", raw.frame, session.stream_id)
            with self._cond:
                self._fail(session, raw.frame, "undecodable", f"decoding failed: {err}")
        else:
            self.stats.frame(FrameEvent("decoded", seconds=prepared.decode_seconds))
            pending = PendingFrame(
                session.stream_id, session.id, raw.frame, prepared.image, prepared.frame_size, raw.received_at,
                time.perf_counter(), prepared.decode_seconds,
            )
            superseded = None
            with self._cond:
                closed = session.closed
                if not closed:
                    superseded = self._scheduler.put(pending)
                    self._cond.notify_all()
            if closed:
                self.stats.frame(FrameEvent("dropped"))  # its connection went away while it was decoded
            elif superseded is not None:
                self._dropped(session, superseded.frame)
        finally:
            with self._cond:
                waiting, session.waiting = session.waiting, None
                session.decoding = waiting is not None and not session.closed and not self._stopping
                if session.decoding:
                    self._decode_pool.submit(self._decode, session, waiting)

    # ---- the inference thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            # Per-thread settings: this thread's intra-op pool (decode threads use one thread each), and
            # denormals flushed to zero (MXCSR is per thread; denormal GELU tails cost up to 3x on some CPUs).
            torch.set_num_threads(self._torch_threads)
            torch.set_flush_denormal(True)
            runner = self._load_runner()
            # two batch sizes: the controller's cost model tells a step's fixed cost from a stream's (and on a GPU,
            # where kernels are chosen per shape, the largest batch is warmed too)
            timings = runner.warmup(tuple(sorted({1, self.config.max_batch_size})))
            policy = BudgetPolicy(runner.num_patches, self.config.default_budget)
            self._controller = BudgetController(self._controller_config(policy), policy.get_global()[1])
            self._controller.calibrate(timings.eventful, timings.dense_s)
            self._policy = policy
            self._planner = Planner(runner, policy, self.config.seeds_per_step, runner.refresh_interval,
                                    self._stream_policies.get,
                                    lambda now, demands: self._controller.decide(now, demands),
                                    self._stream_queries.get)
            self._runner = runner
            self._ready.set()
        except (FileNotFoundError, ValueError, KeyError) as err:  # a bad spec or checkpoint: the message says it
            self.load_error = err
            log.error("loading the model failed: %s", err)
            return
        except BaseException as err:
            self.load_error = err
            log.exception("loading the model failed")
            return
        log.info("engine ready: %d patch tokens per frame", runner.num_patches)
        while self._step_once(runner):
            pass

    def _step_once(self, runner: Runner) -> bool:
        """Wait for a batch, plan it, run it, route the results (or, idle, run a deferred audit). False when the
        engine stops."""
        with self._cond:
            offered = self._wait_for_batch()
            if offered is None:
                return False
            # a stream's deferred audit settles before its next frame is planned (the audit reseeds its state and
            # its policy counts the audited frame first); with nothing due, idle time runs the oldest one
            ids = {p.stream_id for p in offered}
            settle = ([self._deferred_audits.pop(i) for i in list(self._deferred_audits) if i in ids] if offered
                      else [self._deferred_audits.pop(next(iter(self._deferred_audits)))])
            fits = not offered or self._audit_fits(offered, len(settle))
            step = None if settle else self._plan(offered)
        if settle:
            for deferred in settle:
                self._settle(deferred, run=fits)
            return True
        plan, batch, records, reused = step.plan, step.frames, step.records, step.reused
        result = None
        if batch:
            try:
                result = runner.execute(plan)
            except Exception as err:
                log.exception("step over %d streams failed", plan.batch_size)
                self._step_failed(batch, records, err)
            else:
                try:
                    self._finish(batch, records, plan, result)
                except Exception:  # never let bookkeeping take the inference thread down
                    log.exception("routing the results of a step failed")
        try:  # after every served frame has gone out: reused answers, then the policies' measuring (audits)
            self._serve_reused(reused, step.audited)
            if result is not None:
                self._after_scheduled(batch, records, plan, result, runner, step.audited)
        except Exception:
            log.exception("serving reused results or auditing failed")
        return True

    def _wait_for_batch(self) -> list[PendingFrame] | None:
        """Under the lock: block until a batch is due (or the engine stops: None)."""
        while True:
            if self._stopping:
                return None
            now = time.perf_counter()
            self._registry.reap(now)
            timeout = self._registry.next_expiry(now)
            if not self._paused:
                incoming = sum(1 for r in self._registry.records.values() if self._expected_soon(r, now))
                window = max(self.config.batch_window_s, WINDOW_STEP_FRACTION * self._recent_step_s)
                due = self._scheduler.next_batch(now, incoming, window, self._shed_limit, take=False)
                if isinstance(due, list):
                    return due
                if due is not None:
                    timeout = due if timeout is None else min(timeout, due)
                if self._deferred_audits:
                    return []  # idle: time for a deferred audit
            self._cond.wait(timeout)

    def _shed_late_frames(self, now: float) -> None:
        """Under the lock, while the controller sheds load, after a batch was taken: frames left waiting for a later
        step that are already older than the target are dropped (their streams' next frames are served instead of
        results that would come too late). Frames in the batch are always served."""
        target = self._controller.config.target_s if self._controller is not None else None
        if target is not None:
            self._drop_late(self._scheduler.expire(now - target))

    def _drop_late(self, frames: list[PendingFrame]) -> None:
        """Under the lock: answer frames taken out for load shedding `dropped`."""
        for late in frames:
            record = self._registry.records.get(late.stream_id)
            session = record.session if record is not None else None
            if record is not None and session is not None and session.id == late.session:
                record.frames_dropped += 1
                session.send(FrameDropped(late.frame))
            self.stats.frame(FrameEvent("dropped"))

    def _plan(self, offered: list[PendingFrame]) -> Round:
        """Under the lock: the planner's round over the offered frames; the scheduler lets go of the frames it
        disposes of; shed frames are answered `dropped`."""
        now = time.perf_counter()
        offered_ids = {p.stream_id for p in offered}
        expected = [r.stream_id for r in self._registry.records.values()
                    if r.stream_id not in offered_ids and r.session is not None
                    and (self._scheduler.is_ready(r.stream_id) or self._expected_soon(r, now))]
        step = self._planner.round([(p, self._registry.records.get(p.stream_id)) for p in offered], now, expected,
                                   self._shed_age)
        self._shed_limit = step.decision.max_batch if step.decision is not None else None
        self._shed_age = step.decision.max_age_s if step.decision is not None else None
        self._scheduler.take(step.taken, now)
        self._drop_late(step.late)
        for _ in step.gone:
            self.stats.frame(FrameEvent("dropped"))
        if self._shed_limit is not None or self._shed_age is not None:
            self._shed_late_frames(now)
        return step

    def _expected_soon(self, record: StreamRecord, now: float) -> bool:
        """A stream worth waiting for (within the batch window): no frame ready, but one being decoded, or it sent a
        frame in the last ACTIVE_STREAM_S (a live camera, or a client about to answer its last result)."""
        session = record.session
        if session is None or self._scheduler.is_ready(record.stream_id):
            return False
        return session.decoding or now - session.last_received_at < ACTIVE_STREAM_S

    def _serve_reused(self, reused: list[tuple[PendingFrame, StreamRecord]], audited: set[str]) -> None:
        """Answer frames a policy reuses for: the stream's last result again, marked reused, at no model cost."""
        now = time.perf_counter()
        served = []
        with self._cond:
            for pending, record in reused:
                session = record.session
                if record.last_result is None or session is None or session.id != pending.session:
                    continue
                record.frames_processed += 1
                record.frames_reused += 1
                outputs, answer = record.last_result
                session.send(
                    FrameResult(
                        frame=pending.frame, budget_tokens=0, dense=False, updated_fraction=0.0, outputs=outputs,
                        received_at=pending.received_at,
                        timing=FrameTiming(pending.decode_seconds, max(0.0, now - pending.queued_at), 0.0),
                        batch_size=0, reused=True, fidelity=_message_fidelity(record),
                    )
                )
                self.stats.frame(FrameEvent("processed"))
                served.append((pending, record, record.schedule, answer, self._stream_queries.get(pending.stream_id)))
        for pending, record, schedule, answer, queries in served:
            if schedule is not None:
                self._after(record, audited, lambda audit, s=schedule, p=pending, r=record, a=answer, q=queries:
                            s.after("reuse", a, audit, None, 0, 0, _Probes(self.runner, p, r, q)),
                            self._audit_for(pending, record, answer, queries))

    def _after_scheduled(self, batch: list[PendingFrame], records: list[StreamRecord], plan: StepPlan,
                         result: StepResult, runner: Runner, audited: set[str]) -> None:
        """Keep each stream's last result (what a reuse serves); let the frame policies measure (shadows, audits)."""
        for pending, record, output, planned in zip(batch, records, result.outputs, plan.frames, strict=True):
            record.last_result = (output.outputs, output.answer)
            schedule = record.schedule
            if schedule is not None:
                action = "dense" if output.dense else "sparse"
                # a dense frame's audit is free (its answer is the dense one): only a reused or sparse one defers
                self._after(record, audited if action != "dense" else set(),
                            lambda audit, s=schedule, a=action, o=output, p=pending, r=record, q=planned.queries:
                            s.after(a, o.answer, audit, o.shadow_answer, o.macs, o.shadow_macs,
                                    _Probes(runner, p, r, q)),
                            self._audit_for(pending, record, output.answer, planned.queries))

    def _after(self, record: StreamRecord, audited: set[str], after: Callable[[Callable[[], Any]], Any],
               audit: Callable[[], Any]) -> None:
        """A served frame's policy bookkeeping, `after(audit)`: now, or (the frame is audited) deferred to idle
        time, as late as the stream's next frame."""
        if record.stream_id not in audited:
            after(audit)
            return
        with self._cond:
            self._deferred_audits[record.stream_id] = _DeferredAudit(record, after, audit)
            self._cond.notify_all()

    def _audit_fits(self, offered: list[PendingFrame], audits: int) -> bool:
        """Under the lock: whether `audits` dense audit steps before the due batch keep its oldest frame within the
        latency target (auto mode; with a fixed budget there is none, and they run)."""
        state = self._budget_view(time.perf_counter())
        if state is None or state.budget.mode != "auto" or state.controller is None:
            return True
        oldest = min(p.queued_at for p in offered)
        wait = time.perf_counter() - oldest + audits * self._audit_s + self._recent_step_s
        return wait <= state.controller.target_s

    def _settle(self, deferred: _DeferredAudit, run: bool) -> None:
        """A deferred frame's policy bookkeeping, with its audit (run) or without (skipped: it would have made a
        due frame late, or the stream is gone)."""
        record = deferred.record
        with self._cond:
            live = self._registry.records.get(record.stream_id) is record and record.schedule is not None
        if not live:
            self.stats.audit_skipped("gone")
            return
        if not run:
            record.schedule.skip_audit()
            self.stats.audit_skipped("late")
        started = time.perf_counter()
        spent = 0
        try:
            spent = deferred.after(deferred.audit)  # MACs measuring took (0: nothing ran, e.g. no clip was due)
        except Exception:
            log.exception("a deferred audit failed")
        if run and spent:
            self._audit_s += 0.3 * (time.perf_counter() - started - self._audit_s)

    def _audit_for(self, pending: PendingFrame, record: StreamRecord, served: Any, queries: Any):
        """An audit of this frame: the dense model on it, with the stream's text queries if it has some (reseeding
        the stream; its result is what a skipping stream serves next), compared by the stream's policy with what
        was served. Only this stream's state and last result change."""

        def audit():
            runner = self.runner
            out = runner.execute(StepPlan([PlannedFrame(
                pending.stream_id, pending.frame, pending.image, record.state, FULL, False, pending.frame_size,
                seed=runner.dense_first_frame, queries=queries, audit=True)])).outputs[0]
            record.last_result = (out.outputs, out.answer)
            fidelity = runner.fidelity
            self.stats.audit(AuditStats(fidelity.kind, error=fidelity.error(served, out.answer),
                                        agreement=fidelity.agreement(served, out.answer), macs=out.macs))
            return out.answer

        return audit

    def _finish(self, batch: list[PendingFrame], records: list[StreamRecord], plan: StepPlan, result: StepResult):
        queue_seconds = [max(0.0, result.started_at - p.queued_at) for p in batch]
        self._recent_step_s += 0.2 * (result.step_seconds - self._recent_step_s)
        with self._cond:
            if self._controller is not None:
                tokens = sum(o.budget_tokens for o in result.outputs)
                self._controller.observe_step(time.perf_counter(), plan.batch_size, tokens, result.step_seconds,
                                              plain_dense=plan.plain_dense, seeded=plan.seeds)
            for pending, record, output, queued in zip(batch, records, result.outputs, queue_seconds, strict=True):
                record.frames_processed += 1
                record.budget_tokens = output.budget_tokens
                session = record.session
                if session is None or session.id != pending.session:
                    continue  # the connection closed during the step
                session.send(
                    FrameResult(
                        frame=pending.frame, budget_tokens=output.budget_tokens, dense=output.dense,
                        updated_fraction=output.updated_fraction, outputs=output.outputs,
                        received_at=pending.received_at,
                        timing=FrameTiming(pending.decode_seconds, queued, result.step_seconds),
                        batch_size=plan.batch_size, fidelity=_message_fidelity(record),
                    )
                )
        for _ in batch:
            self.stats.frame(FrameEvent("processed"))
        self.stats.step(
            StepStats(
                batch_size=plan.batch_size, step_seconds=result.step_seconds, queue_seconds=queue_seconds,
                updated_fractions=[o.updated_fraction for o in result.outputs],
                macs=sum(o.macs for o in result.outputs), dense_macs=result.dense_macs * plan.batch_size,
            )
        )

    def _step_failed(self, batch: list[PendingFrame], records: list[StreamRecord], err: Exception) -> None:
        with self._cond:
            for pending, record in zip(batch, records, strict=True):
                if record.state is not None:
                    record.state.flush()  # a step that failed half-way may have written part of the state
                session = record.session
                if session is not None and session.id == pending.session:
                    self._fail(session, pending.frame, "inference_failed", f"the model step failed: {err}")
                else:
                    record.frames_failed += 1

    # ---- bookkeeping helpers (lock held) ---------------------------------------------------

    def _count_received(self, session: Session) -> None:
        record = self._registry.records.get(session.stream_id)
        if record is not None and record.session is session:
            record.frames_received += 1

    def _fail(self, session: Session, frame: int, code: str, message: str) -> None:
        record = self._registry.records.get(session.stream_id)
        if record is not None and record.session is session:
            record.frames_failed += 1
        self.stats.frame(FrameEvent("failed", code=code))
        session.send(FrameError(frame, code, message))

    def _dropped(self, session: Session, frame: int) -> None:
        with self._cond:
            record = self._registry.records.get(session.stream_id)
            if record is not None and record.session is session:
                record.frames_dropped += 1
            session.send(FrameDropped(frame))
        self.stats.frame(FrameEvent("dropped"))


def _message_fidelity(record: StreamRecord) -> dict | None:
    """The fidelity estimate a result message of this stream carries (its policy's report_fidelity), or None."""
    return record.schedule.message_fidelity() if record.schedule is not None else None


@dataclass
class _DeferredAudit:
    """An audited frame's policy bookkeeping, waiting for idle time: `after(audit)` runs it."""

    record: StreamRecord
    after: Callable[[Callable[[], Any]], Any]
    audit: Callable[[], Any]


class _Probes:
    """An adaptive stream's probe: a copy of its state (in its record) that runs a candidate budget's sparse steps on
    its frames, not served (model/chooser.py); on the inference thread, after the frame was served."""

    def __init__(self, runner: Runner, pending: PendingFrame, record: StreamRecord, queries: Any = None):
        self.runner, self.pending, self.record, self.queries = runner, pending, record, queries

    def start(self) -> None:
        self.record.probe_state = self.record.state.clone()

    def step(self, budget: StreamBudget) -> tuple[Any, int]:
        p = self.pending
        state = self.record.probe_state
        out = self.runner.execute(StepPlan([PlannedFrame(
            p.stream_id, p.frame, p.image, state, budget, False, p.frame_size, seed=state.needs_dense,
            queries=self.queries)])).outputs[0]
        return out.answer, out.macs

    def stop(self) -> None:
        self.record.probe_state = None
