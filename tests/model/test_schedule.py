"""Policies as schedules over frames and tokens, and the adaptive chooser: each against the path it must equal."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter, deque

import pytest
import torch

from bench.fidelity_bench import dense_reference, moving_tokens, run_schedule, skip_at_phase, skip_phases
from model.chooser import AdaptiveConfig, AdaptiveSchedule
from model.macs import dense_macs
from model.schedule import FramePolicy, mac_fraction, policy_for_ratio, sparse_frame_macs
from tests.model.test_eventful import CONFIG, video


def test_skip_serves_the_last_dense_result_again(vit):
    images = video(12)
    dense = dense_reference(vit, images)
    served = run_schedule(vit, images, FramePolicy("skip", interval=3))
    for t in range(12):
        key = 3 * (t // 3)
        assert torch.allclose(served.logits[t], dense.logits[key], atol=1e-4)
        assert torch.allclose(served.features[t], dense.features[key], atol=1e-4)
    assert served.actions == ["dense", "reuse", "reuse"] * 4
    assert served.macs == [dense_macs(CONFIG), 0, 0] * 4  # a reused frame costs nothing


def test_keyframe_policy_at_interval_one_is_dense(vit):
    images = video(8)
    dense = dense_reference(vit, images)
    served = run_schedule(vit, images, FramePolicy("keyframe", interval=1, tokens=4))
    assert served.actions == ["dense"] * 8
    assert torch.allclose(served.logits, dense.logits, atol=1e-4)
    assert torch.allclose(served.features, dense.features, atol=1e-4)


@pytest.mark.parametrize("interval", [1.5, 2.5, 3.0, 4.0])
def test_fractional_intervals_keep_exactly_one_keyframe_per_interval(interval):
    policy = FramePolicy("skip", interval=interval)
    keys = sum(policy.is_keyframe(n) for n in range(120))
    assert keys == math.ceil(120 / interval)


@pytest.mark.parametrize(
    "kind,interval,ratio",
    [("topr", None, 1.2), ("topr", None, 1.4), ("keyframe", 6, 1.5), ("keyframe", 6, 2.0), ("keyframe", 6, 3.0)],
)  # this tiny model's patch embedding alone is a quarter of a dense frame: top-r cannot go far below it
def test_policies_solved_for_a_ratio_spend_it_and_run_at_it(vit, kind, interval, ratio):
    policy = policy_for_ratio(kind, ratio, CONFIG, interval=interval)
    assert policy is not None
    fraction = mac_fraction(policy, CONFIG)
    assert fraction <= 1 / ratio  # never more than asked
    bigger = FramePolicy(policy.kind, interval=policy.interval, tokens=policy.tokens + 1)
    assert mac_fraction(bigger, CONFIG) > 1 / ratio  # the largest budget that fits
    frames = 12
    served = run_schedule(vit, video(frames), policy)
    macs = served.macs[1:] if kind == "topr" else served.macs  # top-r's first frame seeds it densely
    measured = sum(macs) / (len(macs) * dense_macs(CONFIG))
    assert measured == pytest.approx(fraction, rel=1e-6)  # the accounting is the step's own


def test_a_keyframe_interval_at_or_below_the_ratio_is_refused():
    assert policy_for_ratio("keyframe", 3.0, CONFIG, interval=3) is None
    with pytest.raises(ValueError, match="policy must be one of"):
        FramePolicy("sometimes")
    with pytest.raises(ValueError, match="audit_share"):
        AdaptiveConfig(audit_share=0.6)
    with pytest.raises(ValueError, match="explore"):
        AdaptiveConfig(explore="sometimes")


def _adaptive_run(vit, images, ratio=2.0, seed=0, share=0.2, explore="trial"):
    schedule = AdaptiveSchedule(CONFIG, ratio, AdaptiveConfig(audit_share=share, seed=seed, explore=explore))
    return schedule, run_schedule(vit, images, schedule)


@pytest.mark.parametrize("explore", ["trial", "probe"])
def test_the_chooser_is_deterministic_for_a_seed_and_stays_within_its_compute(vit, explore):
    images = video(40)
    a_schedule, a = _adaptive_run(vit, images, explore=explore)
    b_schedule, b = _adaptive_run(vit, images, explore=explore)
    assert a.actions == b.actions and a.macs == b.macs and torch.equal(a.logits, b.logits)
    assert a_schedule.choice_counts() == b_schedule.choice_counts()
    assert a_schedule.measures.q  # it measured keyframe candidates (served on trial, or probed on a copy)
    # audits and shadows included, the stream spends 1/ratio of dense (a forced keyframe aside), give or take the one
    # dense frame measuring may borrow ahead (frame skipping pays it back with a later keyframe)
    assert sum(a.macs) <= (40 / 2.0 + 1) * dense_macs(CONFIG)


def test_a_trial_serves_each_candidate_for_its_cycles_and_measures_it_by_shadows_on_its_keyframes(vit):
    images = video(60)
    schedule, served = _adaptive_run(vit, images, share=0.3)
    assert schedule.probe is None  # no copy of the state ran
    served_policies = set(schedule.choice_counts())
    for candidate in schedule.keyframes:  # each candidate served (sparse frames between its keyframes) ...
        assert candidate.name in served_policies
        # ... until its q samples came: one per shadow, the sparse chain run on a keyframe before it reseeds (one
        # where that first sample already predicted no gain over frame skipping)
        samples = len(schedule.lifetime.q[candidate.interval])
        assert samples >= schedule.config.shadows_per_candidate or samples == 1
    assert "sparse" in served.actions
    probe_schedule, probed = _adaptive_run(vit, images, share=0.3, explore="probe")
    assert probe_schedule.lifetime.q and "sparse" not in probed.actions[:10]  # a probe's sparse steps are unserved
    # on trial every q sample is a shadow: taken on a dense frame, never more frames after the keyframe than the
    # candidate's interval (a probe's chain also meets dense results at ages in between)
    assert all(age <= interval for interval, age in schedule.lifetime.q_age)


def _drive(schedule: AdaptiveSchedule, frames: int, sparse_q: float, seed: int = 0, cuts=()) -> list[str]:
    """Serve a synthetic scene frame by frame as the server does (no model): dense answers wander (an AR(1) walk of
    logits); a sparse answer (served or a shadow) is off from the dense one by sparse_q times the error of reusing its
    keyframe's answer. The input is still but for scene cuts at the frames in `cuts` (a new scene, new answers).
    Returns the policy serving each frame."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(16, generator=gen)
    image = torch.zeros(3, 32, 32)
    seeded = last = dense  # the answer the stream's state was seeded by; the answer served last
    serving = []
    for t in range(frames):
        dense = 0.995 * dense + 0.1 * torch.randn(16, generator=gen)
        if t in cuts:
            image, dense = 1.0 - image, torch.randn(16, generator=gen)
        action, budget = schedule.next_action(image)
        shadow, shadow_macs = None, 0
        if action == "dense" and (shadow_budget := schedule.shadow_budget()) is not None:
            shadow, shadow_macs = dense + sparse_q * (seeded - dense), sparse_frame_macs(CONFIG, shadow_budget.tokens)
        if action == "dense":
            served, macs, seeded = dense, dense_macs(CONFIG), dense
        elif action == "sparse":
            served, macs = dense + sparse_q * (seeded - dense), sparse_frame_macs(CONFIG, budget.tokens)
        else:
            served, macs = last, 0

        def audit(d=dense) -> torch.Tensor:
            nonlocal seeded, last
            seeded = last = d  # an audit reseeds the stream: its dense answer is what reuse serves next
            return d

        last = served
        schedule.after_frame(t, action, served, audit, shadow, shadow_macs, macs)
        serving.append(schedule.policy.name)
    return serving


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trials_of_candidates_that_lose_to_skipping_serve_each_one_cycle_and_end_on_skipping(seed):
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig(audit_share=0.1, explore="trial", seed=seed))
    serving = _drive(schedule, 400, sparse_q=1.5, seed=seed)
    skip = schedule.skip.name
    assert schedule.home == schedule.skip and serving[-100:] == [skip] * 100
    # each candidate is served one cycle: its first sample (the shadow on its next keyframe) predicts no gain, and
    # the next candidate (or skipping) takes over on that keyframe
    trials = [(name, len(list(run))) for name, run in itertools.groupby(serving) if name != skip]
    intervals = {p.name: p.interval for p in schedule.keyframes}
    assert {name for name, _ in trials} == set(intervals)
    assert all(length == intervals[name] for name, length in trials)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_trial_that_measures_a_better_candidate_switches_to_it_within_tens_of_frames(seed):
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig(audit_share=0.1, explore="trial", seed=seed))
    serving = _drive(schedule, 200, sparse_q=0.3, seed=seed)
    assert schedule.home.kind == "keyframe" and schedule.home in schedule.keyframes
    chosen = next(t for t in range(200) if serving[t:] == [schedule.home.name] * (200 - t))
    assert chosen < 100


