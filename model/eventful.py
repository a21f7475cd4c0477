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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.kernels import linear
from model.macs import dense_block_macs, dense_macs, embed_macs, eventful_block_macs, head_macs
from model.policy import Selection, StreamBudget, select_tokens
from model.state import LEVELS, Level, StreamState
from model.vit import Block, VisionTransformer

GATE_POSITIONS = ("normed", "residual")
EXECUTIONS = ("eager", "compile", "graph")


@dataclass(frozen=True)
class EventfulConfig:
    """How the eventful model gates (fixed per runner; budgets change per frame)."""

    level: Level = "tokenwise"
    # "residual": gate on the residual stream (LayerNorm then runs on selected tokens only; measured at least as
    # accurate on every clip we have); "normed": gate on the LayerNorm output of every token.
    gate_position: str = "residual"
    # Every K-th frame of a stream is dense, bounding accumulated error (None: only new/flushed streams).
    refresh_interval: int | None = None
    # How a step runs: "eager" (PyTorch ops, exact shapes), "compile" (torch.compile per shape bucket) or "graph"
    # (CUDA only: one captured CUDA graph per shape bucket, replayed). See EXECUTIONS.
    execution: str = "eager"

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.gate_position not in GATE_POSITIONS:
            raise ValueError(f"gate_position must be one of {GATE_POSITIONS}, got {self.gate_position!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.refresh_interval is not None and self.refresh_interval < 1:
            raise ValueError("refresh_interval must be >= 1 or None")


@dataclass
class StepOutput:
    """What one batched step returns, per stream."""

    logits: torch.Tensor  # [B, num_classes]
    tokens: torch.Tensor  # [B, N, C] final residual stream (before the final norm)
    updated_tokens: torch.Tensor  # [B, depth, 3] tokens through the qkv / proj / MLP gates (incl. prefix)
    macs: list[int]  # MACs done per stream this frame (incl. gate overhead)
    dense_macs: int  # MACs of one dense frame
    dense_frame: list[bool]  # which streams were computed densely (new, flushed or refreshed)

    @property
    def updated_fraction(self) -> torch.Tensor:
        """[B] mean fraction of tokens updated over all gates."""
        n = self.tokens.shape[1]
        return self.updated_tokens.float().mean(dim=(1, 2)) / n

    @staticmethod
    def concat(outputs: list[StepOutput]) -> StepOutput:
        """The outputs of steps over disjoint streams as one, their streams in the order given."""
        return StepOutput(
            torch.cat([o.logits for o in outputs]), torch.cat([o.tokens for o in outputs]),
            torch.cat([o.updated_tokens for o in outputs]), [m for o in outputs for m in o.macs],
            outputs[0].dense_macs, [d for o in outputs for d in o.dense_frame],
        )

    def reordered(self, index: list[int]) -> StepOutput:
        """The same output with its streams in the order `index` gives."""
        idx = torch.tensor(index, device=self.logits.device)
        return StepOutput(
            self.logits[idx], self.tokens[idx], self.updated_tokens[torch.tensor(index)],
            [self.macs[i] for i in index], self.dense_macs, [self.dense_frame[i] for i in index],
        )


class _LayerBatch:
    """Batched views of one layer's buffers across the streams of a step.

    One stream: zero-copy views, so in-place writes land in the state directly.
    Several streams: the streams' buffers are rows of one [B, ...] slab. The first step of a new batch
    composition stacks them (or allocates, for buffers the step overwrites whole) and re-points every stream's
    buffer at its row of the slab; later steps of the same streams in the same order use the slab as it is
    (no copies: in-place writes land in the states). `write_rows` / `write_all` are kept for the copy-back
    variant and are no-ops on slabs. A stream that leaves keeps the slab alive until the others are re-batched.
    """

    def __init__(self, states: list[StreamState], layer_index: int):
        self.layers = [state.layers[layer_index] for state in states]
        self.single = len(self.layers) == 1
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str, overwrite: bool = False) -> torch.Tensor:
        """The [B, ...] buffer; overwrite=True: the caller writes every element, so nothing is gathered."""
        if name not in self._cache:
            tensors = [getattr(layer, name) for layer in self.layers]
            if self.single:
                self._cache[name] = tensors[0].unsqueeze(0)
                return self._cache[name]
            slab = _shared_slab(tensors)
            if slab is None:
                if overwrite:
                    slab = tensors[0].new_empty((len(tensors), *tensors[0].shape))
                else:
                    slab = torch.stack(tensors)
                for layer, row in zip(self.layers, slab.unbind(0), strict=True):
                    setattr(layer, name, row)
            self._cache[name] = slab
        return self._cache[name]

    def _is_slab(self, name: str) -> bool:
        """True once the streams' buffers are rows of the cached batch (always, after `get`)."""
        batched, row = self._cache[name], getattr(self.layers[0], name)
        return batched.untyped_storage().data_ptr() == row.untyped_storage().data_ptr()

    def write_rows(self, name: str, selection: Selection, token_dim: int) -> None:
        """Copy the selected tokens of a [B, ...] buffer back into each stream's state."""
        if self.single or self._is_slab(name):
            return
        if selection.everything:
            self.write_all(name)
            return
        batched = self._cache[name]
        for b, layer in enumerate(self.layers):
            index = selection.padded[b]
            target = getattr(layer, name)
            if token_dim == 0:
                target[index] = batched[b, index]
            else:
                target[:, index] = batched[b, :, index]

    def write_all(self, *names: str) -> None:
        if self.single:
            return
        for name in names:
            if self._is_slab(name):
                continue
            batched = self._cache[name]
            for b, layer in enumerate(self.layers):
                getattr(layer, name).copy_(batched[b])


