"""The CUDA paths against the CPU ones: the same weights and frames must give the same answers on either device.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest tests/model/test_cuda.py`.
TF32 is switched off here: the comparisons are of fp32 against fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model.eventful import EventfulConfig, EventfulViT, full_budget
from model.policy import StreamBudget
from model.vit import VisionTransformer
from tests.model.test_eventful import CONFIG, LEVELS, video

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def pair() -> tuple[VisionTransformer, VisionTransformer]:
    """The same random ViT on the CPU and on CUDA (weights scaled up so that changes propagate visibly)."""
    torch.manual_seed(0)
    cpu = VisionTransformer(CONFIG).eval().requires_grad_(False)
    with torch.no_grad():
        for p in cpu.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return cpu, copy.deepcopy(cpu).to(CUDA)


def test_dense_on_cuda_equals_cpu(pair):
    cpu, gpu = pair
    frames = video()
    assert torch.allclose(gpu(frames.to(CUDA)).cpu(), cpu(frames), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("level", LEVELS)
def test_full_budget_equals_dense_on_cuda(pair, level):
    _, gpu = pair
    runner = EventfulViT(gpu, EventfulConfig(level=level))
    state = runner.new_state()
    assert state.device.type == "cuda"
    frames = video().to(CUDA)
    dense = gpu(frames)
    for t in range(len(frames)):
        out = runner.step(frames[t : t + 1], [state], [full_budget(CONFIG.num_patches)])
        assert (out.logits - dense[t : t + 1]).abs().max() <= 1e-5


@pytest.mark.parametrize("level", LEVELS)
def test_sparse_budget_on_cuda_follows_the_cpu(pair, level):
    """Top-r on CUDA picks the same tokens as on the CPU (the change scores agree to fp32 rounding) and so gives
    the same outputs, frame after frame, while the reference state carries the history."""
    cpu, gpu = pair
    runners = EventfulViT(cpu, EventfulConfig(level=level)), EventfulViT(gpu, EventfulConfig(level=level))
    states = [r.new_state() for r in runners]
    frames = video(12)
    budget = StreamBudget(tokens=12)
    for t in range(len(frames)):
        a = runners[0].step(frames[t : t + 1], [states[0]], [budget])
        b = runners[1].step(frames[t : t + 1].to(CUDA), [states[1]], [budget])
        assert torch.equal(a.updated_tokens, b.updated_tokens.cpu()), t
        assert torch.allclose(a.logits, b.logits.cpu(), atol=1e-3, rtol=1e-3), t


def test_batch_equals_alone_on_cuda(pair):
    """Streams with different budgets in one CUDA batch give what each gives alone."""
    _, gpu = pair
    runner = EventfulViT(gpu, EventfulConfig(level="tokenwise"))
    budgets = [StreamBudget(tokens=6), full_budget(CONFIG.num_patches), StreamBudget(tokens=20)]
    videos = [video(6, seed=s).to(CUDA) for s in (1, 2, 3)]
    alone_states = [runner.new_state() for _ in budgets]
    batch_states = [runner.new_state() for _ in budgets]
    for t in range(6):
        alone = [runner.step(v[t : t + 1], [s], [b]).logits
                 for v, s, b in zip(videos, alone_states, budgets, strict=True)]
        batch = runner.step(torch.cat([v[t : t + 1] for v in videos]), batch_states, budgets).logits
        assert torch.allclose(torch.cat(alone), batch, atol=1e-4, rtol=1e-4), t


def test_real_checkpoint_on_cuda_agrees_with_the_cpu(shared_file):
    """DeiT-Tiny (the real ImageNet checkpoint) on real video frames: same top-1, close logits, dense and at r=64."""
    from model.loaders import load_model
    from model.preprocess import Preprocessor, read_video_frames

    cpu = load_model(str(shared_file("weights/deit_tiny_patch16_224.pth")))
    gpu = copy.deepcopy(cpu).to(CUDA)
    images = Preprocessor(cpu.config.preprocess)(read_video_frames(str(shared_file("data/videos/realshort.mp4")),
                                                                   max_frames=8))
    dense_cpu, dense_gpu = cpu(images), gpu(images.to(CUDA)).cpu()
    assert torch.equal(dense_cpu.argmax(-1), dense_gpu.argmax(-1))
    assert (dense_cpu - dense_gpu).abs().max() <= 1e-3 * dense_cpu.abs().max()
    runners = EventfulViT(cpu, EventfulConfig()), EventfulViT(gpu, EventfulConfig())
    states = [r.new_state() for r in runners]
    for t in range(len(images)):
        a = runners[0].step(images[t : t + 1], [states[0]], [StreamBudget(tokens=64)]).logits
        b = runners[1].step(images[t : t + 1].to(CUDA), [states[1]], [StreamBudget(tokens=64)]).logits.cpu()
        assert a.argmax(-1).item() == b.argmax(-1).item(), t
        assert (a - b).abs().max() <= 1e-2 * a.abs().max(), t


@pytest.mark.parametrize("execution", ["graph", "compile-graph"])
@pytest.mark.parametrize("level", LEVELS)
def test_captured_steps_equal_eager_on_cuda(pair, level, execution):
    """Every step kind captured as a CUDA graph (padded batch buckets, mixed budgets, a joiner, a threshold) gives
    the eager step's results, and capturing writes no stream's state."""
    if execution == "compile-graph" and level != "tokenwise":
        pytest.skip("compile-graph is measured on the token-wise level")
    _, gpu = pair
    eager, captured = EventfulViT(gpu, EventfulConfig(level=level)), EventfulViT(gpu, EventfulConfig(
        level=level, execution=execution))
    budgets = [StreamBudget(tokens=6), StreamBudget(tokens=20), StreamBudget(threshold=0.2, tokens=30)]
    videos = [video(6, seed=s).to(CUDA) for s in (1, 2, 3)]
    states = {r: [r.new_state() for _ in budgets] for r in (eager, captured)}
    for t in range(6):
        members = [0, 1] if t < 2 else [0, 1, 2]  # stream 2 joins at t = 2 (a seeding call beside the others)
        images = torch.cat([videos[j][t : t + 1] for j in members])
        outs = [r.step(images, [states[r][j] for j in members], [budgets[j] for j in members]) for r in
                (eager, captured)]
        assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-4, rtol=1e-4), t
        assert torch.equal(outs[0].updated_tokens, outs[1].updated_tokens), t
    plain = [r.step(videos[0][:2], [r.new_state(), r.new_state()]).logits for r in (eager, captured)]
    assert torch.allclose(plain[0], plain[1], atol=1e-4, rtol=1e-4)


def test_bfloat16_step_on_cuda_follows_float32_and_halves_the_state(pair):
    """bf16 model and state: the same tokens mostly, logits close to fp32's, and half the state bytes."""
    _, gpu = pair
    half = copy.deepcopy(gpu).to(torch.bfloat16)
    runners = EventfulViT(gpu), EventfulViT(half, EventfulConfig(execution="graph"))
    states = [r.new_state() for r in runners]
    assert states[1].nbytes * 2 == states[0].nbytes and runners[1].pool.dtype == torch.bfloat16
    frames = video(6).to(CUDA)
    for t in range(len(frames)):
        a = runners[0].step(frames[t : t + 1], [states[0]], [StreamBudget(tokens=12)])
        b = runners[1].step(frames[t : t + 1].to(torch.bfloat16), [states[1]], [StreamBudget(tokens=12)])
        scale = a.logits.abs().max()
        assert (a.logits - b.logits.float()).abs().max() <= 0.1 * scale, t
