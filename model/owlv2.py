"""OWLv2 (Minderer et al., NeurIPS 2023): open-vocabulary detection on a CLIP ViT. Weights only; the eventful step is
EventfulViT's (`EventfulOwlv2` adds the heads' MACs).

As transformers' Owlv2ForObjectDetection: a CLIP vision encoder ([cls, patches] + positions, pre-LayerNorm, blocks
with quick_gelu MLPs, post-LayerNorm), then the image-feature path: every patch token times the class token,
LayerNorm -> features [B, Np, C]. Per patch, a box (an MLP plus a bias from its grid cell), an objectness and a class
embedding, whose cosine with each text query (shifted and scaled per patch) is that patch's logit for the query.
Queries are encoded by a CLIP text encoder (causal blocks, EOS pooling, projection) once per change (`QueryCache`).

The class token is the one prefix token, so EventfulViT updates it on every frame and gates only the patch tokens.
Because it multiplies into every patch feature, the heads run on every patch every frame (they are cheap beside
the encoder: about 1 % of a dense OWLv2-B/16 frame). `forward_head` returns the feature map (what a step returns as
`StepOutput.logits`): the query embeddings belong to each stream, so logits against them are `class_logits`.

Frames are padded to a square (bottom and right, black) before the resize, as Owlv2ImageProcessor does, so
normalised boxes are fractions of the padded square: `postprocess_owlv2` scales them by the frame's longer side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Owlv2Config
from model.eventful import EventfulConfig, EventfulViT
from model.kernels import linear
from model.macs import dense_macs, embed_macs
from model.preprocess import Frame, Preprocessor, _as_list, _to_uint8_chw
from model.vit import Block, PatchEmbed, TokenEncoder
from model.yolos import Detections, boxes_to_corners

# --------------------------------------------------------------------------- blocks


class QuickGeluMlp(nn.Module):
    """CLIP's MLP: fc2(quick_gelu(fc1(x))), quick_gelu(x) = x * sigmoid(1.702 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., C] -> [..., C]
        h = linear(x, self.fc1)
        return linear(h * torch.sigmoid(1.702 * h), self.fc2)


class Owlv2Block(Block):
    """A CLIP pre-norm block: the ViT block (fused qkv, proj) with a quick_gelu MLP."""

    def __init__(self, config):
        super().__init__(config)
        self.mlp = QuickGeluMlp(config.embed_dim, config.mlp_dim)

    def forward_causal(self, x: torch.Tensor) -> torch.Tensor:
        """The text encoder's block: each token attends to itself and the tokens before it. x: [Q, L, D]."""
        x = x + self.attention_branch(x, causal=True)
        return x + self.mlp_branch(x)


# --------------------------------------------------------------------------- heads


class ClassHead(nn.Module):
    """Owlv2ClassPredictionHead: per-patch class embeddings [.., D] and a logit shift and scale per patch."""

    def __init__(self, config: Owlv2Config):
        super().__init__()
        c = config.embed_dim
        self.dense0 = nn.Linear(c, config.text_embed_dim)
        self.logit_shift = nn.Linear(c, 1)
        self.logit_scale = nn.Linear(c, 1)

    def embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised class embeddings. features: [B, Np, C] -> [B, Np, D]."""
        embeds = linear(features, self.dense0)
        return embeds / (torch.linalg.vector_norm(embeds, dim=-1, keepdim=True) + 1e-6)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Logits of every patch for every query. features: [B, Np, C]; queries: [Q, D] (every row) or [B, Q, D]
        -> [B, Np, Q]."""
        queries = queries / (torch.linalg.vector_norm(queries, dim=-1, keepdim=True) + 1e-6)
        logits = self.embeddings(features) @ queries.transpose(-2, -1)  # [B, Np, Q]
        scale = F.elu(linear(features, self.logit_scale)) + 1  # [B, Np, 1]
        return (logits + linear(features, self.logit_shift)) * scale


