"""Engine parts on their own: scheduler, budget policy, registry, decode, and the runner batched vs alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.policy import StreamBudget
from server.engine import BudgetError, BudgetPolicy, GlobalBudget, ModelRunner, StreamOverride, StreamRefused
from server.engine.decode import FrameLimits, FrameRejected, decode_image
from server.engine.planner import PlannedFrame, StepPlan
from server.engine.registry import StreamRegistry
from server.engine.scheduler import PendingFrame, Scheduler
from tests.server.conftest import encode, frames, png_header_only


def pending(stream: str, frame: int, queued_at: float, session: int = 1) -> PendingFrame:
    return PendingFrame(stream, session, frame, torch.zeros(3, 4, 4), (4, 4), queued_at, queued_at, 0.0)


# ---- scheduler -------------------------------------------------------------------------------


def test_latest_frame_wins_per_stream():
    scheduler = Scheduler(max_batch_size=4, batch_window_s=0.0)
    assert scheduler.put(pending("a", 0, 1.0)) is None
    superseded = scheduler.put(pending("a", 1, 1.1))
    assert superseded.frame == 0
    assert scheduler.put(pending("a", 0, 1.2)).frame == 0  # an older frame arriving late is the one dropped
    assert [f.frame for f in scheduler.next_batch(2.0)] == [1]
    assert scheduler.next_batch(2.0) is None


def test_batching_window_waits_for_frames_on_their_way_then_goes():
    scheduler = Scheduler(max_batch_size=8, batch_window_s=0.010)
    scheduler.put(pending("a", 0, 1.000))
    wait = scheduler.next_batch(1.004, incoming=2)
    assert wait == pytest.approx(0.006)  # 2 streams are decoding a frame: wait the rest of the window for them
    scheduler.put(pending("b", 0, 1.005))
    assert isinstance(scheduler.next_batch(1.006, incoming=1), float)
    scheduler.put(pending("c", 0, 1.007))
    batch = scheduler.next_batch(1.007, incoming=0)  # nothing more on its way: go before the window ends
    assert [f.stream_id for f in batch] == ["a", "b", "c"]
    scheduler.put(pending("a", 1, 2.000))
    assert [f.stream_id for f in scheduler.next_batch(2.011, incoming=2)] == ["a"]  # window over: go alone
    scheduler.put(pending("a", 2, 3.000))
    assert [f.stream_id for f in scheduler.next_batch(3.000, incoming=0)] == ["a"]  # idle streams: no waiting


def test_batches_are_bounded_and_oldest_first():
    scheduler = Scheduler(max_batch_size=2, batch_window_s=1.0)
    for i, stream in enumerate(["c", "a", "b"]):
        scheduler.put(pending(stream, 0, 1.0 + i))
    assert [f.stream_id for f in scheduler.next_batch(5.0, incoming=3)] == ["c", "a"]
    assert [f.stream_id for f in scheduler.next_batch(5.0)] == ["b"]



def test_streams_served_longest_ago_go_first_and_max_batch_limits():
    scheduler = Scheduler(max_batch_size=4, batch_window_s=0.0)
    for stream in "abc":
        scheduler.put(pending(stream, 0, 1.0))
    assert [f.stream_id for f in scheduler.next_batch(2.0, max_batch=2)] == ["a", "b"]
    for stream in "ab":
        scheduler.put(pending(stream, 1, 2.5))  # a and b have newer frames than c's, but c has waited its turn
    assert [f.stream_id for f in scheduler.next_batch(3.0, max_batch=2)] == ["c", "a"]
    assert [f.stream_id for f in scheduler.next_batch(3.0, max_batch=2)] == ["b"]


def test_a_frame_offered_but_not_taken_goes_first_in_the_next_batch():
    """The planner takes what it runs; a frame it holds back stays ready and goes first next time."""
    scheduler = Scheduler(max_batch_size=2, batch_window_s=0.0)
    for i, stream in enumerate("abc"):
        scheduler.put(pending(stream, 0, 1.0 + i))
    offered = scheduler.next_batch(5.0, take=False)
    assert [f.stream_id for f in offered] == ["a", "b"]
    scheduler.take(offered[:1], 5.0)  # b was offered but held back
    assert scheduler.is_ready("b") and not scheduler.is_ready("a")
    assert [f.stream_id for f in scheduler.next_batch(6.0)] == ["b", "c"]


def test_expire_takes_out_frames_received_too_long_ago():
    scheduler = Scheduler(max_batch_size=4, batch_window_s=0.0)
    scheduler.put(pending("old", 0, 1.0))
    scheduler.put(pending("new", 0, 2.0))
    assert [f.stream_id for f in scheduler.expire(1.5)] == ["old"]
    assert [f.stream_id for f in scheduler.next_batch(3.0)] == ["new"]

# ---- budget policy ---------------------------------------------------------------------------


def test_budget_policy_resolution():
    policy = BudgetPolicy(196, GlobalBudget("fixed", tokens=50))
    assert policy.resolve("x").tokens == 50
    policy.set_override("x", StreamOverride(fraction=0.5))
    assert (policy.resolve("x").tokens, policy.resolve("x").source) == (98, "override")
    policy.set_override("x", StreamOverride(max_tokens=20))
    assert (policy.resolve("x").tokens, policy.resolve("x").source) == (20, "cap")
    policy.set_global(GlobalBudget("fixed", fraction=0.05))
    assert policy.resolve("x").tokens == 10 and policy.resolve("x").source == "global"
    policy.set_global(GlobalBudget("auto", target_latency_ms=30, min_tokens=12))
    assert policy.get_global() == (GlobalBudget("auto", target_latency_ms=30, min_tokens=12), 12)  # within range
    policy.set_auto(40, {"x": 20, "y": 33})  # the controller's decision: the capped stream got its cap
    assert (policy.resolve("x").tokens, policy.resolve("x").source) == (20, "cap")
    assert (policy.resolve("y").tokens, policy.resolve("y").source) == (33, "global")
    assert (policy.resolve("new").tokens, policy.resolve("new").source) == (40, "global")
    assert policy.terms("x") == (None, 20) and policy.terms("y") == (None, None)
    assert policy.clear_override("x") and not policy.clear_override("x")
    with pytest.raises(BudgetError) as err:
        policy.set_global(GlobalBudget("fixed", tokens=197))
    assert err.value.field == "tokens"
    with pytest.raises(BudgetError):
        policy.set_override("y", StreamOverride(tokens=1, max_tokens=2))


# ---- registry --------------------------------------------------------------------------------


def test_registry_limits_ttl_and_eviction():
    registry = StreamRegistry(max_streams=2, ttl_s=5.0)
    _, a = registry.open("a", print)
    registry.open("b", print)
    with pytest.raises(StreamRefused) as refused:
        registry.open("c", print)
    assert refused.value.code == 1013 and refused.value.kind == "max_streams"
    with pytest.raises(StreamRefused) as in_use:
        registry.open("b", print)
    assert in_use.value.kind == "in_use"
    registry.close(a, now=10.0)
    assert registry.connected_count == 1 and registry.retained_count == 1
    record, _ = registry.open("a", print)  # resumed: same record
    assert record is registry.records["a"] and record.connected
    registry.close(record.session, now=10.0)
    assert registry.reap(now=14.0) == [] and registry.reap(now=15.0) == ["a"]


def test_registry_holds_at_most_max_streams_states_connected_first():
    """Retained states only use free stream slots: 300 distinct ids keep max_streams records, the newest; streams
    that connect push the oldest retained out, and a retained stream resumes without pushing any out."""
    registry = StreamRegistry(max_streams=4, ttl_s=60.0)
    for i in range(300):
        _, session = registry.open(f"s{i}", print)
        registry.close(session, now=float(i))
        assert len(registry.records) <= 4
    assert sorted(registry.records) == ["s296", "s297", "s298", "s299"] and registry.retained_count == 4
    registry.open("c0", print)
    registry.open("c1", print)
    assert sorted(registry.records) == ["c0", "c1", "s298", "s299"]
    resumed, _ = registry.open("s298", print)
    assert resumed.connected and sorted(registry.records) == ["c0", "c1", "s298", "s299"]
    registry.open("c2", print)
    assert sorted(registry.records) == ["c0", "c1", "c2", "s298"] and registry.retained_count == 0


# ---- decode ----------------------------------------------------------------------------------


def test_decode_png_exact_and_limits():
    frame = frames(1, 40, 50)[0]
    assert (decode_image(encode(frame), FrameLimits()) == frame).all()
    assert decode_image(encode(frame, "JPEG"), FrameLimits()).shape == (40, 50, 3)
    with pytest.raises(FrameRejected) as too_wide:
        decode_image(encode(frame), FrameLimits(max_width=49))
    assert too_wide.value.code == "image_too_large"
    with pytest.raises(FrameRejected) as too_many:
        decode_image(encode(frame), FrameLimits(max_pixels=40 * 50 - 1))
    assert too_many.value.code == "image_too_large"
    with pytest.raises(FrameRejected) as gif:
        decode_image(encode(frame, "GIF"), FrameLimits())
    assert gif.value.code == "undecodable"


def test_a_corrupt_png_header_is_undecodable_and_a_valid_large_one_too_large():
    """The PNG size is read from the IHDR chunk before Pillow sees the data: only from a chunk whose CRC holds."""
    signature = b"\x89PNG\r\n\x1a\n"
    rng = np.random.default_rng(0)
    corrupt = [signature + rng.bytes(int(n)) for n in rng.integers(0, 300, 20)]
    huge = png_header_only(20_000, 20_000)
    bad_crc = huge[:29] + bytes([huge[29] ^ 1]) + huge[30:]
    over_spec = png_header_only(2**31, 1)  # a valid CRC, but PNG dimensions stop at 2^31 - 1
    for data in [*corrupt, bad_crc, over_spec, signature, huge[:32]]:
        with pytest.raises(FrameRejected) as rejected:
            decode_image(data, FrameLimits())
        assert rejected.value.code == "undecodable", rejected.value.message
    with pytest.raises(FrameRejected) as too_large:
        decode_image(huge, FrameLimits())
    assert too_large.value.code == "image_too_large"


def test_frames_past_the_aspect_ratio_limit_are_refused_from_the_header():
    """A 4096x1 PNG is tiny, but a short-side resize to 256 would make it 256x1048576: refused before decoding."""
    strip = encode(np.zeros((1, 4096, 3), np.uint8))
    assert len(strip) < 200
    for data in [strip, png_header_only(1, 4096), png_header_only(90, 10), encode(np.zeros((10, 90, 3), np.uint8))]:
        with pytest.raises(FrameRejected) as rejected:
            decode_image(data, FrameLimits())
        assert rejected.value.code == "bad_aspect_ratio", rejected.value.message
    assert decode_image(encode(np.zeros((10, 80, 3), np.uint8)), FrameLimits()).shape == (10, 80, 3)  # 8:1 is in
    assert decode_image(strip, FrameLimits(max_aspect_ratio=4096)).shape == (1, 4096, 3)


# ---- runner: a stream inside a batch equals the same stream alone ---------------------------


def test_two_streams_batched_equal_each_alone(tiny_model):
    runner = ModelRunner(tiny_model, top_k=10)
    videos = [frames(5, seed=1), frames(5, seed=2)]
    images = [[runner.prepare(encode(f)).image for f in video] for video in videos]
    budgets = [StreamBudget(tokens=3), StreamBudget(tokens=7)]  # different budgets inside one step
    batched_states = [runner.new_state(), runner.new_state()]
    alone_states = [runner.new_state(), runner.new_state()]

    def planned(i: int, t: int, states) -> PlannedFrame:
        return PlannedFrame(f"s{i}", t, images[i][t], states[i], budgets[i], flush=False, seed=t == 0)

    for t in range(5):
        batched = runner.execute(StepPlan([planned(0, t, batched_states), planned(1, t, batched_states)]))
        for i in range(2):
            alone = runner.execute(StepPlan([planned(i, t, alone_states)]))
            got, want = batched.outputs[i], alone.outputs[0]
            assert (got.budget_tokens, got.dense, got.macs) == (want.budget_tokens, want.dense, want.macs)
            assert got.updated_fraction == pytest.approx(want.updated_fraction)
            assert [e["index"] for e in got.outputs["top"]] == [e["index"] for e in want.outputs["top"]]
            assert [e["score"] for e in got.outputs["top"]] == pytest.approx(
                [e["score"] for e in want.outputs["top"]], abs=1e-6
            )
    assert batched.outputs[0].budget_tokens == 3 and batched.outputs[1].budget_tokens == 7


def test_runner_matches_the_model_called_directly(tiny_model):
    """At full budget the served top-k are the dense model's softmax."""
    runner = ModelRunner(tiny_model, top_k=10)
    state = runner.new_state()
    for frame in frames(3):
        image = runner.prepare(encode(frame)).image
        out = runner.execute(StepPlan([PlannedFrame("s", 0, image, state, StreamBudget(tokens=16), False)]))
        probs = tiny_model(image[None]).softmax(-1)[0]
        for entry in out.outputs[0].outputs["top"]:
            assert entry["score"] == pytest.approx(probs[entry["index"]].item(), abs=1e-5)


