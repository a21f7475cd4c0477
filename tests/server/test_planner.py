"""The planner's rules, one round at a time (no threads, no model): seeds, held frames, plain dense steps, refresh,
new frame sizes, frame policies, and the controller's decision in auto mode."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from model.config import ViTConfig
from model.fidelity import LogitFidelity
from server.engine.budget import BudgetPolicy, GlobalBudget, StreamOverride
from server.engine.controller import Decision
from server.engine.frame_policy import StreamPolicySpec
from server.engine.planner import Planner
from server.engine.registry import StreamRecord
from server.engine.scheduler import PendingFrame

CONFIG = ViTConfig(image_size=(32, 32), patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=4)


@dataclass
class FakeState:
    needs_dense: bool = True
    frames_since_dense: int = 0
    nbytes: int = 100


class FakeRunner:
    num_patches = CONFIG.num_patches  # 16
    dense_first_frame = True
    plain_dense = True
    fidelity = LogitFidelity()
    rlt_tau = None
    config = CONFIG

    def new_state(self) -> FakeState:
        return FakeState()


def offer(streams: list[str], frame: int = 0, size=(32, 32)) -> list[PendingFrame]:
    return [PendingFrame(s, 1, frame, torch.zeros(3, 32, 32), size, 0.0, 0.0, 0.0) for s in streams]


def step(planner: Planner, records: dict[str, StreamRecord], frames: list[PendingFrame]):
    """One round; then what the runner does to the states (seeded frames seeded, plain steps flush)."""
    for f in frames:
        records.setdefault(f.stream_id, StreamRecord(f.stream_id))
    out = planner.plan([(f, records[f.stream_id]) for f in frames])
    for planned in out.plan.frames:
        if out.plan.plain_dense:
            planned.state.needs_dense = True
        elif planned.seed:
            planned.state.needs_dense, planned.state.frames_since_dense = False, 0
        else:
            planned.state.frames_since_dense += 1
    return out


def planner(tokens: int = 4, **kw) -> Planner:
    return Planner(FakeRunner(), BudgetPolicy(16, GlobalBudget("fixed", tokens=tokens)), **kw)


def test_joiners_seed_one_a_round_and_the_others_wait_untaken():
    p, records = planner(), {}
    first = step(p, records, offer(["a", "b", "c"]))
    assert [f.stream_id for f in first.plan.frames] == ["a"] and first.plan.frames[0].seed
    assert [f.stream_id for f in first.held] == ["b", "c"] and [f.stream_id for f in first.taken] == ["a"]
    second = step(p, records, offer(["b", "c", "a"], 1))
    assert [(f.stream_id, f.seed) for f in second.plan.frames] == [("b", True), ("a", False)]
    assert second.plan.seeds == 1 and [f.stream_id for f in second.held] == ["c"]
    assert second.plan.frames[1].budget.tokens == 4


def test_seeds_per_step_is_honoured():
    p, records = planner(seeds_per_step=2), {}
    assert step(p, records, offer(["a", "b", "c"])).plan.seeds == 2


def test_every_budget_full_runs_the_plain_dense_model_and_seeds_nothing():
    p, records = planner(tokens=16), {}
    out = step(p, records, offer(["a", "b", "c"]))
    assert out.plan.plain_dense and out.plan.seeds == 0 and len(out.plan.frames) == 3 and not out.held
    p.policy.set_global(GlobalBudget("fixed", tokens=4))  # back to sparse: each stream reseeds, one a round
    out = step(p, records, offer(["a", "b", "c"], 1))
    assert not out.plan.plain_dense and [f.stream_id for f in out.plan.frames] == ["a"] and out.plan.seeds == 1


def test_an_override_at_full_budget_beside_sparse_streams_is_not_a_plain_step():
    p, records = planner(), {}
    p.policy.set_override("a", StreamOverride(tokens=16))
    step(p, records, offer(["a"]))
    step(p, records, offer(["b"]))
    out = step(p, records, offer(["a", "b"], 1))
    assert not out.plan.plain_dense and [f.budget.tokens for f in out.plan.frames] == [16, 4]


def test_refresh_and_a_new_frame_size_seed():
    p, records = planner(refresh_interval=3), {}
    seeds = [step(p, records, offer(["a"], t)).plan.frames[0].seed for t in range(7)]
    assert seeds == [True, False, False, True, False, False, True]
    out = step(p, records, offer(["a"], 7, size=(48, 64)))
    assert out.plan.frames[0].flush and out.plan.frames[0].seed


def test_a_skipping_stream_reuses_between_its_dense_frames_unheld():
    policies = {"a": StreamPolicySpec("skip", interval=2)}
    p, records = planner(stream_policy=policies.get), {}
    step(p, records, offer(["b"]))  # b seeded first
    out = step(p, records, offer(["a", "b"], 1))  # a's dense frame is a seed that is not held back
    assert [(f.stream_id, f.seed) for f in out.plan.frames] == [("a", True), ("b", False)]
    records["a"].last_result = ({}, None)
    out = step(p, records, offer(["a", "b"], 2))
    assert [f.stream_id for f, _ in out.reused] == ["a"] and [f.stream_id for f in out.plan.frames] == ["b"]
    assert {f.stream_id for f in out.taken} == {"a", "b"}


def test_auto_mode_asks_the_controller_with_the_seeding_streams_marked():
    asked = []

    def decide(now, demands):
        asked.append([(d.stream_id, d.seeding, d.fixed_tokens) for d in demands])
        return Decision({"a": 9}, 5, 0.0, 0.0, None, False, None)

    p, records = planner(decide=decide), {}
    p.policy.set_global(GlobalBudget("auto", target_latency_ms=100))
    p.policy.set_override("c", StreamOverride(tokens=7))
    frames = offer(["a", "b"])
    for f in frames:
        records[f.stream_id] = StreamRecord(f.stream_id)
    decision = p.decide_budgets(1.0, [(f, records[f.stream_id]) for f in frames], expected=["c"])
    assert decision.level == 5 and asked == [[("a", True, None), ("b", False, None), ("c", False, 7)]]
    out = step(p, records, frames)
    assert [f.budget.tokens for f in out.plan.frames] == [9]  # a seeds (its budget is what it would have had)
    assert p.policy.resolve("b").tokens == 5


def test_fixed_mode_does_not_ask():
    p = planner(decide=lambda now, demands: pytest.fail("asked in fixed mode"))
    assert p.decide_budgets(0.0, [], []) is None


def test_a_round_lets_closed_connections_go_and_sheds_old_frames_but_the_youngest():
    from server.engine.registry import Session

    p, records = planner(), {}
    frames = [PendingFrame(s, 1, 0, torch.zeros(3, 32, 32), (32, 32), t, t, 0.0)
              for s, t in (("a", 1.00), ("b", 1.05), ("c", 1.09), ("d", 1.10))]
    for f in frames:
        records[f.stream_id] = StreamRecord(f.stream_id, session=Session(1, f.stream_id, lambda m: None))
    records["d"].session = Session(2, "d", lambda m: None)  # d reconnected: its queued frame is of the old session
    offered = [(f, records[f.stream_id]) for f in frames]
    out = p.round(offered, now=1.12, max_age_s=0.05)
    assert [f.stream_id for f in out.gone] == ["d"] and [f.stream_id for f in out.late] == ["a", "b"]
    assert [f.stream_id for f in out.plan.frames] == ["c"]
    assert {f.stream_id for f in out.taken} == {"a", "b", "c", "d"}
    everything_old = p.round(offered[:3], now=5.0, max_age_s=0.05)  # all too old: the youngest is still served
    assert [f.stream_id for f in everything_old.late] == ["a", "b"]
    assert [f.stream_id for f in everything_old.plan.frames] == ["c"]
    assert p.round(offered[:3], now=5.0).late == []  # not shedding: nothing is dropped


def test_the_plan_says_which_frames_are_audited_and_those_are_the_ones_audited():
    """An adaptive stream's audits (drawn at plan time from its measuring credit) are named in the round, and after
    the frame is served exactly those call for the dense model."""
    policies = {"a": StreamPolicySpec("adaptive", ratio=2.0, audit_share=0.5)}
    p, records = planner(stream_policy=policies.get), {}
    audited, called = [], []
    gen = torch.Generator().manual_seed(0)
    for t in range(60):
        frame = PendingFrame("a", 1, t, torch.rand(3, 32, 32, generator=gen), (32, 32), 0.0, 0.0, 0.0)
        out = step(p, records, [frame])
        record = records["a"]
        fp_audit = "a" in out.audited
        audited.append(fp_audit)
        action = "reuse" if out.reused else ("dense" if out.plan.frames[0].seed else "sparse")
        logits = torch.randn(4, generator=gen)
        record.last_result = ({}, logits)
        calls = []

        def dense(calls=calls):
            calls.append(1)
            return torch.randn(4, generator=gen)

        record.schedule.after(action, logits, dense, None, 100, 0)
        called.append(bool(calls) or (fp_audit and action == "dense"))
    assert any(audited) and audited == called