def test_scene_cuts_do_not_explore_again_candidates_that_lost():
    """Candidates that lost are explored again when the next exploration is due, not at every cut (each trial serves
    a cycle of a worse policy; each probe costs its sparse steps). Cuts still force keyframes."""
    cuts = (60, 120, 180, 240)
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig(audit_share=0.1, explore="trial", seed=1))
    serving = _drive(schedule, 300, sparse_q=1.5, seed=1, cuts=cuts)
    trials = [name for name, _ in itertools.groupby(serving) if name != schedule.skip.name]
    assert sorted(trials) == sorted(p.name for p in schedule.keyframes)  # each one cycle, at the start only
    assert schedule.home == schedule.skip and not schedule.exploring


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cuts_during_an_exploration_do_not_try_again_the_candidates_it_found_hopeless(seed):
    """A hand-held camera's fast pans count as cuts, many of them while the first exploration runs: each cut had
    started the trials again, and the hand-held clip at 224 and 2x served its first candidate on seven cycles (1.07x
    skipping's error against 1.01x for probing). A candidate found hopeless stays out until the next exploration; the
    others are measured afresh on the new scene."""
    cuts = tuple(range(10, 200, 12))  # the first between the first candidate's trial and the second's
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig(audit_share=0.1, explore="trial", seed=seed))
    serving = _drive(schedule, 250, sparse_q=1.5, seed=seed, cuts=cuts)
    trials = [name for name, _ in itertools.groupby(serving) if name != schedule.skip.name]
    assert sorted(trials) == sorted(p.name for p in schedule.keyframes)  # each one cycle
    assert schedule.home == schedule.skip and not schedule.exploring


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_after_a_scene_cut_a_stream_that_chose_a_keyframe_policy_explores_again_at_once(seed):
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig(audit_share=0.1, explore="trial", seed=seed))
    serving = _drive(schedule, 300, sparse_q=0.3, seed=seed, cuts=(150,))
    assert serving[149] in {p.name for p in schedule.keyframes} and serving[150] == schedule.skip.name
    assert schedule.home.kind == "keyframe"
    chosen = next(t for t in range(150, 300) if serving[t:] == [schedule.home.name] * (300 - t))
    assert chosen < 150 + 100


