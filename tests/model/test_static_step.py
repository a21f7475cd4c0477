"""The fixed-shape step: the state pool, shape buckets, padding rows, and a step that compiles into one graph."""

from __future__ import annotations

import pytest
import torch

from model.config import ViTConfig
from model.eventful import (
    INT64_MAX,
    EventfulConfig,
    EventfulViT,
    StepShape,
    _counted_topk,
    batch_bucket,
    token_bucket,
)
from model.policy import StreamBudget
from model.pool import StatePool
from model.vit import VisionTransformer
from tests.model.test_eventful import CONFIG, video

LEVELS = ["tokenwise", "qk", "full"]


@pytest.fixture()
def bucketed(monkeypatch):
    """Eager kernels with the bucketed shapes of the compiled and captured executions (fast to test)."""
    monkeypatch.setattr(EventfulViT, "bucketed", property(lambda self: True))


def test_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]
    assert token_bucket(98, 196) == 104 and token_bucket(64, 196) == 64 and token_bucket(0, 196) == 0
    assert token_bucket(195, 196) == 196 and token_bucket(500, 196) == 196
    previous = 0
    for r in range(1, 1025):
        bucket = token_bucket(r, 4096)
        assert bucket >= r and bucket >= previous
        assert bucket - r < max(4, r / 8 + 1)  # padding wastes at most an eighth (4 tokens below 32)
        previous = bucket
    assert len({token_bucket(r, 4096) for r in range(65, 129)}) == 8  # eight buckets an octave


def test_pool_slots_grow_release_and_clone():
    pool = StatePool(CONFIG, "tokenwise", slots=2)
    a, b = pool.acquire(), pool.acquire()
    pool.layers[0]["qkv_reference"][a].fill_(1.0)
    pool.layers[0]["qkv_reference"][b].fill_(2.0)
    c = pool.acquire()  # the pool doubles, every slot copied
    assert (pool.capacity, pool.generation, c) == (4, 1, 2)
    assert pool.layers[0]["qkv_reference"][a].eq(1.0).all() and pool.layers[0]["qkv_reference"][b].eq(2.0).all()
    pool.release(a)
    assert pool.acquire() == a  # the lowest free slot
    with pytest.raises(ValueError, match="not in use"):
        pool.release(3)
    assert pool.nbytes == pool.bytes_per_slot * 5


def test_clone_is_independent_and_released_slots_are_reused(vit):
    runner = EventfulViT(vit, slots=2)
    frames = video()
    state = runner.new_state()
    runner.step(frames[:1], [state], [StreamBudget(tokens=8)])
    copy = state.clone()
    assert copy.slot != state.slot
    assert torch.equal(copy.layers[1].keys, state.layers[1].keys)
    runner.step(frames[1:2], [copy], [StreamBudget(tokens=8)])
    again = runner.step(frames[1:2], [state], [StreamBudget(tokens=8)])
    copied = runner.step(frames[2:3], [copy], [StreamBudget(tokens=8)])
    assert not torch.equal(copy.layers[1].keys, state.layers[1].keys)
    assert (runner.step(frames[2:3], [state], [StreamBudget(tokens=8)]).logits - copied.logits).abs().max() <= 1e-6
    assert again.logits.shape == (1, CONFIG.num_classes)
    slot = copy.slot
    copy.release()
    assert runner.new_state().slot == slot
    with pytest.raises(ValueError, match="one pool"):
        runner.step(frames[:1], [copy], [StreamBudget(tokens=8)])


def test_dropped_states_give_their_slots_back(vit):
    runner = EventfulViT(vit, slots=2)
    for _ in range(10):
        runner.step(video()[:1], [runner.new_state()], [StreamBudget(tokens=8)])
    assert runner.pool.capacity == 2 and runner.pool.in_use == 0


@pytest.mark.parametrize("level", LEVELS)
def test_a_stream_alone_equals_the_same_stream_in_every_padded_bucket(vit, level, bucketed):
    """Batches of 1-5 streams (padded to 1, 2, 4, 8 rows) with mixed top-r, threshold and capped budgets."""
    runner = EventfulViT(vit, EventfulConfig(level=level))
    budgets = [StreamBudget(tokens=5), StreamBudget(tokens=21), StreamBudget(threshold=0.3),
               StreamBudget(threshold=0.2, tokens=9), StreamBudget(tokens=13)]
    streams = [video(seed=20 + j) for j in range(len(budgets))]
    alone = [runner.new_state() for _ in budgets]
    for size in (1, 2, 3, 5):
        batched = [runner.new_state() for _ in range(size)]
        reference = [runner.new_state() for _ in range(size)]
        for t in range(5):
            images = torch.stack([streams[j][t] for j in range(size)])
            out = runner.step(images, batched, budgets[:size])
            for j in range(size):
                one = runner.step(images[j : j + 1], [reference[j]], [budgets[j]])
                assert (out.logits[j] - one.logits[0]).abs().max() <= 1e-5, (size, t, j)
                assert torch.equal(out.updated_tokens[j], one.updated_tokens[0])
                assert out.macs[j] == one.macs[0]
    assert runner.step(streams[0][:1], [alone[0]], [budgets[0]]).logits.shape[0] == 1


