"""The budget controller against a simulated engine (deterministic: seeded noise), its parts, and its wiring.

Targets asserted in simulation (150 ms p95 target, step time a + b*B + c*tokens with noise, 30 fps cameras):
steady p95 within the target, re-settled within 2.5 s of a load or device step, mean r within 10 % of the largest
fixed r that meets the target, no oscillation over thousands of noisy rounds, equal shares, and at saturation
load shed by dropping frames while the served frames keep the target.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest

from bench.controller_ablation import DOMINANCE_MARGIN, FIXED_GRID, SCENARIOS, Scenario, phase_stats
from server.engine.controller import BudgetController, ControllerConfig, StreamDemand
from server.engine.step_cost import StepCostModel, water_level
from tests.server.conftest import encode, frames, wait_until
from tests.server.controller_sim import (
    PROFILES,
    Phase,
    SimConfig,
    controller_decider,
    eventful_step_s,
    fixed_decider,
    largest_fixed_tokens,
    new_controller,
    simulate,
    warmup_timings,
)

TARGET = 0.150
LOAD_STEPS = [Phase(0, 1), Phase(10, 4), Phase(20, 8), Phase(30, 4), Phase(40, 1)]
STEADY_AFTER_S = 3.0  # a phase's steady part starts this long after its step


def phase_spans(phases: list[Phase], end: float) -> list[tuple[Phase, float, float]]:
    ends = [p.start_s for p in phases[1:]] + [end]
    return [(p, p.start_s, e) for p, e in zip(phases, ends, strict=True)]


@pytest.fixture(scope="module")
def load_step_runs():
    """The 1 -> 4 -> 8 -> 4 -> 1 stream load steps, three seeds."""
    return [simulate(LOAD_STEPS, 50, controller_decider(new_controller(TARGET)), SimConfig(seed=s)) for s in range(3)]


# ---- closed loop in simulation ---------------------------------------------------------------


def test_load_steps_hold_the_target_and_settle_fast(load_step_runs):
    for trace in load_step_runs:
        for phase, start, end in phase_spans(LOAD_STEPS, 50):
            steady_p95 = trace.p95(start + STEADY_AFTER_S, end)
            assert steady_p95 <= TARGET, (phase, steady_p95)
            assert steady_p95 >= 0.85 * TARGET or trace.mean_tokens(start + STEADY_AFTER_S, end) == 196, (
                phase, steady_p95)  # tokens are not left on the table
            if start > 0:
                assert trace.settle_time(start, end, TARGET) <= 2.5, phase
            # overshoot after a step: the joining streams' dense first frames, for about one step
            assert trace.overshoot(start, end, TARGET) <= 2.6, phase


def test_mean_budget_is_close_to_the_best_fixed_budget(load_step_runs):
    for streams in (4, 8):
        best = largest_fixed_tokens([Phase(0, streams)], 10, TARGET)
        phases = [(start, end) for p, start, end in phase_spans(LOAD_STEPS, 50) if p.streams == streams]
        for trace in load_step_runs:
            for start, end in phases:
                mean = trace.mean_tokens(start + STEADY_AFTER_S, end)
                assert 0.9 * best <= mean <= 1.05 * best, (streams, mean, best)


def test_one_stream_with_slack_gets_the_full_budget_and_no_windup(load_step_runs):
    trace = load_step_runs[0]
    assert trace.mean_tokens(STEADY_AFTER_S, 10) == 196
    # the integrator did not wind up during the slack: the first decision with 4 streams cuts r at once
    first_after = next(d for t, d in trace.decisions if t >= 10 and len(d.tokens) == 4)
    assert first_after.level < 80


def test_light_load_with_partial_batches_spends_its_slack():
    """10 fps cameras and short steps: batches hold fewer streams than are active. The latency the controller
    feeds back must be judged at those batch sizes, or r stays far below what fits (it stayed at 60 % of the best
    fixed r before). Latency is steep in r here (one token more: +25 % p95): r wobbles by a token around it, the
    window p95 with it, and the margin for a noisy p95 costs about a token more (of 15)."""
    sim = SimConfig(fps=10, a=0.010, b=0.006, c=0.20)
    best = largest_fixed_tokens([Phase(0, 4)], 20, TARGET, sim)
    for seed in range(3):
        trace = simulate([Phase(0, 4)], 30, controller_decider(new_controller(TARGET, sim)), replace(sim, seed=seed))
        assert trace.p95(5, 30) <= 1.1 * TARGET
        assert trace.mean_tokens(5, 30) >= 0.8 * best, (trace.mean_tokens(5, 30), best)


def test_device_slowdown_is_followed_within_two_seconds():
    phases = [Phase(0, 4), Phase(10, 4, speed=1.6), Phase(20, 4)]
    for seed in range(3):
        trace = simulate(phases, 30, controller_decider(new_controller(TARGET)), SimConfig(seed=seed))
        levels = []
        for phase, start, end in phase_spans(phases, 30):
            assert trace.p95(start + STEADY_AFTER_S, end) <= TARGET, (seed, phase)
            if start > 0:
                assert trace.settle_time(start, end, TARGET) <= 2.5, (seed, phase)
            levels.append(trace.mean_tokens(start + STEADY_AFTER_S, end))
        assert levels[1] < 0.7 * levels[0] and levels[2] > 0.9 * levels[0], levels  # down with the device, and up


def test_stable_over_thousands_of_noisy_rounds():
    sim = SimConfig(noise=0.25, seed=3)
    controller = new_controller(TARGET)
    trace = simulate([Phase(0, 4)], 120, controller_decider(controller), sim)
    rounds = [d for t, d in trace.decisions if t >= 10]
    assert len(rounds) > 1000
    for start in range(10, 120, 10):
        assert trace.p95(start, start + 10) <= 1.05 * TARGET, start
    levels = [d.level for d in rounds]
    assert statistics.pstdev(levels) / statistics.mean(levels) < 0.2  # no limit cycle
    assert trace.level_changes(10, 120) / 110 < 4  # r changes a few times a second at most (hysteresis)
    assert controller.model.shifts <= 3  # noise is not mistaken for a slower device
    best = largest_fixed_tokens([Phase(0, 4)], 60, TARGET, sim)
    assert trace.mean_tokens(10, 120) >= 0.85 * best


def test_fair_shares_with_caps_and_fixed_overrides():
    def demand(stream: int) -> StreamDemand:
        if stream == 0:
            return StreamDemand("s0", fixed_tokens=100)  # an operator's override: kept, and it costs
        if stream == 1:
            return StreamDemand("s1", cap_tokens=10)  # a cap below the fair share
        return StreamDemand(f"s{stream}")

    trace = simulate([Phase(0, 6)], 20, controller_decider(new_controller(TARGET)), demand=demand)
    decision = trace.decisions[-1][1]
    assert decision.tokens["s0"] == 100 and decision.tokens["s1"] == 10
    shares = {decision.tokens[f"s{i}"] for i in range(2, 6)}
    assert len(shares) == 1 and 10 < shares.pop() < 100
    assert trace.p95(5, 20) <= TARGET
    frames = trace.frames_per_stream(5, 20)
    assert max(frames.values()) - min(frames.values()) <= 1  # every stream is served as often


def test_saturation_sheds_load_and_says_so():
    phases = [Phase(0, 8), Phase(10, 8, speed=6.0), Phase(25, 8)]
    trace = simulate(phases, 40, controller_decider(new_controller(TARGET, min_tokens=20)))
    saturated = [d for t, d in trace.decisions if 13 <= t < 25]
    assert all(d.saturated and d.level == 20 for d in saturated)
    assert all(d.max_batch is not None and d.max_batch < 8 for d in saturated)
    assert "minimum budget (20 tokens)" in saturated[-1].reason
    assert trace.p95(13, 25) <= 1.1 * TARGET  # served frames keep the target ...
    frames = trace.frames_per_stream(13, 25)
    assert len(frames) == 8 and min(frames.values()) >= 0.9 * max(frames.values())  # ... round robin ...
    assert sum(1 for t, _ in trace.dropped if 13 <= t < 25) > 1000  # ... and the rest is dropped
    recovered = [d for t, d in trace.decisions if t >= 28]
    assert not any(d.saturated for d in recovered) and trace.p95(28, 40) <= TARGET


def test_where_the_plain_dense_step_fits_the_controller_goes_dense_not_to_dearer_eventful_levels():
    """The eventful step near the full budget costs more than the plain dense model (gathers, scatters and reference
    updates on every token; live on this CPU r = 182 took 1.4x dense, and a 1-stream phase sat at r = 167 with p95
    171 ms while dense gave 73 ms). Here one stream's plain dense step is 22 ms, its eventful one 10 + 3 + 50 * r/196
    ms: dense (p95 ~33 ms) fits a 50 ms target, eventful r > ~90 does not."""
    sim = SimConfig(fps=10, a=0.01, b=0.003, c=0.05, noise=0.08, overhead_s=0.008, dense_per_frame=0.012)
    target = 0.05
    phases = [Phase(0, 1), Phase(10, 3), Phase(20, 1)]
    for seed in range(3):
        controller = new_controller(target, sim)
        controller.dense_model.observe(1, sim.a + sim.dense_per_frame)  # what the engine times at warm-up (dense)
        trace = simulate(phases, 30, controller_decider(controller), replace(sim, seed=seed))
        assert trace.mean_tokens(3, 10) == 196 and trace.p95(3, 10) <= target
        assert trace.mean_tokens(13, 20) < 60  # 3 streams: eventful, far under the top
        assert trace.recovery_time(20, 30, target) <= 1.0
        # dense at once, within the target (a noisy step may drop it out of dense for a moment: dense_hysteresis,
        # off by default, holds it at 196; the ablation in docs/controller.md found it worth no target)
        assert trace.mean_tokens(21, 30) >= 0.95 * 196 and trace.p95(21, 30) <= target
        levels = [d.level for t, d in trace.decisions if 20 <= t < 30]
        assert all(r == 196 or r < 90 for r in levels)  # never through the dear levels in between


def test_a_joiners_dense_first_frames_are_a_transient_not_a_reason_to_shed():
    """A stream's first frame seeds its state densely through the eventful path: live, four joiners made a 300 ms
    step, the feedback cut for the backlog behind it, and the controller shed load at 4 streams (23 frames/s, r = 4)
    where a fixed r = 11 served all 40 frames/s at 103 ms. Feedback now resumes after the step that follows."""
    sim = SimConfig(fps=10, a=0.0127, b=0.0126, c=0.0228, noise=0.1, overhead_s=0.008, spike_prob=0.05, spike_s=0.08,
                    seed_factor=3.0)
    for seed in range(4):
        trace = simulate([Phase(0, 1), Phase(10, 4)], 20, controller_decider(new_controller(TARGET, sim, min_tokens=4)),
                         replace(sim, seed=seed))
        after = [d for t, d in trace.decisions if 10.5 <= t < 20]
        assert not any(d.saturated for d in after), seed
        assert len(trace.window(11, 20)) >= 0.97 * 4 * 10 * 9  # every frame served
        assert trace.p95(13, 20) <= 1.1 * TARGET and trace.mean_tokens(13, 20) >= 40


def test_shedding_keeps_batches_where_frames_would_only_wait_longer():
    """Steps with a large fixed part (here 30 ms, 3 ms a stream): a smaller batch costs more per frame. The
    controller is started saturated (its step budget cut to 3 % of the target, as a transient can leave it); it
    must not hold single-frame steps (live: 23 frames/s at 4 streams, where full batches at r = 4 served 40)."""
    sim = SimConfig(fps=10, a=0.03, b=0.003, c=0.02, noise=0.05, overhead_s=0.008)
    controller = new_controller(TARGET, sim, min_tokens=4)
    controller._u = ControllerConfig(target_s=TARGET, num_patches=196).u_min  # noqa: SLF001 (a state, set up)
    trace = simulate([Phase(0, 4)], 10, controller_decider(controller), sim)
    assert len(trace.window(2, 10)) >= 0.97 * 4 * 10 * 8  # every frame served
    assert trace.p95(2, 10) <= TARGET and trace.mean_tokens(3, 10) > 50


def test_past_the_knee_full_batches_drop_only_the_frames_that_would_be_late():
    """A step with a large fixed part (the live CPU fit: 41 ms a step, 4 ms a stream): 8 streams at r = 4 make steps
    of about a frame period, p95 ~165 ms at full service. A batch limit barely helps (a frame's age, up to a period,
    dominates; live it served 35 of 80 frames/s for 160 ms). With full batches and an age limit the frames that
    could not make the target are dropped and the rest are served on time."""
    sim = SimConfig(fps=10, a=0.041, b=0.0043, c=0.053, noise=0.1, overhead_s=0.012, spike_prob=0.05, spike_s=0.08,
                    dense_per_frame=0.02, seed_factor=2.0)
    phases = [Phase(0, 4), Phase(10, 8)]
    for seed in range(4):
        full = simulate([Phase(0, 8)], 12, fixed_decider(4), replace(sim, seed=seed))
        assert full.p95(3, 12) > 1.05 * TARGET  # the minimum budget alone misses the target
        trace = simulate(phases, 22, controller_decider(new_controller(TARGET, sim, min_tokens=4)),
                         replace(sim, seed=seed))
        assert trace.recovery_time(10, 22, TARGET) <= 2.0
        shedding = [d for t, d in trace.decisions if 13 <= t < 22]
        assert all(d.saturated for d in shedding)
        assert sum(d.max_age_s is not None and d.max_batch is None for d in shedding) >= 0.9 * len(shedding)
        assert "older than" in shedding[-1].reason
        assert trace.p95(13, 22) <= TARGET
        assert len(trace.window(13, 22)) >= 0.7 * len(full.window(3, 12))  # most frames still served


def test_a_new_target_is_followed():
    controller = new_controller(TARGET)
    trace = simulate([Phase(0, 4)], 10, controller_decider(controller))
    before = trace.mean_tokens(5, 10)
    controller.reconfigure(ControllerConfig(target_s=0.3, num_patches=196), initial_tokens=round(before))
    trace = simulate([Phase(0, 4)], 10, controller_decider(controller), SimConfig(seed=1))
    assert trace.p95(4, 10) <= 0.3 and trace.mean_tokens(4, 10) > 1.5 * before


# ---- parts -----------------------------------------------------------------------------------


def test_cost_model_learns_a_linear_step_time():
    model = StepCostModel(196)
    truth = (0.003, 0.002, 0.05)
    points = [(b, t) for b in (1, 2, 4, 8) for t in (20, 60, 150, 300, 600)]
    for i in range(400):
        b, t = points[i % len(points)]
        model.observe(b, t, truth[0] + truth[1] * b + truth[2] * t / 196)
    for b, t in [(3, 100), (8, 160), (1, 196)]:
        assert model.predict(b, t) == pytest.approx(truth[0] + truth[1] * b + truth[2] * t / 196, rel=0.02)


def test_cost_model_follows_a_shift_in_three_steps():
    model = StepCostModel(196)
    for _ in range(50):
        model.observe(4, 200, 0.08)
    for _ in range(3):
        model.observe(4, 200, 0.16)  # the device got twice as slow
    assert model.shifts == 1 and model.predict(4, 200) == pytest.approx(0.16, rel=0.1)


def test_cost_model_undoes_a_slowdown_that_passes_and_keeps_one_that_stays():
    """The host contended for half a second: steps 1.5x as long, three in a row, shift the model; when they are back,
    three steps that the model from before predicts better restore it as it was (its noise estimate too). A slowdown
    that stays is kept, and so is one a fit still learning shifted to correct itself."""
    def settled(steps: int = 60) -> StepCostModel:
        model = StepCostModel(196)
        for i in range(steps):
            model.observe(4, 200, 0.08 * (1.02 if i % 2 else 0.98))
        return model

    passing, staying, learning = settled(), settled(), settled(steps=20)
    before, noise = passing.theta.copy(), passing.noise
    for model in (passing, staying, learning):
        for _ in range(3):
            model.observe(4, 200, 0.12)
        assert model.shifts == 1 and model.predict(4, 200) == pytest.approx(0.12, rel=0.05)
    for _ in range(3):
        passing.observe(4, 200, 0.08)
        staying.observe(4, 200, 0.12)
        learning.observe(4, 200, 0.08)
    assert passing.shifts == 2 and passing.reverted and passing.last_shift == pytest.approx(1 / 1.5, rel=0.05)
    assert passing.theta == pytest.approx(before) and passing.noise == pytest.approx(noise)
    assert staying.shifts == 1 and not staying.reverted and staying.predict(4, 200) == pytest.approx(0.12, rel=0.05)
    assert learning.shifts == 2 and not learning.reverted  # followed as any speed-up, not restored


def test_calibration_on_warm_up_steps_fits_the_device_where_the_prior_is_far_off():
    sim = SimConfig(a=0.041, b=0.0043, c=0.053)  # the live CPU's fit
    calibrated, prior = StepCostModel(196), StepCostModel(196)
    calibrated.calibrate(warmup_timings(sim)[0])
    for batch, r in [(1, 11), (4, 20), (4, 60), (8, 8)]:
        truth = sim.a + sim.b * batch + sim.c * batch * r / 196
        assert calibrated.predict(batch, batch * r) == pytest.approx(truth, rel=0.01)
        assert prior.predict(batch, batch * r) < 0.5 * truth


def test_a_first_join_after_start_begins_near_what_the_load_sustains():
    """A single stream runs the plain dense model, so the eventful cost model sees no step before streams join. From
    its prior, the first join took r = 141 at 4 streams (live: predicted 68 ms, ~300 ms measured, then r = 4 and a
    climb). Calibrated on the warm-up steps, the first r is at most what the phase settles at."""
    sim = SimConfig(fps=10, a=0.041, b=0.0043, c=0.053, noise=0.1, overhead_s=0.012, spike_prob=0.05, spike_s=0.08,
                    dense_per_frame=0.02, seed_factor=2.0)
    overshoot = {True: [], False: []}
    for seed in range(6):
        for warm in (True, False):
            controller = new_controller(TARGET, sim, warm=warm, min_tokens=4)
            controller.dense_model.observe(1, sim.a + sim.dense_per_frame)
            trace = simulate([Phase(0, 1), Phase(10, 4)], 20, controller_decider(controller), replace(sim, seed=seed))
            first = next(d.level for t, d in trace.decisions if t >= 10)
            steady = trace.mean_tokens(14, 20)
            assert first <= steady if warm else first >= 5 * steady, (warm, first, steady)
            overshoot[warm].append(trace.overshoot(10, 20, TARGET))
    assert statistics.mean(overshoot[True]) < statistics.mean(overshoot[False]), overshoot


def test_a_knee_found_is_kept_for_a_target_as_tight_and_dropped_for_a_looser_one():
    config = ControllerConfig(target_s=0.15, num_patches=196, min_tokens=4)
    controller = BudgetController(config, initial_tokens=30)
    controller._knees.steps[4] = 0.09  # noqa: SLF001 (a knee found at 4 streams: steps of 90 ms went over)
    controller.reconfigure(config, 30)  # auto mode set again, the same target
    assert controller._knees.steps == {4: 0.09}  # noqa: SLF001
    controller.reconfigure(replace(config, target_s=0.1), 30)
    assert controller._knees.steps == {4: 0.09}  # noqa: SLF001
    controller.reconfigure(replace(config, target_s=0.3), 30)  # looser: the knee may lie higher
    assert controller._knees.steps == {}  # noqa: SLF001


def test_water_level():
    assert water_level(100, [math.inf] * 4) == 25
    assert water_level(100, [10, math.inf, math.inf]) == 45
    assert water_level(100, [10, 20]) == math.inf  # everyone is capped below the room
    assert water_level(-5, [math.inf]) == -5


def test_hysteresis_keeps_r_still_for_small_changes():
    controller = BudgetController(ControllerConfig(target_s=0.1, num_patches=196), initial_tokens=60)
    for i in range(30):
        controller.observe_step(i * 0.05, 2, 120, 0.040)
    first = controller.decide(1.5, [StreamDemand("a"), StreamDemand("b")]).level
    levels = set()
    for i in range(200):  # latencies wobbling 3 % around the aim: inside the deadband and the band
        now = 2.0 + i * 0.02
        controller.observe_latency(now, 0.097 * (1.03 if i % 2 else 0.97))
        levels.add(controller.decide(now, [StreamDemand("a"), StreamDemand("b")]).level)
    assert len(levels) <= 2 and first in levels | {first}


def test_config_is_checked():
    with pytest.raises(ValueError):
        ControllerConfig(target_s=0, num_patches=196)
    with pytest.raises(ValueError):
        ControllerConfig(target_s=0.1, num_patches=196, min_tokens=50, max_tokens=40)


# ---- wired into the server -------------------------------------------------------------------


def _stream(ws, video, count: int) -> list[dict]:
    out = []
    for t in range(count):
        ws.send_bytes(encode(video[t % len(video)]))
        out.append(ws.receive_json())
    return out


def test_auto_mode_spends_slack_on_tokens_and_reports_itself(make_client):
    client = make_client()  # fixed 4 of 16 tokens to start with
    body = client.put("/v1/budget", json={"mode": "auto", "target_latency_ms": 5000, "max_tokens": 12}).json()
    assert body["controller"]["level_tokens"] == 4  # it starts from the budget in effect
    video = frames(8)
    with client.websocket_connect("/v1/streams/cam") as ws:
        results = _stream(ws, video, 3)
        wait_until(lambda: _stream(ws, video, 1)[0]["budget"] == 12, timeout=20, what="r rising to max_tokens")
        results += _stream(ws, video, 10)  # enough frames for the controller's p95 (at least 8)
        metrics = client.get("/metrics").text  # while the stream is connected
    assert all(r["type"] == "result" for r in results) and results[-1]["budget"] == 12
    controller = client.get("/v1/budget").json()["controller"]
    assert controller["tokens_max"] == 12 and controller["streams"] == 1 and not controller["saturated"]
    assert controller["measured_p95_ms"] is not None and controller["cost_model_ms"][2] > 0
    assert client.get("/v1/streams/cam/budget").json()["effective_tokens"] == 12
    assert "eventful_target_latency_seconds 5.0" in metrics
    assert 'eventful_stream_budget_tokens{stat="max"} 12.0' in metrics
    assert "eventful_controller_saturated 0.0" in metrics


def test_the_engine_calibrates_the_controller_on_its_warm_up(make_client):
    client = make_client(max_batch_size=3)
    controller = client.app.state.engine._controller  # noqa: SLF001 (before any frame: what warm-up taught it)
    assert controller.model.observations == 4  # sparse steps at two budgets, at one stream and at the largest batch
    assert controller.dense_model.predict(1) is not None and controller.dense_model.predict(3) is not None


def test_auto_mode_at_an_impossible_target_is_saturated_at_min_tokens(make_client):
    client = make_client()
    client.put("/v1/budget", json={"mode": "auto", "target_latency_ms": 0.01, "min_tokens": 2})
    video = frames(8)
    with client.websocket_connect("/v1/streams/cam") as ws:
        results = _stream(ws, video, 8)
    assert all(r["type"] == "result" for r in results)  # a lone stream is still served, at the floor
    assert [r["budget"] for r in results[-3:]] == [2, 2, 2]
    controller = client.get("/v1/budget").json()["controller"]
    assert controller["saturated"] and "minimum budget (2 tokens)" in controller["reason"]
    assert "eventful_controller_saturated 1.0" in client.get("/metrics").text
    # back to fixed mode: no longer saturated, the target gauge reads 0
    client.put("/v1/budget", json={"mode": "fixed", "tokens": 5})
    metrics = client.get("/metrics").text
    assert "eventful_controller_saturated 0.0" in metrics and "eventful_target_latency_seconds 0.0" in metrics


def test_an_age_limit_never_stops_the_engine(make_client):
    """While the controller sheds with an age limit, the frames of a due batch past it are dropped, but the youngest is
    always served: a step, and with it the next decision, always happens. Live, an engine that expired frames while
    they waited ran no step under a small limit, so no decision lifted it, and every frame was dropped."""
    client = make_client()
    client.put("/v1/budget", json={"mode": "auto", "target_latency_ms": 5000})
    controller = client.app.state.engine._controller  # noqa: SLF001 (the engine owns it; the test sets its decision)
    honest = controller.decide
    controller.decide = lambda now, demands: replace(honest(now, demands), saturated=True, max_age_s=0.0)
    video = frames(8)
    with client.websocket_connect("/v1/streams/cam") as ws:
        answers = _stream(ws, video, 5)  # one stream, one frame at a time: each is the youngest of its batch
    assert [a["type"] for a in answers] == ["result"] * 5
    assert client.app.state.engine._shed_age == 0.0  # noqa: SLF001 (the limit was in force throughout)


def test_fixed_overrides_and_caps_hold_in_auto_mode(make_client):
    client = make_client()
    client.put("/v1/budget", json={"mode": "auto", "target_latency_ms": 5000})
    client.put("/v1/streams/fixed/budget", json={"tokens": 7})
    client.put("/v1/streams/capped/budget", json={"max_tokens": 3})
    video = frames(4)
    with client.websocket_connect("/v1/streams/fixed") as a, client.websocket_connect("/v1/streams/capped") as b:
        for _ in range(4):
            ra, rb = _stream(a, video, 1)[0], _stream(b, video, 1)[0]
    assert (ra["budget"], rb["budget"]) == (7, 3)
    assert client.get("/v1/streams/capped/budget").json()["source"] == "cap"


def test_fewer_streams_release_the_cuts_made_under_heavier_load():
    """Shedding holds the measured latency near the target, so after a heavy phase the feedback alone would see
    little error and climb back slowly (seen live: 8 s at the floor after 8 -> 4 streams)."""
    controller = BudgetController(ControllerConfig(target_s=0.15, num_patches=196, min_tokens=4), initial_tokens=40)
    eight = [StreamDemand(f"s{i}") for i in range(8)]
    now = 0.0
    for _ in range(400):  # a slow device under 8 streams: every latency at twice the target
        now += 0.05
        controller.observe_step(now, 8, 32, 0.2)
        for _ in range(8):
            controller.observe_latency(now, 0.3)
        cut = controller.decide(now, eight)
    assert cut.saturated
    controller._u = math.log(0.05)  # noqa: SLF001 (as deep as a transient can leave it)
    controller.decide(now + 0.05, eight)
    after = controller.decide(now + 0.1, eight[:4])
    assert after.step_budget_s >= 0.45 * 0.15 * 0.99  # back to the neutral start, the feed-forward takes it from there


def test_a_cpu_at_its_knee_holds_the_target_in_every_phase():
    """The live CPU regime (step-cost terms fitted on the 2-core machine with DeiT-Tiny, 10 fps cameras, OS jitter):
    with 4 streams the device is ~95 % busy and the p95 is steep in r (r 46 -> 58: +35 %), and it is noisy. Before
    the ceiling, the per-load memory and the noise margin, r swung over the knee (4-stream phases at 181-189 ms)."""
    sim = SimConfig(fps=10, a=0.0127, b=0.0126, c=0.0228, noise=0.1, overhead_s=0.008, spike_prob=0.05, spike_s=0.08)
    best = largest_fixed_tokens([Phase(0, 4)], 12, TARGET, sim, settle_s=3)
    for seed in range(3):
        controller = new_controller(TARGET, sim, min_tokens=4)
        trace = simulate(LOAD_STEPS, 50, controller_decider(controller), replace(sim, seed=seed))
        for phase, start, end in phase_spans(LOAD_STEPS, 50):
            assert trace.p95(start + STEADY_AFTER_S, end) <= 1.1 * TARGET, (seed, phase)
            # back under 1.1 x the target for 2 s within 2 s of every step (measured as the live bench does): over
            # ten seeds all 40 steps were, the 4 -> 8 step (shedding) in 1.5-2 s (up to 3.5 s before the integrator
            # fell twice as fast at saturation)
            assert trace.recovery_time(start, end, TARGET) <= 2.0, (seed, phase)
            if phase.streams == 4:
                # noisy near the knee: over ten seeds the phases' mean r spreads 0.80-1.06 of the best fixed r
                assert trace.mean_tokens(start + STEADY_AFTER_S, end) >= 0.8 * best, (seed, phase)


def test_one_late_frame_of_a_slow_camera_does_not_cut_r():
    """One camera at 10 fps: a second holds 10 frames, whose p95 would be the slowest of them. One 250 ms frame (an
    OS hiccup; seen live) must not cut r: the p95 is taken over at least 20 frames."""
    controller = BudgetController(ControllerConfig(target_s=0.15, num_patches=196, min_tokens=4))
    demand = [StreamDemand("cam")]
    now, levels = 0.0, []
    for i in range(100):  # 10 s at 10 fps, steps of 30 ms, 60 ms latency, one frame at 250 ms at 5 s
        now += 0.1
        controller.observe_step(now, 1, 196, 0.03)
        controller.observe_latency(now, 0.25 if i == 50 else 0.06)
        levels.append(controller.decide(now, demand).level)
    assert min(levels[20:]) == 196, levels


def test_host_stalls_that_r_did_not_cause_do_not_swing_r():
    """The host stalls now and then (live: the load generator and the decoders share the 2 cores with the model): a
    step takes up to 150 ms longer, a burst of frames is late, and one window's p95 (a few frames' worth) jumps
    though r did not change. Fed back as is, each burst cut r and the slow rise did not win it back: over 8 seeds the
    mean r was 0.73 of the best fixed r with stalls as here (0.46 in the worst seed). The estimate fed back caps a
    window's p95 at what its middle half and the tail of the windows lately say: 0.80 (0.61)."""
    sim = SimConfig(fps=10, a=0.023, b=0.0032, c=0.050, noise=0.1, overhead_s=0.012, spike_prob=0.05, spike_s=0.08,
                    dense_per_frame=0.02, seed_factor=2, stall_rate=0.5, stall_s=0.15)
    best = largest_fixed_tokens([Phase(0, 4)], 30, TARGET, sim, settle_s=3)
    means = []
    for seed in range(8):
        controller = new_controller(TARGET, sim, min_tokens=4, tail_cap=True)
        trace = simulate([Phase(0, 1), Phase(5, 4)], 30, controller_decider(controller), replace(sim, seed=seed))
        assert trace.p95(8, 30) <= 1.1 * TARGET, seed
        means.append(trace.mean_tokens(8, 30))
    assert statistics.mean(means) >= 0.77 * best and min(means) >= 0.55 * best, (means, best)


