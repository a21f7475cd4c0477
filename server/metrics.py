"""Prometheus metrics, all built from the CollectorRegistry they are given (a fresh one per app or test).

`Metrics` is the engine's StatsSink: the engine hands it plain stats dataclasses and never imports
prometheus_client. Gauges are set from an EngineSnapshot at scrape time. No stream ids as labels.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from server.engine.stats import AuditStats, EngineSnapshot, FrameEvent, LatencyStats, StepStats

PREFIX = "eventful"
ERROR_CODES = (
    "empty_frame", "frame_too_large", "image_too_large", "bad_aspect_ratio", "empty_image", "undecodable",
    "unsupported_size",
)
REFUSAL_REASONS = ("max_streams", "in_use", "not_ready")


def latency_buckets(target_s: float) -> list[float]:
    """Histogram buckets placed around a latency target (10% .. 10x, densest near the target)."""
    factors = (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.15, 1.3, 1.5, 2.0, 3.0, 5.0, 10.0)
    return [round(target_s * f, 6) for f in factors]


def step_buckets(target_s: float) -> list[float]:
    """Finer at the low end: a step or a queue wait is a fraction of the end-to-end target."""
    factors = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 5.0)
    return [round(target_s * f, 6) for f in factors]


class Metrics:
    """Every server metric, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry, target_latency_s: float = 0.1, max_batch_size: int = 8):
        self.registry = registry
        p = PREFIX
        self.frames_received = Counter(f"{p}_frames_received_total", "Binary frame messages received.",
                                       registry=registry)
        self.frames_processed = Counter(f"{p}_frames_processed_total", "Frames run through the model.",
                                        registry=registry)
        self.frames_dropped = Counter(f"{p}_frames_dropped_total",
                                      "Frames skipped because a newer frame of the same stream arrived.",
                                      registry=registry)
        self.frames_failed = Counter(f"{p}_frames_failed_total",
                                     "Frames answered with an error (undecodable, out of limits, step failed).",
                                     registry=registry)
        self.decode_errors = Counter(f"{p}_decode_errors_total", "Frames rejected before the model, by error code.",
                                     ["code"], registry=registry)
        self.streams_refused = Counter(f"{p}_streams_refused_total", "WebSocket connections refused, by reason.",
                                       ["reason"], registry=registry)
        self.frame_latency = Histogram(f"{p}_frame_latency_seconds",
                                 "End to end: frame message received -> result message sent.",
                                 buckets=latency_buckets(target_latency_s), registry=registry)
        self.decode_time = Histogram(f"{p}_decode_seconds", "Decode and preprocess time per frame.",
                                     buckets=step_buckets(target_latency_s), registry=registry)
        self.queue_wait = Histogram(f"{p}_queue_wait_seconds",
                                    "Preprocessed frame ready -> its batched step starts.",
                                    buckets=step_buckets(target_latency_s), registry=registry)
        self.step_time = Histogram(f"{p}_step_seconds", "Time of one batched eventful model step.",
                                   buckets=step_buckets(target_latency_s), registry=registry)
        self.batch_size = Histogram(f"{p}_batch_size", "Streams per batched step.",
                                    buckets=[float(b) for b in range(1, max_batch_size + 1)], registry=registry)
        self.updated_fraction = Histogram(f"{p}_updated_token_fraction",
                                          "Fraction of tokens recomputed per frame (mean over gates).",
                                          buckets=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.95, 1.0],
                                          registry=registry)
        self.macs = Counter(f"{p}_macs_total", "Multiply-accumulates done by model steps.", registry=registry)
        self.macs_saved = Counter(f"{p}_macs_saved_total",
                                  "Multiply-accumulates saved against running every frame densely.", registry=registry)
        self.active_streams = Gauge(f"{p}_active_streams", "Connected streams.", registry=registry)
        self.retained_streams = Gauge(f"{p}_retained_streams",
                                      "Disconnected streams whose state is kept for a resume.", registry=registry)
        self.state_bytes = Gauge(f"{p}_state_bytes", "Bytes of eventful state held for all streams.",
                                 registry=registry)
        self.state_pool_bytes = Gauge(f"{p}_state_pool_bytes", "Bytes of the state pool on the model's device (every "
                                      "stream slot, allocated at start-up for --max-streams).", registry=registry)
        self.budget_tokens = Gauge(f"{p}_budget_tokens", "Global budget now: patch tokens per gate.",
                                   registry=registry)
        self.patch_tokens = Gauge(f"{p}_patch_tokens", "Patch tokens per frame of the loaded model.",
                                  registry=registry)
        self.target_latency = Gauge(f"{p}_target_latency_seconds",
                                    "The budget controller's p95 latency target (auto mode; 0 in fixed mode).",
                                    registry=registry)
        self.measured_p95 = Gauge(f"{p}_measured_p95_latency_seconds",
                                  "p95 end-to-end latency over about the last second, as the controller measures it.",
                                  registry=registry)
        self.stream_budget = Gauge(f"{p}_stream_budget_tokens",
                                   "Tokens per gate the connected streams get now, by stat (mean, min, max).",
                                   ["stat"], registry=registry)
        self.saturated = Gauge(f"{p}_controller_saturated",
                               "1 when the controller's minimum budget cannot meet the target (frames are shed).",
                               registry=registry)
        self.ready = Gauge(f"{p}_ready", "1 when the model is loaded and the inference thread runs.",
                           registry=registry)
        self.audits = Counter(f"{p}_audits_total", "Dense audits of adaptive streams (served answer vs dense).",
                              registry=registry)
        self.audit_disagreements = Counter(f"{p}_audit_top1_disagreements_total",
                                           "Audits of classifier streams whose served top-1 class differed from "
                                           "the dense model's.",
                                           registry=registry)
        self.audits_skipped = Counter(f"{p}_audits_skipped_total",
                                      "Audits planned but not run: `late` (no idle time for them before a due frame "
                                      "within the latency target), `gone` (the stream's state was freed first).",
                                      ["reason"], registry=registry)
        self.audit_macs = Counter(f"{p}_audit_macs_total",
                                  "Multiply-accumulates spent on audits (share: against eventful_macs_total).",
                                  registry=registry)
        self.audit_rel_l2 = Histogram(f"{p}_audit_logit_rel_l2",
                                      "Relative L2 error of the served logits against dense, per audit (all streams).",
                                      buckets=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0], registry=registry)
        self.audit_box_f1 = Histogram(f"{p}_audit_box_f1",
                                      "Box F1 (IoU >= 0.5, same label) of the served detections against dense, per "
                                      "audit of a detector stream (all streams).",
                                      buckets=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
                                      registry=registry)
        self.audit_box_iou = Histogram(f"{p}_audit_box_mean_iou",
                                       "Mean IoU of the matched boxes (0 when none match, 1 when neither side has a "
                                       "box) of the served detections "
                                       "against dense, per audit of a detector stream (all streams).",
                                       buckets=[0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0], registry=registry)
        self.floor_unmet = Gauge(f"{p}_fidelity_floor_unmet_streams",
                                 "Adaptive streams whose fidelity floor cannot be met even with every frame dense.",
                                 registry=registry)
        for code in ERROR_CODES:  # export every code from the start (at 0), so rates work from the first error
            self.decode_errors.labels(code=code)
        for reason in REFUSAL_REASONS:
            self.streams_refused.labels(reason=reason)
        for reason in ("late", "gone"):
            self.audits_skipped.labels(reason=reason)

    # ---- StatsSink ---------------------------------------------------------------------------

    def step(self, stats: StepStats) -> None:
        self.step_time.observe(stats.step_seconds)
        self.batch_size.observe(stats.batch_size)
        for seconds in stats.queue_seconds:
            self.queue_wait.observe(seconds)
        for fraction in stats.updated_fractions:
            self.updated_fraction.observe(fraction)
        self.macs.inc(stats.macs)
        self.macs_saved.inc(max(0, stats.dense_macs - stats.macs))

    def frame(self, event: FrameEvent) -> None:
        if event.kind == "received":
            self.frames_received.inc()
        elif event.kind == "processed":
            self.frames_processed.inc()
        elif event.kind == "dropped":
            self.frames_dropped.inc()
        elif event.kind == "decoded" and event.seconds is not None:
            self.decode_time.observe(event.seconds)
        elif event.kind == "failed":
            self.frames_failed.inc()
            if event.code != "inference_failed":
                self.decode_errors.labels(code=event.code or "unknown").inc()

    def latency(self, stats: LatencyStats) -> None:
        self.frame_latency.observe(stats.seconds)

    def refused(self, reason: str) -> None:
        self.streams_refused.labels(reason=reason).inc()

    def audit_skipped(self, reason: str) -> None:
        self.audits_skipped.labels(reason=reason).inc()

    def audit(self, stats: AuditStats) -> None:
        self.audits.inc()
        self.audit_macs.inc(stats.macs)
        if stats.measure == "boxes":
            self.audit_box_f1.observe(stats.agreement)
            self.audit_box_iou.observe(1.0 - stats.error)
            return
        if stats.agreement < 1:
            self.audit_disagreements.inc()
        self.audit_rel_l2.observe(stats.error)

    # ---- scrape ------------------------------------------------------------------------------

    def render(self, snapshot: EngineSnapshot) -> tuple[bytes, str]:
        """Set the gauges from the snapshot; the exposition text and its content type."""
        self.ready.set(1 if snapshot.ready else 0)
        self.active_streams.set(snapshot.active_streams)
        self.retained_streams.set(snapshot.retained_streams)
        self.state_bytes.set(snapshot.state_bytes)
        self.state_pool_bytes.set(snapshot.pool_bytes)
        self.budget_tokens.set(snapshot.budget_tokens)
        self.patch_tokens.set(snapshot.num_patches)
        self.target_latency.set(snapshot.target_latency_s)
        self.measured_p95.set(math.nan if snapshot.measured_p95_s is None else snapshot.measured_p95_s)
        mean, low, high = snapshot.stream_tokens or (math.nan, math.nan, math.nan)
        for stat, value in (("mean", mean), ("min", low), ("max", high)):
            self.stream_budget.labels(stat=stat).set(value)
        self.saturated.set(1 if snapshot.saturated else 0)
        self.floor_unmet.set(snapshot.floor_unmet_streams)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