def test_a_stream_serving_a_keyframe_policy_is_audited_and_its_audits_sample_its_q():
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig(audit_share=0.1, explore="trial"))
    serving = _drive(schedule, 600, sparse_q=0.3)
    home = schedule.home
    assert home.kind == "keyframe" and sum(name == home.name for name in serving[-300:]) >= 250
    # its shadows take at most their part of the measuring share, so the rest pays for audits of its sparse frames:
    # enough of them for the estimate to rest on audits alone (not only on the curves' model)
    share = schedule._share()
    assert schedule.shadowing <= schedule.config.shadow_share * share + sparse_frame_macs(CONFIG, home.tokens)
    assert schedule.audits >= schedule.config.audits_for_estimate
    assert schedule.estimate()["source"] == "audits"
    # an audit of a sparse frame is a sample of q at that frame's age (a shadow's is at the full interval)
    assert any(interval == home.interval and age < interval for interval, age in schedule.lifetime.q_age)
    # the audited errors are those of sparse answers: q times the reuse error, not the dense answer's zero
    assert statistics.median(schedule.audit_errors) > 0


def test_an_audit_compares_the_served_answer_with_the_dense_model_on_that_frame(vit):
    images = video(40)
    dense = dense_reference(vit, images)
    schedule, served = _adaptive_run(vit, images, share=0.5)
    assert schedule.audit_errors, "no audit ran"
    # every audit's error is the served answer's distance from the dense model on the same frame
    errors = sorted(
        float((served.logits[t] - dense.logits[t]).norm() / dense.logits[t].norm()) for t in range(40)
    )
    for error in schedule.audit_errors:
        assert min(abs(error - e) for e in errors) < 1e-4