def test_cameras_in_step_hold_the_target_at_the_device_capacity():
    """The load generator's cameras send at the same instants (they start together and keep an absolute schedule):
    below the device's capacity a frame waits for no step but its own, past it for most of another, and the p95
    jumps from about one step to two (live: r 26 -> 34 took it from 104 to 197 ms at 4 streams; here r 33 -> 39 takes
    it from 134 to 205 ms). The latency gives no warning below the jump, so the step budget is held within the frame
    period where frames come together; without that limit the 4-stream phase (the first after a join) runs over."""
    sim = SimConfig(fps=10, a=0.041, b=0.0043, c=0.053, noise=0.1, overhead_s=0.012, spike_prob=0.05, spike_s=0.08,
                    dense_per_frame=0.02, seed_factor=2.0, aligned=True, batch_window_s=0.005)
    best = largest_fixed_tokens([Phase(0, 4)], 12, TARGET, sim, settle_s=3)
    uncapped = []
    for seed in range(4):
        controller = new_controller(TARGET, sim, warm=True, min_tokens=4, capacity=0.95)
        trace = simulate(LOAD_STEPS, 50, controller_decider(controller), replace(sim, seed=seed))
        for phase, start, end in phase_spans(LOAD_STEPS, 50):
            assert trace.p95(start + STEADY_AFTER_S, end) <= 1.05 * TARGET, (seed, phase)
            assert trace.recovery_time(start, end, TARGET) <= 2.0, (seed, phase)
            if phase.streams == 4:  # over 6 seeds 0.83-0.95 of the best fixed r
                assert trace.mean_tokens(start + STEADY_AFTER_S, end) >= 0.8 * best, (seed, phase)
        budgets = [d.step_budget_s for t, d in trace.decisions if 13 <= t < 20]
        assert max(budgets) <= 0.95 * 0.1 * 1.02  # within 95 % of the period (the measured one: +-2 %) ...
        assert sum(b >= 0.95 * 0.1 * 0.98 for b in budgets) >= 0.25 * len(budgets)  # ... where the limit holds it
        without = new_controller(TARGET, sim, warm=True, min_tokens=4, capacity=None)
        trace = simulate(LOAD_STEPS, 50, controller_decider(without), replace(sim, seed=seed))
        uncapped.append(trace.p95(10 + STEADY_AFTER_S, 20))
    assert statistics.mean(uncapped) > 1.03 * TARGET, uncapped  # over 4 seeds: 147-164 ms


