"""Server settings: command-line flags and EVENTFUL_* environment variables (flags win)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Flag:
    """What `eventful-serve` needs beyond a field's name, type, choices, default and description: more flag
    names, and a metavar. Used as `Annotated[type, Flag(...)]`; pydantic keeps it and does nothing with it."""

    aliases: tuple[str, ...] = ()
    metavar: str | None = None


class Settings(BaseSettings):
    """Everything `eventful-serve` can be told; each field is a flag too (server/cli.py makes them from the fields).
    Environment: EVENTFUL_<NAME>, e.g. EVENTFUL_API_KEY."""

    model_config = SettingsConfigDict(env_prefix="EVENTFUL_", extra="forbid")

    # model
    model: str = Field("deit-tiny-patch16-224", description="checkpoint file (timm), HF directory, HF id or named "
                       "architecture")
    labels: str | None = Field(None, description="class names file (one per line) for timm checkpoints")
    image_size: Annotated[tuple[int, int] | None, Flag(metavar="SIZE")] = Field(
        None, description="model input size: 224 or 432x768 (height x width)")
    num_heads: int | None = Field(None, ge=1, description="attention heads (timm files do not record it)")
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="model and state dtype; 'auto': bfloat16 on CUDA, float32 on the CPU"
    )
    execution: Literal["auto", "eager", "compile", "graph", "compile-graph"] = Field(
        "auto", description="how eventful steps run: 'auto' (CUDA graphs on CUDA, eager on the CPU), 'eager', "
        "'compile' (torch.compile per step shape), 'graph' (CUDA only: the eager kernels captured as CUDA graphs) "
        "or 'compile-graph' (CUDA only: the compiled step captured)",
    )
    level: Literal["tokenwise", "qk", "full"] = Field(
        "tokenwise", description="attention update: 'tokenwise' (rows of the selected tokens), 'qk' (buffered "
        "Q K^T, gated attention output) or 'full' (exact incremental softmax); docs/model.md")
    gate_position: Literal["residual", "normed"] = Field(
        "residual", description="gate on the residual stream or on the LayerNorm output of every token")
    refresh_interval: int | None = Field(None, ge=1, description="force a dense frame every K frames per stream")
    torch_threads: Annotated[int | None, Flag(aliases=("--threads",))] = Field(
        None, ge=1, description="intra-op threads of the inference thread (default: CPU cores - 1, at least 1)"
    )

    # budget and latency
    budget_tokens: int | None = Field(None, ge=0, description="default tokens per gate (wins over budget_fraction)")
    budget_fraction: float = Field(0.25, ge=0.0, le=1.0, description="default budget as a fraction of patches")
    budget_mode: Literal["fixed", "auto"] = Field("fixed", description="start with a fixed budget or the controller")
    target_latency_ms: float = Field(100.0, gt=0, description="p95 latency target: auto mode, SLO, histogram buckets")
    budget_min_tokens: int | None = Field(None, ge=0, description="auto mode: the controller's floor (default: 0)")
    budget_max_tokens: int | None = Field(
        None, ge=0, description="auto mode: the controller's ceiling (default: all patch tokens)")
    top_k: int = Field(5, ge=1, le=100, description="labels per result")
    # detection (YOLOS, OWLv2) and clip (VideoMAE) models
    detect_threshold: float = Field(0.5, ge=0.0, le=1.0, description="detection score threshold (YOLOS, OWLv2)")
    max_boxes: int = Field(100, ge=1, description="at most this many boxes per frame (YOLOS, OWLv2)")
    default_queries: str = Field(
        "person,car", description="OWLv2: comma-separated text queries of streams that set none of their own")
    tokenizer: Annotated[str | None, Flag(metavar="DIR")] = Field(
        None, description="OWLv2: a CLIP tokenizer directory (as save_pretrained writes it); default: --model's "
        "directory when it holds tokenizer files; the random-weight owlv2-base-patch16 falls back to a built-in "
        "hashing tokenizer (its labels mean nothing)")
    clip_stride: int = Field(8, ge=1, description="clip models: an action label every this many frames")
    rlt_tau: float = Field(0.1, ge=0.0, description="clip models: Run-Length Tokenization threshold (0: off)")

    # engine
    max_streams: int = Field(16, ge=1, description="stream states held at once, connected and retained together")
    max_batch_size: int = Field(8, ge=1, description="frames per eventful step at most")
    batch_window_ms: float = Field(5.0, ge=0, description="min wait for batch company")
    stream_ttl_s: float = Field(10.0, ge=0, description="keep a disconnected stream's state this long (resume)")
    decode_threads: int = Field(2, ge=1, description="JPEG/PNG decode and preprocessing threads")
    seeds_per_step: int = Field(
        1, ge=1, description="frames that seed a stream's state (its first, computed densely) per eventful step")
    idle_timeout_s: float = Field(
        30.0, gt=0, description="close a connection that sent no frame this long (since it connected or its last)")
    first_frame_grace_s: float = Field(
        2.0, gt=0, description="a new connection's time for its first frame before it counts as idle")
    max_idle_streams: int = Field(
        4, ge=0, description="connections that may wait past the grace for a first frame; more are closed")

    # limits
    max_frame_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest frame message accepted")
    max_frame_width: int = Field(4096, ge=1, description="widest frame accepted (checked from the header)")
    max_frame_height: int = Field(4096, ge=1, description="highest frame accepted (checked from the header)")
    max_frame_pixels: int = Field(4096 * 2160, ge=1, description="most pixels per frame (checked from the header)")
    max_frame_aspect_ratio: float = Field(
        8.0, ge=1.0, description="long side / short side of a frame (a short-side resize scales the long side too)")

    # auth
    api_key: SecretStr | None = Field(
        None, description="require this key (prefer EVENTFUL_API_KEY: flags show up in process lists)")
    metrics_require_key: bool = Field(False, description="/metrics needs the API key too")
    health_require_key: bool = Field(False, description="/healthz and /readyz need the API key too")

    # serving
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")

    @field_validator("image_size", mode="before")
    @classmethod
    def _parse_size(cls, value):
        """'224', '432x768' or [h, w]."""
        if isinstance(value, int):
            return value, value
        if isinstance(value, str):
            parts = value.lower().replace(",", "x").split("x")
            parts = parts * 2 if len(parts) == 1 else parts
            if len(parts) != 2:
                raise ValueError(f"image size must look like 224 or 432x768, got {value!r}")
            return int(parts[0]), int(parts[1])
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        return None if value in ("", None) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.execution in ("graph", "compile-graph") and self.device == "cpu":
            raise ValueError(f"execution {self.execution!r} captures CUDA graphs: it needs a CUDA device")
        return self

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def inference_threads(self) -> int:
        """torch_threads, or every core but one: decoding, the event loop and the OS need a core, and an
        OpenMP team that shares its cores with them stalls on every fine-grained eventful step."""
        if self.torch_threads is not None:
            return self.torch_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores - 1)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def step_execution(self) -> str:
        """execution, with 'auto' resolved for the device."""
        if self.execution == "auto":
            return "graph" if self.torch_device.type == "cuda" else "eager"
        return self.execution