def test_a_scene_cut_forces_a_keyframe(vit):
    images = video(20)
    images[10:] = torch.randn(10, 3, 48, 64, generator=torch.Generator().manual_seed(9))  # a cut at frame 10
    schedule = AdaptiveSchedule(CONFIG, 3.0, AdaptiveConfig(audit_share=0.0))
    served = run_schedule(vit, images, schedule)
    assert served.actions[10] == "dense"


@pytest.mark.parametrize("ratio", [1.5, 2.0, 3.0, 2.5])
def test_an_adaptive_stream_that_measures_nothing_skips_exactly_like_frame_skipping(vit, ratio):
    # no audit share: nothing is measured, so no keyframe candidate is ever tried; frame skipping's keyframes are then
    # paid from the stream's whole compute and fall on the same frames as the fixed policy's
    images = video(30)
    adaptive = run_schedule(vit, images, AdaptiveSchedule(CONFIG, ratio, AdaptiveConfig(audit_share=0.0)))
    skip = run_schedule(vit, images, FramePolicy("skip", interval=ratio))
    assert adaptive.actions == skip.actions and adaptive.macs == skip.macs
    assert torch.equal(adaptive.logits, skip.logits)


def test_an_audit_on_a_skipping_stream_is_paid_back_by_a_later_keyframe(vit):
    images = video(60)
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig(audit_share=0.1, explore_candidates=0, seed=3))
    served = run_schedule(vit, images, schedule)
    assert schedule.audit_errors  # it audited reused frames (each a dense step after the frame was served)
    dense = dense_macs(CONFIG)
    assert sum(served.macs) <= (60 / 2.0 + 1) * dense  # audits included: the stream's compute, within a frame
    assert sum(served.macs) >= (60 / 2.0 - 1) * dense  # and the unspent measuring share served frames
    assert served.actions.count("dense") < 30  # fewer keyframes than frame skipping: the audits took their place


@pytest.mark.parametrize("ratio", [2.0, 1.5, 3.0])
def test_skip_phases_scored_from_the_dense_reference_equal_frame_skipping_run_through_the_model(vit, ratio):
    images = video(13)
    dense = dense_reference(vit, images)
    run = run_schedule(vit, images, FramePolicy("skip", interval=ratio))
    phase0 = skip_at_phase(dense, ratio, 0)  # the pattern the skip policy runs
    assert phase0.actions == run.actions and phase0.macs == run.macs
    assert torch.allclose(phase0.logits, run.logits, atol=1e-4)
    assert torch.allclose(phase0.features, run.features, atol=1e-4)
    periods = {2.0: 2, 1.5: 3, 3.0: 3}
    for shift in range(1, periods[ratio]):  # another phase keeps the compute and moves the keyframes
        other = skip_at_phase(dense, ratio, shift)
        assert other.actions != run.actions and other.actions[0] == "dense"
        assert abs(other.actions.count("dense") - run.actions.count("dense")) <= 1
    phases = skip_phases(dense, moving_tokens(dense), ratio)
    assert phases["phases"] == periods[ratio]
    assert phases["rel_l2_range"][0] <= phases["rel_l2_mean"] <= phases["rel_l2_range"][1]


def test_a_fast_pan_forces_one_keyframe_and_borrows_no_more_than_a_dense_frame(vit):
    images = torch.randn(24, 3, 48, 64, generator=torch.Generator().manual_seed(4))  # every frame a new scene
    schedule = AdaptiveSchedule(CONFIG, 4.0, AdaptiveConfig(audit_share=0.0))
    served = run_schedule(vit, images, schedule)
    dense = dense_macs(CONFIG)
    for t in range(1, 25):  # at every frame, what was spent so far is within one dense frame of the credit
        assert sum(served.macs[:t]) <= (1 + (t - 1) / 4.0 + 1) * dense
    keyframes = [t for t, action in enumerate(served.actions) if action == "dense"]
    assert keyframes[1] == 1  # the first large change is forced
    assert max(b - a for a, b in itertools.pairwise(keyframes)) <= 5  # no frame waits long for a keyframe


def test_the_estimate_counts_each_served_frame_at_the_age_of_the_answer_it_served(vit):
    images = video(30)
    schedule = AdaptiveSchedule(CONFIG, 3.0, AdaptiveConfig(audit_share=0.0))
    served = run_schedule(vit, images, schedule)
    ages, age = Counter(), 0
    for action in served.actions:  # the age of what each frame served: frames since the last dense one
        age = 0 if action == "dense" else age + 1
        ages[(action, age, None)] += 1
    assert schedule.served_log == ages and max(a for _, a, _ in ages) == 2


