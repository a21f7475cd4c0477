"""The eventful step: one batched call over B streams, each with its own state and budget.

Per block (Dutson et al., ICCV 2023), with the state held in `StreamState`s the caller owns:
  gate -> LN/qkv on the selected tokens -> key/value (and query) buffers -> attention
  -> [qk/full: gate on the attention output] -> proj on selected tokens -> + residual
  -> gate -> MLP on selected tokens -> + residual.
The residual stream stays dense and current; only branch outputs of unselected tokens are reused.
With the default residual gates LayerNorms, qkv, proj and MLP run on the selected tokens only ("normed"
gates need LayerNorm on every token to compare what qkv / MLP would consume).
Prefix tokens (class, distillation, detection) pass every gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.kernels import linear
from model.macs import dense_block_macs, dense_macs, embed_macs, eventful_block_macs, head_macs
from model.policy import StreamBudget
from model.pool import StatePool
from model.state import LEVELS, Level, StreamState
from model.vit import Block, VisionTransformer

GATE_POSITIONS = ("normed", "residual")
EXECUTIONS = ("eager", "compile", "graph", "compile-graph")
GATE_RANKS = ("auto", "topk", "count")


@dataclass(frozen=True)
class EventfulConfig:
    """How the eventful model gates (fixed per runner; budgets change per frame)."""

    level: Level = "tokenwise"
    # "residual": gate on the residual stream (LayerNorm then runs on selected tokens only; measured at least as
    # accurate on every clip we have); "normed": gate on the LayerNorm output of every token.
    gate_position: str = "residual"
    # Every K-th frame of a stream is dense, bounding accumulated error (None: only new/flushed streams).
    refresh_interval: int | None = None
    # How a step runs: "eager" (PyTorch ops, exact shapes), "compile" (torch.compile per shape bucket), "graph"
    # (CUDA only: the eager kernels captured as one CUDA graph per shape bucket, replayed) or "compile-graph" (CUDA
    # only: the compiled step's fused kernels captured per bucket). See EXECUTIONS.
    execution: str = "eager"
    # How a compiled gate ranks its tokens: "topk" (an extern kernel: the gate is three kernels), "count" (a token's
    # rank is the number of larger keys: N comparisons per token, fused into one kernel; up to
    # COUNT_RANK_MAX_TOKENS tokens), "auto" (count on CUDA, where launches cost more than the comparisons; topk on
    # the CPU, where counting made the compiled DeiT-Tiny step 5-8 % slower). Eager steps always use topk.
    gate_rank: str = "auto"

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.gate_position not in GATE_POSITIONS:
            raise ValueError(f"gate_position must be one of {GATE_POSITIONS}, got {self.gate_position!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.gate_rank not in GATE_RANKS:
            raise ValueError(f"gate_rank must be one of {GATE_RANKS}, got {self.gate_rank!r}")
        if self.refresh_interval is not None and self.refresh_interval < 1:
            raise ValueError("refresh_interval must be >= 1 or None")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
COUNT_RANK_MAX_TOKENS = 1024  # compiled gates rank up to this many tokens by counting (see _rank_by_count)


def batch_bucket(batch: int) -> int:
    """Rows a step of `batch` streams runs with when shapes are bucketed: the next power of two."""
    return 1 << (batch - 1).bit_length()


def token_bucket(tokens: int, num_patches: int) -> int:
    """Patch tokens per gate a step runs with for a largest budget of `tokens` when shapes are bucketed: rounded up
    to a step of 4 below 64 tokens and of an eighth of the octave above (8 from 64, 16 from 128, ...), so padding
    wastes at most an eighth (r = 98 runs 104 rows, r = 64 runs 64) and a model has ~8 buckets per octave."""
    if tokens >= num_patches:
        return num_patches
    step = max(4, 1 << max(0, tokens.bit_length() - 4))
    return min(num_patches, -(-tokens // step) * step)


@dataclass(frozen=True)
class StepShape:
    """The fixed shape one compiled or captured step runs: rows (streams + padding), tokens per gate, kind."""

    batch: int
    width: int  # prefix + patch tokens per gate (sparse); every token (seed, plain)
    kind: str  # "sparse", "seed" (every token, writing the streams' state) or "plain" (the dense model, no state)


@dataclass
class StepOutput:
    """What one batched step returns, per stream."""

    logits: torch.Tensor  # [B, num_classes]
    tokens: torch.Tensor  # [B, N, C] final residual stream (before the final norm)
    updated_tokens: torch.Tensor  # [B, depth, 3] tokens through the qkv / proj / MLP gates (incl. prefix), CPU
    macs: list[int]  # MACs done per stream this frame (incl. gate overhead)
    dense_macs: int  # MACs of one dense frame
    dense_frame: list[bool]  # which streams were computed densely (new, flushed or refreshed)

    @property
    def updated_fraction(self) -> torch.Tensor:
        """[B] mean fraction of tokens updated over all gates."""
        n = self.tokens.shape[1]
        return self.updated_tokens.float().mean(dim=(1, 2)) / n


@dataclass(frozen=True)
class _Gate:
    """The tokens one gate chose for a batch: `width` ranks per row, of which `valid` are updated."""

    index: torch.Tensor  # [B, W] token index per rank (prefix tokens first, then patches by change, descending)
    valid: torch.Tensor | None  # [B, W] rank within the stream's budget (r and threshold); None: every rank
    rows: torch.Tensor | None  # [B * W] pool rows a selected token writes ([slots + 1) * N] view; scratch where not
    # valid); None: the rows' slots are a range and every rank counts, so writes go through a view of those slots
    batch_rows: torch.Tensor  # [B * W] rows of a [B * N] view of the batch's tokens
    slots: range | None = None  # with rows None: the consecutive slots of the rows

    def take(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, W, C]: the ranked tokens."""
        b, _, c = tokens.shape
        return tokens.reshape(-1, c).index_select(0, self.batch_rows).view(b, -1, c)

    def write(self, buffer: torch.Tensor, values: torch.Tensor) -> None:
        """values [B, W, D] (or [B * W, D]) into a pool buffer [slots + 1, N, D] at the valid ranks (the rest land in
        scratch)."""
        d = values.shape[-1]
        values = values if values.dim() == 2 else values.reshape(-1, d)
        if self.rows is None:  # the slots' rows of the buffer are one view, laid out as the batch
            buffer[self.slots.start : self.slots.stop].view(-1, d).index_copy_(0, self.batch_rows, values)
        else:
            buffer.view(-1, d).index_copy_(0, self.rows, values)