def test_a_host_contended_for_a_moment_costs_r_for_that_moment_only():
    """Cameras in step at the device's capacity, the host contended now and then (steps 1.5x as long for 0.3-0.6 s; live
    on the 2-core CPU about once in 5-10 s at 4 streams: steps of 150-170 ms for 95). The cost model follows the
    slowdown (r is cut to keep up with the cameras) and, once steps are back, its fit from before is restored and r
    with it. Before, the rescaled fit stayed 15-25 % over the steps for seconds (the fit's memory is 100 steps) and r
    with it: 0.77 of the largest fixed r that meets the target on the same timeline (0.69 in the worst of 6 seeds)."""
    sim = SimConfig(fps=10, a=0.041, b=0.0043, c=0.053, noise=0.05, overhead_s=0.012, spike_prob=0.02, spike_s=0.05,
                    dense_per_frame=0.02, seed_factor=2.0, aligned=True, batch_window_s=0.005, slow_rate=0.1,
                    slow_s=0.6, slow_factor=1.5)
    phases = [Phase(0, 1), Phase(5, 4)]

    def best_fixed(timeline: SimConfig) -> int:
        low, high = 0, timeline.num_patches
        while low < high:
            mid = (low + high + 1) // 2
            if simulate(phases, 35, fixed_decider(mid), timeline).p95(8, 35) <= TARGET:
                low = mid
            else:
                high = mid - 1
        return low

    ratios, without = [], []
    for seed in range(6):
        timeline = replace(sim, seed=seed)
        best = best_fixed(timeline)
        controller = new_controller(TARGET, timeline, warm=True, min_tokens=4, capacity=0.95, slowdown_revert=True)
        trace = simulate(phases, 35, controller_decider(controller), timeline)
        assert trace.p95(8, 35) <= TARGET, seed
        ratios.append(trace.mean_tokens(8, 35) / best)
        kept = new_controller(TARGET, timeline, warm=True, min_tokens=4, capacity=0.95)  # keeps every slowdown
        without.append(simulate(phases, 35, controller_decider(kept), timeline).mean_tokens(8, 35) / best)
    # over these 6 seeds: 0.91-1.11, mean 1.00; without: 0.69-0.94, mean 0.77
    assert statistics.mean(ratios) >= 0.95 and min(ratios) >= 0.88, ratios
    assert statistics.mean(without) < 0.85, without


