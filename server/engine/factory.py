"""The runner factory: a model spec (settings.model) loaded, and the runner its family needs around it. The one
place the server names model families; the app and the API see only the `Runner` protocol."""

from __future__ import annotations

import logging

from torch import nn

from model.eventful import EventfulConfig
from model.loaders import WeightsSource, load_model, weights_source
from model.owlv2 import Owlv2Detector, load_tokenizer
from model.videomae import VideoMAE
from model.yolos import YolosDetector
from server.engine.clip_runner import ClipRunner
from server.engine.decode import FrameLimits
from server.engine.detect_runner import DetectRunner
from server.engine.owlv2_runner import Owlv2Runner
from server.engine.queries import (
    FallbackTokenizer,
    QueryError,
    QueryTokenizer,
    Tokenizer,
    has_tokenizer_files,
    parse_query_list,
)
from server.engine.runner import ModelRunner, Runner
from server.settings import Settings

logger = logging.getLogger(__name__)


def frame_limits(settings: Settings) -> FrameLimits:
    """What a frame may be before it is decoded (bytes) and after (size, pixels, aspect ratio)."""
    return FrameLimits(
        settings.max_frame_bytes, settings.max_frame_width, settings.max_frame_height, settings.max_frame_pixels,
        settings.max_frame_aspect_ratio,
    )


def load_configured_model(settings: Settings) -> nn.Module:
    """settings.model, loaded; a warning when it is a named architecture (random weights)."""
    image_size = tuple(settings.image_size) if settings.image_size else None
    model = load_model(
        settings.model, image_size=image_size, device=settings.torch_device, dtype=settings.torch_dtype,
        num_heads=settings.num_heads, labels_path=settings.labels,
    )
    source = weights_source(settings.model)
    if source.weights == "random":
        logger.warning("serving %s; give --model a checkpoint file, a model directory or a Hugging Face id for real "
                       "outputs", source.description)
    return model


def configured_weights(settings: Settings) -> WeightsSource | None:
    """Where settings.model's weights come from (None for a spec that does not load: the engine reports why)."""
    try:
        return weights_source(settings.model)
    except FileNotFoundError:
        return None


def query_tokenizer(settings: Settings, model: Owlv2Detector, loaded_from_settings: bool) -> Tokenizer:
    """OWLv2's tokenizer: --tokenizer, else --model's directory when it holds tokenizer files, else (only for a named
    architecture: random weights, meaningless labels) the built-in fallback. ValueError otherwise: real weights
    behind hashed ids would detect nonsense under the queries' names."""
    if settings.tokenizer is not None:
        path = settings.tokenizer
    elif loaded_from_settings and has_tokenizer_files(settings.model):
        path = settings.model
    elif loaded_from_settings and weights_source(settings.model).weights == "random":
        logger.warning("OWLv2 without tokenizer files: queries go through the built-in fallback tokenizer (hashed "
                       "words; only for random weights); give --tokenizer DIR for a CLIP tokenizer")
        return FallbackTokenizer(model.config.vocab_size)
    else:
        raise ValueError("an OWLv2 model needs its CLIP tokenizer: give --tokenizer DIR (a directory with "
                         "tokenizer.json or vocab.json + merges.txt, as save_pretrained writes it)")
    try:
        return QueryTokenizer(load_tokenizer(path), str(path))
    except OSError as err:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {err}") from None


def build_runner(settings: Settings, model: nn.Module | None = None) -> Runner:
    """The runner for these settings, by the model's family; loads settings.model unless a model is given."""
    loaded_from_settings = model is None
    if model is None:
        model = load_configured_model(settings)
    eventful = EventfulConfig(
        level=settings.level, gate_position=settings.gate_position, refresh_interval=settings.refresh_interval,
        execution=settings.step_execution,
    )
    slots = settings.max_streams + 1  # every stream's state, and an adaptive stream's probe copy
    limits = frame_limits(settings)
    if isinstance(model, VideoMAE):  # clip mode: a sliding window per stream, RLT, an action label every stride
        return ClipRunner(model, settings.rlt_tau, settings.clip_stride, top_k=settings.top_k, limits=limits)
    if isinstance(model, Owlv2Detector):  # open-vocabulary detection: each stream's text queries, boxes in frame pixels
        tokenizer = query_tokenizer(settings, model, loaded_from_settings)
        try:
            return Owlv2Runner(model, tokenizer, tuple(parse_query_list(settings.default_queries)), eventful,
                               settings.detect_threshold, settings.max_boxes, limits=limits, slots=slots)
        except QueryError as err:
            raise ValueError(f"--default-queries: {err.message}") from None
    if isinstance(model, YolosDetector):  # detection: boxes in frame pixels
        return DetectRunner(model, eventful, settings.detect_threshold, settings.max_boxes, limits=limits,
                            slots=slots)
    return ModelRunner(model, eventful, top_k=settings.top_k, limits=limits, slots=slots)