def _heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, M, C] -> [B, H, M, Dh] view."""
    b, m, c = rows.shape
    return rows.view(b, m, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, M, Dh] -> [B, M, C]."""
    b, h, m, d = x.shape
    return x.transpose(1, 2).reshape(b, m, h * d)


class EventfulViT:
    """Runs a VisionTransformer's weights over many streams' states, held in one slot-indexed `StatePool`.

    `step(images, states, budgets)` takes one frame per stream. Holds no per-stream data besides the pool.
    Each step is one or two fixed-shape calls (the streams that seed their state, the sparse ones), each a pure
    function of (images [B, 3, H, W], slots [B], limits [B, W]) and the pool: no host sync, no data-dependent shape,
    so it compiles into one graph and captures into one CUDA graph per `StepShape`. slots: the streams the pool
    holds before it grows (doubling; the server sizes it for --max-streams, so it never grows there).
    """

    def __init__(self, model: VisionTransformer, config: EventfulConfig | None = None, slots: int = 1):
        self.model = model
        self.config = config or EventfulConfig()
        self.vit = model.config
        if self.vit.num_prefix_tokens < 1 and self.config.level != "tokenwise":
            raise ValueError("the qk and full levels need a prefix token (ranks outside the budget redirect to it)")
        self.scale = self.vit.head_dim**-0.5
        self._norm_scale = math.sqrt(self.vit.embed_dim)  # gates compare L2 norms: RMS thresholds x sqrt(C)
        self._dense_block_macs = dense_block_macs(self.vit)
        self._fixed_macs = embed_macs(self.vit) + head_macs(self.vit)
        self._dense_frame_macs = dense_macs(self.vit)
        p = next(model.parameters())
        if self.config.execution in ("graph", "compile-graph") and p.device.type != "cuda":
            raise ValueError(f"execution {self.config.execution!r} captures CUDA graphs: the model must be on a CUDA "
                             "device")
        self.pool = StatePool(self.vit, self.config.level, slots=slots, device=p.device, dtype=p.dtype)
        rank = self.config.gate_rank
        self._count_ranks = self.vit.num_tokens <= COUNT_RANK_MAX_TOKENS and (
            rank == "count" or (rank == "auto" and p.device.type == "cuda"))
        n, prefix = self.vit.num_tokens, self.vit.num_prefix_tokens
        # Ranking keys add this to (change bits * N): lower token index first among equal changes (so a stream gets
        # the same tokens alone or in any batch), prefix tokens above every patch.
        tiebreak = torch.arange(n - 1, -1, -1, dtype=torch.int64)
        tiebreak[:prefix] += (2**31) * n
        self._tiebreak = tiebreak.to(p.device)
        self._executors: dict[tuple, object] = {}
        self._graph_pool = None
        self.graph_bytes = 0  # device memory the captured graphs hold (execution "graph")

    @property
    def bucketed(self) -> bool:
        """Shapes padded to buckets (captured executions: one graph per shape); eager and compiled steps run exact
        shapes (compiled ones with dynamic sizes: one graph per step kind serves every batch and width)."""
        return self.config.execution in ("graph", "compile-graph")

    def new_state(self) -> StreamState:
        """A state in this runner's pool (its slot returns to the pool on `release()`)."""
        return StreamState(self.pool, self.pool.acquire())

    # ---- the host side: plan the step's calls, run them, read the counts once ------------------

    @torch.inference_mode()
    def step(
        self, images: torch.Tensor, states: list[StreamState], budgets: list[StreamBudget] | None = None,
        seeds: list[bool] | None = None,
    ) -> StepOutput:
        """One frame for each of B streams. images: [B, 3, H, W].

        seeds: which frames seed their stream's state (every token, writing every buffer), as a planner decided;
        a step whose budgets are all full and that seeds nothing runs the plain dense model. None: the model's
        own rule (a stream's first frame, the first after a flush, every `refresh_interval`-th), for callers
        without a planner."""
        b = images.shape[0]
        budgets = budgets if budgets is not None else [StreamBudget.dense()] * b
        if not (len(states) == len(budgets) == b) or (seeds is not None and len(seeds) != b):
            raise ValueError(f"got {b} images, {len(states)} states, {len(budgets)} budgets"
                             + ("" if seeds is None else f" and {len(seeds)} seed flags"))
        pool = states[0].pool if states else self.pool
        for state in states:
            if state.level != self.config.level or state.num_tokens != self.vit.num_tokens:
                raise ValueError(
                    f"state for level {state.level!r} with {state.num_tokens} tokens does not fit this runner "
                    f"(level {self.config.level!r}, {self.vit.num_tokens} tokens): create it with new_state()"
                )
            if state.pool is not pool or state.slot < 0:
                raise ValueError("the states of one step must hold slots of one pool (create them with new_state())")
        np_ = self.vit.num_patches
        if seeds is not None:
            unseeded = [j for j in range(b) if states[j].needs_dense and not seeds[j]]
            if unseeded and not all(bud.is_dense_for(np_) for bud in budgets):
                raise ValueError(f"the states of rows {unseeded} are not seeded: their frames must seed")
        if all(bud.is_dense_for(np_) for bud in budgets) and not (seeds is not None and any(seeds)):
            return self._plain_dense(images, states)
        dense_frame = [self._dense_frame(s) for s in states] if seeds is None else list(seeds)
        # A stream computing every token (a joiner's first frame, a refresh, a full budget) runs in a seeding call
        # of its own: beside the sparse streams it would widen every row to all N tokens.
        every = [j for j in range(b) if dense_frame[j] or budgets[j].is_dense_for(np_)]
        some = [j for j in range(b) if j not in every]
        every.sort(key=lambda j: states[j].slot)  # in slot order: consecutive slots are views, not gathers (eager)
        some.sort(key=lambda j: states[j].slot)
        parts = []
        if every:
            parts.append((every, *self._run(pool, images, states, budgets, every, seed=True)))
        if some:
            parts.append((some, *self._run(pool, images, states, budgets, some, seed=False)))
        macs, counts = [0] * b, [None] * b
        for members, _, _, member_counts in parts:
            for j, c in zip(members, member_counts, strict=True):
                counts[j] = c
                macs[j] = self._dense_frame_macs if dense_frame[j] else self._frame_macs(c)
        for j, state in enumerate(states):
            if dense_frame[j]:
                state.needs_dense = False
                state.frames_since_dense = 0
            else:
                state.frames_since_dense += 1
        order = [j for members, *_ in parts for j in members]
        x, logits = (parts[0][1], parts[0][2]) if len(parts) == 1 else (torch.cat([p[1] for p in parts]),
                                                                         torch.cat([p[2] for p in parts]))
        if order != list(range(b)):
            inverse = _device_ints(sorted(range(b), key=order.__getitem__), x.device)
            x, logits = x.index_select(0, inverse), logits.index_select(0, inverse)
        return StepOutput(logits, x, torch.tensor(counts, dtype=torch.long), macs, self._dense_frame_macs, dense_frame)

    def _dense_frame(self, state: StreamState) -> bool:
        """This frame (re)seeds the stream's state: its first, the first after a flush, or a refresh."""
        refresh = self.config.refresh_interval
        return state.needs_dense or (refresh is not None and state.frames_since_dense + 1 >= refresh)

    def _frame_macs(self, counts: list[list[int]]) -> int:
        return self._fixed_macs + sum(self._block_macs(c) for c in counts)

    def _block_macs(self, counts: list[int]) -> int:
        n_qkv, n_proj, n_mlp = counts
        if n_qkv == n_proj == n_mlp == self.vit.num_tokens:
            return self._dense_block_macs
        return eventful_block_macs(self.vit, self.config.level, n_qkv, n_proj, n_mlp)

    def shape_for(self, budgets: list[StreamBudget], seed: bool = False) -> StepShape:
        """The shape a call over streams with these budgets runs (see `batch_bucket`, `token_bucket`)."""
        b, n, np_ = len(budgets), self.vit.num_tokens, self.vit.num_patches
        rows = batch_bucket(b) if self.bucketed else b
        if seed:
            return StepShape(rows, n, "seed")
        r = max(self._cap(bud) for bud in budgets)
        return StepShape(rows, self.vit.num_prefix_tokens + (token_bucket(r, np_) if self.bucketed else r), "sparse")

    def _run(self, pool: StatePool, images: torch.Tensor, states: list[StreamState], budgets: list[StreamBudget],
             members: list[int], seed: bool) -> tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]]:
        """One fixed-shape call over these members (indices into the batch): (x [b, N, C], logits [b, K], counts
        per member [depth][3])."""
        b, n, prefix = len(members), self.vit.num_tokens, self.vit.num_prefix_tokens
        shape = self.shape_for([budgets[j] for j in members], seed)
        pad = shape.batch - b
        chosen = images if members == list(range(images.shape[0])) else images.index_select(
            0, _device_ints(members, images.device))
        if pad:
            chosen = torch.cat([chosen, chosen.new_zeros((pad, *chosen.shape[1:]))])
        slots = [states[j].slot for j in members] + [pool.scratch] * pad
        meta = list(slots)
        if not seed:  # limits [rows, width]: a rank is updated when its key >= its limit (see _gate)
            for j in [*members, *([None] * pad)]:
                bud = budgets[j] if j is not None else StreamBudget(tokens=0)
                cap = self._cap(bud)
                key = INT64_MIN if bud.threshold is None else _float_bits(bud.threshold * self._norm_scale) * n
                meta += [INT64_MIN] * prefix + [key] * cap + [INT64_MAX] * (shape.width - prefix - cap)
        meta_t = _device_ints(meta, chosen.device)
        slots_t, limits_t = meta_t[: shape.batch], meta_t[shape.batch :].view(shape.batch, -1)
        if self.config.execution == "eager" and not pad and slots == list(range(slots[0], slots[0] + b)):
            slots_t = range(slots[0], slots[0] + b)
        if not seed and self._every_rank_counts(shape, [budgets[j] for j in members], pad):
            limits_t = shape.width  # no masks to compute: every rank of every row is within its budget
        x, logits, valid = self._executor(pool, shape)(chosen, slots_t, limits_t)
        if seed:
            counts = [[[n] * 3] * self.vit.depth] * b
        elif any(budgets[j].threshold is not None for j in members):
            per_gate = valid[:b].sum(dim=-1).cpu()  # [b, depth * gates]: the step's one read-back
            counts = [self._gate_counts(row.tolist()) for row in per_gate]
        else:
            counts = []
            for j in members:
                counts.append([[prefix + self._cap(budgets[j])] * 3] * self.vit.depth)
        return x[:b], logits[:b], counts

    def _every_rank_counts(self, shape: StepShape, budgets: list[StreamBudget], pad: int) -> bool:
        """Eager token-wise steps whose rows all update every rank (the same top-r, no threshold, no padding) skip
        the masks (two operators a gate)."""
        width = shape.width - self.vit.num_prefix_tokens
        return (self.config.execution == "eager" and self.config.level == "tokenwise" and not pad
                and all(b.threshold is None and self._cap(b) == width for b in budgets))

    def _cap(self, budget: StreamBudget) -> int:
        """Patch tokens a budget may update per gate (its r, or every patch)."""
        np_ = self.vit.num_patches
        return np_ if budget.tokens is None else min(budget.tokens, np_)

    def _gate_counts(self, per_gate: list[int]) -> list[list[int]]:
        """Tokens per gate [depth * gates] -> [depth][qkv, proj, mlp] (token-wise: proj follows qkv)."""
        if self.config.level == "tokenwise":
            return [[per_gate[2 * i], per_gate[2 * i], per_gate[2 * i + 1]] for i in range(self.vit.depth)]
        return [per_gate[3 * i : 3 * i + 3] for i in range(self.vit.depth)]

    def _plain_dense(self, images: torch.Tensor, states: list[StreamState]) -> StepOutput:
        """Every stream asked for its full budget: the plain dense model, at exactly its cost. The states are not
        seeded (that would cost writes), so each stream's next sparse frame runs densely and seeds them."""
        b = images.shape[0]
        shape = StepShape(batch_bucket(b) if self.bucketed else b, self.vit.num_tokens, "plain")
        padded = images if shape.batch == b else torch.cat([images, images.new_zeros((shape.batch - b,
                                                                                      *images.shape[1:]))])
        x, logits, _ = self._executor(self.pool, shape)(padded, None, None)
        for state in states:
            state.flush()
        counts = torch.full((b, self.vit.depth, 3), self.vit.num_tokens, dtype=torch.long)
        macs = self._dense_frame_macs
        return StepOutput(logits[:b], x[:b], counts, [macs] * b, macs, [True] * b)

    # ---- executors: the same pure function, eager, compiled or captured per shape ---------------

    def _executor(self, pool: StatePool, shape: StepShape):
        fn = {"sparse": self._sparse_step, "seed": self._seed_step, "plain": self._plain_step}[shape.kind]
        execution = self.config.execution
        if execution == "eager":
            return lambda images, slots, limits: fn(images, slots, limits, pool.layers)
        # compiled: one executor per step kind, its sizes dynamic (dynamo specialises a batch of 1 and compiles a
        # second graph for the rest); captured: one per shape
        key = (shape.kind if execution == "compile" else shape, id(pool), pool.generation)
        if key not in self._executors:
            if execution == "compile":
                _raise_recompile_limits()
                compiled = torch.compile(fn, fullgraph=True, dynamic=True)
                self._executors[key] = lambda images, slots, limits: compiled(images, slots, limits, pool.layers)
            elif execution == "graph":
                self._executors[key] = _CapturedStep(self, fn, pool, shape)
            else:  # compile-graph: compiled on the warm-up calls, then captured
                _raise_recompile_limits()
                self._executors[key] = _CapturedStep(self, torch.compile(fn, fullgraph=True, dynamic=False), pool,
                                                     shape)
        return self._executors[key]

    def prepare(self, shapes: list[StepShape]) -> None:
        """Compile or capture these shapes now (start-up), not on the first frames that need them."""
        for shape in shapes:
            self._executor(self.pool, shape)
            if self.config.execution == "compile":  # torch.compile compiles on the first call
                h, w = self.vit.image_size
                images = torch.zeros(shape.batch, 3, h, w, device=self._tiebreak.device, dtype=self.pool.dtype)
                slots = torch.full((shape.batch,), self.pool.scratch, dtype=torch.int64, device=images.device)
                limits = torch.full((shape.batch, shape.width), INT64_MAX, dtype=torch.int64, device=images.device)
                with torch.inference_mode():
                    self._executor(self.pool, shape)(images, slots, limits)

    # ---- the step functions (pure tensor code: no host sync, fixed shapes) ------------------------

    def _plain_step(self, images, slots, limits, layers):
        x = self.model.forward_features(images)  # [B, N, C]
        return x, self.model.forward_head(x), None

    def _seed_step(self, images, slots, limits, layers):
        """Every token of every row, writing each row's slot whole (padding rows write scratch)."""
        x = self.model.embed(images)  # [B, N, C]
        for i, block in enumerate(self.model.blocks):
            x = self.model.after_block(self._seed_block(block, x, layers[i], slots), i)
        return x, self.model.forward_head(x), None

    def _sparse_step(self, images, slots, limits, layers):
        """Rows' top tokens per gate, within each row's limits. Returns x, logits and valid [B, gates, W].
        limits: [B, W], or the width W alone when every rank of every row is updated (eager: no masks, valid None)."""
        n, device = self.vit.num_tokens, images.device
        batch_rows = torch.arange(images.shape[0], device=device)[:, None] * n
        scratch_row = (layers[0]["qkv_reference"].shape[0] - 1) * n
        slot_index = torch.arange(slots.start, slots.stop, device=device) if isinstance(slots, range) else slots
        width, limits = (limits, None) if isinstance(limits, int) else (limits.shape[1], limits)
        ctx = _Context(slots, limits, slot_index[:, None] * n, batch_rows, scratch_row, width)
        valids: list[torch.Tensor] = []
        x = self.model.embed(images)  # [B, N, C]
        for i, block in enumerate(self.model.blocks):
            x = self.model.after_block(self._sparse_block(block, x, layers[i], ctx, valids), i)
        return x, self.model.forward_head(x), torch.stack(valids, dim=1) if valids else None

    # ---- gates ---------------------------------------------------------------------------------

    def _gate(self, g: torch.Tensor, reference: torch.Tensor, ctx: _Context, redirect: bool = False) -> _Gate:
        """Rank tokens by the change of g [B, N, C] against the slots' reference rows [slots + 1, N, C], keep each
        row's ranks within its limits, and move the reference to g at the kept tokens.

        Keys are the change's float bits (non-negative floats order like their bits) times N plus a tie-break, so
        `keys >= bits(threshold * sqrt(C)) * N` is `RMS change >= threshold`, and a rank's limit encodes both the
        top-r cut and the threshold. redirect: ranks outside the budget point at the row's first token (a prefix
        token), so their computed values equal a kept token's and writes through them are harmless (the qk and
        full levels scatter into batch copies)."""
        b, n, c = g.shape
        change = torch.linalg.vector_norm(g - _rows(reference, ctx.slots), dim=-1)  # [B, N]: sqrt(C) x RMS
        keys = torch.add(self._tiebreak, change.float().view(torch.int32).to(torch.int64), alpha=n)  # [B, N]
        top, index = _counted_topk(keys, ctx.width) if self._rank_by_count() else keys.topk(ctx.width, dim=1)
        # top, index: [B, W], prefix tokens first
        # rows of the batch's [B * N] view (one row: the token indices themselves)
        batch_rows = index.flatten() if b == 1 else (index + ctx.batch_rows).flatten()
        if ctx.limits is None and isinstance(ctx.slots, range):  # every rank counts, the slots are one view
            gate = _Gate(index, None, None, batch_rows, ctx.slots)
        elif ctx.limits is None:  # every rank is updated
            gate = _Gate(index, None, (index + ctx.slot_rows).flatten(), batch_rows)
        else:
            valid = top >= ctx.limits
            if redirect:
                index = torch.where(valid, index, index[:, :1])
                batch_rows = index.flatten() if b == 1 else (index + ctx.batch_rows).flatten()
            gate = _Gate(index, valid, torch.where(valid, index + ctx.slot_rows, ctx.scratch_row).flatten(), batch_rows)
        gate.write(reference, gate.take(g))
        return gate

    def _rank_by_count(self) -> bool:
        """Compiled steps may rank a gate's keys by counting (pointwise work and a reduction, fused into the gate's
        kernel) instead of topk (an extern kernel that splits the gate in three): see EventfulConfig.gate_rank."""
        return self._count_ranks and torch.compiler.is_compiling()

    # ---- one block -----------------------------------------------------------------------------

    def _seed_block(self, block: Block, x: torch.Tensor, layer: dict[str, torch.Tensor], slots: torch.Tensor):
        """The dense block, writing every buffer of the rows' slots. x: [B, N, C]."""
        normed, level, c = self.config.gate_position == "normed", self.config.level, self.vit.embed_dim
        attn = block.attn
        h = block.norm1(x)
        _write_rows(layer["qkv_reference"], slots, h if normed else x)
        qkv = linear(h, attn.qkv)  # [B, N, 3C]
        _write_rows(layer["key_values"], slots, qkv[..., c:])
        q, k, v = attn.split_heads(qkv)  # [B, H, N, Dh]
        if level == "tokenwise":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            _write_rows(layer["queries"], slots, qkv[..., :c])
            logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            if level == "qk":
                _write_rows(layer["attention_logits"], slots, logits)
                out = logits.softmax(dim=-1) @ v
            else:
                offset = logits.amax(dim=-1)  # [B, H, N]
                weights = torch.exp(logits - offset[..., None])
                row_sum = weights.sum(dim=-1)
                weighted = weights @ v
                for name, t in (("exp_weights", weights), ("row_offset", offset), ("row_sum", row_sum),
                                ("weighted_values", weighted)):
                    _write_rows(layer[name], slots, t)
                out = weighted / row_sum[..., None]
        out = _merge(out)  # [B, N, C]
        if level != "tokenwise":
            _write_rows(layer["proj_reference"], slots, out)
        return self._seed_block_rest(block, x, out, layer, slots)

    def _seed_block_rest(self, block, x: torch.Tensor, attention: torch.Tensor, layer: dict[str, torch.Tensor],
                         slots) -> torch.Tensor:
        """A seeding block after its attention ([B, N, C], before proj): proj, the residual, the MLP branch, every
        buffer of the rows' slots written."""
        update = linear(attention, block.attn.proj)
        _write_rows(layer["attention_update"], slots, update)
        x = x + update
        h = block.norm2(x)
        _write_rows(layer["mlp_reference"], slots, h if self.config.gate_position == "normed" else x)
        update = block.mlp(h)
        _write_rows(layer["mlp_update"], slots, update)
        return x + update

    def _sparse_block(self, block: Block, x: torch.Tensor, layer: dict[str, torch.Tensor], ctx: _Context,
                      valids: list[torch.Tensor]) -> torch.Tensor:
        # x: [B, N, C] current residual stream
        level, c, attn = self.config.level, self.vit.embed_dim, block.attn
        heavy = level != "tokenwise"
        gate, h = self._gated_input(block.norm1, x, layer["qkv_reference"], ctx, valids, redirect=heavy)
        qkv = linear(h, attn.qkv)  # [B, W, 3C]
        if level == "tokenwise":
            gate.write(layer["key_values"], qkv.view(-1, 3 * c)[:, c:])  # a strided view: written without a copy
            kv = _rows(layer["key_values"], ctx.slots)  # [B, N, 2C]
            heads = attn.num_heads
            out = F.scaled_dot_product_attention(_heads(qkv[..., :c], heads), _heads(kv[..., :c], heads),
                                                 _heads(kv[..., c:], heads))  # [B, H, W, Dh]
            gate.write(layer["attention_update"], linear(_merge(out), attn.proj))
        else:
            out = self._attention_heavy(attn, qkv, gate, layer, ctx)  # [B, N, C]
            proj_gate = self._gate(out, layer["proj_reference"], ctx)
            valids.append(proj_gate.valid)
            proj_gate.write(layer["attention_update"], linear(proj_gate.take(out), attn.proj))
        return self._mlp_branch(block, x + _rows(layer["attention_update"], ctx.slots), layer, ctx, valids)

    def _gated_input(self, norm, x: torch.Tensor, reference: torch.Tensor, ctx: _Context, valids: list[torch.Tensor],
                     redirect: bool = False) -> tuple[_Gate, torch.Tensor]:
        """A branch's gate on x [B, N, C] (residual gates) or on norm(x) (normed gates), and the branch's input at the
        ranked tokens, norm(x) there [B, W, C] (residual gates: LayerNorm on those tokens only)."""
        normed = self.config.gate_position == "normed"
        h_all = norm(x) if normed else None
        gate = self._gate(h_all if normed else x, reference, ctx, redirect)
        if gate.valid is not None:
            valids.append(gate.valid)
        return gate, gate.take(h_all) if normed else norm(gate.take(x))

    def _mlp_branch(self, block, x: torch.Tensor, layer: dict[str, torch.Tensor], ctx: _Context,
                    valids: list[torch.Tensor]) -> torch.Tensor:
        """x + the MLP branch: updated at the MLP gate's tokens, reused elsewhere."""
        gate, h = self._gated_input(block.norm2, x, layer["mlp_reference"], ctx, valids)
        gate.write(layer["mlp_update"], block.mlp(h))
        return x + _rows(layer["mlp_update"], ctx.slots)

    # ---- attention for the query-key and attention-value levels ---------------------------------

    def _attention_heavy(self, attn, qkv: torch.Tensor, gate: _Gate, layer: dict[str, torch.Tensor],
                         ctx: _Context) -> torch.Tensor:
        """The rows' attention buffers copied out of the pool, updated in place at the gate's tokens (ranks outside
        the budget redirected, see _gate), written back whole. qkv: [B, W, 3C] -> attention output [B, N, C]."""
        c, heads = self.vit.embed_dim, attn.num_heads
        names = ["queries", "key_values", *(["attention_logits"] if self.config.level == "qk" else
                                            ["exp_weights", "row_offset", "row_sum", "weighted_values"])]
        work = {name: _rows(layer[name], ctx.slots) for name in names}
        index = gate.index  # [B, W]
        old_values = None
        if self.config.level == "full":
            old_values = _heads(work["key_values"][..., c:], heads).gather(2, self._head_index(index, heads))
        work["queries"].scatter_(1, index[..., None].expand(-1, -1, c), qkv[..., :c])
        work["key_values"].scatter_(1, index[..., None].expand(-1, -1, 2 * c), qkv[..., c:])
        queries = _heads(work["queries"], heads)  # [B, H, N, Dh]
        keys, values = _heads(work["key_values"][..., :c], heads), _heads(work["key_values"][..., c:], heads)
        if self.config.level == "qk":
            out = self._attention_qk(queries, keys, values, index, work["attention_logits"])
        else:
            out = self._attention_full(queries, keys, values, old_values, index, gate.valid, work)
        for name, tensor in work.items():
            _write_rows(layer[name], ctx.slots, tensor)
        return _merge(out)

    def _head_index(self, index: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, W] token index -> [B, H, W, Dh] for gathers along the token dim of [B, H, N, Dh]."""
        return index[:, None, :, None].expand(-1, heads, -1, self.vit.head_dim)

    def _attention_qk(self, queries, keys, values, index, logits) -> torch.Tensor:
        """Query-key level: Q.K^T updated by rows (changed queries) and columns (changed keys); A.V dense."""
        h, n = queries.shape[1], queries.shape[2]
        idx = self._head_index(index, h)
        k_pad, q_pad = keys.gather(2, idx), queries.gather(2, idx)  # [B, H, W, Dh]
        columns = (queries * self.scale) @ k_pad.transpose(-2, -1)  # [B, H, N, W]
        logits.scatter_(3, index[:, None, None, :].expand(-1, h, n, -1), columns)
        rows = (q_pad * self.scale) @ keys.transpose(-2, -1)  # [B, H, W, N]
        logits.scatter_(2, index[:, None, :, None].expand(-1, h, -1, n), rows)
        return logits.softmax(dim=-1) @ values  # [B, H, N, Dh]

    def _attention_full(self, queries, keys, values, old_values, index, valid, work) -> torch.Tensor:
        """Attention-value level: exact incremental softmax(Q.K^T).V.

        The softmax is kept unnormalised (exp weights with a per-row offset, row sums, weights @ values),
        so a changed key/value column updates every row's numerator and denominator alike: no drift
        from missing renormalisation. Changed queries recompute their rows.
        """
        h, n = queries.shape[1], queries.shape[2]
        weights, offset = work["exp_weights"], work["row_offset"]  # [B, H, N, N], [B, H, N]
        row_sum, weighted = work["row_sum"], work["weighted_values"]  # [B, H, N], [B, H, N, Dh]
        idx = self._head_index(index, h)
        keep = valid[:, None, None, :].to(weights.dtype)  # [B, 1, 1, W]; redirected ranks count once only
        col_index = index[:, None, None, :].expand(-1, h, n, -1)  # [B, H, N, W]
        new_k, new_v = keys.gather(2, idx), values.gather(2, idx)  # [B, H, W, Dh]
        col_logits = (queries * self.scale) @ new_k.transpose(-2, -1)  # [B, H, N, W]
        new_offset = torch.maximum(offset, col_logits.amax(dim=-1))
        rescale = torch.exp(offset - new_offset)  # [B, H, N] <= 1
        weights.mul_(rescale[..., None])
        weighted.mul_(rescale[..., None])
        row_sum.mul_(rescale)
        offset.copy_(new_offset)
        old_cols = weights.gather(3, col_index) * keep  # [B, H, N, W]
        new_cols_all = torch.exp(col_logits - offset[..., None])
        new_cols = new_cols_all * keep
        weighted.add_(new_cols @ new_v - old_cols @ old_values)
        row_sum.add_(new_cols.sum(dim=-1) - old_cols.sum(dim=-1))
        weights.scatter_(3, col_index, new_cols_all)

        # rows of the changed queries, recomputed exactly
        row_index = index[:, None, :]  # [B, 1, W]
        row_logits = (queries.gather(2, idx) * self.scale) @ keys.transpose(-2, -1)  # [B, H, W, N]
        row_offset = row_logits.amax(dim=-1)  # [B, H, W]
        row_weights = torch.exp(row_logits - row_offset[..., None])
        weights.scatter_(2, row_index[..., None].expand(-1, h, -1, n), row_weights)
        offset.scatter_(2, row_index.expand(-1, h, -1), row_offset)
        row_sum.scatter_(2, row_index.expand(-1, h, -1), row_weights.sum(dim=-1))
        weighted.scatter_(2, idx, row_weights @ values)
        return weighted / row_sum[..., None]  # [B, H, N, Dh]


@dataclass(frozen=True)
class _Context:
    """Per-call tensors every gate of a sparse step uses."""

    slots: torch.Tensor | range  # [B] pool slot per row (padding rows: scratch); eager: a range when consecutive
    limits: torch.Tensor | None  # [B, W] int64 key a rank must reach to be updated; None: every rank is
    slot_rows: torch.Tensor  # [B, 1] slot * N: first row of each slot in a [(slots + 1) * N] view
    batch_rows: torch.Tensor  # [B, 1] b * N: first row of each batch row in a [B * N] view
    scratch_row: int  # first row of the scratch slot
    width: int


def _counted_topk(keys: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys.topk(width, dim=1) of distinct keys [B, N] -> (top, index) [B, W]: a key's rank is the number of larger
    keys in its row (a permutation of 0..N-1), and the token of rank k is the one scattered to position k."""
    n = keys.shape[1]
    rank = (keys[:, None, :] > keys[:, :, None]).sum(dim=-1)  # [B, N]
    tokens = torch.arange(n, device=keys.device).expand_as(rank)
    index = torch.empty_like(rank).scatter_(1, rank, tokens)[:, :width]  # [B, W] tokens by descending key
    return keys.gather(1, index), index