class BoxHead(nn.Module):
    """Owlv2BoxPredictionHead: Linear, GELU (exact), Linear, GELU, Linear (4 box terms or 1 objectness logit)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dense0 = nn.Linear(dim, dim)
        self.dense1 = nn.Linear(dim, dim)
        self.dense2 = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.gelu(linear(F.gelu(linear(x, self.dense0)), self.dense1)), self.dense2)


def box_bias(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """transformers' compute_box_bias: logit of each grid cell's bottom-right corner (x, y) and of the cell size
    (w, h), which the box head's output is added to before the sigmoid. -> [gh * gw, 4], raster order."""
    gh, gw = grid
    x = torch.arange(1, gw + 1, dtype=torch.float32, device=device) / gw
    y = torch.arange(1, gh + 1, dtype=torch.float32, device=device) / gh
    xx, yy = torch.meshgrid(x, y, indexing="xy")  # [gh, gw]
    corners = torch.stack([xx, yy], dim=-1).view(-1, 2).clip(0.0, 1.0)
    size = torch.tensor([1.0 / gw, 1.0 / gh], device=device).expand_as(corners)
    return torch.cat([torch.log(corners + 1e-4) - torch.log1p(-corners + 1e-4),
                      torch.log(size + 1e-4) - torch.log1p(-size + 1e-4)], dim=-1)


# --------------------------------------------------------------------------- text encoder