def test_a_keyframe_candidate_is_predicted_from_q_at_the_ages_its_sparse_frames_serve():
    """keyframe(k)'s predicted error: over its cycle, 0 on the keyframe, then q at each age (the samples there, else
    the candidate's pooled ones) times the reuse error at that age."""
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig())
    candidate = next(p for p in schedule.keyframes if p.interval == 3)
    for age, error in ((1, 0.1), (2, 0.2), (3, 0.3)):
        schedule.measures.reuse[age] = deque([error] * 3)
    schedule.measures.q[3] = deque([0.9, 0.9])  # at age 3 (probe ends, shadows)
    schedule.measures.q_age[(3, 1)] = deque([0.5, 0.5])
    assert schedule.predictions()[candidate.name] == pytest.approx((0.5 * 0.1 + 0.9 * 0.2) / 3)  # age 2: pooled
    schedule.measures.q_age[(3, 2)] = deque([0.8, 0.8])
    assert schedule.predictions()[candidate.name] == pytest.approx((0.5 * 0.1 + 0.8 * 0.2) / 3)
    assert schedule.predictions(upper=True)[candidate.name] == pytest.approx((0.5 * 0.1 + 0.8 * 0.2) / 3)  # no spread


def test_an_age_seen_once_or_twice_does_not_stand_for_itself_in_the_reuse_curve():
    """A pair of identical frames (a still title) gives a reuse error of 0 at its age; taken as that age's mean, every
    frame frame skipping serves at that age would count as exact (an estimate a third of the truth on the scene-cut
    clip at 3x, where skipping's own dense results pair only at multiples of 3). The curve reads such an age from the
    power law fitted to the ages measured often."""
    schedule = AdaptiveSchedule(CONFIG, 3.0, AdaptiveConfig())
    for age, errors in ((3, [0.05] * 40), (6, [0.08] * 40), (2, [0.0])):
        schedule.lifetime.reuse[age] = deque(errors)
        schedule.lifetime.reuse_agree[age] = deque([1.0] * len(errors))
    at_2 = schedule.reuse_curve(2, schedule.lifetime)
    alpha = math.log(0.08 / 0.05) / math.log(2)  # the law through ages 3 and 6
    assert at_2 == pytest.approx(0.05 * (2 / 3) ** alpha)
    schedule.served_log.update({("dense", 0, None): 100, ("reuse", 1, None): 100, ("reuse", 2, None): 100})
    estimate = schedule.estimate()
    assert estimate["rel_l2"] == pytest.approx((schedule.reuse_curve(1, schedule.lifetime) + at_2) / 3)
    # the agreement too: one pair of identical frames at age 2 does not make the frames served there agree
    assert estimate["top1"] == pytest.approx(1.0)
    schedule.lifetime.reuse_agree[6] = deque([0.4] * 40)
    schedule.lifetime.curves.clear()
    agreement = schedule.estimate()["top1"]
    assert agreement < 1.0 and agreement == pytest.approx(
        (1 + schedule._agreement_at(1, schedule.lifetime) + schedule._agreement_at(2, schedule.lifetime)) / 3)
    schedule.lifetime.reuse[2].extend([0.0, 0.0])  # three samples: the age is measured
    schedule.lifetime.curves.clear()
    assert schedule.reuse_curve(2, schedule.lifetime) == 0.0


def test_the_reuse_curve_does_not_fall_with_age():
    """Ages measured on a few audits of one part of the clip (here ages 1 and 3 on a keyframe(4) stream, which pairs
    its keyframes at multiples of 4) are pooled with the neighbours they contradict: before, age 1 read 0.112
    against age 2's 0.100, the keyframe policy's predicted error rose over skipping's, and the stream (the traffic
    clip at 352x640, 2x, trial) went back to skipping for its last 100 frames."""
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig())
    for age, errors in ((1, [0.112] * 3), (2, [0.100] * 100), (3, [0.16] * 3), (4, [0.133] * 90)):
        schedule.measures.reuse[age] = deque(errors)
    curve = [schedule.reuse_curve(a) for a in (1, 2, 3, 4)]
    assert curve == sorted(curve)
    assert curve[0] == curve[1] == pytest.approx((3 * 0.112 + 100 * 0.100) / 103)
    assert curve[2] == curve[3] == pytest.approx((3 * 0.16 + 90 * 0.133) / 93)
    schedule.measures.reuse[1] = deque([0.05] * 3)  # consistent ages stand as measured
    schedule.measures.curves.clear()
    assert schedule.reuse_curve(1) == pytest.approx(0.05) and schedule.reuse_curve(2) == pytest.approx(0.1)