def _rows(buffer: torch.Tensor, slots: torch.Tensor | range) -> torch.Tensor:
    """The slots' rows of a pool buffer [slots + 1, ...] -> [B, ...]: a view for a range of consecutive slots
    (eager steps), a gather otherwise."""
    if isinstance(slots, range):
        return buffer[slots.start : slots.stop]
    return buffer.index_select(0, slots)


def _write_rows(buffer: torch.Tensor, slots: torch.Tensor | range, values: torch.Tensor) -> None:
    """values [B, ...] into the slots' rows of a pool buffer."""
    if isinstance(slots, range):
        buffer[slots.start : slots.stop].copy_(values)
    else:
        buffer.index_copy_(0, slots, values)


def _device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor on `device`; from pinned memory, without blocking the host, on CUDA."""
    tensor = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _float_bits(value: float) -> int:
    """The bit pattern of a non-negative float32 (orders like the floats)."""
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))


def _raise_recompile_limits() -> None:
    """One compiled graph per step shape: more shapes than dynamo's default recompile limit (8)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)


class _CapturedStep:
    """One step shape captured as a CUDA graph: static input buffers, replayed with each call's inputs copied in.

    Warm-up and capture run with every row on the scratch slot, so they write no stream's state."""

    def __init__(self, runner: EventfulViT, fn, pool: StatePool, shape: StepShape):
        device = runner._tiebreak.device
        h, w = runner.vit.image_size
        self.kind = shape.kind
        self.images = torch.zeros(shape.batch, 3, h, w, device=device, dtype=pool.dtype)
        self.slots = torch.full((shape.batch,), pool.scratch, dtype=torch.int64, device=device)
        self.limits = torch.full((shape.batch, shape.width), INT64_MAX, dtype=torch.int64, device=device)
        if runner._graph_pool is None:
            runner._graph_pool = torch.cuda.graph_pool_handle()
        before = torch.cuda.memory_reserved(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                fn(self.images, self.slots, self.limits, pool.layers)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=runner._graph_pool):
            self.outputs = fn(self.images, self.slots, self.limits, pool.layers)
        runner.graph_bytes += torch.cuda.memory_reserved(device) - before

    def __call__(self, images, slots, limits):
        self.images.copy_(images, non_blocking=True)
        if self.kind != "plain":
            self.slots.copy_(slots, non_blocking=True)
        if self.kind == "sparse":
            self.limits.copy_(limits, non_blocking=True)
        self.graph.replay()
        return tuple(None if t is None else t.clone() for t in self.outputs)


def full_budget(num_patches: int) -> StreamBudget:
    """A top-r budget that updates every token (the eventful path, not the dense shortcut)."""
    return StreamBudget(tokens=num_patches)


__all__ = ["EventfulConfig", "EventfulViT", "StepOutput", "StepShape", "batch_bucket", "full_budget", "token_bucket"]
