"""REST: budget endpoints, validation errors naming the field, auth, health, stream list, OpenAPI."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import server.app
from server.settings import Settings
from tests.server.conftest import API_KEY, encode, frames


def test_global_budget_fixed_and_auto(client):
    assert client.get("/v1/budget").json() == {
        "mode": "fixed", "tokens": 4, "fraction": None, "target_latency_ms": None, "min_tokens": None,
        "max_tokens": None, "effective_tokens": 4, "num_patches": 16, "controller": None,
    }
    body = client.put("/v1/budget", json={"mode": "fixed", "fraction": 0.5}).json()
    assert (body["mode"], body["fraction"], body["effective_tokens"]) == ("fixed", 0.5, 8)
    auto = client.put("/v1/budget", json={"mode": "auto", "target_latency_ms": 40, "min_tokens": 2}).json()
    # the controller starts from the budget in effect and shows its state
    assert auto["mode"] == "auto" and auto["target_latency_ms"] == 40 and auto["min_tokens"] == 2
    assert auto["effective_tokens"] == 8
    controller = auto["controller"]
    assert controller["target_latency_ms"] == 40 and controller["saturated"] is False
    assert controller["level_tokens"] == 8 and controller["reason"] is None
    assert client.get("/v1/budget").json()["controller"]["target_latency_ms"] == 40


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"mode": "fixed", "tokens": -1}, "tokens"),
        ({"mode": "fixed", "tokens": 17}, "tokens"),  # more than the model's 16 patch tokens
        ({"mode": "fixed", "tokens": "many"}, "tokens"),
        ({"mode": "fixed", "tokens": True}, "tokens"),  # strict: not 1 token
        ({"mode": "fixed", "tokens": "4"}, "tokens"),  # strict: a number, not a string of one
        ({"mode": "fixed", "tokens": 4.5}, "tokens"),
        ({"mode": "fixed", "fraction": "0.5"}, "fraction"),
        ({"mode": "fixed", "fraction": True}, "fraction"),
        ({"mode": "auto", "target_latency_ms": "50"}, "target_latency_ms"),
        ({"mode": "auto", "target_latency_ms": 50, "min_tokens": False}, "min_tokens"),
        ({"mode": "auto", "target_latency_ms": 50, "max_tokens": "8"}, "max_tokens"),
        ({"mode": "fixed", "fraction": 1.5}, "fraction"),
        ({"mode": "fixed", "tokens": 3, "fraction": 0.5}, "fraction"),  # exactly one of the two
        ({"mode": "fixed"}, "tokens"),
        ({"mode": "auto"}, "target_latency_ms"),
        ({"mode": "auto", "target_latency_ms": 0}, "target_latency_ms"),
        ({"mode": "auto", "target_latency_ms": 50, "min_tokens": 17}, "min_tokens"),
        ({"mode": "auto", "target_latency_ms": 50, "max_tokens": 17}, "max_tokens"),
        ({"mode": "auto", "target_latency_ms": 50, "min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        ({"mode": "turbo"}, "mode"),
        ({"tokens": 3}, "mode"),
        ({"mode": "fixed", "tokens": 3, "colour": "red"}, "colour"),
    ],
)
def test_global_budget_validation_names_the_field(client, body, field):
    response = client.put("/v1/budget", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["message"]
    assert client.get("/v1/budget").json()["effective_tokens"] == 4  # unchanged


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tokens": -2}, "tokens"),
        ({"tokens": 100}, "tokens"),
        ({"max_tokens": 17}, "max_tokens"),
        ({"fraction": -0.1}, "fraction"),
        ({"tokens": True}, "tokens"),
        ({"tokens": "4"}, "tokens"),
        ({"fraction": "0.5"}, "fraction"),
        ({"max_tokens": False}, "max_tokens"),
        ({}, "max_tokens"),
        ({"tokens": 2, "max_tokens": 3}, "max_tokens"),
    ],
)
def test_stream_budget_validation_names_the_field(client, body, field):
    response = client.put("/v1/streams/cam/budget", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["message"]


def test_global_budget_numbers_may_be_json_integers_or_floats(client):
    """Strict types refuse strings and booleans, not a float field given as a JSON integer."""
    assert client.put("/v1/budget", json={"mode": "fixed", "fraction": 1}).json()["effective_tokens"] == 16
    auto = client.put("/v1/budget", json={"mode": "auto", "target_latency_ms": 50, "max_tokens": 8})
    assert auto.status_code == 200 and auto.json()["target_latency_ms"] == 50


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"tokens": 40}, "field 'mode' is required: one of fixed, auto"),
        ({"mode": "turbo", "tokens": 40}, "field 'mode' must be one of fixed, auto, not 'turbo'"),
        ({"mode": None}, "field 'mode' must be one of fixed, auto, not None"),
    ],
)
def test_global_budget_without_a_valid_mode_says_so(client, body, says):
    response = client.put("/v1/budget", json=body)
    assert response.status_code == 422, response.text
    assert says in response.json()["message"] and "discriminator" not in response.text


@pytest.mark.parametrize("path", ["/v1/budget", "/v1/streams/cam/budget"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_budget_put_without_a_json_content_type_is_415_and_says_so(client, path, content_type):
    body = b'{"mode": "fixed", "tokens": 3}' if path == "/v1/budget" else b'{"tokens": 3}'
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.put(path, content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["detail"].startswith("Content-Type must be application/json")
    assert client.get("/v1/budget").json()["effective_tokens"] == 4  # unchanged
    assert client.get("/v1/streams/cam/budget").json()["override"] is None
    with_charset = client.put(path, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert with_charset.status_code == 200 and with_charset.json()["effective_tokens"] == 3


def test_stream_budget_override_cap_and_delete(client):
    assert client.get("/v1/streams/cam/budget").json() == {
        "stream_id": "cam", "override": None, "effective_tokens": 4, "source": "global", "num_patches": 16,
    }
    assert client.put("/v1/streams/cam/budget", json={"tokens": 12}).json()["effective_tokens"] == 12
    capped = client.put("/v1/streams/cam/budget", json={"max_tokens": 2}).json()
    assert (capped["effective_tokens"], capped["source"]) == (2, "cap")
    assert capped["override"] == {"tokens": None, "fraction": None, "max_tokens": 2}
    loose = client.put("/v1/streams/cam/budget", json={"max_tokens": 10}).json()  # a cap above the global budget
    assert (loose["effective_tokens"], loose["source"]) == (4, "global")
    assert client.delete("/v1/streams/cam/budget").status_code == 204
    missing = client.delete("/v1/streams/cam/budget")
    assert missing.status_code == 404 and "cam" in missing.json()["detail"]
    bad_id = client.get("/v1/streams/bad id/budget")
    assert bad_id.status_code == 422 and "stream_id" in bad_id.json()["message"]


def test_stream_list_reports_counters_budget_latency_and_state(client):
    video = frames(3)
    with client.websocket_connect("/v1/streams/listed") as ws:
        for frame in video:
            ws.send_bytes(encode(frame))
            ws.receive_json()
        ws.send_bytes(b"junk")
        ws.receive_json()
        listing = client.get("/v1/streams").json()
    assert listing["active_streams"] == 1 and listing["max_streams"] == 16
    (stream,) = listing["streams"]
    assert stream["stream_id"] == "listed" and stream["connected"]
    assert (stream["frames_received"], stream["frames_processed"], stream["frames_failed"]) == (4, 3, 1)
    assert stream["frames_dropped"] == 0
    assert stream["budget_tokens"] == 4 and stream["budget_source"] == "global"
    assert 0 < stream["latency_p50_ms"] <= stream["latency_p95_ms"]
    assert stream["state_bytes"] == listing["total_state_bytes"] > 0
    assert client.get("/v1/streams/nobody").status_code == 404


def test_health_readiness_and_openapi(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["status"] == "ready"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/budget", "/v1/streams", "/v1/streams/{stream_id}/budget", "/healthz", "/readyz"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_readyz_is_503_while_the_model_loads(tiny_model, monkeypatch):
    import server.app

    release = threading.Event()
    build_runner = server.app.build_runner

    def slow_build_runner(settings, model=None):
        release.wait(10)
        return build_runner(settings, tiny_model)

    monkeypatch.setattr(server.app, "build_runner", slow_build_runner)
    app = server.app.create_app(Settings(budget_tokens=4))  # no model given: loaded on the engine thread
    with TestClient(app) as client:
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["detail"] == "model loading"
        assert client.get("/v1/budget").status_code == 503
        with client.websocket_connect("/v1/streams/early") as ws, pytest.raises(WebSocketDisconnect) as refused:
            ws.receive_json()
        assert refused.value.code == 1013 and "loading" in refused.value.reason
        release.set()
        assert app.state.engine.wait_ready(10)
        assert client.get("/readyz").status_code == 200


def test_a_server_on_random_weights_says_so_at_start_up_in_v1_model_and_readyz(caplog):
    """A named architecture has deterministic random weights: a warning when it loads, `"weights": "random"` in
    GET /v1/model, and a detail in /readyz (still 200: the server works, its answers mean nothing)."""
    settings = Settings(model="deit-tiny-patch16-224", image_size=(32, 32), budget_tokens=2, torch_threads=1)
    app = server.app.create_app(settings)
    with caplog.at_level(logging.WARNING), TestClient(app) as client:
        assert app.state.engine.wait_ready(60)
        described = client.get("/v1/model").json()
        ready = client.get("/readyz")
    assert described["weights"] == "random" and described["weights_source"] == "deit-tiny-patch16-224"
    assert described["model"] == "deit-tiny-patch16-224" and described["task"] == "classify"
    assert described["num_patches"] == 4 and described["image_size"] == [32, 32]
    # the state pool: max_streams slots, a probe slot and scratch, DeiT-Tiny's 12 blocks x 6 [5, 192] fp32 buffers
    assert (described["dtype"], described["execution"], described["captured_graph_bytes"]) == ("float32", "eager", None)
    assert described["state_pool_bytes"] == (settings.max_streams + 2) * 12 * 6 * 5 * 192 * 4
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert "random weights" in ready.json()["detail"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("random weights" in text and "deit-tiny-patch16-224" in text for text in warnings), warnings


def test_a_server_on_a_checkpoint_names_it(tiny_model, tmp_path, caplog):
    checkpoint = tmp_path / "tiny.pth"
    torch.save(tiny_model.state_dict(), checkpoint)
    settings = Settings(model=str(checkpoint), num_heads=2, budget_tokens=2, torch_threads=1)
    app = server.app.create_app(settings)
    with caplog.at_level(logging.WARNING), TestClient(app) as client:
        assert app.state.engine.wait_ready(60)
        described = client.get("/v1/model").json()
        ready = client.get("/readyz").json()
    assert described["weights"] == "checkpoint" and described["weights_source"] == str(checkpoint.resolve())
    assert described["num_patches"] == 16 and described["num_classes"] == 10
    assert ready == {"status": "ready", "detail": None}
    assert not any("random weights" in r.getMessage() for r in caplog.records)


def test_a_model_given_in_process_has_unknown_weights(client):
    described = client.get("/v1/model").json()
    assert described["weights"] == "unknown" and described["weights_source"] is None


def test_rest_needs_the_key_but_health_and_metrics_do_not(make_client):
    client = make_client(api_key=API_KEY)
    for method, url in [("get", "/v1/budget"), ("get", "/v1/streams"), ("put", "/v1/streams/x/budget"),
                        ("get", "/v1/model")]:
        response = client.request(method.upper(), url, json={"tokens": 1})
        assert response.status_code == 401, url
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/budget", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/budget", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert client.get(f"/v1/budget?token={API_KEY}").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_metrics_and_health_can_require_the_key(make_client):
    client = make_client(api_key=API_KEY, metrics_require_key=True, health_require_key=True)
    assert client.get("/metrics").status_code == 401
    assert client.get("/healthz").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