def _shared_slab(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A [B, ...] view whose rows, in order, are these tensors (consecutive rows of one storage), or None.

    Decided from storage and offsets (inference tensors do not record their view base)."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    storage, row = first.untyped_storage().data_ptr(), first.numel()
    start = first.storage_offset()
    for b, tensor in enumerate(tensors):
        if (
            tensor.untyped_storage().data_ptr() != storage
            or tensor.storage_offset() != start + b * row
            or not tensor.is_contiguous()
        ):
            return None
    return first.as_strided((len(tensors), *first.shape), (row, *first.stride()), start)


def _slab_order(states: list[StreamState]) -> list[int]:
    """Batch order in which streams that shared a slab last step find their rows in order (by buffer address)."""
    return sorted(range(len(states)), key=lambda j: states[j].layers[0].keys.data_ptr())


class EventfulViT:
    """Runs a VisionTransformer's weights over many streams' explicit states.

    `step(images, states, budgets)` takes one frame per stream. Holds no per-stream data.
    """

    def __init__(self, model: VisionTransformer, config: EventfulConfig | None = None):
        self.model = model
        self.config = config or EventfulConfig()
        self.vit = model.config
        self.scale = self.vit.head_dim**-0.5
        self._dense_block_macs = dense_block_macs(self.vit)
        self._fixed_macs = embed_macs(self.vit) + head_macs(self.vit)
        self._all_selections: dict[tuple[int, torch.device], Selection] = {}

    def new_state(self) -> StreamState:
        p = next(self.model.parameters())
        return StreamState.create(self.vit, self.config.level, device=p.device, dtype=p.dtype)

    @torch.inference_mode()
    def step(
        self, images: torch.Tensor, states: list[StreamState], budgets: list[StreamBudget] | None = None
    ) -> StepOutput:
        """One frame for each of B streams. images: [B, 3, H, W]."""
        b = images.shape[0]
        budgets = budgets if budgets is not None else [StreamBudget.dense()] * b
        if not (len(states) == len(budgets) == b):
            raise ValueError(f"got {b} images, {len(states)} states and {len(budgets)} budgets")
        for state in states:
            if state.level != self.config.level or state.num_tokens != self.vit.num_tokens:
                raise ValueError(
                    f"state for level {state.level!r} with {state.num_tokens} tokens does not fit this runner "
                    f"(level {self.config.level!r}, {self.vit.num_tokens} tokens): create it with new_state()"
                )
        if all(bud.is_dense_for(self.vit.num_patches) for bud in budgets):
            return self._plain_dense(images, states)
        every = [j for j in range(b) if self._computes_every_token(states[j], budgets[j])]
        if 0 < len(every) < b:
            # a stream computing every token (a joiner's first frame, a refresh, a full budget) would pad the
            # others' attention queries to all N tokens (the padded form is as wide as its widest stream): on the
            # 2-core CPU (DeiT-Tiny), a joiner's first frame in a step of 7 streams at r = 57 cost 48 ms, beside it
            # 23. Two steps, one answer.
            some = [j for j in range(b) if j not in every]
            order = some + every
            out = StepOutput.concat([self._step_in_slab_order(images, states, budgets, g) for g in (some, every)])
            return out.reordered(sorted(range(b), key=order.__getitem__))
        return self._step_in_slab_order(images, states, budgets, list(range(b)))

    def _computes_every_token(self, state: StreamState, budget: StreamBudget) -> bool:
        return self._dense_frame(state) or budget.is_dense_for(self.vit.num_patches)

    def _dense_frame(self, state: StreamState) -> bool:
        """This frame (re)seeds the stream's state: its first, the first after a flush, or a refresh."""
        refresh = self.config.refresh_interval
        return state.needs_dense or (refresh is not None and state.frames_since_dense + 1 >= refresh)

    def _step_in_slab_order(self, images: torch.Tensor, states: list[StreamState], budgets: list[StreamBudget],
                            members: list[int]) -> StepOutput:
        """`_step` over these members (indices into the batch), run in slab order (no copies), answered in the
        members' order."""
        order = [members[j] for j in _slab_order([states[i] for i in members])]
        out = self._step(images[order] if order != list(range(len(images))) else images,
                         [states[i] for i in order], [budgets[i] for i in order])
        if order == members:
            return out
        rank = {i: k for k, i in enumerate(order)}
        return out.reordered([rank[i] for i in members])

    def _plain_dense(self, images: torch.Tensor, states: list[StreamState]) -> StepOutput:
        """Every stream asked for its full budget: the plain dense model, at exactly its cost. The states are not
        seeded (that would cost copies), so each stream's next sparse frame runs densely and seeds them."""
        x = self.model.forward_features(images)  # [B, N, C]
        logits = self.model.forward_head(x)
        for state in states:
            state.flush()
        b, depth = images.shape[0], self.vit.depth
        counts = torch.full((b, depth, 3), self.vit.num_tokens, dtype=torch.long)
        macs = dense_macs(self.vit)
        return StepOutput(logits, x, counts, [macs] * b, macs, [True] * b)

    def _step(self, images: torch.Tensor, states: list[StreamState], budgets: list[StreamBudget]) -> StepOutput:
        b = images.shape[0]
        dense_frame = [self._dense_frame(s) for s in states]
        budgets = [StreamBudget.dense() if dense else bud for dense, bud in zip(dense_frame, budgets, strict=True)]

        x = self.model.embed(images)  # [B, N, C]
        counts = torch.zeros(b, self.vit.depth, 3, dtype=torch.long)
        for i, block in enumerate(self.model.blocks):
            x = self._block(block, x, _LayerBatch(states, i), budgets, counts[:, i])
            x = self.model.after_block(x, i)  # e.g. YOLOS mid-position embeddings (the same on every frame)
        logits = self.model.forward_head(x)

        macs = []
        for j, state in enumerate(states):
            if dense_frame[j]:
                state.needs_dense = False
                state.frames_since_dense = 0
                macs.append(dense_macs(self.vit))
            else:
                state.frames_since_dense += 1
                macs.append(self._fixed_macs + sum(self._block_macs(c) for c in counts[j].tolist()))
        return StepOutput(logits, x, counts, macs, dense_macs(self.vit), dense_frame)

    def _block_macs(self, counts: list[int]) -> int:
        n_qkv, n_proj, n_mlp = counts
        if n_qkv == n_proj == n_mlp == self.vit.num_tokens:
            return self._dense_block_macs
        return eventful_block_macs(self.vit, self.config.level, n_qkv, n_proj, n_mlp)

    def _select_all(self, batch: int, device: torch.device) -> Selection:
        key = (batch, device)
        if key not in self._all_selections:
            keep = torch.ones(batch, self.vit.num_tokens, dtype=torch.bool, device=device)
            self._all_selections[key] = select_tokens(keep.float(), [StreamBudget.dense()] * batch, 0)
        return self._all_selections[key]

    # ---- gates ---------------------------------------------------------------------------------

    def _gate(
        self, gate_input: torch.Tensor, reference: torch.Tensor, budgets: list[StreamBudget]
    ) -> Selection:
        """Select tokens by RMS change against the reference, then move the reference at those tokens."""
        # gate_input, reference: [B, N, C]
        if all(bud.is_dense_for(self.vit.num_patches) for bud in budgets):
            reference.copy_(gate_input)
            return self._select_all(gate_input.shape[0], gate_input.device)
        change = (gate_input - reference).norm(dim=-1) * gate_input.shape[-1] ** -0.5  # [B, N]
        selection = select_tokens(change, budgets, self.vit.num_prefix_tokens)
        selection.scatter(reference, selection.gather(gate_input))
        return selection

    # ---- one block -----------------------------------------------------------------------------

    def _block(
        self, block: Block, x: torch.Tensor, lb: _LayerBatch, budgets: list[StreamBudget], counts: torch.Tensor
    ) -> torch.Tensor:
        # x: [B, N, C] current residual stream
        normed = self.config.gate_position == "normed"
        attn = block.attn
        h = block.norm1(x) if normed else None  # residual gates: LayerNorm on the selected tokens only
        all_dense = all(bud.is_dense_for(self.vit.num_patches) for bud in budgets)  # every buffer overwritten
        qkv_ref = lb.get("qkv_reference", overwrite=all_dense)
        sel = self._gate(h if normed else x, qkv_ref, budgets)
        lb.write_rows("qkv_reference", sel, 0)
        counts[:, 0] = torch.tensor(sel.counts)

        if sel.everything:
            attention_out = self._dense_attention(block, h if normed else block.norm1(x), lb)  # [B, N, C]
        else:
            h_sel = sel.gather(h) if normed else block.norm1(sel.gather(x))  # [T, C]
            q, k, v = attn.split_heads(linear(h_sel, attn.qkv).unsqueeze(0))  # each [1, H, T, Dh]
            q, k, v = (t.squeeze(0).transpose(0, 1) for t in (q, k, v))  # each [T, H, Dh]
            if self.config.level == "tokenwise":
                attention_out = self._attention_rows(attn, q, k, v, sel, lb)  # [T, C]
            elif self.config.level == "qk":
                attention_out = self._attention_qk(q, k, v, sel, lb)  # [B, N, C]
            else:
                attention_out = self._attention_full(q, k, v, sel, lb)  # [B, N, C]

        # attention output -> proj on the tokens that need it
        update = lb.get("attention_update", overwrite=sel.everything)
        if sel.everything:
            update.copy_(linear(attention_out, attn.proj))
            if self.config.level != "tokenwise":
                lb.get("proj_reference", overwrite=True).copy_(attention_out)
            counts[:, 1] = self.vit.num_tokens
            lb.write_all("attention_update", *(["proj_reference"] if self.config.level != "tokenwise" else []))
        elif self.config.level == "tokenwise":
            sel.scatter(update, linear(attention_out, attn.proj))
            counts[:, 1] = counts[:, 0]
            lb.write_rows("attention_update", sel, 0)
        else:
            proj_sel = self._gate(attention_out, lb.get("proj_reference"), budgets)
            proj_sel.scatter(update, linear(proj_sel.gather(attention_out), attn.proj))
            counts[:, 1] = torch.tensor(proj_sel.counts)
            lb.write_rows("proj_reference", proj_sel, 0)
            lb.write_rows("attention_update", proj_sel, 0)
        x = x + update

        # MLP branch
        h = block.norm2(x) if normed else None
        mlp_sel = self._gate(h if normed else x, lb.get("mlp_reference", overwrite=all_dense), budgets)
        lb.write_rows("mlp_reference", mlp_sel, 0)
        counts[:, 2] = torch.tensor(mlp_sel.counts)
        mlp_update = lb.get("mlp_update", overwrite=mlp_sel.everything)
        if mlp_sel.everything:
            mlp_update.copy_(block.mlp(h if normed else block.norm2(x)))
            lb.write_all("mlp_update")
        else:
            h_sel = mlp_sel.gather(h) if normed else block.norm2(mlp_sel.gather(x))  # [T, C]
            mlp_sel.scatter(mlp_update, block.mlp(h_sel))
            lb.write_rows("mlp_update", mlp_sel, 0)
        return x + mlp_update

    # ---- attention variants --------------------------------------------------------------------

    def _dense_attention(self, block: Block, h: torch.Tensor, lb: _LayerBatch) -> torch.Tensor:
        """Every token of every stream: the dense computation, seeding all buffers. h: [B, N, C] -> [B, N, C]."""
        attn = block.attn
        q, k, v = attn.split_heads(linear(h, attn.qkv))  # [B, H, N, Dh]
        lb.get("keys", overwrite=True).copy_(k)
        lb.get("values", overwrite=True).copy_(v)
        names = ["keys", "values"]
        level = self.config.level
        if level == "tokenwise":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            lb.get("queries", overwrite=True).copy_(q)
            logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            if level == "qk":
                lb.get("attention_logits", overwrite=True).copy_(logits)
                out = logits.softmax(dim=-1) @ v
                names += ["queries", "attention_logits"]
            else:
                offset = logits.amax(dim=-1)  # [B, H, N]
                weights = torch.exp(logits - offset[..., None])
                row_sum = weights.sum(dim=-1)
                weighted = weights @ v
                lb.get("exp_weights", overwrite=True).copy_(weights)
                lb.get("row_offset", overwrite=True).copy_(offset)
                lb.get("row_sum", overwrite=True).copy_(row_sum)
                lb.get("weighted_values", overwrite=True).copy_(weighted)
                out = weighted / row_sum[..., None]
                names += ["queries", "exp_weights", "row_offset", "row_sum", "weighted_values"]
        lb.write_all(*names)
        return attn.merge_heads(out)

    def _write_kv(self, lb: _LayerBatch, sel: Selection, **new: torch.Tensor) -> None:
        """Scatter new per-token heads ([T, H, Dh]) into the [B, H, N, Dh] buffers."""
        for name, tensor in new.items():
            buffer = lb.get(name)
            if buffer.is_contiguous():
                sel.scatter_heads(buffer, tensor)
            else:
                buffer[sel.batch_idx, :, sel.token_idx] = tensor
            lb.write_rows(name, sel, 1)

    def _attention_rows(self, attn, q, k, v, sel: Selection, lb: _LayerBatch) -> torch.Tensor:
        """Token-wise level: attention recomputed only for the selected queries, over all current keys."""
        self._write_kv(lb, sel, keys=k, values=v)
        q_pad = sel.to_padded(q).transpose(1, 2)  # [B, H, R, Dh]
        out = F.scaled_dot_product_attention(q_pad, lb.get("keys"), lb.get("values"))  # [B, H, R, Dh]
        return sel.from_padded(out.transpose(1, 2)).flatten(1)  # [T, C]

    def _attention_qk(self, q, k, v, sel: Selection, lb: _LayerBatch) -> torch.Tensor:
        """Query-key level: Q.K^T updated by rows (changed queries) and columns (changed keys); A.V dense."""
        self._write_kv(lb, sel, queries=q, keys=k, values=v)
        queries, keys, values = lb.get("queries"), lb.get("keys"), lb.get("values")
        logits = lb.get("attention_logits")  # [B, H, N, N]
        idx = sel.padded[:, None, :, None]  # [B, 1, R, 1]
        h, dh = queries.shape[1], queries.shape[3]
        k_pad = keys.gather(2, idx.expand(-1, h, -1, dh))  # [B, H, R, Dh]
        q_pad = queries.gather(2, idx.expand(-1, h, -1, dh))
        columns = (queries * self.scale) @ k_pad.transpose(-2, -1)  # [B, H, N, R]
        logits.scatter_(3, sel.padded[:, None, None, :].expand(-1, h, logits.shape[2], -1), columns)
        rows = (q_pad * self.scale) @ keys.transpose(-2, -1)  # [B, H, R, N]
        logits.scatter_(2, idx.expand(-1, h, -1, logits.shape[3]), rows)
        lb.write_all("attention_logits")
        out = logits.softmax(dim=-1) @ values  # [B, H, N, Dh]
        return out.transpose(1, 2).flatten(2)  # [B, N, C]

    def _attention_full(self, q, k, v, sel: Selection, lb: _LayerBatch) -> torch.Tensor:
        """Attention-value level: exact incremental softmax(Q.K^T).V.

        The softmax is kept unnormalised (exp weights with a per-row offset, row sums, weights @ values),
        so a changed key/value column updates every row's numerator and denominator alike: no drift
        from missing renormalisation. Changed queries recompute their rows.
        """
        b = sel.padded.shape[0]
        values = lb.get("values")
        h, dh = values.shape[1], values.shape[3]
        idx = sel.padded[:, None, :, None].expand(-1, h, -1, dh)  # [B, H, R, Dh]
        old_values = values.gather(2, idx)  # [B, H, R, Dh] before the update
        self._write_kv(lb, sel, queries=q, keys=k, values=v)
        queries, keys = lb.get("queries"), lb.get("keys")
        weights, offset = lb.get("exp_weights"), lb.get("row_offset")  # [B, H, N, N], [B, H, N]
        row_sum, weighted = lb.get("row_sum"), lb.get("weighted_values")  # [B, H, N], [B, H, N, Dh]
        n = weights.shape[2]
        valid = sel.valid[:, None, None, :].to(weights.dtype)  # [B, 1, 1, R]; padding counts once only
        col_index = sel.padded[:, None, None, :].expand(b, h, n, -1)  # [B, H, N, R]

        new_k, new_v = keys.gather(2, idx), values.gather(2, idx)  # [B, H, R, Dh]
        col_logits = (queries * self.scale) @ new_k.transpose(-2, -1)  # [B, H, N, R]
        new_offset = torch.maximum(offset, col_logits.amax(dim=-1))
        rescale = torch.exp(offset - new_offset)  # [B, H, N] <= 1
        weights.mul_(rescale[..., None])
        weighted.mul_(rescale[..., None])
        row_sum.mul_(rescale)
        offset.copy_(new_offset)
        old_cols = weights.gather(3, col_index) * valid  # [B, H, N, R]
        new_cols_all = torch.exp(col_logits - offset[..., None])
        new_cols = new_cols_all * valid
        weighted.add_(new_cols @ new_v - old_cols @ old_values)
        row_sum.add_(new_cols.sum(dim=-1) - old_cols.sum(dim=-1))
        weights.scatter_(3, col_index, new_cols_all)

        # rows of the changed queries, recomputed exactly
        row_index = sel.padded[:, None, :]  # [B, 1, R]
        q_rows = queries.gather(2, idx)  # [B, H, R, Dh]
        row_logits = (q_rows * self.scale) @ keys.transpose(-2, -1)  # [B, H, R, N]
        row_offset = row_logits.amax(dim=-1)  # [B, H, R]
        row_weights = torch.exp(row_logits - row_offset[..., None])
        weights.scatter_(2, row_index[..., None].expand(-1, h, -1, n), row_weights)
        offset.scatter_(2, row_index.expand(-1, h, -1), row_offset)
        row_sum.scatter_(2, row_index.expand(-1, h, -1), row_weights.sum(dim=-1))
        weighted.scatter_(2, idx, row_weights @ lb.get("values"))
        lb.write_all("exp_weights", "row_offset", "row_sum", "weighted_values")
        out = weighted / row_sum[..., None]  # [B, H, N, Dh]
        return out.transpose(1, 2).flatten(2)  # [B, N, C]


def full_budget(num_patches: int) -> StreamBudget:
    """A top-r budget that updates every token (the eventful path, not the dense shortcut)."""
    return StreamBudget(tokens=num_patches)


__all__ = ["EventfulConfig", "EventfulViT", "StepOutput", "full_budget"]
