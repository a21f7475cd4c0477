"""The eventful step against the dense model, and a stream alone against the same stream in a batch."""

from __future__ import annotations

import pytest
import torch

from model.config import ViTConfig
from model.eventful import EventfulConfig, EventfulViT, full_budget
from model.macs import dense_macs
from model.policy import StreamBudget
from model.state import StreamState
from model.vit import VisionTransformer

LEVELS = ["tokenwise", "qk", "full"]
CONFIG = ViTConfig(
    image_size=(48, 64), patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_dim=128, num_classes=10
)  # 6x8 = 48 patches + class token


def video(frames: int = 8, seed: int = 1) -> torch.Tensor:
    """A drifting random 'video': each frame changes a few regions of the previous one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 48, 64, generator=gen)
    out = []
    for _ in range(frames):
        x = x.clone()
        for _ in range(3):
            i, j = torch.randint(0, 40, (1,), generator=gen).item(), torch.randint(0, 56, (1,), generator=gen).item()
            x[:, i : i + 8, j : j + 8] += torch.randn(3, 8, 8, generator=gen)
        x += 0.02 * torch.randn(x.shape, generator=gen)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("gate_position", ["normed", "residual"])
@pytest.mark.parametrize("budget", [full_budget(CONFIG.num_patches), StreamBudget(threshold=0.0)])
def test_full_budget_equals_dense(vit, level, gate_position, budget):
    runner = EventfulViT(vit, EventfulConfig(level=level, gate_position=gate_position))
    state = runner.new_state()
    frames = video()
    dense = vit(frames)
    for t in range(len(frames)):
        out = runner.step(frames[t : t + 1], [state], [budget])
        assert (out.logits - dense[t : t + 1]).abs().max() <= 1e-5
        assert out.updated_tokens.min() == CONFIG.num_tokens


def assert_alone_equals_batched(runner, budgets: list[StreamBudget], frames: int) -> None:
    """Each stream (video(seed=j) under budgets[j]) stepped alone equals the same stream stepped in one batch with
    the others, frame after frame: outputs (<= 1e-5), tokens updated, MACs, and at the end its state slots."""
    batched_states = [runner.new_state() for _ in budgets]
    alone_states = [runner.new_state() for _ in budgets]
    streams = [video(seed=s) for s in range(len(budgets))]
    for t in range(frames):
        images = torch.stack([s[t] for s in streams])
        batched = runner.step(images, batched_states, budgets)
        for j, budget in enumerate(budgets):
            alone = runner.step(images[j : j + 1], [alone_states[j]], [budget])
            assert (batched.logits[j] - alone.logits[0]).abs().max() <= 1e-5
            assert torch.equal(batched.updated_tokens[j], alone.updated_tokens[0])
            assert batched.macs[j] == alone.macs[0]
    # the states themselves agree too (a full-budget stream alone runs the plain dense model and seeds nothing)
    for a, b in zip(batched_states, alone_states, strict=True):
        if b.needs_dense:
            continue
        for layer in runner.pool.layers:
            for name, tensor in layer.items():
                assert (tensor[a.slot] - tensor[b.slot]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("level", LEVELS)
def test_batch_equals_separate_with_mixed_budgets(vit, level):
    runner = EventfulViT(vit, EventfulConfig(level=level))
    assert_alone_equals_batched(
        runner, [StreamBudget(tokens=5), StreamBudget(tokens=20), StreamBudget(threshold=0.3), StreamBudget()], 8)


def static_video(frames: int = 6, seed: int = 3) -> torch.Tensor:
    """A static camera: most pixels bit-identical between frames (many exactly-zero, tied change scores)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 48, 64, generator=gen)
    out = []
    for t in range(frames):
        x = x.clone()
        if t % 3:  # every third frame repeats the previous one exactly
            x[:, 8 * t % 40 : 8 * t % 40 + 8, :16] += torch.randn(3, 8, 16, generator=gen)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("level", LEVELS)
