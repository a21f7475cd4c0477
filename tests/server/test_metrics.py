"""Prometheus metrics: every metric the issue lists, moving with traffic, named by the rules, no stream labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.engine.stats import EngineSnapshot, FrameEvent, LatencyStats, StepStats
from server.metrics import Metrics, latency_buckets
from tests.server.conftest import encode, frames

EXPECTED = {
    "eventful_frames_received": "counter",
    "eventful_frames_processed": "counter",
    "eventful_frames_dropped": "counter",
    "eventful_frames_failed": "counter",
    "eventful_decode_errors": "counter",
    "eventful_streams_refused": "counter",
    "eventful_frame_latency_seconds": "histogram",
    "eventful_queue_wait_seconds": "histogram",
    "eventful_step_seconds": "histogram",
    "eventful_decode_seconds": "histogram",
    "eventful_batch_size": "histogram",
    "eventful_updated_token_fraction": "histogram",
    "eventful_macs": "counter",
    "eventful_macs_saved": "counter",
    "eventful_active_streams": "gauge",
    "eventful_state_bytes": "gauge",
    "eventful_state_pool_bytes": "gauge",
    "eventful_budget_tokens": "gauge",
    "eventful_target_latency_seconds": "gauge",
    "eventful_measured_p95_latency_seconds": "gauge",
    "eventful_stream_budget_tokens": "gauge",
    "eventful_controller_saturated": "gauge",
}


def scrape(client) -> dict[str, float]:
    """Sample name (with labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_every_metric_is_present_typed_and_unlabelled_by_stream(client):
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("eventful_")}
    for name, kind in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, name
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= {"code", "reason", "le", "stat"}, sample
        if family.type == "counter":
            assert any(s.name == f"{family.name}_total" for s in family.samples), family.name


def test_metrics_move_with_traffic(client):
    before = scrape(client)
    with client.websocket_connect("/v1/streams/m") as ws:
        for frame in frames(4):
            ws.send_bytes(encode(frame))
            ws.receive_json()
        ws.send_bytes(b"not an image")
        ws.receive_json()
        during = scrape(client)
    after = scrape(client)
    assert during["eventful_frames_received_total"] - before["eventful_frames_received_total"] == 5
    assert during["eventful_frames_processed_total"] - before["eventful_frames_processed_total"] == 4
    assert during["eventful_frames_failed_total"] - before["eventful_frames_failed_total"] == 1
    assert during["eventful_decode_errors_total{code=undecodable}"] == 1
    assert during["eventful_frame_latency_seconds_count"] == 4
    assert during["eventful_step_seconds_count"] == 4 and during["eventful_batch_size_count"] == 4
    assert during["eventful_queue_wait_seconds_count"] == 4 and during["eventful_decode_seconds_count"] == 4
    assert during["eventful_updated_token_fraction_count"] == 4
    assert during["eventful_macs_total"] > 0 and during["eventful_macs_saved_total"] > 0  # 3 frames at 4 of 16
    assert during["eventful_active_streams"] == 1 and after["eventful_active_streams"] == 0
    assert during["eventful_state_bytes"] > 0 and after["eventful_state_bytes"] == 0
    assert during["eventful_state_pool_bytes"] == after["eventful_state_pool_bytes"] > during["eventful_state_bytes"]
    assert during["eventful_budget_tokens"] == 4
    client.put("/v1/budget", json={"mode": "fixed", "tokens": 10})
    assert scrape(client)["eventful_budget_tokens"] == 10


def budget_and_metrics(client) -> tuple[dict, dict[str, float]]:
    return client.get("/v1/budget").json(), scrape(client)


def test_auto_mode_without_traffic_rest_and_metrics_agree(client):
    """With no frame in the controller's window (1 s), GET /v1/budget's measured_p95_ms is null and the gauge NaN (not
    a p95 of older frames), the last decision's streams and tokens are gone, and the budget (REST effective_tokens,
    level_tokens and eventful_budget_tokens) is the level auto mode holds: what its next decision starts from."""
    import math
    import time

    def agree(rest: dict, gauges: dict[str, float]) -> None:
        controller = rest["controller"]
        assert rest["effective_tokens"] == controller["level_tokens"] == gauges["eventful_budget_tokens"]
        assert gauges["eventful_target_latency_seconds"] == controller["target_latency_ms"] / 1000

    def idle(rest: dict, gauges: dict[str, float]) -> None:
        agree(rest, gauges)
        controller = rest["controller"]
        assert controller["measured_p95_ms"] is None and math.isnan(gauges["eventful_measured_p95_latency_seconds"])
        assert controller["streams"] == 0 and controller["tokens_mean"] is None and not controller["saturated"]
        assert gauges["eventful_controller_saturated"] == 0

    client.put("/v1/budget", json={"mode": "auto", "target_latency_ms": 1000})
    rest, gauges = budget_and_metrics(client)
    idle(rest, gauges)
    assert rest["effective_tokens"] == 4  # auto mode starts from the budget in effect
    with client.websocket_connect("/v1/streams/auto") as ws:
        for frame in frames(30):
            ws.send_bytes(encode(frame))
            ws.receive_json()
            time.sleep(0.02)
        rest, gauges = budget_and_metrics(client)
    agree(rest, gauges)
    assert rest["controller"]["measured_p95_ms"] > 0 and gauges["eventful_measured_p95_latency_seconds"] > 0
    assert rest["controller"]["streams"] == 1
    time.sleep(1.3)  # no traffic for more than the window
    rest, gauges = budget_and_metrics(client)
    idle(rest, gauges)


def test_metrics_module_on_its_own_registry():
    registry = CollectorRegistry()
    metrics = Metrics(registry, target_latency_s=0.05, max_batch_size=4)
    metrics.step(StepStats(batch_size=2, step_seconds=0.02, queue_seconds=[0.001, 0.003],
                           updated_fractions=[0.3, 1.0], macs=100, dense_macs=250))
    metrics.frame(FrameEvent("failed", code="frame_too_large"))
    metrics.latency(LatencyStats(0.04))
    body, _ = metrics.render(EngineSnapshot(True, 3, 1, 1234, 50, 196, pool_bytes=4321))
    text = body.decode()
    assert "eventful_macs_total 100.0" in text and "eventful_macs_saved_total 150.0" in text
    assert 'eventful_decode_errors_total{code="frame_too_large"} 1.0' in text
    assert "eventful_state_bytes 1234.0" in text and "eventful_active_streams 3.0" in text
    assert "eventful_state_pool_bytes 4321.0" in text
    assert registry.get_sample_value("eventful_frame_latency_seconds_bucket", {"le": "0.05"}) == 1
    assert registry.get_sample_value("eventful_queue_wait_seconds_count") == 2
    # a second Metrics on a fresh registry does not clash (one registry per app / test)
    Metrics(CollectorRegistry())


def test_latency_buckets_surround_the_target():
    buckets = latency_buckets(0.1)
    assert buckets == sorted(buckets) and 0.1 in buckets
    assert buckets[0] <= 0.01 and buckets[-1] >= 1.0
    assert sum(0.05 <= b <= 0.2 for b in buckets) >= 6  # densest around the target
