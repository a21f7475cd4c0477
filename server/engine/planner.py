"""The planner: each round, one `StepPlan` — which streams step, each one's budget, which frames seed their state,
which are answered by reuse, which wait — the one place these rules live. The runner executes a plan and decides
nothing; the model obeys the plan's seed flags.

Pure bookkeeping (no threads, no model): the engine calls it under its lock with the frames the scheduler offers;
the controller simulator in tests drives the same object.

Rules, in order, for the frames offered (each a stream's latest):
- a frame whose connection closed is let go; while the controller sheds load, frames older than its age limit are
  dropped, all but the youngest;
- a stream with a frame policy (`skip`, `keyframe`, `adaptive`) plans its own frame: reuse (its last result again,
  no step), a keyframe (dense, reseeding: not held back by `seeds_per_step`, the stream's schedule pays for it) or
  a sparse frame at the policy's budget; an adaptive stream also says whether the frame is audited (compared with
  the dense model after it is served, from the stream's measuring credit);
- the step runs the plain dense model when every frame that steps is at the full budget (or a skipping stream's
  dense frame): no state is written, each stream's next sparse frame reseeds;
- otherwise a frame seeds its stream's state (every token, writing every buffer) when it is the stream's first,
  the first after a new frame size or after plain dense steps, or a refresh is due; at most `seeds_per_step` such
  frames step per round, the others wait for the next (live, four joiners seeded in one step made a 300 ms step
  and every stream's frames 450-580 ms late for a second; one a step spreads that cost over steps the others
  barely notice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from model.fidelity import Fidelity
from model.policy import StreamBudget
from server.engine.budget import BudgetPolicy
from server.engine.controller import Decision, StreamDemand
from server.engine.frame_policy import FramePlan, StreamPolicySpec, StreamSchedule
from server.engine.registry import StreamRecord
from server.engine.scheduler import PendingFrame

FULL = StreamBudget()  # every token: a dense frame


@dataclass(frozen=True)
class PlannedFrame:
    """One stream's part of a step: its frame, its state, its budget, and whether it seeds the state."""

    stream_id: str
    frame: int
    image: torch.Tensor  # [3, H, W]
    state: Any  # the runner's per-stream state (model.state.StreamState, a clip window)
    budget: StreamBudget  # top-r: tokens per gate
    flush: bool  # the frame size changed: forget the stream's past before this frame
    frame_size: tuple[int, int] | None = None  # decoded (height, width): outputs in frame pixels (boxes)
    shadow: StreamBudget | None = None  # a keyframe of an adaptive stream: a sparse step first, measured, not served
    seed: bool = False  # every token, writing every buffer of the state (a keyframe); the model obeys
    queries: Any = None  # the stream's text queries (queries.StreamQueries; open-vocabulary models); None: default
    audit: bool = False  # the frame was served already: the dense answer of it (a clip window takes no frame again)


@dataclass(frozen=True)
class StepPlan:
    """What the runner executes in one batched step."""

    frames: list[PlannedFrame]
    plain_dense: bool = False  # every budget full, nothing seeds: the plain dense model runs (its own cost)

    @property
    def batch_size(self) -> int:
        return len(self.frames)

    @property
    def seeds(self) -> int:
        return sum(f.seed for f in self.frames)


@dataclass
class Round:
    """A round's decisions: the plan, and for the engine what each planned frame answers."""

    plan: StepPlan
    frames: list[PendingFrame] = field(default_factory=list)  # per planned frame, in plan order
    records: list[StreamRecord] = field(default_factory=list)
    reused: list[tuple[PendingFrame, StreamRecord]] = field(default_factory=list)  # answered with the last result
    held: list[PendingFrame] = field(default_factory=list)  # seeding frames over seeds_per_step: next round
    audited: set[str] = field(default_factory=set)  # streams whose frame is audited after it is served
    late: list[PendingFrame] = field(default_factory=list)  # shed (too old to make the target): answered dropped
    gone: list[PendingFrame] = field(default_factory=list)  # their connection closed: nobody to answer
    decision: Decision | None = None  # the controller's, in auto mode

    @property
    def taken(self) -> list[PendingFrame]:
        """The frames this round disposes of (the scheduler lets go of them; held frames stay)."""
        return [*self.frames, *(p for p, _ in self.reused), *self.late, *self.gone]