class Owlv2TextEncoder(nn.Module):
    """The CLIP text encoder of OWLv2: token and position embeddings, causal blocks, final LayerNorm, the EOS token
    (the highest id of each query, as transformers pools) through the text projection."""

    def __init__(self, config: Owlv2Config):
        super().__init__()
        text = config.text_config
        self.max_tokens = config.max_text_tokens
        self.token_embed = nn.Embedding(config.vocab_size, text.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(config.max_text_tokens, text.embed_dim))
        self.blocks = nn.ModuleList(Owlv2Block(text) for _ in range(text.depth))
        self.norm = nn.LayerNorm(text.embed_dim, eps=text.layer_norm_eps)
        self.proj = nn.Linear(text.embed_dim, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [Q, L] (BOS .. EOS, right-padded, L <= max_tokens) -> normalised query embeddings [Q, D].

        Padding after EOS needs no mask: attention is causal, and only the EOS token is pooled."""
        q, length = input_ids.shape
        if length > self.max_tokens:
            raise ValueError(f"queries of {length} tokens: the text encoder has {self.max_tokens} positions")
        x = self.token_embed(input_ids) + self.pos_embed[:length]  # [Q, L, D]
        for block in self.blocks:
            x = block.forward_causal(x)
        x = self.norm(x)
        pooled = x[torch.arange(q, device=x.device), input_ids.argmax(dim=-1)]  # [Q, D]: the EOS tokens
        embeds = linear(pooled, self.proj)
        return embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)


# --------------------------------------------------------------------------- the detector


class Owlv2Detector(TokenEncoder):
    """OWLv2 weights: the vision encoder EventfulViT runs (embed / blocks / after_block / forward_head), the box,
    objectness and class heads, and the text encoder for queries."""

    def __init__(self, config: Owlv2Config):
        super().__init__()
        self.config = config
        c = config.embed_dim
        self.patch_embed = PatchEmbed(config, bias=False)  # CLIP: no bias
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, c))
        self.pre_norm = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(Owlv2Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(c, eps=config.layer_norm_eps)  # CLIP's post_layernorm
        self.merge_norm = nn.LayerNorm(c, eps=config.layer_norm_eps)  # after the class-token merge
        self.class_head = ClassHead(config)
        self.box_head = BoxHead(c, 4)
        self.objectness_head = BoxHead(c, 1)
        self.text = Owlv2TextEncoder(config)
        self.init_random_weights()

    # ---- the vision encoder, as EventfulViT calls it

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # images: [B, 3, H, W] -> tokens [B, 1 + Np, C] (class token first), pre-LayerNorm applied
        patches = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        return self.pre_norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image feature map: post-LayerNorm, every patch times the class token, LayerNorm.
        tokens: [B, 1 + Np, C] final residual stream -> [B, Np, C] (raster order)."""
        x = self.norm(tokens)
        return self.merge_norm(x[:, 1:] * x[:, :1])

    # ---- heads on the feature map

    def class_logits(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """features [B, Np, C], queries [Q, D] or [B, Q, D] -> [B, Np, Q]."""
        return self.class_head(features, queries)

    def boxes(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised (cx, cy, w, h) per patch, fractions of the (padded, square) input. [B, Np, C] -> [B, Np, 4]."""
        return torch.sigmoid(self.box_head(features) + box_bias(self.config.grid_size, features.device))

    def objectness(self, features: torch.Tensor) -> torch.Tensor:
        """Objectness logit per patch (query-free). [B, Np, C] -> [B, Np]."""
        return self.objectness_head(features)[..., 0]

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [Q, L] -> normalised query embeddings [Q, D]."""
        return self.text(input_ids)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W], input_ids [Q, L] (the same queries for every image) -> (logits [B, Np, Q],
        boxes [B, Np, 4])."""
        features = self.forward_head(self.forward_features(images))
        return self.class_logits(features, self.encode_text(input_ids)), self.boxes(features)


def owlv2_head_macs(config: Owlv2Config, queries: int = 0) -> int:
    """MACs of the heads on every patch: box and objectness MLPs, class embedding, shift and scale, query dots."""
    c, d = config.embed_dim, config.text_embed_dim
    per_patch = 2 * (2 * c * c) + c * (4 + 1) + c * d + 2 * c + queries * d
    return config.num_patches * per_patch


class EventfulOwlv2(EventfulViT):
    """EventfulViT's step over an Owlv2Detector: `StepOutput.logits` is the feature map [B, Np, C] (see
    `Owlv2Detector.forward_head`); `detect` gives each stream's logits against its queries and the boxes. MACs
    count the heads (their query dot products excluded: queries differ per stream)."""

    def __init__(self, model: Owlv2Detector, config: EventfulConfig | None = None, slots: int = 1):
        super().__init__(model, config, slots)
        heads = owlv2_head_macs(self.vit)
        self._fixed_macs = embed_macs(self.vit) + heads
        self._dense_frame_macs = dense_macs(self.vit) + heads

    def detect(self, features: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, Np, C] (a step's logits), queries [Q, D] or [B, Q, D] -> (logits [B, Np, Q], boxes
        [B, Np, 4])."""
        with torch.inference_mode():
            return self.model.class_logits(features, queries), self.model.boxes(features)


# --------------------------------------------------------------------------- queries


def load_tokenizer(path: str | Path):
    """A CLIP tokenizer from a local directory (tokenizer.json or vocab.json + merges.txt, as save_pretrained
    writes them); nothing is downloaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def pad_token_ids(queries: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Token id lists (BOS .. EOS each) -> [Q, length], right-padded with 0 (OWLv2's pad id); a longer query keeps
    its first length - 1 tokens and its last (EOS), as the tokenizer truncates."""
    rows = []
    for ids in queries:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("an empty query")
        if len(ids) > length:
            ids = ids[: length - 1] + ids[-1:]
        rows.append(ids + [0] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class QueryCache:
    """A stream's text queries, encoded once per change: `update(queries)` re-encodes only when the list differs
    from the last one. Queries are strings (with a tokenizer) or token id lists (BOS .. EOS); labels default to the
    strings (token id lists: their ids joined)."""

    def __init__(self, model: Owlv2Detector, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self.encodes = 0  # how many times the text encoder ran
        self._key: tuple | None = None
        self.labels: tuple[str, ...] = ()
        self.embeddings: torch.Tensor | None = None  # [Q, D], normalised

    def update(self, queries: Sequence[str] | Sequence[Sequence[int]], labels: Sequence[str] | None = None
               ) -> torch.Tensor:
        """The queries' normalised embeddings [Q, D]; encoded only when the queries changed."""
        if not queries:
            raise ValueError("no queries")
        key = tuple(q if isinstance(q, str) else tuple(int(i) for i in q) for q in queries)
        if key == self._key and self.embeddings is not None:
            return self.embeddings
        length = self.model.config.max_text_tokens
        if all(isinstance(q, str) for q in key):
            if self.tokenizer is None:
                raise ValueError("string queries need a tokenizer (load_tokenizer), or pass token id lists")
            ids = self.tokenizer(list(key), padding="max_length", truncation=True, max_length=length,
                                 return_tensors="pt")["input_ids"]
        elif any(isinstance(q, str) for q in key):
            raise ValueError("queries must be all strings or all token id lists")
        else:
            ids = pad_token_ids(key, length)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            self.embeddings = self.model.encode_text(ids.to(device))
        self.encodes += 1
        self._key = key
        self.labels = tuple(labels) if labels is not None else tuple(
            q if isinstance(q, str) else " ".join(map(str, q)) for q in key)
        return self.embeddings


# --------------------------------------------------------------------------- frames in, detections out


class Owlv2Preprocessor:
    """Owlv2ImageProcessor's geometry: each RGB uint8 frame padded to a square (bottom and right, black), then
    resized whole to the model input (the config's filter, CLIP mean/std). Its resize is this project's antialiased
    bilinear (transformers': a Gaussian blur, then bilinear without antialias), so inputs differ slightly."""

    def __init__(self, config: Owlv2Config, device: torch.device | str | None = None):
        self.resize = Preprocessor(config.preprocess, device)

    def __call__(self, frames: Frame | Sequence[Frame], device: torch.device | str | None = None) -> torch.Tensor:
        return self.resize([pad_to_square(_to_uint8_chw(f, i)) for i, f in enumerate(_as_list(frames))], device)


def pad_to_square(frame_chw: torch.Tensor) -> torch.Tensor:
    """[3, H, W] uint8 -> [S, S, 3] uint8 with S = max(H, W): the frame at the top left, zeros elsewhere."""
    _, h, w = frame_chw.shape
    s = max(h, w)
    out = frame_chw.new_zeros(s, s, 3)
    out[:h, :w] = frame_chw.permute(1, 2, 0)
    return out


def postprocess_owlv2(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    frame_sizes: list[tuple[int, int]],
    threshold: float = 0.1,
    top_k: int = 100,
) -> list[Detections]:
    """Owlv2ImageProcessor.post_process_object_detection, plus top-k: per patch the best query, score = its sigmoid,
    kept above threshold; boxes (x0, y0, x1, y1) in the frame's pixels. The frame was padded to a square of side
    max(height, width) before the resize, so normalised coordinates scale by that side on both axes.

    logits: [B, Np, Q], boxes: [B, Np, 4] normalised (cx, cy, w, h). Labels index the queries (Detections.to_list
    with the QueryCache's labels names them)."""
    best, labels = logits.float().max(dim=-1)  # [B, Np]
    scores = torch.sigmoid(best)
    corners = boxes_to_corners(boxes.float())
    out = []
    for b, (height, width) in enumerate(frame_sizes):
        keep = (scores[b] > threshold).nonzero().squeeze(1)
        keep = keep[scores[b, keep].argsort(descending=True)[:top_k]]
        out.append(Detections(scores[b, keep], labels[b, keep], corners[b, keep] * max(height, width)))
    return out


__all__ = [
    "BoxHead", "ClassHead", "EventfulOwlv2", "Owlv2Block", "Owlv2Detector", "Owlv2Preprocessor", "Owlv2TextEncoder",
    "QueryCache", "QuickGeluMlp", "box_bias", "load_tokenizer", "owlv2_head_macs", "pad_to_square", "pad_token_ids",
    "postprocess_owlv2",
]