def _burst_levels(restore: bool) -> dict[float, int]:
    """4 streams whose latency follows r (1.2 steps + 20 ms; r about 68 holds the aim), and a burst of frames 120 ms
    later for 0.6 s that r did not make (the host stalled; the steps ran as before). r at every round (20 a second)."""
    config = ControllerConfig(target_s=0.15, num_patches=196, min_tokens=4, drain_restore=restore)
    controller = BudgetController(config, initial_tokens=40)
    demands = [StreamDemand(f"s{i}") for i in range(4)]
    levels = {}
    for i in range(600):
        now = round(0.05 * (i + 1), 2)
        level = controller.decide(now, demands).level
        step = 0.032 + 0.2 * level / 196
        controller.observe_step(now, 4, 4 * level, step)
        for _ in range(2):
            controller.observe_latency(now, 1.2 * step + 0.02 + (0.12 if 20 <= now < 20.6 else 0.0))
        levels[now] = level
    return levels


def test_a_burst_r_did_not_make_is_drained_then_r_goes_back():
    """The fast cut drains the burst's backlog; once the frames are back under the aim, r goes back to where the cut
    found it (feedback forgets the burst's frames). Without that, r climbed back from the cut for over 5 s. (Off by
    default: docs/controller.md#ablation.)"""
    restored, climbed = _burst_levels(True), _burst_levels(False)
    before = restored[19.95]
    assert climbed[19.95] == before and 60 <= before <= 75
    assert min(level for t, level in restored.items() if 20 <= t < 21) < 0.5 * before  # it was cut (and drained)
    assert all(level >= 0.85 * before for t, level in restored.items() if 21 <= t <= 30)  # 0.88
    assert climbed[24.0] < 0.8 * before  # the path without it, for comparison (0.72; back only at 27 s)