def test_warmup_times_sparse_steps_per_batch_size_and_leaves_the_model_as_it_was(tiny_model):
    """The controller's first figures: sparse steps at an eighth and half the tokens, and a plain dense step, at
    each batch size warmed; the states are thrown away, so serving after it is as without it."""
    runner = ModelRunner(tiny_model, top_k=10)
    n = runner.num_patches
    timings = runner.warmup((1, 3))
    assert set(timings.dense_s) == {1, 3} and all(s > 0 for s in timings.dense_s.values())
    assert sorted((b, t) for b, t, _ in timings.eventful) == [(1, n // 8), (1, n // 2), (3, 3 * (n // 8)),
                                                             (3, 3 * (n // 2))]
    assert all(s > 0 for *_, s in timings.eventful)
    state = runner.new_state()
    image = runner.prepare(encode(frames(1)[0])).image
    out = runner.execute(StepPlan([PlannedFrame("s", 0, image, state, StreamBudget(tokens=4), False, seed=True)]))
    probs = tiny_model(image[None]).softmax(-1)[0]  # a stream's first frame seeds: the model's own answer
    for entry in out.outputs[0].outputs["top"]:
        assert entry["score"] == pytest.approx(probs[entry["index"]].item(), abs=1e-5)


def test_the_runner_seeds_the_frames_the_plan_says_and_no_others(tiny_model):
    runner = ModelRunner(tiny_model)
    state = runner.new_state()
    image = runner.prepare(encode(frames(1)[0])).image
    plan = lambda flush, seed: StepPlan([  # noqa: E731
        PlannedFrame("s", 0, image, state, StreamBudget(tokens=2), flush, seed=seed)])
    with pytest.raises(ValueError, match="not seeded"):  # a first frame the plan does not seed
        runner.execute(plan(False, False))
    assert runner.execute(plan(False, True)).outputs[0].dense
    assert not runner.execute(plan(False, False)).outputs[0].dense
    again = runner.execute(plan(False, True)).outputs[0]  # a keyframe on a seeded state
    assert again.dense and again.budget_tokens == 16
    flushed = runner.execute(plan(True, True)).outputs[0]
    assert flushed.dense and flushed.budget_tokens == 16


def test_start_up_compiles_each_step_kind_at_one_and_two_streams(tiny_model):
    """Compiled steps have dynamic sizes: warming one and two streams of each kind covers every batch and width;
    eager steps warm nothing."""
    from model.eventful import EventfulConfig, StepShape

    assert ModelRunner(tiny_model).step_shapes(8) == []
    runner = ModelRunner(tiny_model, EventfulConfig(execution="compile"))
    n, prefix = tiny_model.config.num_tokens, tiny_model.config.num_prefix_tokens
    shapes = runner.step_shapes(8)
    assert {(s.batch, s.kind) for s in shapes} == {(b, k) for b in (1, 2) for k in ("plain", "seed", "sparse")}
    assert StepShape(1, n, "seed") in shapes and StepShape(2, prefix + 8, "sparse") in shapes
    assert {s.batch for s in runner.step_shapes(1)} == {1}
