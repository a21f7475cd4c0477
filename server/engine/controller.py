"""The budget controller (auto mode): every scheduling round, the tokens per gate r of every stream, chosen so
that the p95 end-to-end latency holds a target while as many tokens as fit are spent.

Two loops, one actuator (a water level L: the r every controlled stream gets unless its cap is lower):

- Feed-forward (inner): a cost model of the step time, step_s = a + b*batch + c*tokens/num_patches, learned
  online (`StepCostModel`, step_cost.py). Given a step-time budget S and the streams expected in the next batch, it
  gives the largest L whose predicted step fits S, counting fixed overrides at their tokens and caps at their caps
  (water-filling: every stream the same r, capped ones their cap). A stream that joins or a device that slows
  down changes the prediction in the same round, so r is cut at once.
- Feedback (outer): a PI loop on e = log(aim * target / measured p95) sets S = target * exp(u + kp*e). It learns
  what the cost model cannot see: decode and protocol time, and how long frames wait for the step before theirs.
  The integrator u is clamped (anti-windup), frozen while the streams already get all they may have, falls fast
  (a jump of up to 50 % when the recent latency is far over the target) and rises at a bounded rate. Errors
  inside a deadband are ignored.

r moves only when the wanted change leaves a hysteresis band, and rises at a bounded rate from where it was last
set, slower as the latency nears the aim (what is measured lags r by about a window). While that bound holds r
back, the integrator does not rise (anti-windup).

The cost model starts from the engine's warm-up steps (`calibrate`), not from its prior.

The plain dense step (every stream at the full budget) is a regime of its own, timed at warm-up and on every dense
step: where it fits S, r goes to the full budget at once (the eventful levels just below cost more). A step that
seeded streams (a joiner's first frame, dense through the eventful path) is a one-off: feedback resumes after it.

When even the minimum r cannot fit S, the decision says so (saturated, with the reason) and sheds load, so that
the engine drops frames instead of letting latency grow: full batches with an age limit (frames that would be late
are dropped before a step; never younger than 30 % of the frame period, or frames of the round being served are
dropped and steps shrink to one frame), or, where no age works, a batch limit. S does not fall below the point where
neither serves a frame sooner. While saturated and late, the integrator falls faster (the load that saturated it is
new). Frames are not dropped where that cannot bring the p95 under the target: the device keeps up at the minimum r
and the p95 is over the target by more than a step (the rest of the latency is not the device's).

Beyond this core, each mechanism added after a trace on the shared 2-core CPU is one switch of `ControllerConfig`
(knee memory and cut, tail-capped p95, noise-scaled aim, frame-period capacity, per-load integrator memory,
drain-and-restore, slowdown revert, shedding regime gain, seed pricing, dense hysteresis). An ablation across seeds
on a CPU and a GPU-like simulated device (`python -m bench.controller_ablation`, docs/controller.md#ablation) kept
on only those that help more than the noise: the frame-period capacity, the per-load integrator memory and the
no-futile-shedding rule.

Pure: no threads, no clock, no torch. The engine feeds it observations and asks for a Decision every round.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.engine.step_cost import DenseStepModel, StepCostModel


@dataclass(frozen=True)
class ControllerConfig:
    """Every parameter of the controller. The core (cost model, PI loop on the log p95, anti-windup, shedding at
    saturation) comes first; each mechanism beyond it has one switch (off: that mechanism alone is skipped) with its
    parameters beneath it. The defaults are what the ablation across seeds on the CPU and GPU-like simulated devices
    found worth more than the noise (docs/controller.md#ablation); the rest stay as settings, off:

    - knee_memory (off): after r rose into a p95 clearly over the target, cut r back under that step and keep a
      ceiling there (KneeMemory);
    - tail_cap (off): a window's p95 is fed back capped at what its middle half and the recent windows' tails say;
    - noise_aim (off): the aim is lowered by the spread of the window p95s measured lately;
    - capacity (on: 0.95; None: off): where frames come together, S is held within a share of the frame period;
    - load_memory (on): per stream count, the integrator last used is restored when that load comes back;
    - drain_restore (off): a fast cut r did not cause is undone once the burst has drained;
    - slowdown_revert (off): a slowdown the cost model followed and then undid takes u and r back (and the fit);
    - shed_regime (off): past the device's capacity, shedding runs at a fraction of the integral gain, no fast cut;
    - seed_pricing (off): a step with a seeding frame gives the other streams what fits beside a dense frame;
    - shed_must_pay (on): saturated, no frames are dropped where the p95 is over the target by more than a step (the
      device keeps up; the rest of the latency is not the device's, and dropping frames cannot bring it under);
    - dense_hysteresis (None: off): at the plain dense step r stays until the step misses S by this share.
    """

    target_s: float  # p95 end-to-end latency to hold
    num_patches: int  # the dense budget
    min_tokens: int = 0  # global floor of r for controlled streams
    max_tokens: int | None = None  # global ceiling (None: num_patches)
    aim: float = 0.97  # hold the measured p95 at this fraction of the target (noise margin)
    window_s: float = 1.0  # p95 over the frames of this window (at least min_samples, from at most 4 windows back)
    min_samples: int = 8
    kp: float = 0.3  # proportional gain on the log error
    ki: float = 1.2  # integral gain, per second
    deadband: float = 0.04  # |log error| below this counts as on target
    rise_per_s: float = 0.8  # r rises at most this fraction of itself per second (cuts are not limited) ...
    rise_room: float = 0.25  # ... when the latency is this far (log) under the aim; nearer, proportionally slower ...
    rise_floor: float = 0.7  # ... but at least this share of the rate
    u_rise_per_s: float = 1.2  # the integrator rises at most this much (log units) per second
    shed_gain: float = 1.0  # saturated and over the aim: u falls (1 + this) times as fast (the batch limit is coarse)
    shed_tolerance: float = 0.2  # saturated, no batch limit fits: the largest within this share of the least latency
    min_age_share: float = 0.3  # the age limit is at least this share of the frame period (or full step, if shorter)
    hold_s: float = 0.5  # after streams join or leave: feed-forward only, latencies before then are forgotten
    jump_factor: float = 1.0  # the median latency of the recent frames over target * this: cut at once ...
    jump_window_s: float = 0.3  # ... judged over this window (at least 5 frames) ...
    jump_every_s: float = 0.5  # ... at most this often
    hysteresis_tokens: float = 2.0  # r changes only by at least this many tokens ...
    hysteresis_fraction: float = 0.04  # ... and this fraction of itself
    u_min: float = math.log(0.03)  # S between 3 % and 100 % of the target
    u_max: float = 0.0
    u_initial: float = math.log(0.45)  # about two steps (the one a frame waits for, its own) plus overhead
    # ---- mechanisms beyond the core: one switch each, then its parameters ----
    knee_memory: bool = False  # after the p95 went over ceiling_trigger times the target, r rises at most to where ...
    ceiling_trigger: float = 1.1
    ceiling_margin: float = 0.95  # ... the step is predicted at this share of the step at the last window's highest r
    ceiling_creep_per_s: float = 0.005  # (for this many streams); this ceiling then creeps up this fast ...
    ceiling_creep_fast_per_s: float = 0.01  # ... or this fast while the latency is ceiling_far (log) under the aim
    ceiling_far: float = 0.25
    knee_cut: bool = True  # (with knee_memory) going over cuts r to the ceiling at once, and feedback waits a window
    knee_rise: float = 0.05  # a knee (ceiling, cut) only where r rose by this much within knee_lookback_s before
    knee_lookback_s: float = 3.0
    tail_cap: bool = False  # a window's p95 is fed back capped at tail_slack times its middle half's mean times the
    tail_windows: int = 6  # tail (p95 / that mean) of the last this many windows, less the largest (host stalls)
    tail_slack: float = 1.2
    noise_aim: bool = False  # the aim is lowered by exp(-aim_noise_gain * (sigma - noise_free)), sigma: the spread
    aim_noise_gain: float = 0.5  # (std of the log) of the window p95s measured lately: a noisy p95 needs a wider
    noise_free: float = 0.04  # margin to stay under
    capacity: float | None = 0.95  # where the target is at most 2 frame periods: S at most this share of the period
    load_memory: bool = True  # the integrator last used with a stream count is restored when that count comes back
    drain_restore: bool = False  # a fast cut r did not cause is undone once the frames are back under the aim ...
    drain_s: float = 3.0  # ... (by rise_room) within this long ...
    restore_every_s: float = 5.0  # ... and at most once this often
    slowdown_revert: bool = False  # a slowdown that passes restores the cost model's fit, u and r from before it
    shed_regime: bool = False  # saturated for shed_calm_s past the device's capacity: feedback without the fast cut,
    shed_calm_s: float = 1.0  # at shed_ki_scale of the integral gain (the shedding actuators are steep)
    shed_ki_scale: float = 0.3
    seed_pricing: bool = False  # in a step with a seeding frame the others get what fits S beside a dense frame
    shed_must_pay: bool = True  # saturated, frames are dropped only where that can bring the p95 under the target
    dense_hysteresis: float | None = None  # at the full budget (the plain dense step) r stays until it misses S by this
    # share (None: leaves as soon as it misses)

    def __post_init__(self):
        if not self.target_s > 0:
            raise ValueError("target_s must be > 0")
        top = self.num_patches if self.max_tokens is None else self.max_tokens
        if not 0 <= self.min_tokens <= top <= self.num_patches:
            raise ValueError(f"need 0 <= min_tokens <= max_tokens <= {self.num_patches}")

    @property
    def top_tokens(self) -> int:
        return self.num_patches if self.max_tokens is None else self.max_tokens


@dataclass(frozen=True)
class StreamDemand:
    """A stream expected in the next batch. fixed_tokens: an override (not controlled, but it costs);
    cap_tokens: a per-stream cap on its controlled r; seeding: its frame this step costs a dense one (the step's
    other streams get less for it, the level the controller holds stays)."""

    stream_id: str
    fixed_tokens: int | None = None
    cap_tokens: int | None = None
    seeding: bool = False  # its frame in this step seeds its state (computed densely: a dense frame's cost)


@dataclass(frozen=True)
class Decision:
    tokens: dict[str, int]  # r for every demand
    level: int  # r of a controlled stream without a cap (also for streams not yet in the demands)
    step_budget_s: float  # S: what the next step may take
    predicted_step_s: float  # the cost model's prediction for the chosen r
    max_batch: int | None  # at saturation: streams per step (the rest wait, newer frames replace theirs)
    saturated: bool
    reason: str | None
    max_age_s: float | None = None  # at saturation: frames older than this when a step starts are dropped


@dataclass(frozen=True)
class ControllerState:
    """What the API and the metrics show."""

    target_s: float
    measured_p95_s: float | None
    step_budget_s: float
    predicted_step_s: float
    level: int
    tokens_mean: float | None
    tokens_min: int | None
    tokens_max: int | None
    streams: int
    saturated: bool
    reason: str | None
    max_batch: int | None
    busy_fraction: float  # share of the last window the device spent in steps
    cost_model: tuple[float, float, float]  # a (s), b (s per stream), c (s per frame of dense tokens)
    max_age_s: float | None = None  # frames older than this at a step's start are dropped (saturated)
    capacity_s: float | None = None  # the device's capacity held the step budget down to this (None: it did not)
    step_noise: float = 0.0  # the step time's spread around the cost model (std of the log)


def _quantile(ordered: list[float], steady: bool, q: float) -> float:
    """The q-quantile of sorted latencies. Of a whole window of a steady load never the slowest frame alone (of a
    10 fps camera's 10 frames it would be): one hiccup is not a trend. Just after a change, the few fresh frames are
    all there is."""
    top = len(ordered) - 2 if steady else len(ordered) - 1
    return ordered[min(top, max(0, math.ceil(q * len(ordered)) - 1))]


def shed_plan(config: ControllerConfig, model: StepCostModel, batch: int, period: float, per_stream: float,
              budget: float, full_step: float) -> tuple[int | None, float | None, float, float]:
    """At saturation, how to drop frames: (streams per step or None, an age limit or None, the floor of S, S).

    Full batches with an age limit: frames older than A when a step starts are dropped (their streams' next
    frames are served instead), so a served frame's latency is at most about A + S_n, which is 2 * S (what S
    means unsaturated: a full batch that keeps up has latency about 2 * S_n) for A = 2 * S - S_n. Only the
    frames that would be late are dropped, and the steps stay full: the fixed part of a step (tens of ms on
    this CPU) is paid once for every frame served. Not only where full steps keep up with the cameras: S_n is
    extrapolated by the cost model, and in batch-limit mode it sees only small batches (live, it predicted 103 ms
    for a full batch that took under 100, and held one stream per step: 31 of 80 frames/s). In simulation with
    the live CPU's step costs the age limit served 56-71 of 80 frames/s at 8 streams where the batch limit served
    22-58 at the same p95.

    The batch limit is the fallback where no age works: 2 * S <= S_n (even a fresh frame would be late) or a
    full step alone is longer than the target. With m streams per step of S_m seconds and frames every T, a
    stream is served every ceil(n/m) steps, with a frame at most min(T, ceil(n/m) * S_m) old (latest frame
    wins): p95 latency about 0.95 * that + S_m, whose step-equivalent is half of it. Smaller batches cost more
    per frame: they help only where frames would otherwise wait a whole period. The largest m whose equivalent
    fits S; if none does, the largest within shed_tolerance of the least.

    S is not taken below the floor, where neither way serves a frame any sooner."""
    equivalent = []  # of m = 1 .. batch streams per step
    for m in range(1, batch + 1):
        step = model.predict(m, per_stream * m)
        equivalent.append((0.95 * min(period, math.ceil(batch / m) * step) + step) / 2)
    least = min(equivalent)
    least_age = config.min_age_share * min(period, full_step)  # younger: the round being served (decoded)
    floor_s = min(least, (full_step + least_age) / 2)
    budget = max(budget, floor_s)
    age = 2 * budget - full_step
    if age > 0 and full_step < config.target_s:
        return None, max(age, least_age), floor_s, budget
    fitting = [m for m, e in enumerate(equivalent, 1) if e <= budget]
    if not fitting:
        fitting = [m for m, e in enumerate(equivalent, 1) if e <= (1 + config.shed_tolerance) * least]
    limit = max(fitting)
    return (limit if limit < batch else None), None, floor_s, budget



class KneeMemory:
    """Per stream count, a knee found: the predicted step at the highest r of a window whose p95 went clearly over the
    target after r rose into it. Kept as a step time, not an r: a knee is the device's (live, at the step that
    outlasts the frame period), so a device that slows down lowers it in r and one that gets faster raises it. r
    rises at most to where the step is predicted at ceiling_margin of it, which creeps up ceiling_creep_per_s
    (faster while the latency is far under the aim). After a knee cut, feedback waits a window."""

    def __init__(self, config: ControllerConfig):
        self.config = config
        self.steps: dict[int, float] = {}  # streams -> the step at the knee (s)
        self.fast = False  # the latency is far under the aim: creep faster
        self.cut_until = -math.inf  # after a knee cut: feedback does not cut further until then

    def ceiling_s(self, streams: int, dt: float) -> float | None:
        """The step r may rise to with this many streams (None: no knee known); the knee creeps up dt's worth."""
        step = self.steps.get(streams)
        if step is None:
            return None
        creep = self.config.ceiling_creep_fast_per_s if self.fast else self.config.ceiling_creep_per_s
        self.steps[streams] = step * (1 + creep * dt)
        return self.config.ceiling_margin * step

    def found(self, streams: int, step_s: float) -> float:
        """A knee at this step: returns the step r may rise to from now on."""
        self.steps[streams] = step_s
        return self.config.ceiling_margin * step_s

    def waiting(self, now: float) -> bool:
        """A knee cut is waiting for its window to be measured."""
        return now < self.cut_until

    def may_cut(self, now: float) -> bool:
        return now >= self.cut_until + self.config.window_s

    def cut(self, now: float) -> None:
        self.cut_until = now + self.config.window_s

    def forget(self) -> None:
        self.steps.clear()


class LatencyWindow:
    """The end-to-end latencies of the frames served lately, and what feedback reads from them per stream count: a
    window's p95 (capped at what its middle half and the recent windows' tails say) and how noisy the window p95s
    are (a noisy p95 needs a wider margin under the target)."""

    def __init__(self, config: ControllerConfig):
        self.config = config
        self._latencies: deque[tuple[float, float]] = deque(maxlen=4096)  # (time, seconds)
        self._tails: dict[int, deque[float]] = {}  # for this many streams: the last windows' p95 / location
        self._tail_at = -math.inf
        # for this many streams: (time, log p95), one a window (how noisy the p95 is)
        self._p95_samples: dict[int, deque[tuple[float, float]]] = {}

    def add(self, now: float, seconds: float) -> None:
        self._latencies.append((now, seconds))
        _keep_recent(self._latencies, now, self.config.window_s)

    def recent(self, now: float, since: float, window_s: float | None = None,
               min_samples: int | None = None) -> tuple[list[float], bool] | None:
        """The latencies of the last window (none before `since`), sorted, and whether they are a whole window of a
        steady load (None: fewer than min_samples, from at most 4 windows back)."""
        window = self.config.window_s if window_s is None else window_s
        need = self.config.min_samples if min_samples is None else min_samples
        start, earliest = max(now - window, since), max(now - 4 * window, since)
        recent = [s for t, s in self._latencies if t >= start]
        steady = start == now - window and len(recent) >= max(need, 3)
        if len(recent) < need:
            older = [s for t, s in self._latencies if t >= earliest]
            recent = older[-need:]
        if len(recent) < need:
            return None
        recent.sort()
        return recent, steady

    def steady_p95(self, now: float, p95: float, ordered: list[float], streams: int, whole: bool) -> float:
        """The p95 to feed back: the window's, capped at what its middle half says with the tail (p95 / the mean of
        the middle half) of the windows lately (whole: a whole window was measured since the load changed; one tail
        a window is kept). A host stall makes a burst of frames late though r did not change: it moves a 1-s p95 (a
        few frames' worth) but not the middle half, and one window's tail not the mean of several. Fed back as is,
        every stall cut r (in simulation with stalls: r 0.73 of the best fixed, 0.80 so)."""
        cfg = self.config
        quarter = len(ordered) // 4
        location = float(np.mean(ordered[quarter:len(ordered) - quarter]))  # the mean of the middle half
        tail = max(p95 / location, 1.0) if location > 0 else 1.0
        samples = self._tails.setdefault(streams, deque(maxlen=cfg.tail_windows))
        if whole and now - self._tail_at >= cfg.window_s:
            samples.append(tail)
            self._tail_at = now
        # the mean of the last windows' tails less the largest (one transient or one stall is not the load's shape)
        mean = None if len(samples) < 2 else (sum(samples) - max(samples)) / (len(samples) - 1)
        return p95 if mean is None or not cfg.tail_cap else min(p95, cfg.tail_slack * mean * location)

    def sample(self, now: float, p95: float, streams: int) -> None:
        """A window p95 (at most one a window), to tell how noisy it is."""
        samples = self._p95_samples.setdefault(streams, deque(maxlen=12))
        if not samples or now - samples[-1][0] >= self.config.window_s:
            samples.append((now, math.log(p95)))

    def aim(self, streams: int) -> float:
        """The share of the target the p95 is held at: cfg.aim, less where the window p95 is noisy."""
        cfg = self.config
        samples = self._p95_samples.get(streams, ())
        if len(samples) < 5 or not cfg.noise_aim:
            return cfg.aim
        sigma = float(np.std([v for _, v in samples]))
        return cfg.aim * math.exp(-cfg.aim_noise_gain * max(0.0, sigma - cfg.noise_free))

    def forget_spread(self) -> None:
        self._p95_samples.clear()


def _keep_recent(history: deque, now: float, window_s: float) -> None:
    """Keep 4 windows of (time, ...) history: every round reads it, so it must stay short."""
    horizon = now - 4 * window_s - 1.0
    while history and history[0][0] < horizon:
        history.popleft()


class BudgetController:
    """Feed it `observe_latency` (every result sent), `observe_step` (every step); ask `decide` every round."""

    def __init__(self, config: ControllerConfig, initial_tokens: int | None = None):
        self.config = config
        self.model = StepCostModel(config.num_patches)
        self.model.revert = config.slowdown_revert
        self.dense_model = DenseStepModel()
        start = config.top_tokens if initial_tokens is None else initial_tokens
        self._level = float(min(max(start, config.min_tokens), config.top_tokens))  # L in effect
        self._rise_credit = 0.0  # tokens L may still rise by (bounded rise)
        self._held_back = False  # the bounded rise kept L below what the last round wanted
        self._capacity: float | None = None  # the device's capacity (a step within the frame period) held S to this
        self._raw_error: float | None = None  # the last latency error, deadband or not (None: not measured)
        self._u = config.u_initial
        self._last_decide: float | None = None
        self._last_jump = -math.inf
        self._saturated_at = -math.inf  # the last decision that shed load ...
        self._saturated_since = math.inf  # ... and the first of the run of such decisions it is in
        self._knees = KneeMemory(config)
        self._u_history: deque[tuple[float, float]] = deque(maxlen=256)  # (time, u) of recent rounds
        self._latency = LatencyWindow(config)
        # (end, seconds, batch, tokens, plain dense)
        self._steps: deque[tuple[float, float, int, float, bool]] = deque(maxlen=4096)
        self._arrival_gaps: dict[str, tuple[float, float]] = {}  # stream -> (last arrival, moving mean gap)
        self._after_seeding = False  # the last step seeded streams (their first frames, computed densely)
        # (batch, tokens, plain dense) of the decision in effect
        self._operating_point: tuple[int, float, bool] | None = None
        self._shed_floor_u: float | None = None  # while shedding: u below which no way of dropping frames helps
        self._last: Decision | None = None
        self._p95: float | None = None
        self._error = 0.0
        self._streams: frozenset[str] = frozenset()
        self._hold_until = -math.inf
        self._forget_before = -math.inf
        self._levels: deque[tuple[float, float]] = deque(maxlen=256)  # (time, L) of recent rounds
        self._u_by_streams: dict[int, float] = {}  # the integrator last used with this many streams (regulating)
        self._before_slowdown: tuple[float, float] | None = None  # (u, L) when the device last slowed down
        self._restore_level: float | None = None  # a slowdown passed: L goes back to this (if it fits) next round
        self._drain: tuple[float, float, float] | None = None  # (when, u, L) of a fast cut r did not cause
        self._last_restore = -math.inf

    def reconfigure(self, config: ControllerConfig, initial_tokens: int) -> None:
        """A new target or range (or auto mode switched on): start over from initial_tokens, keeping what was
        learned about the device (the cost model, the latencies measured, and the knees: a step time past which
        the p95 went over a target at least as tight stays a limit for this one)."""
        tighter = config.target_s <= self.config.target_s
        self.config = config
        self.model.revert = config.slowdown_revert
        self._level = float(min(max(initial_tokens, config.min_tokens), config.top_tokens))
        self._u = config.u_initial
        self._rise_credit = 0.0
        self._streams = frozenset()  # the next decision starts with a hold
        self._u_by_streams.clear()
        self._knees.config = config
        if not tighter:
            self._knees.forget()
        self._latency.config = config
        self._latency.forget_spread()
        self._last = None
        self._operating_point = None

    # ---- observations ----------------------------------------------------------------------

    def calibrate(self, eventful_steps: Sequence[tuple[int, float, float]], dense_steps: dict[int, float]) -> None:
        """Steps timed before serving (warm-up): (batch, tokens, seconds) of sparse ones for the cost model, and
        batch -> seconds of plain dense ones for the dense step model."""
        self.model.calibrate(eventful_steps)
        for batch, seconds in dense_steps.items():
            self.dense_model.observe(batch, seconds)

    def observe_latency(self, now: float, seconds: float) -> None:
        self._latency.add(now, seconds)

    def observe_arrival(self, now: float, stream_id: str) -> None:
        """A frame of this stream was received (how often tells how old its newest frame can be)."""
        last = self._arrival_gaps.get(stream_id)
        if last is None:
            self._arrival_gaps[stream_id] = (now, math.inf)
            return
        gap = now - last[0]
        mean = gap if math.isinf(last[1]) else last[1] + 0.2 * (gap - last[1])
        self._arrival_gaps[stream_id] = (now, mean)

    def observe_step(self, now: float, batch: int, tokens: float, seconds: float, plain_dense: bool = False,
                     seeded: int = 0) -> None:
        """A step that ended at `now`: `batch` frames, `tokens` patch tokens per gate over all of them. plain_dense:
        every stream was at the full budget and the plain model ran; seeded: frames that seeded a stream's state
        (its first frame, or the first after dense steps), computed densely through the eventful path."""
        self._steps.append((now, seconds, batch, tokens, plain_dense))
        _keep_recent(self._steps, now, self.config.window_s)
        if plain_dense:
            self.dense_model.observe(batch, seconds)
            return
        if seeded:
            # a one-off (a joiner's first frame costs several sparse ones): not the operating point, and the frames
            # that wait for it are late through no fault of r. Feedback resumes with the frames after the next step.
            self._after_seeding = True
            return
        if self._after_seeding:
            self._after_seeding = False
            self._forget_before = max(self._forget_before, now)
            self._hold_until = max(self._hold_until, now)
        shifts = self.model.shifts
        self.model.observe(batch, tokens, seconds)
        if self.model.shifts != shifts:
            # the device got slower or faster: the feed-forward has followed it; latencies from before are stale
            self._hold_until = now + self.config.hold_s
            self._forget_before = now
            # the model explains what the feedback was reacting to since the shift began: undo its cuts
            self._u = max([self._u] + [u for t, u in self._u_history if t >= now - self.config.window_s])
            if self.model.reverted and self._before_slowdown is not None:
                # a slowdown that passed (the host contended for a moment): back to where it found the loop, at once
                # (the model from before it is back; the climb from the cut it made took 1-4 s, live r 122 -> 56-69)
                self._go_back_to(*self._before_slowdown)
            elif self.model.last_shift > 1:
                self._before_slowdown = (self._u, self._rose_into(now)[0])
            if self.model.last_shift < 1 and not self.model.reverted:
                # faster: a knee found before lies higher now (slower: lower, so the ceilings stay on the safe side)
                self._knees.forget()

    def p95(self, now: float, window_s: float | None = None, min_samples: int | None = None,
            q: float = 0.95, fresh: bool = True) -> float | None:
        """p95 (or the q-quantile) end-to-end latency of the frames of the last window (at least min_samples, up
        to 4 windows back). fresh: only frames since the load or the device last changed (what feedback uses)."""
        recent = self._latency.recent(now, self._forget_before if fresh else -math.inf, window_s, min_samples)
        return None if recent is None else _quantile(*recent, q)

    # ---- the decision ----------------------------------------------------------------------

    def decide(self, now: float, demands: Sequence[StreamDemand]) -> Decision:
        cfg = self.config
        dt = 0.0 if self._last_decide is None else min(max(now - self._last_decide, 0.0), 1.0)
        self._last_decide = now
        fixed, caps = self._fixed_and_caps(demands)
        batch = max(1, len(demands))
        streams = frozenset(d.stream_id for d in demands)
        if streams != self._streams:
            # the load changed: the feed-forward answers it now; the latencies measured so far belong to the old
            # load (and the joiners' dense first frames to none), so feedback waits for fresh ones
            if cfg.load_memory and len(streams) in self._u_by_streams:
                # a load seen before: what the feedback learned then (the step budget, as a share of the target)
                self._u = self._u_by_streams[len(streams)]
            elif len(streams) < len(self._streams):
                # fewer streams: cuts made under the heavier load (down to shedding frames, which holds the measured
                # latency near the target and so hides the room the lighter load has) no longer apply
                self._u = max(self._u, cfg.u_initial)
            elif self._streams and self._beyond_step_budget(len(streams)):
                # more streams than the step budget holds even at the minimum r: shedding starts, and a frame then
                # waits for about two steps (the one running, its own), not the one a lighter load measured
                self._u = min(self._u, cfg.u_initial)
            self._streams = streams
            self._hold_until = now + cfg.hold_s
            self._forget_before = self._hold_until
            self._shed_floor_u = None
            self._drain = None
            for gone in [i for i, (t, _) in self._arrival_gaps.items() if i not in streams and t < now - 10.0]:
                del self._arrival_gaps[gone]  # streams long gone
        at_top = self._level >= cfg.top_tokens or all(c <= self._level for c in caps)
        self._feedback(now, dt, at_top=at_top and bool(demands))
        budget = cfg.target_s * math.exp(min(self._u + cfg.kp * self._error, cfg.u_max))
        capacity = self._capacity_s(now, [d.stream_id for d in demands])
        self._capacity = capacity if budget > capacity else None
        budget = min(budget, capacity)

        wanted = self.model.level_within(budget, batch, fixed, caps) if caps else float(cfg.top_tokens)
        saturated = wanted < cfg.min_tokens
        wanted = min(max(wanted, cfg.min_tokens), cfg.top_tokens)
        ceiling = self._knees.ceiling_s(len(streams), dt)
        ceiling_level = None if ceiling is None else self.model.level_within(ceiling, batch, fixed, caps)
        dense_step = self._dense_step(batch, demands, caps)
        # hysteresis: leaving dense costs a seeding step per stream, so it takes a clear miss
        margin = cfg.dense_hysteresis if cfg.dense_hysteresis is not None and self._level >= cfg.top_tokens else 0.0
        dense_room = budget * (1 + margin)
        dense_fits = dense_step is not None and dense_step <= dense_room
        if dense_fits and (ceiling_level is None or ceiling_level >= cfg.top_tokens):
            # the plain dense step fits: the most tokens there are, and cheaper than the eventful levels just below
            # (which a bounded rise would have to climb through): go there at once
            self._level, self._rise_credit, wanted = float(cfg.top_tokens), 0.0, float(cfg.top_tokens)
        elif self._restore_level is not None:
            self._level = max(self._level, min(wanted, self._restore_level))
            self._rise_credit = 0.0
        else:
            self._move_level(dt, wanted, self._raw_error, ceiling_level)
        self._restore_level = None
        self._levels.append((now, self._level))
        self._held_back = wanted - self._level >= max(cfg.hysteresis_tokens, cfg.hysteresis_fraction * self._level)
        level = round(self._level)
        plain_dense = dense_step is not None and level >= cfg.num_patches
        step_level = level if plain_dense else self._level_beside_seeds(level, budget, demands)

        tokens = {}
        for d in demands:
            if d.fixed_tokens is not None:
                tokens[d.stream_id] = d.fixed_tokens
            else:
                tokens[d.stream_id] = step_level if d.cap_tokens is None else min(step_level, d.cap_tokens)
        total = fixed + sum(tokens[d.stream_id] for d in demands if d.fixed_tokens is None)
        seeds = sum(self.config.num_patches - tokens[d.stream_id] for d in demands if d.seeding)  # beyond their r
        predicted = dense_step if plain_dense else self.model.predict(batch, total + seeds)
        # the operating point the feedback compares the window with: the level held (seeding steps are one-offs)
        held_total = fixed + sum(min(level, cap) for cap in caps)
        max_batch, max_age, reason = None, None, None
        self._shed_floor_u = None
        if saturated:
            if not (self._last and self._last.saturated):
                self._saturated_since = now
            self._saturated_at = now
            ids = [d.stream_id for d in demands]
            period = self.frame_period(ids)
            max_batch, max_age, floor_s, budget = shed_plan(cfg, self.model, batch, period, total / batch, budget,
                                                            predicted)
            self._shed_floor_u = math.log(floor_s / cfg.target_s)
            measured = "" if self._p95 is None else f", measured p95 {1000 * self._p95:.0f} ms"
            if self._shedding_is_futile(now, predicted, period):
                max_batch, max_age = None, None
                shed = ("the latency beside the steps is over the target, and dropping frames, which only saves "
                        "waiting for a step, would not bring it under: every frame is served")
            elif max_age is not None:
                shed = f"frames older than {1000 * max_age:.0f} ms when a step starts are dropped (full batches)"
            elif max_batch is not None:
                shed = f"frames are dropped, streams per step limited to {max_batch}"
            else:
                shed = "neither a smaller batch nor an age limit would be faster: latency at its floor"
            reason = (
                f"at the minimum budget ({cfg.min_tokens} tokens) a step over {batch} streams is predicted at "
                f"{1000 * predicted:.1f} ms, over the {1000 * budget:.1f} ms the {1000 * cfg.target_s:.0f} ms target "
                f"allows{measured}: {shed}"
            )
            if max_batch is not None:
                predicted = self.model.predict(max_batch, total / batch * max_batch)
        served = min(batch, max_batch or batch)
        self._operating_point = (served, held_total * served / batch, plain_dense)
        self._last = Decision(tokens, step_level, budget, predicted, max_batch, saturated, reason, max_age)
        return self._last

    def _shedding_is_futile(self, now: float, full_step: float, period: float) -> bool:
        """Whether dropping frames cannot bring the p95 under the target (shed_must_pay): the device keeps up at the
        minimum r (a full step within the frame period and the target), so a frame waits for at most one step before
        its own, and the p95 of a whole window since the load changed and saturation began is over the target by
        more than that step. The rest of the latency is not the device's (live on a GPU: decoding and transfers of 8
        streams), and shedding only serves fewer frames: at 8 streams of ViT-L an age limit served 36 of 80 frames/s
        at a p95 of 127 ms where a fixed r = 4 served all at 107 ms. A transient's backlog is not judged."""
        cfg = self.config
        settled = now >= max(self._hold_until, self._saturated_since) + cfg.window_s
        return (cfg.shed_must_pay and settled and self._p95 is not None and full_step < min(cfg.target_s, period)
                and self._p95 > cfg.target_s + full_step)

    def _level_beside_seeds(self, level: int, budget: float, demands: Sequence[StreamDemand]) -> int:
        """The level for this step: where streams seed (a joiner's first frame, a dense frame's cost), the others
        get what fits the step budget beside them (not under min_tokens; a one-off, the level held stays). Live, 4
        joiners seeding one a step at 4 -> 8 streams made steps of 120-140 ms where 93 were predicted, frames
        waited for them, and the latency of 200+ ms set off the fast cut (r 55 -> 11, then shedding)."""
        if not self.config.seed_pricing or not any(d.seeding for d in demands):
            return level
        fixed, caps = self._fixed_and_caps(demands, seeds_fixed=True)
        if not caps:
            return level
        beside = self.model.level_within(budget, len(demands), fixed, caps)
        return max(min(level, math.floor(beside)), min(level, self.config.min_tokens))

    def _fixed_and_caps(self, demands: Sequence[StreamDemand], seeds_fixed: bool = False) -> tuple[float, list[float]]:
        """The tokens of the streams the level does not set (overrides; seeding frames, at every token, where
        seeds_fixed), and the caps of those it does (inf: none)."""
        fixed, caps = 0.0, []
        for d in demands:
            if seeds_fixed and d.seeding:
                fixed += self.config.num_patches
            elif d.fixed_tokens is not None:
                fixed += d.fixed_tokens
            else:
                caps.append(math.inf if d.cap_tokens is None else float(d.cap_tokens))
        return fixed, caps

    def _dense_step(self, batch: int, demands: Sequence[StreamDemand], caps: Sequence[float]) -> float | None:
        """The predicted plain dense step over the batch, when every stream may have the full budget (else None)."""
        n = self.config.num_patches
        if not caps or self.config.top_tokens < n or any(c < n for c in caps):
            return None
        if any(d.fixed_tokens is not None and d.fixed_tokens < n for d in demands):
            return None
        seen = self.dense_model.predict(batch)
        return self.model.predict(batch, batch * n) if seen is None else seen

    def _capacity_s(self, now: float, stream_ids: Sequence[str]) -> float:
        """The longest step over all streams that keeps up with cameras whose frames come together (every step of
        the last window had nearly all of them), where the target is at most two frame periods (else inf): a share
        of the period. Past it each frame waits for most of a step before its own, and the latency jumps from about
        one step to two, past the target: live, r 26 -> 34 took the p95 from 104 to 197 ms at 4 streams (steps of
        90 and 100 ms, frames every 100 ms). Where frames come apart, batches are partial and the latency (about two
        steps already) is the limit; the cost model's full-batch step is an extrapolation there."""
        cfg = self.config
        period = self.frame_period(stream_ids)
        if cfg.capacity is None or not cfg.target_s <= 2 * period:
            return math.inf
        batches = [b for end, _, b, _, _ in self._steps if end >= now - cfg.window_s]
        if not batches or sum(batches) < 0.9 * len(stream_ids) * len(batches):
            return math.inf
        return cfg.capacity * period

    def frame_period(self, stream_ids: Sequence[str]) -> float:
        """The median seconds between a stream's frames over these streams (inf: unknown)."""
        gaps = [self._arrival_gaps[i][1] for i in stream_ids if i in self._arrival_gaps]
        return float(np.median(gaps)) if gaps else math.inf

    def _feedback(self, now: float, dt: float, at_top: bool) -> None:
        """The PI loop on the log latency error: updates the error and the integrator u."""
        cfg = self.config
        recent = self._latency.recent(now, self._forget_before)
        p95 = None if recent is None else _quantile(*recent, 0.95)
        self._p95 = p95
        self._u_history.append((now, self._u))
        self._raw_error = None
        if p95 is None or now < self._hold_until:
            self._error = 0.0
            return
        # Latencies measured over the window came from steps at the operating points of their time; the cost model
        # says how the step in effect now compares with them (a Smith predictor: the window's delay is not fed back)
        now_vs_window = self._now_vs_window(now)
        count = len(self._streams)
        whole = now >= self._hold_until + cfg.window_s  # a whole window measured since the load changed
        if whole:  # the window p95 itself: how far the p95 over a phase may stray from the estimate
            self._latency.sample(now, p95, count)
        p95 = self._latency.steady_p95(now, p95, recent[0], count, whole)
        error = math.log(self.aim * cfg.target_s / max(p95 * now_vs_window, 1e-6))
        self._raw_error = error
        if not at_top:  # at the top u says nothing of what this load needs
            self._u_by_streams[count] = self._u
        median = self.p95(now, cfg.jump_window_s, 5, q=0.5)  # of the last frames: noise does not move it, a jump does
        median = None if median is None else median * self._now_vs_window(now, cfg.jump_window_s)
        jumped = median is not None and median > cfg.jump_factor * cfg.target_s
        over = p95 * now_vs_window > cfg.ceiling_trigger * cfg.target_s or jumped
        top, rose = self._rose_into(now) if over else (self._level, False)  # (a jump is over too)
        if over and whole:
            # clearly over the target with a whole window measured since the load changed (not the change's transient):
            # r rose into it: a knee (with r steady, noise or the device; shedding in the window, the frames dropped)
            if rose and cfg.knee_memory:
                ceiling = self._knees.found(count, self.model.predict(count, count * top))  # the window's top step
                under = self.model.level_within(ceiling, count, 0.0, [math.inf] * count)
                if (cfg.knee_cut and self._level > under and self._knees.may_cut(now)
                        and not (self._last and self._last.saturated)):
                    # r went over the knee: back under it at once, and let a window measure that before cutting more
                    # (what the window measured came from the r above the knee; the cost model, linear, cannot say
                    # how steep the knee is: live, r 40 -> 46 took the p95 from 113 to 177 ms, and feedback and the
                    # fast cut on it took r to 13-26, a swing that made the phase's p95)
                    self._level = max(under, float(cfg.min_tokens))
                    self._rise_credit = 0.0
                    self._knees.cut(now)
        # far under the aim, the ceiling creeps up faster (the device may have got faster; dropping it at once undid
        # it live: just under a sharp knee the latency is far under the aim, and r went straight back over)
        self._knees.fast = error > cfg.ceiling_far
        self._error = 0.0 if abs(error) < cfg.deadband else error
        if self._knees.waiting(now):
            self._error = max(self._error, 0.0)  # the knee cut is waiting for its window
        # shedding for a while: the age limit (or batch limit) moves the latency about twice as much as S, so the
        # loop runs at a fraction of its gain and without the fast cut (live, at full gain the age limit swung
        # between 10 and 79 ms and the 1-s p95 between 80 and 180 ms, period ~1.5 s; at 0.3, 109-152 ms)
        shedding = (cfg.shed_regime and self._last is not None and self._last.saturated
                    and now - self._saturated_since >= cfg.shed_calm_s
                    and self._beyond_capacity())
        if jumped and not self._knees.waiting(now) and now - self._last_jump >= cfg.jump_every_s and not shedding:
            # fast cut: at most halve at once, then let the window refill before judging again
            # r did not make it late, nor a new load (a whole window since it), nor shedding: a burst to drain
            if (not rose and whole and self._drain is None and not (self._last and self._last.saturated)
                    and cfg.drain_restore and now - self._last_restore >= cfg.restore_every_s):
                self._drain = (now, self._u, top)
            self._u -= min(math.log(median / (cfg.aim * cfg.target_s)), math.log(2.0))
            self._last_jump = now
        elif not (self._error > 0 and (at_top or self._held_back or self._capacity is not None)):
            # anti-windup: no credit for slack nobody can use, nor while r is still climbing to what u already asks
            du = cfg.ki * self._error * dt
            if shedding and self._error < cfg.rise_room:  # (far under the aim, the way out of shedding is up)
                du *= cfg.shed_ki_scale
            elif self._error < 0 and self._last is not None and self._last.saturated:
                du *= 1 + cfg.shed_gain
            self._u += min(du, cfg.u_rise_per_s * dt)
        if self._drain is not None:
            self._restore_after_drain(now)
        if self._shed_floor_u is not None:
            # anti-windup at the last actuator: below the floor no way of dropping frames serves any sooner
            self._u = max(self._u, self._shed_floor_u)
        self._u = min(max(self._u, cfg.u_min), cfg.u_max)

    def _rose_into(self, now: float) -> tuple[float, bool]:
        """The highest L of the last window (what the latency measured comes from), and whether L rose into it within
        knee_lookback_s (and no frames were shed there, which makes latencies of their own)."""
        cfg = self.config
        recent = [(t, level) for t, level in self._levels if t >= now - cfg.knee_lookback_s] + [(now, self._level)]
        top_at, top = max((p for p in recent if p[0] >= now - cfg.window_s - cfg.hold_s), key=lambda p: p[1])
        low = min(level for t, level in recent if t <= top_at)  # before it (a fall is not a rise)
        return top, top >= (1 + cfg.knee_rise) * low and self._saturated_at < now - cfg.window_s - cfg.hold_s

    def _restore_after_drain(self, now: float) -> None:
        """After a fast cut that r did not cause (a burst of late frames: the host stalled, a step ran long), once the
        frames are back under the aim by a margin (the backlog drained), u and L go back to where the cut found them
        (at most once every restore_every_s: a burst that keeps coming back is the load's, and the climb handles it).
        Live, the climb back from such a cut took 3-5 s at 4 streams (r 122 -> 77 -> 122)."""
        cfg = self.config
        start, u, level = self._drain
        if now - start > cfg.drain_s:
            self._drain = None
            return
        median = self.p95(now, cfg.jump_window_s, 5, q=0.5)
        if median is not None and median <= cfg.aim * cfg.target_s * math.exp(-cfg.rise_room):
            self._go_back_to(u, level)
            self._drain = None
            self._last_restore = now
            self._forget_before = now  # the burst's frames are not the load's: fed back, they would cut again

    def _go_back_to(self, u: float, level: float) -> None:
        """Undo the cuts a passing disturbance made: u at least this, and L back to this next round (if it fits)."""
        self._u = max(self._u, u)
        self._restore_level = level

    def _beyond_capacity(self) -> bool:
        """Whether the device cannot serve every frame at any r: a step over every stream at the minimum r outlasts
        the frame period (shedding is then the regime, not a transient's)."""
        count = len(self._streams)
        return count > 0 and self._floor_step(count) > self.frame_period(list(self._streams))

    def _beyond_step_budget(self, count: int) -> bool:
        """Whether a step over count streams at the minimum r outlasts the step budget the feedback holds now."""
        return self._floor_step(count) > self.config.target_s * math.exp(self._u)

    def _floor_step(self, count: int) -> float:
        """The predicted step over count streams at the minimum r."""
        return self.model.predict(count, count * self.config.min_tokens)

    @property
    def aim(self) -> float:
        """The share of the target the p95 is held at now."""
        return self._latency.aim(len(self._streams))

    def _move_level(self, dt: float, wanted: float, now_error: float | None = None,
                    ceiling: float | None = None) -> None:
        """Hysteresis and the bounded rise: L moves only by a clear step; it falls at once, and rises by a credit
        that grows at rise_per_s of L per second while a rise is wanted (and is forfeited when it is not)."""
        cfg = self.config
        current = self._level
        band = max(cfg.hysteresis_tokens, cfg.hysteresis_fraction * current)
        if wanted < current:
            self._rise_credit = 0.0
            if current - wanted >= band or wanted <= cfg.min_tokens:
                self._level = wanted
            return
        if ceiling is not None:
            wanted = min(wanted, max(current, ceiling))
        if wanted - current < min(band, cfg.top_tokens - current) or current >= cfg.top_tokens:
            self._rise_credit = 0.0
            return
        # the rise slows as the latency nears the aim: what it measures lags r by about a window
        room = 1.0 if now_error is None else min(max(now_error / cfg.rise_room, cfg.rise_floor), 1.0)
        self._rise_credit += room * cfg.rise_per_s * dt * max(current, cfg.hysteresis_tokens / cfg.hysteresis_fraction)
        step = min(wanted - current, self._rise_credit)
        if step >= min(band, cfg.top_tokens - current):
            self._level = current + step
            self._rise_credit -= step

    def _now_vs_window(self, now: float, window_s: float | None = None) -> float:
        """How much longer the window's steps would take with the tokens per stream in effect now (the cost model
        replays each step's own batch size: at light load batches hold fewer streams than are active)."""
        if self._operating_point is None:
            return 1.0
        since = max(now - (self.config.window_s if window_s is None else window_s), self._forget_before)
        batch, total, dense_now = self._operating_point
        per_stream = total / max(batch, 1)
        past = np.array([(b, t, d) for end, _, b, t, d in self._steps if end >= since], dtype=np.float64).reshape(-1, 3)
        if not len(past):
            return 1.0
        a, b, c = self.model.theta
        then = a + b * past[:, 0] + c * past[:, 1] / self.model.num_patches
        later = a + b * past[:, 0] + c * past[:, 0] * per_stream / self.model.num_patches
        if dense_now or past[:, 2].any():  # plain dense steps cost what the dense model says, not the eventful one
            dense = np.array([self.dense_model.predict(int(k)) or e for k, e in zip(past[:, 0], then, strict=True)])
            then = np.where(past[:, 2] > 0, dense, then)
            later = dense if dense_now else later
        then, later = float(np.sum(then)), float(np.sum(later))
        if then <= 0:
            return 1.0
        return min(max(later / then, 0.25), 4.0)

    # ---- views -----------------------------------------------------------------------------

    def busy_fraction(self, now: float) -> float:
        window = self.config.window_s
        return min(1.0, sum(s for t, s, *_ in self._steps if t >= now - window) / window)

    def state(self, now: float) -> ControllerState:
        last = self._last
        values = list(last.tokens.values()) if last and last.tokens else []
        a, b, c = (float(v) for v in self.model.theta)
        return ControllerState(
            target_s=self.config.target_s,
            measured_p95_s=self.p95(now, fresh=False),
            step_budget_s=last.step_budget_s if last else self.config.target_s * math.exp(self._u),
            predicted_step_s=last.predicted_step_s if last else 0.0,
            level=round(self._level),
            tokens_mean=sum(values) / len(values) if values else None,
            tokens_min=min(values) if values else None,
            tokens_max=max(values) if values else None,
            streams=len(values),
            saturated=bool(last and last.saturated),
            reason=last.reason if last else None,
            max_batch=last.max_batch if last else None,
            busy_fraction=self.busy_fraction(now),
            max_age_s=last.max_age_s if last else None,
            capacity_s=self._capacity,
            step_noise=self.model.noise,
            cost_model=(a, b, c),
        )