def _knee_levels(knee_cut: bool) -> list[int]:
    """4 streams whose latency jumps from 90 to 200 ms once r passes 45 (a knee as sharp as the 2-core CPU's: live,
    r 40 -> 46 took the p95 from 113 to 177 ms); the step time itself is linear in r, as the cost model assumes.
    r every round (20 a second) for 32 s, starting at 30."""
    config = ControllerConfig(target_s=0.15, num_patches=196, min_tokens=4, knee_memory=True, knee_cut=knee_cut)
    controller = BudgetController(config, initial_tokens=30)
    demands = [StreamDemand(f"s{i}") for i in range(4)]
    levels = []
    for i in range(640):
        now = 0.05 * (i + 1)
        level = controller.decide(now, demands).level
        controller.observe_step(now, 4, 4 * level, 0.02 + 4 * 0.003 + 0.05 * 4 * level / 196)
        for _ in range(2):
            controller.observe_latency(now, 0.2 if level > 45 else 0.09)
        levels.append(level)
    return levels


def test_over_a_sharp_knee_r_goes_back_under_the_knee_not_far_below():
    """Over the knee, what the last window measured came from the r above it: fed back alone (with the fast cut), it
    cut r far below the knee (live: from 50-65 to 13-26), and the climb back made a swing whose top made the phase's
    p95. The knee cut takes r back to where the step is 95 % of the step at the window's highest r and lets a window
    measure that before cutting more; the ceiling it leaves creeps up slowly, so r stays under the knee for seconds,
    not one."""
    with_cut, without = _knee_levels(True), _knee_levels(False)
    over = [i for i, level in enumerate(with_cut) if level > 45 and i >= 40]  # after the start (2 s)
    assert over, with_cut
    after = with_cut[over[0]:]
    assert min(after) >= 0.8 * 45, after
    assert sum(1 for level in with_cut[40:] if level > 45) <= 0.05 * len(with_cut[40:])  # seldom over the knee
    assert min(without[over[0]:]) < 0.7 * 45  # the path without it, for comparison