def test_padding_rows_write_only_the_scratch_slot(vit, bucketed):
    runner = EventfulViT(vit)
    states = [runner.new_state() for _ in range(3)]
    idle = runner.new_state()  # a slot no step touches
    frames = video()
    before = {name: t[idle.slot].clone() for name, t in runner.pool.layers[1].items()}
    for t in range(4):
        runner.step(torch.stack([frames[t]] * 3), states, [StreamBudget(tokens=7)] * 3)  # 3 streams -> 4 rows
    for name, tensor in runner.pool.layers[1].items():
        assert torch.equal(tensor[idle.slot], before[name]), name


def _trace(fn, *args):
    """fn compiled whole by dynamo (fullgraph: a graph break, a host sync or a data-dependent shape raises)."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False, backend="eager")(*args)


@pytest.mark.parametrize("gate_rank", ["topk", "count"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_every_step_kind_compiles_into_one_graph(vit, level, rows, gate_rank):
    """No graph break in any bucket of the sparse, seeding and plain steps, and the traced step computes what the
    eager one does (on copies of the same pool), whichever way its gates rank."""
    runner = EventfulViT(vit, EventfulConfig(level=level, gate_rank=gate_rank), slots=rows)
    pool = runner.pool
    states = [runner.new_state() for _ in range(rows)]
    images = torch.stack([video(seed=40 + j)[0] for j in range(rows)])
    runner.step(images, states, [StreamBudget(tokens=4)] * rows)  # seeded
    slots = torch.tensor([s.slot for s in states])
    width = CONFIG.num_prefix_tokens + token_bucket(9, CONFIG.num_patches)
    limits = torch.full((rows, width), INT64_MAX)
    limits[:, : CONFIG.num_prefix_tokens] = -(2**63)
    limits[0, : width - 2] = -(2**63)  # row 0: r = 7 of 12; the others r = 3
    limits[1:, CONFIG.num_prefix_tokens : CONFIG.num_prefix_tokens + 3] = -(2**63)
    frame = torch.stack([video(seed=40 + j)[1] for j in range(rows)])
    for kind, fn in (("sparse", runner._sparse_step), ("seed", runner._seed_step), ("plain", runner._plain_step)):
        eager_layers = [{k: t.clone() for k, t in layer.items()} for layer in pool.layers]
        traced_layers = [{k: t.clone() for k, t in layer.items()} for layer in pool.layers]
        with torch.inference_mode():
            expected = fn(frame, slots, limits, eager_layers)
            traced = _trace(fn, frame, slots, limits, traced_layers)
        assert (expected[1] - traced[1]).abs().max() <= 1e-5, kind
        for a, b in zip(eager_layers, traced_layers, strict=True):
            for name in a:
                assert (a[name] - b[name]).abs().max() <= 1e-5, (kind, name)


@pytest.mark.parametrize("width", [1, 7, 17])
def test_counted_ranks_are_topk(width):
    """The compiled gates' ranking by counting picks topk's tokens in topk's order, ties in the change included
    (the keys' tie-break makes them distinct: lower token first, the prefix token above every patch)."""
    runner = EventfulViT(VisionTransformer(CONFIG).eval())
    n = CONFIG.num_tokens
    change_bits = torch.tensor([[0] * n, [5] * n, list(range(n)), [3, 1, 1, 2, 2, 9] * (n // 6) + [1] * (n % 6)])
    keys = runner._tiebreak + change_bits * n  # noqa: SLF001  [4, N]
    top, index = _counted_topk(keys, width)
    expected_top, expected_index = keys.topk(width, dim=1)
    assert torch.equal(index, expected_index) and torch.equal(top, expected_top)
    assert (index[:, 0] == 0).all()  # the prefix token first


@pytest.mark.parametrize("gate_rank", ["topk", "count"])
def test_compiled_execution_equals_eager(gate_rank):
    """execution="compile" (inductor, dynamic sizes: one graph per step kind for every batch and width) gives the
    eager results on a real sequence of steps: a joiner, mixed budgets, a threshold, batches of 3, 2 and 1; its
    gates ranking by topk or by counting."""
    config = ViTConfig(image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                       num_classes=10)
    vit = VisionTransformer(config).eval()
    eager = EventfulViT(vit)
    compiled = EventfulViT(vit, EventfulConfig(execution="compile", gate_rank=gate_rank))
    assert compiled._count_ranks == (gate_rank == "count")  # noqa: SLF001  (auto on the CPU: topk)
    assert compiled.shape_for([StreamBudget(tokens=5)] * 3) == StepShape(3, 6, "sparse")  # exact shapes
    budgets = [StreamBudget(tokens=5), StreamBudget(tokens=9), StreamBudget(threshold=0.3, tokens=12)]
    frames = torch.rand(7, 3, 3, 32, 32)
    states = {runner: [runner.new_state() for _ in budgets] for runner in (eager, compiled)}
    for t in range(7):
        members = [0, 1, 2] if t < 4 else [0, 2] if t < 6 else [1]
        outs = [runner.step(frames[t][members], [states[runner][j] for j in members], [budgets[j] for j in members])
                for runner in (eager, compiled)]
        assert (outs[0].logits - outs[1].logits).abs().max() <= 1e-4
        assert torch.equal(outs[0].updated_tokens, outs[1].updated_tokens)
    assert {key[0] for key in compiled._executors} == {"seed", "sparse"}  # noqa: SLF001