def test_tied_change_scores_select_the_same_tokens_alone_and_batched(vit, level):
    """Budgets larger than the changed region leave ties at zero change: the choice among them must not depend
    on the batch (the uniform top-r fast path alone vs the general path beside a different budget)."""
    runner = EventfulViT(vit, EventfulConfig(level=level))
    budgets = [StreamBudget(tokens=20), StreamBudget(tokens=7)]
    batched_states = [runner.new_state() for _ in budgets]
    alone_states = [runner.new_state() for _ in budgets]
    streams = [static_video(seed=s) for s in (3, 4)]
    for t in range(len(streams[0])):
        images = torch.stack([s[t] for s in streams])
        batched = runner.step(images, batched_states, budgets)
        for j, budget in enumerate(budgets):
            alone = runner.step(images[j : j + 1], [alone_states[j]], [budget])
            assert (batched.logits[j] - alone.logits[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("level", LEVELS)
def test_sparse_budget_counts_and_prefix_always_updated(vit, level):
    runner = EventfulViT(vit, EventfulConfig(level=level))
    state = runner.new_state()
    frames = video()
    first = runner.step(frames[:1], [state], [StreamBudget(tokens=7)])
    assert first.dense_frame == [True]  # a new stream starts dense whatever its budget
    for budget_tokens in (7, 0, 13):
        out = runner.step(frames[1:2], [state], [StreamBudget(tokens=budget_tokens)])
        assert out.dense_frame == [False]
        assert out.updated_tokens[0, :, 0].tolist() == [budget_tokens + 1] * CONFIG.depth
        assert out.updated_tokens[0, :, 2].tolist() == [budget_tokens + 1] * CONFIG.depth
        assert out.macs[0] < out.dense_macs


@pytest.mark.parametrize("level", LEVELS)
def test_budget_back_to_full_recovers_dense_exactly(vit, level):
    """Sparse frames leave stale tokens; one full-budget frame recomputes them all (budget changes per frame).

    A full-budget frame runs the plain dense model and seeds no state, so the first sparse frame after it runs
    densely (and seeds the state); the ones after that are sparse."""
    runner = EventfulViT(vit, EventfulConfig(level=level))
    state = runner.new_state()
    frames = video()
    dense = vit(frames)
    budgets = [None, 4, 10, 2, 30, None, 3, None]
    for t, tokens in enumerate(budgets):
        budget = full_budget(CONFIG.num_patches) if tokens is None else StreamBudget(tokens=tokens)
        out = runner.step(frames[t : t + 1], [state], [budget])
        err = (out.logits - dense[t : t + 1]).abs().max()
        assert out.dense_frame[0] == (t in (0, 1, 5, 6, 7))
        if t in (0, 1, 5, 6, 7):
            assert err <= 1e-5
        else:
            assert err > 1e-4  # sparse frames really are approximate (the test could fail)


def test_flush_and_refresh(vit):
    runner = EventfulViT(vit, EventfulConfig(refresh_interval=3))
    state = runner.new_state()
    frames = video(frames=8)
    dense = vit(frames)
    flags = []
    for t in range(6):
        out = runner.step(frames[t : t + 1], [state], [StreamBudget(tokens=2)])
        flags.append(out.dense_frame[0])
        if out.dense_frame[0]:
            assert (out.logits - dense[t : t + 1]).abs().max() <= 1e-5
            assert out.macs[0] == dense_macs(CONFIG)
    assert flags == [True, False, False, True, False, False]
    state.flush()
    out = runner.step(frames[6:7], [state], [StreamBudget(tokens=2)])
    assert out.dense_frame == [True]
    assert (out.logits - dense[6:7]).abs().max() <= 1e-5


@pytest.mark.parametrize("gate_position", ["normed", "residual"])
def test_threshold_policy_counts_match_independent_gate(vit, gate_position):
    """Layer-0 qkv gate after a dense frame: count = patches whose RMS change (of LN1(tokens) for normed gates,
    of the tokens for residual gates) >= h, per stream."""
    runner = EventfulViT(vit, EventfulConfig(gate_position=gate_position))
    thresholds = [0.05, 0.3, 1.0]
    states = [runner.new_state() for _ in thresholds]
    frames = video(frames=2)
    images0 = frames[0].expand(3, -1, -1, -1)
    images1 = torch.stack([frames[1], frames[1] * 1.1, frames[1]])
    runner.step(images0, states, [StreamBudget(threshold=h) for h in thresholds])
    out = runner.step(images1, states, [StreamBudget(threshold=h) for h in thresholds])
    with torch.no_grad():
        norm = vit.blocks[0].norm1 if gate_position == "normed" else torch.nn.Identity()
        change = (norm(vit.embed(images1)) - norm(vit.embed(images0))).pow(2).mean(-1).sqrt()[:, 1:]
    expected = [int((change[j] >= h).sum()) + 1 for j, h in enumerate(thresholds)]
    assert out.updated_tokens[:, 0, 0].tolist() == expected
    assert len(set(expected)) > 1


def test_threshold_with_cap_and_qk_full_agree(vit):
    """The query-key and attention-value levels compute the same exact attention by different updates."""
    qk = EventfulViT(vit, EventfulConfig(level="qk"))
    full = EventfulViT(vit, EventfulConfig(level="full"))
    s_qk, s_full = qk.new_state(), full.new_state()
    frames = video(frames=8, seed=5)
    budget = StreamBudget(tokens=12, threshold=0.05)
    for t in range(8):
        a = qk.step(frames[t : t + 1], [s_qk], [budget])
        b = full.step(frames[t : t + 1], [s_full], [budget])
        assert (a.logits - b.logits).abs().max() <= 1e-4
        if t > 0:
            assert a.updated_tokens.max() <= 13


def test_full_level_has_no_drift_over_a_long_stream(vit):
    """Incremental softmax over 60 sparse frames stays equal to recomputing Q.K^T-softmax from the buffers."""
    full = EventfulViT(vit, EventfulConfig(level="full"))
    state = full.new_state()
    frames = video(frames=60, seed=7)
    for t in range(60):
        full.step(frames[t : t + 1], [state], [StreamBudget(tokens=6)])
    for layer in state.layers:
        logits = (layer.queries * CONFIG.head_dim**-0.5) @ layer.keys.transpose(-2, -1)
        exact = logits.softmax(-1) @ layer.values
        incremental = layer.weighted_values / layer.row_sum[..., None]
        assert (exact - incremental).abs().max() <= 1e-4


@pytest.mark.parametrize("level", LEVELS)
def test_state_bytes_and_device(vit, level):
    runner = EventfulViT(vit, EventfulConfig(level=level))
    state = runner.new_state()
    n, c, h, d = CONFIG.num_tokens, CONFIG.embed_dim, CONFIG.num_heads, CONFIG.depth
    per_layer = 6 * n * c
    if level != "tokenwise":
        per_layer += 2 * n * c
    if level == "qk":
        per_layer += h * n * n
    if level == "full":
        per_layer += h * n * n + 2 * h * n + n * c
    assert state.nbytes == d * per_layer * 4
    assert sum(state.breakdown().values()) == state.nbytes
    assert state.device == torch.device("cpu")
    assert runner.pool.nbytes == state.nbytes * (runner.pool.capacity + 1)  # the scratch slot included


def test_state_must_fit_runner(vit):
    runner = EventfulViT(vit, EventfulConfig(level="full"))
    wrong = StreamState.create(CONFIG, level="tokenwise")
    with pytest.raises(ValueError, match="does not fit"):
        runner.step(video(frames=1), [wrong])
    with pytest.raises(ValueError, match="images"):
        runner.step(video(frames=2), [runner.new_state()])


def test_budget_validation():
    with pytest.raises(ValueError, match="tokens"):
        StreamBudget(tokens=-1)
    with pytest.raises(ValueError, match="threshold"):
        StreamBudget(threshold=float("nan"))
    with pytest.raises(ValueError, match="level"):
        EventfulConfig(level="sparse")


def test_dense_macs_match_flop_counter(vit):
    """Analytic dense MACs equal torch's own FLOP count of a dense forward (matmuls, attention, conv) / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    assert any(p.requires_grad for p in vit.parameters())  # grad mode: plain F.linear, which the counter sees
    with FlopCounterMode(display=False) as counter:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            vit(video(frames=1))
    assert dense_macs(CONFIG) == counter.get_total_flops() // 2


@pytest.mark.parametrize("level", LEVELS)
def test_sparse_machinery_with_every_token_equals_dense(vit, level, monkeypatch):
    """The gated path (not the dense shortcut or the seeding call) with every token selected reproduces dense."""
    runner = EventfulViT(vit, EventfulConfig(level=level))
    state = runner.new_state()
    frames = video()
    dense = vit(frames)
    runner.step(frames[:1], [state])
    runner.step(frames[1:2], [state], [StreamBudget(tokens=3)])  # seeds the state
    monkeypatch.setattr(StreamBudget, "is_dense_for", lambda self, n: False)
    for t in range(2, 6):
        out = runner.step(frames[t : t + 1], [state], [full_budget(CONFIG.num_patches)])
        assert not out.dense_frame[0]
        assert out.updated_tokens.min() == CONFIG.num_tokens
        assert (out.logits - dense[t : t + 1]).abs().max() <= 1e-4


def test_model_without_class_token_is_refused():
    with pytest.raises(ValueError, match="class token"):
        VisionTransformer(ViTConfig(class_token=False, depth=1, embed_dim=64, num_heads=4, mlp_dim=64))


def test_changing_batch_compositions_and_orders_equal_each_stream_alone(vit):
    """Every stream's buffers stay in its pool slot (nothing is re-stacked or moved, whatever the batch's
    composition or order), and each stream's results are what it would get alone."""
    runner = EventfulViT(vit)
    streams = [video(seed=s) for s in (5, 6, 7)]
    shared = [runner.new_state() for _ in streams]
    alone = [runner.new_state() for _ in streams]
    addresses = {name: t.data_ptr() for name, t in runner.pool.layers[0].items()}
    rows = [s.layers[0].keys.data_ptr() for s in shared]
    schedule = [[0, 1, 2], [0, 1, 2], [2, 0, 1], [1], [0, 2], [2, 1, 0], [0, 1, 2]]
    budget = StreamBudget(tokens=12)
    for t, members in enumerate(schedule):
        images = torch.stack([streams[j][t] for j in members])
        out = runner.step(images, [shared[j] for j in members], [budget] * len(members))
        for row, j in enumerate(members):
            reference = runner.step(streams[j][t : t + 1], [alone[j]], [budget])
            assert (out.logits[row] - reference.logits[0]).abs().max() <= 1e-5
            assert torch.equal(out.updated_tokens[row], reference.updated_tokens[0])
    assert {name: t.data_ptr() for name, t in runner.pool.layers[0].items()} == addresses
    assert [s.layers[0].keys.data_ptr() for s in shared] == rows


def test_a_joiners_first_frame_runs_beside_the_sparse_streams_with_the_same_results(vit, monkeypatch):
    """A stream computing every token would widen the others' rows to all tokens: it runs in a seeding call of its
    own (the sparse streams in theirs), and every stream's result is what it would be alone."""
    runner = EventfulViT(vit)
    streams = [video(seed=s) for s in (8, 9, 10)]
    shared = [runner.new_state() for _ in streams]
    alone = [runner.new_state() for _ in streams]
    budget = StreamBudget(tokens=12)
    calls: list[tuple[list[int], bool]] = []
    run = runner._run  # noqa: SLF001

    def recording(pool, images, states, budgets, members, seed):
        calls.append(([next(k for k, mine in enumerate(shared) if mine is states[j]) for j in members], seed))
        return run(pool, images, states, budgets, members, seed)

    schedule = [[0, 1], [0, 1], [0, 2, 1], [2, 1, 0]]  # stream 2 joins (its first frame, dense) at t = 2
    for t, members in enumerate(schedule):
        monkeypatch.setattr(runner, "_run", recording)
        calls.clear()
        out = runner.step(torch.stack([streams[j][t] for j in members]), [shared[j] for j in members],
                          [budget] * len(members))
        monkeypatch.undo()
        if t == 2:
            assert sorted(calls) == [([0, 1], False), ([2], True)], calls
            assert out.dense_frame == [False, True, False]
        for row, j in enumerate(members):
            reference = runner.step(streams[j][t : t + 1], [alone[j]], [budget])
            assert (out.logits[row] - reference.logits[0]).abs().max() <= 1e-5
            assert torch.equal(out.updated_tokens[row], reference.updated_tokens[0])
            assert out.macs[row] == reference.macs[0]
