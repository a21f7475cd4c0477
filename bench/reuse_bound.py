"""`eventful-bench reuse-bound`: could any choice of tokens beat frame skipping? A bound on the gate's choice.

Keyframe + sparse recomputes r tokens per gate between dense keyframes and keeps the rest of each block's outputs
from when they were last computed. Its error against the dense model has two possible sources: the gate picks the
wrong tokens, or r tokens are too few whatever they are. This benchmark separates them. It replays the keyframe
schedule with each block's two branch outputs (attention, MLP) cached per token, every branch computed for every
token on every frame with current inputs (exact attention context: more than the eventful model has), and keeps
only r rows of each branch's new output, chosen by one of two rules:

- `gate`: the rows whose branch input changed most since they were last computed (what an eventful gate sees);
- `oracle`: the rows whose branch output changed most (the error each row would leave; no gate can know it without
  computing every row, which is the cost it exists to save).

If the oracle is no better than the gate, no token-choice rule can close a gap to frame skipping at that r: only a
larger r (less compute saved) or a different kind of update can. Rows also hold the eventful model's own keyframe
policy at the same setting, and frame skipping at the ratio.
"""

from __future__ import annotations

import torch

from bench.fidelity_bench import (
    KEYFRAME_INTERVALS,
    Served,
    dense_reference,
    moving_tokens,
    run_schedule,
    score,
    skip_at_phase,
)
from model.macs import dense_macs
from model.schedule import policy_for_ratio
from model.vit import VisionTransformer

RULES = ("gate", "oracle")


class _BranchCache:
    """One branch's output per token and the input it was computed from. out, ref: [N, C]."""

    def __init__(self, out: torch.Tensor, ref: torch.Tensor):
        self.out, self.ref = out.clone(), ref.clone()

    def update(self, new_out: torch.Tensor, new_in: torch.Tensor, tokens: int, rule: str, prefix: int) -> torch.Tensor:
        """Keep `tokens` patch rows of the new output (and every prefix row); the rest stay as they were."""
        change = (new_out - self.out if rule == "oracle" else new_in - self.ref).norm(dim=-1)  # [N]
        change[:prefix] = float("inf")  # the class token is always recomputed, as in the eventful model
        rows = change.topk(min(prefix + tokens, change.numel())).indices
        self.out[rows] = new_out[rows]
        self.ref[rows] = new_in[rows]
        return self.out


@torch.inference_mode()
def simulate(model: VisionTransformer, images: torch.Tensor, interval: int, tokens: int, rule: str) -> Served:
    """Keyframe every `interval` frames (frame 0 first), `tokens` rows per branch between, chosen by `rule`.
    images: [T, 3, H, W]. MACs are not counted (every branch is computed for every row here)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if interval < 1 or tokens < 0:
        raise ValueError(f"interval must be >= 1 and tokens >= 0, got {interval} and {tokens}")
    prefix = model.config.num_prefix_tokens
    attention: list[_BranchCache] = []  # per block, from the last keyframe on
    mlp: list[_BranchCache] = []
    logits, features = [], []
    for t in range(images.shape[0]):
        x = model.embed(images[t : t + 1])  # [1, N, C]
        keyframe = t % interval == 0
        if keyframe:
            attention, mlp = [], []
        for b, block in enumerate(model.blocks):
            a = block.attention_branch(x)  # [1, N, C]
            if keyframe:
                attention.append(_BranchCache(a[0], x[0]))
            else:
                a = attention[b].update(a[0], x[0], tokens, rule, prefix)[None]
            y = x + a
            m = block.mlp_branch(y)
            if keyframe:
                mlp.append(_BranchCache(m[0], y[0]))
            else:
                m = mlp[b].update(m[0], y[0], tokens, rule, prefix)[None]
            x = model.after_block(y + m, b)
        logits.append(model.forward_head(x)[0])
        features.append(model.norm(x[:, prefix:])[0])
    macs = [0] * images.shape[0]
    return Served(torch.stack(logits), torch.stack(features), macs, ["keyframe" if t % interval == 0 else "sparse"
                                                                      for t in range(images.shape[0])])


def run_video(model: VisionTransformer, images: torch.Tensor, ratios: list[float], *, video: str,
              intervals: tuple[int, ...] = KEYFRAME_INTERVALS, progress=None) -> dict:
    """Per ratio: frame skipping, and per keyframe interval that can spend 1/ratio of the dense MACs the eventful
    model's keyframe policy and the two simulated rules at its r."""
    dense = dense_reference(model, images)
    moving = moving_tokens(dense)
    frame_macs = dense_macs(model.config)
    results = []
    for ratio in ratios:
        skip = score(skip_at_phase(dense, ratio, 0), dense, moving)
        results.append({"ratio": ratio, "policy": "skip", "interval": None, "tokens": None, **skip})
        for k in intervals:
            policy = policy_for_ratio("keyframe", ratio, model.config, interval=k)
            if policy is None:
                continue
            served = run_schedule(model, images, policy)
            mac_ratio = frame_macs * len(served.macs) / max(1, sum(served.macs))
            results.append({"ratio": ratio, "policy": "eventful", "interval": k, "tokens": policy.tokens,
                            "mac_ratio": mac_ratio, **score(served, dense, moving)})
            for rule in RULES:
                row = score(simulate(model, images, k, policy.tokens, rule), dense, moving)
                results.append({"ratio": ratio, "policy": rule, "interval": k, "tokens": policy.tokens, **row})
            if progress:
                progress(video, ratio, k)
    return {"video": video, "frames": images.shape[0], "results": results}


def print_table(report: dict) -> str:
    lines = [f"model {report['model']}  image {report['image_size']}  ({report['tokens']} tokens)"]
    header = (f"{'ratio':>5} {'k':>3} {'r':>5} {'rule':<9} {'top1%':>6} {'relL2':>6} {'tokL2':>6} {'movL2':>6}  "
              f"vs skip (relL2, movL2)")
    for video in report["videos"]:
        lines += [f"\n{video['video']}: {video['frames']} frames", header]
        skip = {r["ratio"]: r for r in video["results"] if r["policy"] == "skip"}
        for r in video["results"]:
            s = skip[r["ratio"]]
            k = "" if r["interval"] is None else r["interval"]
            tokens = "" if r["tokens"] is None else r["tokens"]
            lines.append(
                f"{r['ratio']:5.2g} {k:>3} {tokens:>5} {r['policy']:<9} {100 * r['top1_agreement']:6.1f} "
                f"{r['rel_l2']:6.3f} {r['token_rel_l2']:6.3f} {r['moving_token_rel_l2']:6.3f}  "
                f"{r['rel_l2'] / max(s['rel_l2'], 1e-12):5.2f}x "
                f"{r['moving_token_rel_l2'] / max(s['moving_token_rel_l2'], 1e-12):5.2f}x")
    return "\n".join(lines)
