"""A simulated engine for the budget controller: cameras, latest-frame-wins, one batched step at a time.

Each round the real planner (server/engine/planner.py) decides over the simulated streams' records: the controller's
budgets (through `decide`), which frames seed, plain dense steps, which seeding frames wait; the simulation plays
the rest of the engine (shedding, batch order) and the runner (step time, seeding and flushing states).

Deterministic (seeded). Step time = speed * (a + max(launch_s, b*batch + c*tokens/num_patches)) * lognormal noise
(launch_s: the host issues the step's kernels meanwhile, a time that does not shrink with r; 0 on a CPU); a stream's
first frame (and its first after plain dense steps) seeds its state, densely through the eventful path, at
seed_factor times the cost of a dense frame there. With dense_per_frame set, a step whose streams are all at the full
budget runs the plain dense model instead: speed * (a + dense_per_frame*batch). The host may stall (stall_rate):
a step running then takes longer (the correlated bursts of late frames seen live, that r did not cause). Each
stream sends a frame every 1/fps s (random phase, or all at once: aligned); a frame waits for the running step (an
idle device waits batch_window_s for company), a newer frame of its stream replaces it (dropped).
Latency = ready -> step end + overhead (decode, protocol).

Two device profiles (`PROFILES`): "cpu", the project's 2-core CPU (a large token cost, 10 % step noise, OS jitter,
cameras in step near the device's capacity), and "gpu", a GPU-like device (2 % noise, a 3 ms fixed cost a step, a
per-stream cost a tenth of the CPU's, a launch time of 12 ms a step that hides the compute of small batches, and
a plain dense step cheaper than the eventful one at one stream).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from bench.controller_bench import Sample, first_dwell, recovery_time
from model.config import ViTConfig
from model.fidelity import LogitFidelity, rel_l2
from model.macs import dense_macs
from model.schedule import sparse_frame_macs
from server.engine.budget import BudgetPolicy, GlobalBudget, StreamOverride
from server.engine.controller import BudgetController, ControllerConfig, Decision, StreamDemand
from server.engine.frame_policy import StreamPolicySpec
from server.engine.planner import FULL, Planner
from server.engine.registry import StreamRecord
from server.engine.scheduler import PendingFrame

_STILL = torch.zeros(3, 16, 16)  # every frame's image (a fixed scene: no cut for an adaptive stream to see)


@dataclass
class _SimState:
    """A stream's state as the planner sees it (the simulated runner seeds and flushes it)."""

    needs_dense: bool = True
    frames_since_dense: int = 0
    nbytes: int = 0


