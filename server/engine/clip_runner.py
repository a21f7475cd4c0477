"""The clip runner: VideoMAE with Run-Length Tokenization behind the Runner protocol (stream mode).

Each stream's state is a sliding window of its last num_frames preprocessed frames (a fixed ring buffer). Every
frame goes into the window; once the window is full, every `stride`-th frame classifies it: the due clips of all
streams in a step run as one packed batch per tau (RLT drops repeated tubelets, clips keep different token counts,
no padding). Other frames answer with the window fill. A stream's tau is the server's (`rlt_tau`) unless its
budget's threshold sets its own (an adaptive stream holding a fidelity floor, model/clip_audit.py); an audit frame
(PlannedFrame.audit) classifies the window as it stands with every tubelet (tau 0, the plain model) and pushes
nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model.fidelity import LogitFidelity
from model.rlt import DEFAULT_TAU, classify_clips, clip_macs
from model.videomae import VideoMAE
from server.engine.decode import FrameLimits
from server.engine.planner import FULL, PlannedFrame, StepPlan
from server.engine.runner import FrameOutput, FrameRunner, StepResult, WarmupTimings


@dataclass
class ClipWindow:
    """One stream's last frames: a ring buffer [T, 3, H, W] written in place, and how many frames it has seen."""

    frames: torch.Tensor  # [T, 3, H, W] model-input frames, slot i % T holds frame i
    seen: int = 0  # frames pushed since the last flush

    @classmethod
    def create(cls, num_frames: int, image_size: tuple[int, int], device=None, dtype=torch.float32) -> ClipWindow:
        return cls(torch.zeros(num_frames, 3, *image_size, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.frames.shape[0]

    @property
    def filled(self) -> int:
        return min(self.seen, self.capacity)

    def push(self, image: torch.Tensor) -> None:
        self.frames[self.seen % self.capacity].copy_(image)
        self.seen += 1

    def clip(self) -> torch.Tensor:
        """The window oldest first: [T, 3, H, W]."""
        start = self.seen % self.capacity
        return torch.cat([self.frames[start:], self.frames[:start]]) if start else self.frames

    def flush(self) -> None:
        """Forget the past frames (e.g. the frame size changed): the window fills again."""
        self.seen = 0

    @property
    def nbytes(self) -> int:
        return self.frames.numel() * self.frames.element_size()


class ClipRunner(FrameRunner):
    """A VideoMAE clip classifier with RLT; outputs {"action": {"label", "score"}, "top": [...]} every stride frames
    once the window is full, {"window": n, "of": T} otherwise."""

    task = "clip"
    dense_first_frame = False  # a window fills frame by frame; RLT decides what each clip computes
    plain_dense = False  # budgets do not apply: a step whose budgets are all full is a clip step like any other
    refresh_interval = None  # a window has no reference tokens to reseed
    fidelity = LogitFidelity()  # audits compare a served clip's logits with the plain model's (top-1, rel-L2)
    execution = None  # no eventful step: one packed forward pass per step
    pool_bytes = None  # windows are allocated per stream (ClipWindow.nbytes), not from a pool
    graph_bytes = None  # nothing is captured

    def __init__(
        self, model: VideoMAE, tau: float = DEFAULT_TAU, stride: int = 8, top_k: int = 5,
        limits: FrameLimits | None = None,
    ):  # fmt: skip
        if stride < 1:
            raise ValueError("stride must be >= 1")
        super().__init__(model, top_k, limits)  # per-frame decode and preprocessing, as for single frames
        self.rlt_tau = tau
        self.stride = stride
        self._dense_macs = clip_macs(self.config, self.config.num_patches)

    # num_patches: the tokens of one clip without RLT (budgets do not apply in clip mode: tau decides what is dropped)

    def new_state(self) -> ClipWindow:
        return ClipWindow.create(self.config.num_frames, self.config.image_size, self.device, self.dtype)

    def _due(self, window: ClipWindow) -> bool:
        return window.seen >= window.capacity and (window.seen - window.capacity) % self.stride == 0

    def execute(self, plan: StepPlan) -> StepResult:
        """Push every planned frame into its stream's window; classify the full windows that are due, packed (one
        pass per tau); an audit frame's window as it stands, at tau 0."""
        start = time.perf_counter()
        due: dict[float, list[int]] = {}  # tau -> plan positions
        for j, planned in enumerate(plan.frames):
            window: ClipWindow = planned.state
            if planned.audit:
                due.setdefault(0.0, []).append(j)
                continue
            if planned.flush:
                window.flush()
            window.push(planned.image.to(self.device, self.dtype))
            if self._due(window):
                tau = planned.budget.threshold
                due.setdefault(self.rlt_tau if tau is None else tau, []).append(j)
        predictions = {}
        for tau, rows in due.items():
            clips = torch.stack([plan.frames[j].state.clip() for j in rows])  # [b, T, 3, H, W]
            out = classify_clips(self.model, clips, tau)
            logits = out.logits.float()  # [b, classes]
            scores, indices = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
            answers = logits.cpu()  # what audits compare, one copy for the group
            for row, j in enumerate(rows):
                top = [
                    {"label": self.labels[i], "index": i, "score": s}
                    for s, i in zip(scores[row].tolist(), indices[row].tolist(), strict=True)
                ]
                result = {
                    "action": {"label": top[0]["label"], "score": top[0]["score"]}, "top": top,
                    "tokens_kept": out.tokens_kept[row], "tokens": out.num_tokens,
                }  # fmt: skip
                predictions[j] = (result, out.kept_fraction[row], out.macs[row], answers[row])
        outputs = []
        for j, planned in enumerate(plan.frames):
            if j in predictions:
                result, kept, macs, answer = predictions[j]
                outputs.append(FrameOutput(self.num_patches, False, kept, macs, result, answer))
            else:
                window = planned.state
                outputs.append(FrameOutput(0, False, 0.0, 0, {"window": window.filled, "of": window.capacity}))
        return StepResult(outputs, start, time.perf_counter() - start, self._dense_macs)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> WarmupTimings:
        """Per batch size, after a packed forward pass on blank clips (first-call allocations, kernel selection),
        timed warm steps: one where fresh windows take their first frame (the engine counts a filling frame as no
        tokens), and one where every stream's clip is due (num_patches tokens each), at tau 0: every tubelet kept,
        the plain model and the dearest a clip can be (blank clips would keep almost none). These are the cost
        model's (batch, tokens, seconds) figures; the full clip step is the dense figure too."""
        h, w = self.config.image_size
        n = self.num_patches
        dense_seconds, steps = {}, []
        for batch in batch_sizes:
            clips = torch.zeros(batch, self.config.num_frames, 3, h, w, device=self.device, dtype=self.dtype)
            classify_clips(self.model, clips, 0.0)
            image = torch.zeros(3, h, w)  # [3, H, W] as prepare() makes it, on the CPU
            for _ in range(2):  # the second is warm
                windows = [self.new_state() for _ in range(batch)]
                filling = self.execute(StepPlan([PlannedFrame("warmup", 0, image, window, FULL, False)
                                                 for window in windows]))
            steps.append((batch, sum(o.budget_tokens for o in filling.outputs), filling.step_seconds))
            start = time.perf_counter()
            classify_clips(self.model, clips, 0.0).logits.sum().item()  # .item(): synced
            dense_seconds[batch] = time.perf_counter() - start
            steps.append((batch, batch * n, dense_seconds[batch]))
        return WarmupTimings(dense_seconds, steps)