# ---- shedding as a regime (the device past its capacity at the minimum r) ----------------------------------------

KNEE_CPU = SimConfig(fps=10, a=0.0127, b=0.0126, c=0.0228, noise=0.1, overhead_s=0.008, spike_prob=0.05, spike_s=0.08)


def test_steps_at_the_minimum_budget_leave_the_token_cost_as_it_is():
    """Shedding runs steps at the minimum r, a token load near 0. The token cost's floor (a tenth of the mean step
    per mean token load, against fits that make it vanish) was taken per that load and made the cost 3x the
    device's; the load now counts as at least half a dense frame a step."""
    true = (0.0127, 0.0126, 0.0228)

    def step(batch: int, tokens: float) -> float:
        return true[0] + true[1] * batch + true[2] * tokens / 196

    predictions = {}
    for load in (0.5, 0.1):  # as built, and the floor per the load itself
        model = StepCostModel(196, token_floor_load=load)
        model.calibrate([(b, b * r, step(b, b * r)) for b in (1, 8) for r in (24, 98)])
        for _ in range(400):  # 40 s of 8 streams at r = 4
            model.observe(8, 32, step(8, 32))
        predictions[load] = model.predict(4, 4 * 58) / step(4, 4 * 58)  # then 4 streams at r = 58
    assert predictions[0.5] <= 1.2, predictions  # 1.15
    assert predictions[0.1] >= 1.5, predictions  # 1.70: r 18-40 where 58 fit