class _SimRunner:
    """The facts the planner needs of a runner, for a simulated frame model (a classifier: adaptive streams' audits
    compare logits; its MACs are those of a ViT with this many patches)."""

    dense_first_frame = True
    fidelity = LogitFidelity()
    rlt_tau = None  # not a clip model

    def __init__(self, num_patches: int, plain_dense: bool):
        self.num_patches = num_patches
        self.plain_dense = plain_dense  # the simulated device has a plain dense step (SimConfig.dense_per_frame)
        side = math.isqrt(num_patches)
        self.config = ViTConfig(image_size=(16 * side, 16 * (num_patches // side)), patch_size=16)

    def new_state(self) -> _SimState:
        return _SimState()


@dataclass(frozen=True)
class Phase:
    start_s: float
    streams: int
    speed: float = 1.0  # step time multiplier (a slower device > 1)


@dataclass(frozen=True)
class SimConfig:
    fps: float = 30.0
    num_patches: int = 196
    a: float = 0.004  # s per step
    b: float = 0.003  # s per stream
    c: float = 0.060  # s per frame of dense tokens
    launch_s: float = 0.0  # s a step's kernel launches take on the host, overlapping the compute (b and c terms)
    noise: float = 0.08  # lognormal sigma of the step time
    overhead_s: float = 0.004  # decode + protocol, per frame
    max_batch: int = 8
    spike_prob: float = 0.0  # a frame's latency gets an extra U(0, spike_s) with this probability (OS/GIL jitter)
    spike_s: float = 0.1
    seed: int = 0
    dense_per_frame: float | None = None  # s per frame of the plain dense step (None: no plain path)
    seed_factor: float = 1.0
    seeds_per_step: int | None = None  # as the engine (1): seeding frames beyond this many wait for the next step,
    # and the controller is told which frame seeds (None: every joiner seeds in its first step, unannounced)
    stall_rate: float = 0.0  # the host stalls (another process takes the CPU) this often per second ...
    stall_s: float = 0.15  # ... for U(0, stall_s): a step running then takes that much longer
    slow_rate: float = 0.0  # the host is contended (another process shares the cores) this often per second ...
    slow_s: float = 0.5  # ... for U(0.5, 1) * slow_s: every step starting then costs slow_factor times as much
    slow_factor: float = 1.5  # (live: 3-6 steps in a row 1.3-1.8x as long, at 4 streams near the capacity)
    batch_window_s: float = 0.0  # an idle device waits this long after a frame for company (the engine: 5 ms)
    aligned: bool = False  # every stream sends at the same instants, give or take 1 ms (the load generator's paced
    # streams start together and keep an absolute schedule: live, a frame then waits for no step below the device's
    # capacity, and for most of one above it)
    jitter_s: float = 0.001  # aligned: a frame is ready |N(0, this)| after its instant (live, 8 frames decoded together
    # on 2 threads come ready over ~20 ms)
    decode_s: float = 0.0  # a frame is decoded in this long, on one of decode_threads, before it can join a batch
    decode_threads: int = 2  # (its latency and age count from its arrival, as the engine's from receipt)
    join_offset_s: float = 0.0  # aligned: the streams that join in a later phase start together, off the earlier
    # ones' clock by U(0, this) (the load generator's joiners start when their connections open)


@dataclass
class Completed:
    time: float  # result sent
    stream: int
    latency: float
    tokens: int


@dataclass
class SimTrace:
    completed: list[Completed] = field(default_factory=list)
    dropped: list[tuple[float, int]] = field(default_factory=list)
    decisions: list[tuple[float, Decision]] = field(default_factory=list)
    # streams with a frame policy: (time, stream, frame, rel L2 of the answer served against the dense one) per frame
    served_error: list[tuple[float, int, int, float]] = field(default_factory=list)
    records: dict[int, StreamRecord] = field(default_factory=dict)

    def window(self, start: float, end: float) -> list[Completed]:
        return [c for c in self.completed if start <= c.time < end]

    def p95(self, start: float, end: float) -> float:
        lat = sorted(c.latency for c in self.window(start, end))
        return lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)]

    def mean_tokens(self, start: float, end: float) -> float:
        frames = self.window(start, end)
        return sum(c.tokens for c in frames) / len(frames)

    def level_changes(self, start: float, end: float) -> int:
        levels = [d.level for t, d in self.decisions if start <= t < end]
        return sum(1 for x, y in zip(levels, levels[1:], strict=False) if x != y)

    def settle_time(self, step_at: float, end: float, target: float, bin_s: float = 0.5) -> float:
        """Seconds after step_at from which, at every bin_s, the p95 latency of the last second stays under
        1.1 * target and the bin's mean r within 15 % of the phase's steady mean (its last 60 %)."""
        steady = self.mean_tokens(end - 0.6 * (end - step_at), end)
        last_bad = -1
        for i in range(int((end - step_at) / bin_s)):
            start, stop = step_at + i * bin_s, step_at + (i + 1) * bin_s
            if not self.window(start, stop):
                continue
            late = self.p95(max(step_at, stop - 1.0), stop) > 1.1 * target
            off = abs(self.mean_tokens(start, stop) / steady - 1) > 0.15
            if late or off:
                last_bad = i
        return (last_bad + 1) * bin_s

    def budget_settle_time(self, step_at: float, end: float, band: float = 0.15, dwell_s: float = 2.0,
                           bin_s: float = 0.5) -> float:
        """Seconds after step_at until r is back: from then on, at every bin_s for dwell_s, the last second's mean r
        stays within band of the phase's steady mean (its last 60 %). The budget's half of settling, with a dwell as
        recovery_time has (the latency's half): a noisy device moves r in a steady phase too."""
        steady = self.mean_tokens(end - 0.6 * (end - step_at), end)

        def within(stop: float) -> bool:
            start = max(step_at, stop - 1.0)
            return not self.window(start, stop) or abs(self.mean_tokens(start, stop) / steady - 1) <= band

        return first_dwell(step_at, end, within, dwell_s, bin_s)

    def recovery_time(self, step_at: float, end: float, target: float, dwell_s: float = 2.0) -> float:
        """Seconds after step_at until the last second's p95 is back under 1.1 * target for dwell_s: the measure
        `eventful-bench controller` reports live, on the simulated results."""
        samples = [Sample(c.time, c.latency, c.tokens) for c in self.window(step_at, end)]
        return recovery_time(samples, step_at, end, target, dwell_s)

    def overshoot(self, step_at: float, end: float, target: float, bin_s: float = 0.25) -> float:
        """Largest p95 of a bin_s-wide window after step_at, over the target."""
        starts = [step_at + i * bin_s for i in range(int((end - step_at) / bin_s))]
        return max(self.p95(s, s + bin_s) for s in starts if self.window(s, s + bin_s)) / target

    def frames_per_stream(self, start: float, end: float) -> dict[int, int]:
        counts: dict[int, int] = {}
        for c in self.window(start, end):
            counts[c.stream] = counts.get(c.stream, 0) + 1
        return counts


class Scene:
    """What a simulated classifier answers on each stream's frames: logits [K] that wander (a stationary AR(1) walk: a
    reused answer d frames old is off by sqrt(2 (1 - rho^d)) in relative L2, about step * sqrt(d) for small d, at any
    time). Deterministic per stream. A sparse step's answer is off from the dense one by `sparse_q` times what
    reusing its keyframe's answer would be (above 1: token reuse loses to frame skipping, as on the real footage at
    224 in docs/results.md)."""

    def __init__(self, step: float = 0.1, classes: int = 64, seed: int = 0, sparse_q: float = 1.2):
        self.rho = 1.0 - step * step / 2
        self.classes, self.seed, self.sparse_q = classes, seed, sparse_q
        self._walks: dict[int, tuple[torch.Generator, list[torch.Tensor]]] = {}

    def answer(self, stream: int, frame: int) -> torch.Tensor:
        gen, walk = self._walks.setdefault(stream, (torch.Generator().manual_seed(1000 * self.seed + stream), []))
        while len(walk) <= frame:
            noise = torch.randn(self.classes, generator=gen)
            walk.append(self.rho * walk[-1] + math.sqrt(1 - self.rho**2) * noise if walk else noise)
        return walk[frame]

    def sparse(self, stream: int, frame: int, keyframe_answer: torch.Tensor) -> torch.Tensor:
        """A sparse step's answer on this frame, its state seeded by a dense step whose answer was keyframe_answer."""
        dense = self.answer(stream, frame)
        return dense + self.sparse_q * (keyframe_answer - dense)


Decider = Callable[[float, list[StreamDemand]], Decision]


Observers = tuple[Decider, Callable[..., None], Callable[..., None], Callable[..., None]]


def fixed_decider(tokens: int) -> Observers:
    def decide(now: float, demands: list[StreamDemand]) -> Decision:
        return Decision({d.stream_id: tokens for d in demands}, tokens, 0.0, 0.0, None, False, None)

    ignore = lambda *a, **k: None  # noqa: E731
    return decide, ignore, ignore, ignore


def controller_decider(controller: BudgetController) -> Observers:
    """decide, observe_step, observe_latency, observe_arrival."""
    return controller.decide, controller.observe_step, controller.observe_latency, controller.observe_arrival


def simulate(
    phases: list[Phase], duration_s: float, decider: Observers,
    sim: SimConfig = SimConfig(), demand: Callable[[int], StreamDemand] = lambda s: StreamDemand(f"s{s}"),
    policies: dict[int, StreamPolicySpec] | None = None, scene: Scene | None = None,
) -> SimTrace:
    """Run the phases for duration_s simulated seconds. demand(i): stream i's demand (overrides, caps).

    policies: frame policies by stream (as set over REST), their answers from `scene`: the planner's reused frames are
    answered at once at no device cost, and after each frame the stream's policy measures as in the engine (an
    audit is a dense frame of that stream on the device, before the next step)."""
    decide, observe_step, observe_latency, observe_arrival = decider
    rng = np.random.default_rng(sim.seed)
    trace = SimTrace()
    period = 1.0 / sim.fps
    # next frame time of each stream that ever exists; streams are active while the phase has that many
    max_streams = max(p.streams for p in phases)
    phase_of = lambda t: [p for p in phases if p.start_s <= t][-1]  # noqa: E731
    events: list[tuple[float, int]] = [(float(rng.uniform(0, period)), i) for i in range(max_streams)]
    # aligned: the camera's clock (without the jitter), the phase's own for the streams that join in a later one
    offsets = [0.0] + [float(rng.uniform(0, sim.join_offset_s)) if sim.join_offset_s else 0.0 for _ in phases[1:]]
    scheduled = {i: period + next(o for p, o in zip(phases, offsets, strict=True) if p.streams > i)
                 for i in range(max_streams)}
    if sim.aligned:
        events = [(scheduled[i] + abs(float(rng.normal(0, sim.jitter_s))), i) for i in range(max_streams)]
    heapq.heapify(events)
    pending: dict[int, float] = {}  # stream -> arrival time of its waiting frame (decoded)
    decoding: list[tuple[float, int, float, int]] = []  # (ready, stream, arrival, frame number) being decoded
    decoders = [0.0] * sim.decode_threads  # when each decode thread is free
    served_at: dict[int, float] = {}
    policy = BudgetPolicy(sim.num_patches, GlobalBudget("auto", target_latency_ms=100.0))
    for s in range(max_streams):  # operators' overrides and caps, as set over REST
        d = demand(s)
        if d.fixed_tokens is not None or d.cap_tokens is not None:
            policy.set_override(f"s{s}", StreamOverride(tokens=d.fixed_tokens, max_tokens=d.cap_tokens))

    def told(now: float, demands: list[StreamDemand]) -> Decision:
        if sim.seeds_per_step is None:  # joiners seed unannounced
            demands = [replace(d, seeding=False) for d in demands]
        return decide(now, demands)

    policies = policies or {}
    scene = scene or Scene()
    runner = _SimRunner(sim.num_patches, sim.dense_per_frame is not None)
    planner = Planner(runner, policy, sim.seeds_per_step or sim.max_batch, decide=told,
                      stream_policy=lambda stream_id: policies.get(int(stream_id[1:])))
    records = trace.records
    record_of = lambda s: records.setdefault(s, StreamRecord(f"s{s}"))  # noqa: E731
    arrived: dict[int, int] = {}  # stream -> frames it sent
    frame_no: dict[int, int] = {}  # stream -> number of its waiting frame
    frame_of = lambda s: PendingFrame(f"s{s}", frame_no[s], 0, _STILL, (1, 1), pending[s], pending[s],  # noqa: E731
                                      0.0)
    dense_frame_s = eventful_step_s(sim, 1, sim.seed_factor * sim.num_patches)

    seeded_answer: dict[int, torch.Tensor] = {}  # stream -> the answer of the dense step its state was seeded by

    def measure(t: float, s: int, record: StreamRecord, action: str, answer: torch.Tensor, macs: int,
                shadow: tuple[torch.Tensor, int] | None = None) -> float:
        """A policy stream's frame served: its error against the dense answer, then its policy's bookkeeping (an
        audit reseeds the stream: its dense answer becomes the last result). Returns the device time audits took."""
        n = frame_no[s]
        dense = scene.answer(s, n)
        trace.served_error.append((t, s, n, rel_l2(answer, dense)))
        audits = []

        def audit() -> torch.Tensor:
            audits.append(dense_frame_s)
            record.last_result = ({}, dense)
            seeded_answer[s] = dense
            return dense

        shadow_answer, shadow_macs = shadow or (None, 0)
        record.schedule.after(action, answer, audit, shadow_answer, macs, shadow_macs)
        return sum(audits)
    now, busy_until = 0.0, 0.0
    stall_rng = np.random.default_rng(sim.seed + 7919)  # its own stream: stalls leave the other draws as they were
    stalls: list[tuple[float, float]] = []  # (start, seconds)
    at = 0.0
    while sim.stall_rate > 0 and at < duration_s + 10:
        at += float(stall_rng.exponential(1 / sim.stall_rate))
        stalls.append((at, float(stall_rng.uniform(0, sim.stall_s))))

    slows: list[tuple[float, float]] = []  # (start, end)
    at = 0.0
    while sim.slow_rate > 0 and at < duration_s + 10:
        at += float(stall_rng.exponential(1 / sim.slow_rate))
        slows.append((at, at + sim.slow_s * float(stall_rng.uniform(0.5, 1.0))))

    def run_step(t: float) -> float:
        # the real planner decides the round (budgets through `decide`, seeds, plain dense steps, held frames) over
        # the streams' records; the simulation does the rest of the engine (shedding, batch order) and the runner
        phase = phase_of(t)
        order = lambda s: (served_at.get(s, -1.0), pending[s])  # noqa: E731 (served longest ago first)
        offered = [(frame_of(s), record_of(s)) for s in sorted(pending, key=order)]
        expected = [f"s{s}" for s in range(phase.streams) if s not in pending]
        decision = planner.decide_budgets(t, offered, expected)
        trace.decisions.append((t, decision))
        if decision.max_age_s is not None:  # shedding with full batches: frames too old to make it are dropped ...
            late = [s for s, ready_at in pending.items() if t - ready_at > decision.max_age_s]
            if len(late) == len(pending):
                late.remove(max(pending, key=pending.get))  # ... but the youngest is always served (as the engine)
            for s in late:
                del pending[s]
                trace.dropped.append((t, s))
        ready = sorted(pending, key=order)
        limit = min(sim.max_batch, decision.max_batch or sim.max_batch)
        planned = planner.plan([(frame_of(s), record_of(s)) for s in ready[:limit]])
        step_plan = planned.plan
        audit_s = 0.0
        for frame, record in planned.reused:  # answered with the stream's last result at once, at no device cost
            s = int(frame.stream_id[1:])
            latency = t - pending.pop(s) + sim.overhead_s
            served_at[s] = t
            trace.completed.append(Completed(t, s, latency, 0))
            observe_latency(t, latency)
            audit_s += measure(t, s, record, "reuse", record.last_result[1], 0)
        if not step_plan.frames:
            return t + audit_s * phase.speed
        batch = [int(f.stream_id[1:]) for f in step_plan.frames]
        plain, seeding = step_plan.plain_dense, [f.seed for f in step_plan.frames]
        tokens = [sim.num_patches if f.seed or plain else min(f.budget.tokens, sim.num_patches)
                  for f in step_plan.frames]
        if plain and sim.dense_per_frame is not None:
            cost = phase.speed * (sim.a + sim.dense_per_frame * len(batch))
        else:
            paid = [sim.seed_factor * sim.num_patches if new else r for new, r in zip(seeding, tokens, strict=True)]
            paid += [f.shadow.tokens for f in step_plan.frames if f.shadow is not None]  # shadow steps run first
            cost = phase.speed * eventful_step_s(sim, len(batch), sum(paid))
        for f in step_plan.frames:  # what the runner does to the states
            if plain:
                f.state.needs_dense = True
            elif f.seed:
                f.state.needs_dense, f.state.frames_since_dense = False, 0
            else:
                f.state.frames_since_dense += 1
        step = cost * float(np.exp(rng.normal(0, sim.noise)))
        if any(start <= t < end for start, end in slows):
            step *= sim.slow_factor
        step += sum(seconds for start, seconds in stalls if t <= start < t + step)
        end = t + step
        observe_step(end, len(batch), sum(tokens), step, plain_dense=plain, seeded=sum(seeding))
        for s, r in zip(batch, tokens, strict=True):
            latency = end - pending.pop(s) + sim.overhead_s
            if sim.spike_prob and rng.random() < sim.spike_prob:
                latency += float(rng.uniform(0, sim.spike_s))
            served_at[s] = end
            trace.completed.append(Completed(end, s, latency, r))
            observe_latency(end, latency)
        for f, record in zip(step_plan.frames, planned.records, strict=True):
            s = int(f.stream_id[1:])
            if record.schedule is not None:  # a policy stream's keyframe (dense) or sparse frame
                n = frame_no[s]
                dense = f.seed or plain or f.budget == FULL
                shadow = None
                if dense and f.shadow is not None and s in seeded_answer:  # the sparse chain, measured, not served
                    shadow = (scene.sparse(s, n, seeded_answer[s]), sparse_frame_macs(runner.config, f.shadow.tokens))
                answer = scene.answer(s, n) if dense or s not in seeded_answer else scene.sparse(s, n, seeded_answer[s])
                if dense:
                    seeded_answer[s] = answer
                record.last_result = ({}, answer)
                macs = dense_macs(runner.config) if dense else sparse_frame_macs(runner.config, f.budget.tokens)
                audit_s += measure(end, s, record, "dense" if dense else "sparse", answer, macs, shadow)
        return end + audit_s * phase.speed

    while now < duration_s:
        if decoding and decoding[0][0] <= min(events[0][0], max(busy_until, now)):
            now, stream, arrival, number = heapq.heappop(decoding)
            if stream in pending:
                trace.dropped.append((now, stream))
            pending[stream], frame_no[stream] = arrival, number
            continue
        next_arrival = min(events[0][0], decoding[0][0]) if decoding else events[0][0]
        start = max(busy_until, min(pending.values(), default=now) + sim.batch_window_s)
        if pending and start <= next_arrival:
            now = max(now, start)
            busy_until = run_step(now)
            continue
        now, stream = heapq.heappop(events)
        if sim.aligned:
            scheduled[stream] += period
            heapq.heappush(events, (scheduled[stream] + abs(float(rng.normal(0, sim.jitter_s))), stream))
        else:
            heapq.heappush(events, (now + period * float(np.exp(rng.normal(0, 0.02))), stream))
        if stream >= phase_of(now).streams:
            pending.pop(stream, None)
            continue
        observe_arrival(now, f"s{stream}")
        arrived[stream] = arrived.get(stream, -1) + 1
        if sim.decode_s > 0:
            thread = min(range(len(decoders)), key=decoders.__getitem__)
            decoders[thread] = max(now, decoders[thread]) + sim.decode_s
            heapq.heappush(decoding, (decoders[thread], stream, now, arrived[stream]))
            continue
        if stream in pending:
            trace.dropped.append((now, stream))
        pending[stream], frame_no[stream] = now, arrived[stream]
    return trace


def eventful_step_s(sim: SimConfig, batch: int, tokens: float) -> float:
    """An eventful step's time without noise: its fixed part, then the launches or the compute, whichever is longer."""
    return max(sim.a + sim.launch_s, sim.a + sim.b * batch + sim.c * tokens / sim.num_patches)


# the device profiles: the 2-core CPU (step terms fitted live with DeiT-Tiny, 10 fps cameras the load generator keeps
# in step, seeds one a step as the engine) and a GPU-like device (ViT-L-like steps: fixed and launch-bound parts large,
# strong batching gains, low noise; frames decoded on two host threads)
PROFILES: dict[str, SimConfig] = {
    "cpu": SimConfig(fps=10, a=0.041, b=0.0043, c=0.053, noise=0.1, overhead_s=0.012, spike_prob=0.05, spike_s=0.08,
                     dense_per_frame=0.02, seed_factor=2.0, seeds_per_step=1, aligned=True, batch_window_s=0.005,
                     join_offset_s=0.05),
    "gpu": SimConfig(fps=30, a=0.003, launch_s=0.012, b=0.0005, c=0.010, noise=0.02, overhead_s=0.010,
                     dense_per_frame=0.0095, seed_factor=1.0, seeds_per_step=1, aligned=True, batch_window_s=0.005,
                     decode_s=0.002, join_offset_s=0.05),
}


def largest_fixed_tokens(phases: list[Phase], duration_s: float, target_s: float, sim: SimConfig = SimConfig(),
                         settle_s: float = 2.0) -> int:
    """The largest fixed r whose steady p95 meets the target (bisection; p95 grows with r)."""
    low, high = 0, sim.num_patches
    while low < high:
        mid = (low + high + 1) // 2
        trace = simulate(phases, duration_s, fixed_decider(mid), sim)
        if trace.p95(settle_s, duration_s) <= target_s:
            low = mid
        else:
            high = mid - 1
    return low


def warmup_timings(sim: SimConfig) -> tuple[list[tuple[int, float, float]], dict[int, float]]:
    """What the engine's warm-up times on this simulated device: sparse steps at an eighth and half the tokens and a
    plain dense step (where there is one), at one stream and at the largest batch; no noise (a quiet machine)."""
    n, sizes = sim.num_patches, sorted({1, sim.max_batch})
    eventful = [(b, b * r, eventful_step_s(sim, b, b * r)) for b in sizes for r in (n // 8, n // 2)]
    dense = {} if sim.dense_per_frame is None else {b: sim.a + sim.dense_per_frame * b for b in sizes}
    return eventful, dense


def new_controller(target_s: float, sim: SimConfig = SimConfig(), warm: bool = False, **overrides) -> BudgetController:
    """A controller from its prior (the worst start: a runner that times nothing at warm-up, as the clip runner), or
    as the engine makes one for a frame model (warm): calibrated on the device's warm-up steps."""
    controller = BudgetController(ControllerConfig(target_s=target_s, num_patches=sim.num_patches, **overrides))
    if warm:
        controller.calibrate(*warmup_timings(sim))
    return controller
