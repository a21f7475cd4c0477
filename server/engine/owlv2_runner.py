"""The open-vocabulary detection runner: eventful OWLv2 behind the ModelRunner interface, each stream detecting its own
text queries; results are boxes in frame pixels labelled with the query they answer.

Frames are padded to a square and resized (Owlv2Preprocessor); the eventful step gates the vision encoder's patch
tokens and returns the feature map; per frame, the class head against the stream's query embeddings and the box head
on every patch, post-processed as Owlv2ImageProcessor does. A stream's queries are encoded by the text encoder once
per change, on the inference thread (a QueryCache per stream; streams without queries of their own share the
default's).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from model.eventful import EventfulConfig, StepOutput
from model.fidelity import BoxFidelity
from model.owlv2 import EventfulOwlv2, Owlv2Detector, Owlv2Preprocessor, QueryCache, postprocess_owlv2
from model.yolos import Detections
from server.engine.decode import FrameLimits
from server.engine.planner import PlannedFrame, StepPlan
from server.engine.queries import StreamQueries, Tokenizer, check_query_texts, tokenize_queries
from server.engine.runner import ModelRunner, WarmupTimings

MAX_QUERY_CACHES = 1024  # streams whose encoded queries are kept (least recently used first out: re-encoded if back)


class Owlv2Runner(ModelRunner):
    """An Owlv2Detector behind EventfulOwlv2; outputs {"boxes": [{"label", "score", "box": [x0, y0, x1, y1]}]}, the
    label being the stream's query text."""

    task = "detect"
    fidelity = BoxFidelity()  # audits compare the served detections with the dense ones (box F1, matched IoU)
    eventful_class = EventfulOwlv2

    def __init__(
        self, model: Owlv2Detector, tokenizer: Tokenizer, default_queries: tuple[str, ...],
        eventful: EventfulConfig | None = None, threshold: float = 0.1, max_boxes: int = 100,
        limits: FrameLimits | None = None, slots: int = 8,
    ):  # fmt: skip
        super().__init__(model, eventful, top_k=1, limits=limits, slots=slots)
        self.preprocessor = Owlv2Preprocessor(self.config)  # pad to a square, then resize (FrameRunner.prepare)
        self.tokenizer = tokenizer
        self.threshold = threshold
        self.max_boxes = max_boxes
        self._default = self.check_queries(list(default_queries))  # QueryError for a bad --default-queries
        self._default_cache = QueryCache(model)
        self._caches: OrderedDict[str, QueryCache] = OrderedDict()  # by stream id: streams with queries of their own

    @property
    def default_queries(self) -> tuple[str, ...]:
        return self._default.texts

    @property
    def query_encodes(self) -> int:
        """Times the text encoder ran (every cache's encodes: once per change of a stream's queries)."""
        return self._default_cache.encodes + sum(c.encodes for c in self._caches.values())

    def check_queries(self, queries: Any) -> StreamQueries:
        return tokenize_queries(check_query_texts(queries), self.tokenizer, self.config.max_text_tokens)

    def query_embeddings(self, stream_id: str, queries: StreamQueries | None) -> tuple[torch.Tensor, tuple[str, ...]]:
        """A stream's normalised query embeddings [Q, D] and labels; the text encoder runs only on a change (the
        inference thread)."""
        if queries is None:
            return self._default_cache.update(self._default.token_ids), self._default.texts
        cache = self._caches.pop(stream_id, None) or QueryCache(self.model)
        self._caches[stream_id] = cache  # most recently used last
        while len(self._caches) > MAX_QUERY_CACHES:
            self._caches.popitem(last=False)
        return cache.update(queries.token_ids), queries.texts

    def _frame_size(self, planned: PlannedFrame) -> tuple[int, int]:
        """The decoded (height, width) of a planned frame (the model input size if the plan does not say)."""
        return tuple(planned.frame_size) if planned.frame_size is not None else tuple(self.config.image_size)

    def read_out(self, out: StepOutput, plan: StepPlan) -> tuple[list[dict[str, Any]], list[Detections]]:
        """Per frame, the class head against its stream's queries and the box head, as boxes in frame pixels: the
        result's boxes, and the same Detections on the CPU (what audits compare; labels index the queries)."""
        features = out.logits  # [B, Np, C]
        with torch.inference_mode():
            boxes = self.model.boxes(features)  # [B, Np, 4] normalised (cx, cy, w, h) of the padded square
            results, answers = [], []
            for j, planned in enumerate(plan.frames):
                embeddings, labels = self.query_embeddings(planned.stream_id, planned.queries)
                logits = self.model.class_logits(features[j : j + 1], embeddings)  # [1, Np, Q]
                detections = postprocess_owlv2(logits, boxes[j : j + 1], [self._frame_size(planned)],
                                               self.threshold, self.max_boxes)[0].to("cpu")
                results.append({"boxes": detections.to_list(list(labels))})
                answers.append(detections)
        return results, answers

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> WarmupTimings:
        """The default queries encoded (the text encoder's first call), then ModelRunner's warm steps."""
        self._default_cache.update(self._default.token_ids)
        return super().warmup(batch_sizes)