def test_the_estimate_rests_on_audits_once_enough_of_them_audited_frames_not_served_dense():
    """Audits of dense frames are free and exact (error 0): a fair part of the sample, but they say nothing of the
    frames that were not computed, whose error is the whole estimate. Eight of those before the audits alone count."""
    schedule = AdaptiveSchedule(CONFIG, 1.5, AdaptiveConfig())
    for age, error in ((1, 0.05),):
        schedule.lifetime.reuse[age] = deque([error] * 4)
        schedule.lifetime.reuse_agree[age] = deque([1.0] * 4)
    schedule.served_log.update({("dense", 0, None): 20, ("reuse", 1, None): 10})
    dense, served = torch.ones(8), torch.ones(8) * 1.01
    for _ in range(12):
        schedule._record_audit(dense, dense, paid=False)
    for _ in range(7):
        schedule._record_audit(served, dense, paid=True)
    assert schedule.estimate()["source"] == "model"  # 19 audits, 7 of them of frames not served dense
    schedule._record_audit(served, dense, paid=True)
    estimate = schedule.estimate()
    assert estimate["source"] == "audits" and estimate["rel_l2"] == pytest.approx(8 * 0.01 / 20)


def test_the_estimate_keeps_the_q_of_sparse_frames_served_before_an_exploration_cleared_it():
    """A re-exploration forgets the q samples predictions rest on; the frames a keyframe policy served before still
    count at the q measured for them (before, they counted at the whole reuse error: a pessimistic estimate)."""
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig())
    candidate = next(p for p in schedule.keyframes if p.interval == 3)
    for age, error in ((1, 0.1), (2, 0.2)):
        schedule.lifetime.reuse[age] = deque([error] * 4)
        schedule.lifetime.reuse_agree[age] = deque([1.0] * 4)
    for age, q in ((1, 0.3), (1, 0.3), (2, 0.4), (2, 0.4), (3, 0.5), (3, 0.5)):
        schedule._record_q(candidate, age, q, pooled=age == 3)
    schedule.served_log.update({("dense", 0, 3.0): 10, ("sparse", 1, 3.0): 10, ("sparse", 2, 3.0): 10})
    expected = (10 * 0.3 * 0.1 + 10 * 0.4 * 0.2) / 30
    estimate = schedule.estimate()
    assert estimate["rel_l2"] == pytest.approx(expected)
    schedule.measures.q.clear()  # what a re-exploration does
    schedule.measures.q_age.clear()
    assert schedule.estimate() == estimate


def test_the_estimate_reads_q_at_an_age_from_two_samples_there_as_predictions_do():
    """One sample at an age (an audit of a sparse frame) does not stand for that age alone: its spread is unknown,
    and the interval would widen to half the mean either way. Until a second one, the candidate's pooled q counts."""
    schedule = AdaptiveSchedule(CONFIG, 2.0, AdaptiveConfig())
    candidate = next(p for p in schedule.keyframes if p.interval == 3)
    for age, error in ((1, 0.1), (2, 0.2)):
        schedule.lifetime.reuse[age] = deque([error] * 4)
        schedule.lifetime.reuse_agree[age] = deque([1.0] * 4)
    for q in (0.5, 0.52, 0.48, 0.5):
        schedule._record_q(candidate, 3, q, pooled=True)
    schedule.served_log.update({("dense", 0, 3.0): 10, ("sparse", 1, 3.0): 10, ("sparse", 2, 3.0): 10})
    before = schedule.estimate()
    schedule._record_q(candidate, 1, 0.9, pooled=False)
    assert schedule.estimate() == before
    schedule._record_q(candidate, 1, 0.9, pooled=False)
    assert schedule.estimate()["rel_l2"] == pytest.approx((10 * 0.9 * 0.1 + 10 * 0.5 * 0.2) / 30)