class RunnerFacts(Protocol):
    """What the planner needs to know of the runner."""

    dense_first_frame: bool  # a stream's first frame seeds its state (clip windows fill instead)
    plain_dense: bool  # steps whose budgets are all full run the plain dense model
    fidelity: Fidelity | None  # what an adaptive stream's audits compare (model/fidelity.py); None: no audits
    rlt_tau: float | None  # clip models: RLT's threshold on tubelet change (an adaptive stream lowers its own)

    @property
    def num_patches(self) -> int: ...

    @property
    def config(self) -> Any: ...

    def new_state(self) -> Any: ...


Decide = Callable[[float, list[StreamDemand]], Decision]


class Planner:
    """Decides every step (see the module docstring). `decide`: the budget controller's decision, consulted in
    auto mode each round before the plan."""

    def __init__(
        self, runner: RunnerFacts, policy: BudgetPolicy, seeds_per_step: int = 1,
        refresh_interval: int | None = None,
        stream_policy: Callable[[str], StreamPolicySpec | None] = lambda stream_id: None,
        decide: Decide | None = None,
        stream_queries: Callable[[str], Any] = lambda stream_id: None,
    ):
        self.runner = runner
        self.policy = policy
        self.seeds_per_step = max(1, seeds_per_step)
        self.refresh_interval = refresh_interval
        self.stream_policy = stream_policy
        self.decide = decide
        self.stream_queries = stream_queries  # a stream's text queries as set (None: the model's default)
        self.last_decision: Decision | None = None

    # ---- budgets ------------------------------------------------------------------------------

    def decide_budgets(self, now: float, offered: list[tuple[PendingFrame, StreamRecord]],
                       expected: list[str] = ()) -> Decision | None:
        """In auto mode: the controller decides every expected stream's tokens for this round (the offered ones,
        and `expected`: streams with a frame on its way). Returns the decision (None in fixed mode)."""
        if self.decide is None or self.policy.get_global()[0].mode != "auto":
            self.last_decision = None
            return None
        ids = [p.stream_id for p, _ in offered]
        ids += [i for i in expected if i not in set(ids)]
        seeding = {p.stream_id for p, r in offered if self.seeds(r, p)}
        seeding = set(sorted(seeding, key=ids.index)[: self.seeds_per_step])
        decision = self.decide(now, [StreamDemand(i, *self.policy.terms(i), seeding=i in seeding) for i in ids])
        self.policy.set_auto(decision.level, decision.tokens)
        self.last_decision = decision
        return decision

    # ---- the plan -----------------------------------------------------------------------------

    def round(self, offered: list[tuple[PendingFrame, StreamRecord | None]], now: float, expected: list[str] = (),
              max_age_s: float | None = None) -> Round:
        """Everything decided for the frames the scheduler offers, in order: frames whose connection closed are let
        go; with the controller shedding (max_age_s, its last decision), frames older than that are dropped, all but
        the youngest (a step, and with it the next decision, always happens); the budgets (auto mode); the plan."""
        closed = [r is None or r.session is None or r.session.id != p.session for p, r in offered]
        gone = [p for (p, _), c in zip(offered, closed, strict=True) if c]
        live = [(p, r) for (p, r), c in zip(offered, closed, strict=True) if not c]
        late: list[PendingFrame] = []
        if max_age_s is not None and live:
            youngest = max((p for p, _ in live), key=lambda p: p.received_at)
            old = [p.received_at < now - max_age_s and p is not youngest for p, _ in live]
            late = [p for (p, _), o in zip(live, old, strict=True) if o]
            live = [pr for pr, o in zip(live, old, strict=True) if not o]
        decision = self.decide_budgets(now, live, expected)
        out = self.plan(live)
        out.gone, out.late, out.decision = gone, late, decision
        return out

    def plan(self, offered: list[tuple[PendingFrame, StreamRecord]]) -> Round:
        """The step over these frames (the scheduler's order: served longest ago first). Creates a stream's state on
        its first frame."""
        live = [(p, r, self.policy.resolve(p.stream_id).tokens) for p, r in offered]
        frame_plans: dict[int, FramePlan] = {}  # by position in `live`
        for j, (pending, record, tokens) in enumerate(live):
            schedule = self._schedule(record)
            if schedule is not None:
                frame_plans[j] = schedule.plan(pending.image, tokens, record.last_result is not None)
        out = Round(StepPlan([]))
        out.reused = [(p, r) for j, (p, r, _) in enumerate(live) if frame_plans.get(j, FramePlan("dense")).action
                      == "reuse"]
        out.audited = {live[j][0].stream_id for j, fp in frame_plans.items() if fp.audit}
        def full(j: int, record: StreamRecord, tokens: int) -> bool:  # steps at the full budget
            if j not in frame_plans:
                return StreamBudget(tokens).is_dense_for(self.runner.num_patches)
            return frame_plans[j].action == "dense" and record.schedule.spec.policy == "skip"

        stepping = [j for j in range(len(live)) if frame_plans.get(j, FramePlan("dense")).action != "reuse"]
        plain = self.runner.plain_dense and all(full(j, live[j][1], live[j][2]) for j in stepping)
        planned = []
        for j, (pending, record, tokens) in enumerate(live):
            frame_plan = frame_plans.get(j)
            if frame_plan is not None and frame_plan.action == "reuse":
                continue
            if record.state is None:
                record.state = self.runner.new_state()
                record.state_bytes = getattr(record.state, "nbytes", 0)
            flush = self.flushes(record, pending)
            budget, shadow, seed = StreamBudget(tokens), None, False
            if frame_plan is not None and not plain:
                seed = flush or frame_plan.action == "dense" or self.seeds(record, pending)
                budget = frame_plan.budget if frame_plan.action == "sparse" and not seed else FULL
                shadow = frame_plan.shadow
            elif frame_plan is not None:  # a skipping stream's dense frame in a plain dense step
                budget = FULL
            elif not plain and self.seeds(record, pending):
                if sum(f.seed for f in planned) >= self.seeds_per_step:
                    out.held.append(pending)  # its turn comes next round
                    continue
                seed = True
            record.frame_size = pending.frame_size
            planned.append(PlannedFrame(pending.stream_id, pending.frame, pending.image, record.state, budget, flush,
                                        pending.frame_size, shadow, seed and self.runner.dense_first_frame,
                                        self.stream_queries(pending.stream_id)))
            out.frames.append(pending)
            out.records.append(record)
        out.plan = StepPlan(planned, plain_dense=plain and bool(planned))
        return out

    def _schedule(self, record: StreamRecord) -> StreamSchedule | None:
        """The record's frame policy at run time, built from the spec set over REST."""
        spec = self.stream_policy(record.stream_id)
        if spec is None:
            record.schedule = None
        elif record.schedule is None or record.schedule.spec != spec:
            record.schedule = StreamSchedule(spec, self.runner.config, self.runner.fidelity, self.runner.rlt_tau)
        return record.schedule

    @staticmethod
    def flushes(record: StreamRecord, pending: PendingFrame) -> bool:
        """A new frame size: the stream's state starts over."""
        return record.frame_size is not None and record.frame_size != pending.frame_size

    def seeds(self, record: StreamRecord, pending: PendingFrame) -> bool:
        """Whether this frame seeds its stream's state: the stream's first frame, the first after a flush (a new
        frame size) or plain dense steps, or a refresh is due (every refresh_interval-th frame)."""
        if not self.runner.dense_first_frame:
            return False  # clip windows fill frame by frame
        if record.state is None or self.flushes(record, pending):
            return True
        state = record.state
        refresh = self.refresh_interval
        return state.needs_dense or (refresh is not None and state.frames_since_dense + 1 >= refresh)