def test_four_streams_after_eight_at_the_floor_get_their_r_back():
    """The CPU-knee regime: 8 streams saturate at r = 4 (a step over them outlasts the frame period), then 4 streams
    again. Over 8 seeds the second 4-stream phase's mean r was 0.48-1.0 of the best fixed r with the token cost
    inflated by the steps at the floor; now 0.79-1.0, at the same p95."""
    best = largest_fixed_tokens([Phase(0, 4)], 12, TARGET, KNEE_CPU, settle_s=3)
    ratios = []
    for seed in range(8):
        controller = new_controller(TARGET, KNEE_CPU, min_tokens=4)
        trace = simulate(LOAD_STEPS, 40, controller_decider(controller), replace(KNEE_CPU, seed=seed))
        assert trace.p95(30 + STEADY_AFTER_S, 40) <= 1.1 * TARGET, seed
        ratios.append(trace.mean_tokens(30 + STEADY_AFTER_S, 40) / best)
    assert min(ratios) >= 0.75 and statistics.mean(ratios) >= 0.85, ratios


def _budgets_through_a_jump(step_s: float, **overrides) -> tuple[float, float]:
    """8 streams at 10 fps, every step step_s at the minimum r, the p95 at the aim for 3 s (saturated, shedding),
    then 1.5x the target: S just before the jump and 0.3 s into it."""
    config = ControllerConfig(target_s=0.2, num_patches=196, min_tokens=4, **overrides)
    controller = BudgetController(config)
    ids = [f"s{i}" for i in range(8)]
    budgets, now = {}, 0.0
    for k in range(1, 34):
        now = 0.1 * k
        for stream in ids:
            controller.observe_arrival(now, stream)
        controller.observe_step(now, 8, 32, step_s)
        for _ in ids:
            controller.observe_latency(now, 0.194 if k <= 30 else 0.3)
        decision = controller.decide(now, [StreamDemand(i) for i in ids])
        assert decision.saturated
        budgets[k] = decision.step_budget_s
    return budgets[29], budgets[33]


def test_shedding_past_the_device_capacity_is_a_regime_not_a_transient():
    """Where even the minimum r cannot serve every frame (a step over all streams outlasts the frame period), the age
    limit moves the latency about twice as much as S: the fast cut and the full integral gain made a limit cycle
    live (the age limit swinging between 10 and 79 ms, the 1-s p95 between 80 and 180 ms, every 1.5 s; damped,
    109-152 ms). There the loop runs at 0.3 of its gain without the fast cut; in a transient (the minimum r fits the
    period, the latency is late for a while) it still cuts at once. (Off by default: docs/controller.md#ablation.)"""
    before, after = _budgets_through_a_jump(0.12, shed_regime=True)
    assert after >= 0.8 * before, (before, after)  # 0.84 (0.92 with the tail cap too)
    before, after = _budgets_through_a_jump(0.12)  # without it (the default): halved at once
    assert after <= 0.7 * before, (before, after)
    before, after = _budgets_through_a_jump(0.095, shed_regime=True)  # a transient: cut at once
    assert after <= 0.7 * before, (before, after)


def test_the_age_limit_never_drops_the_round_being_served():
    """A slow host (live: a 4-stream step at r = 4 ~80 ms, 8 frames decoded over ~30 ms): at an age limit of 10 ms
    the frames of the round the step serves were dropped but the youngest, steps shrank to one frame, and 10-16 of
    40-80 frames/s were served at a p95 near the target. The limit is kept at 30 % of the frame period or more."""
    sim = SimConfig(fps=10, a=0.06, b=0.006, c=0.06, noise=0.1, overhead_s=0.012, spike_prob=0.05, spike_s=0.08,
                    dense_per_frame=0.03, seed_factor=2.0, aligned=True, batch_window_s=0.005, decode_s=0.008,
                    join_offset_s=0.05)
    served, p95s = {}, {}
    for share in (0.3, 0.1):
        served[share], p95s[share] = [], []
        for seed in range(4):
            controller = new_controller(TARGET, sim, warm=True, min_tokens=4, min_age_share=share)
            trace = simulate([Phase(0, 1), Phase(10, 4), Phase(20, 8)], 30, controller_decider(controller),
                             replace(sim, seed=seed))
            served[share].append(len(trace.window(23, 30)) / 7)
            p95s[share].append(trace.p95(23, 30))
    # over 4 seeds at 8 streams: 29-34 frames/s at 30 %, 15-23 at 10 %, the p95 within a few % of each other
    assert statistics.mean(served[0.3]) >= 1.3 * statistics.mean(served[0.1]), served
    assert statistics.mean(p95s[0.3]) <= 1.05 * statistics.mean(p95s[0.1]), p95s
    assert max(p95s[0.3]) <= 1.1 * TARGET, p95s


def _join_recoveries(monkeypatch, as_before: bool) -> tuple[list[float], list[float]]:
    if as_before:
        monkeypatch.setattr(BudgetController, "_beyond_step_budget", lambda self, count: False)
    recoveries, p95s = [], []
    for seed in range(6):
        controller = new_controller(TARGET, KNEE_CPU, min_tokens=4)
        trace = simulate(LOAD_STEPS, 40, controller_decider(controller), replace(KNEE_CPU, seed=seed))
        recoveries.append(trace.recovery_time(20, 30, TARGET))
        p95s.append(trace.p95(20 + STEADY_AFTER_S, 30))
    monkeypatch.undo()
    return recoveries, p95s


def test_a_join_into_shedding_starts_from_two_steps_not_the_lighter_loads_budget(monkeypatch):
    """4 -> 8 streams on the CPU knee: 8 streams at the minimum r outlast the step budget the 4-stream phase learned,
    so shedding starts, and a frame then waits for about two steps. Starting from the lighter load's budget, the
    feedback took 1.0-1.5 s (10 seeds) to cut it down and the p95 stayed over 1.1x the target that long; starting
    from two steps, 0-1.0 s (mostly 0-0.5), at the same steady p95."""
    now, now_p95 = _join_recoveries(monkeypatch, as_before=False)
    before, before_p95 = _join_recoveries(monkeypatch, as_before=True)
    assert max(now) <= 1.0 and min(before) >= 1.0 and statistics.mean(now) <= 0.5 * statistics.mean(before), (
        now, before)
    assert max(now_p95) <= 1.05 * TARGET and statistics.mean(now_p95) <= 1.03 * statistics.mean(before_p95), (
        now_p95, before_p95)


def test_a_seeding_frame_costs_a_dense_one_in_its_step_and_the_level_held_stays():
    """A joiner's first frame computes every token: in its step the other streams get what fits the step budget
    beside it (live, unannounced seeds made steps of 120-140 ms where 93 were predicted), and the step after, without
    a seed, is back at the level held."""
    controller = new_controller(TARGET, SimConfig(c=0.03), warm=True, min_tokens=4, seed_pricing=True)
    ids = [f"s{i}" for i in range(4)]
    now, plain = 0.0, None
    for _ in range(100):  # steady under 4 streams (S at its start, two steps)
        now += 0.05
        plain = controller.decide(now, [StreamDemand(i) for i in ids])
    seeding = controller.decide(now + 0.05, [StreamDemand(i, seeding=i == "s3") for i in ids])
    after = controller.decide(now + 0.1, [StreamDemand(i) for i in ids])
    assert plain.predicted_step_s <= plain.step_budget_s and plain.level > 60, plain
    assert after.level == plain.level and after.tokens == plain.tokens
    # the seed priced in (a dense frame: 30 ms), the other three cut to fit the same budget
    assert seeding.step_budget_s == plain.step_budget_s
    assert 0.97 * seeding.step_budget_s <= seeding.predicted_step_s <= seeding.step_budget_s, seeding
    assert 4 < seeding.tokens["s0"] < 0.6 * plain.level, seeding
    # unannounced (as before), the same step: over the budget by what the seed costs beyond r (17 ms)
    over = controller.model.predict(4, 3 * plain.level + 196)
    assert over >= plain.step_budget_s + 0.015, over


def _join_recovery(seed_pricing: bool) -> list[float]:
    sim = replace(KNEE_CPU, seeds_per_step=1, seed_factor=1.5)  # as the engine: one seed a step, announced
    recoveries = []
    for seed in range(6):
        controller = new_controller(TARGET, sim, min_tokens=4, seed_pricing=seed_pricing)
        trace = simulate(LOAD_STEPS, 30, controller_decider(controller), replace(sim, seed=seed))
        recoveries.append(max(trace.recovery_time(start, start + 10, TARGET) for start in (10, 20)))
    return recoveries


def test_joiners_seeding_one_a_step_priced_in_shorten_the_recovery():
    """The CPU knee's load steps with joiners seeding one a step, as the engine does: priced in, the p95 was back
    under 1.1x the target within 0-1.0 s of the 1 -> 4 and 4 -> 8 steps (8 seeds; mostly 0.5), unannounced 1.0 s in
    every run."""
    aware, before = _join_recovery(True), _join_recovery(False)
    assert statistics.mean(aware) <= 0.7 * statistics.mean(before) and max(aware) <= 1.0, (aware, before)


# ---- device profiles: auto mode against fixed budgets ----------------------------------------------------------


def test_the_gpu_profile_is_launch_bound_with_strong_batching():
    """The GPU-like profile differs from the CPU where it matters to the controller: a step's launches hide the compute
    of small batches (the step is flat in r there), a stream adds little to a step, the plain dense step is cheaper
    than the eventful one at one stream, and the noise is low."""
    gpu, cpu = PROFILES["gpu"], PROFILES["cpu"]
    assert eventful_step_s(gpu, 1, 4) == eventful_step_s(gpu, 1, 196)  # launch-bound
    assert eventful_step_s(gpu, 8, 8 * 16) == eventful_step_s(gpu, 1, 16)  # 8 streams for the price of one
    assert eventful_step_s(gpu, 8, 8 * 32) < 1.5 * eventful_step_s(gpu, 1, 32)
    assert eventful_step_s(cpu, 8, 8 * 32) > 2 * eventful_step_s(cpu, 1, 32)
    assert gpu.a + gpu.dense_per_frame < eventful_step_s(gpu, 1, 196)
    assert gpu.noise <= 0.25 * cpu.noise


def test_the_cost_model_does_not_ratchet_on_a_launch_bound_device():
    """Steps flat at 15 ms whatever the batch (1-4 streams, one r each): every stream at one r makes the token load
    proportional to the batch, b and c are told apart by the prior alone, and the fit leans to b < 0. Clamping b alone
    kept the rise in c each step brought: c climbed 7x in 5 s (simulated GPU, 8 streams in partial batches) and r fell
    from 25 to 6 while every step took 15 ms. Restored along the covariance, the fit stays on the steps."""
    model = StepCostModel(196)
    model.calibrate(warmup_timings(PROFILES["gpu"])[0])
    for i in range(300):
        batch = 1 + i % 4
        model.observe(batch, batch * 25, 0.015)
    for batch in (1, 4, 8):
        assert model.predict(batch, batch * 25) == pytest.approx(0.015, rel=0.25), (batch, model.theta)


def _auto_and_fixed(scenario: Scenario, seed: int, **overrides) -> list[tuple[int, tuple, list[tuple[int, tuple]]]]:
    """Per steady phase of the scenario: auto mode's (p95 / target, mean r, frames/s), and every fixed r's of the grid
    on the same timeline."""
    sim = scenario.sim_config(seed)
    spans = [(start + STEADY_AFTER_S, end) for _, start, end in scenario.spans()]
    controller = new_controller(scenario.target_s, sim, warm=True, min_tokens=4, **overrides)
    auto = simulate(list(scenario.phases), scenario.duration_s, controller_decider(controller), sim)
    fixed = {r: simulate(list(scenario.phases), scenario.duration_s, fixed_decider(r), sim) for r in FIXED_GRID}
    return [(i, phase_stats(auto, *span, scenario.target_s),
             [(r, phase_stats(trace, *span, scenario.target_s)) for r, trace in fixed.items()])
            for i, span in enumerate(spans)]


def _dominating(rows) -> list[tuple]:
    """Where a fixed r serves more frames/s (by over DOMINANCE_MARGIN: a few frames of a 5-s phase are noise) at a
    p95 no higher (to 1 %) than auto mode: (phase, r, its frames/s and auto's, its p95 and auto's)."""
    return [(i, r, round(f[2]), round(a[2]), round(f[0], 2), round(a[0], 2))
            for i, a, fixed in rows for r, f in fixed if f[2] > (1 + DOMINANCE_MARGIN) * a[2] and f[0] <= 1.01 * a[0]]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_no_fixed_budget_serves_more_frames_at_a_lower_p95_than_auto_mode(profile):
    """Where some fixed r serves more frames at a p95 no higher than auto mode's, auto mode is wrong: live on an H200
    (ViT-L, 8 streams, most of the latency off the device), shedding served 36 of 80 frames/s at a p95 of 127 ms where
    a fixed r = 4 served all at 107. Every steady phase of each profile's load steps and overload, two seeds, against
    fixed budgets from the minimum to the full one on the same timeline."""
    for scenario in [s for s in SCENARIOS if s.profile == profile and s.name in ("steps", "overload")]:
        for seed in range(2):
            assert not _dominating(_auto_and_fixed(scenario, seed)), (scenario.name, seed)


def test_shedding_that_cannot_reach_the_target_is_not_done():
    """The GPU overload: 8 streams whose frames spend most of their latency off the device (decoding on two host
    threads), so no r meets the target. Dropping frames only saves waiting for a step, far less than the p95 is over,
    so auto mode serves every frame at the minimum r; shedding anyway (the path before) serves about 50 of 80
    frames/s at the same p95, dominated by a fixed r = 4."""
    overload = next(s for s in SCENARIOS if s.profile == "gpu" and s.name == "overload")
    for seed in range(2):
        now, before = _auto_and_fixed(overload, seed), _auto_and_fixed(overload, seed, shed_must_pay=False)
        assert not _dominating(now) and now[1][1][2] >= 0.98 * 80, now[1][1]
        assert any(r == 4 for _, r, *_ in _dominating(before)), before[1][1]
