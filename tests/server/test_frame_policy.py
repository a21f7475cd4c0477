"""Frame policies per stream over REST and the WebSocket: skip, keyframe, adaptive with audits, and their limits."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from model.preprocess import Preprocessor
from server.engine.engine import _DeferredAudit
from tests.server.conftest import encode, frames, stream_beside, stream_frames


def _dense_top(client, tiny_model, frame) -> list[int]:
    image = Preprocessor(tiny_model.config.preprocess)([frame])
    with torch.no_grad():
        logits = tiny_model(image)[0]
    return logits.softmax(-1).topk(3).indices.tolist()


def test_skip_serves_the_dense_result_of_its_last_keyframe_again(make_client, tiny_model):
    client = make_client(stream_ttl_s=60)  # the stream's record outlives its connection: its counters can be read
    put = client.put("/v1/streams/cam/policy", json={"policy": "skip", "interval": 3})
    assert put.status_code == 200 and put.json()["policy"] == "skip"
    video = frames(7, seed=3)
    messages = stream_frames(client, "cam", video)
    assert [m["type"] for m in messages] == ["result"] * 7
    assert [m["reused"] for m in messages] == [False, True, True, False, True, True, False]
    for t, m in enumerate(messages):
        key = 3 * (t // 3)
        assert [c["index"] for c in m["outputs"]["top"]] == _dense_top(client, tiny_model, video[key])
        assert m["dense"] == (t % 3 == 0)
    info = client.get("/v1/streams/cam").json()
    assert info["frames_reused"] == 4 and info["policy"]["policy"] == "skip"


def test_keyframe_policy_runs_dense_every_interval_and_the_budget_between(client):
    assert client.put("/v1/streams/cam/policy", json={"policy": "keyframe", "interval": 2}).status_code == 200
    messages = stream_frames(client, "cam", frames(6, seed=4))
    assert [m["dense"] for m in messages] == [True, False] * 3
    assert [m["budget"] for m in messages] == [16, 4] * 3  # the stream's token budget on the frames between
    assert not any(m["reused"] for m in messages)


def test_a_stream_without_a_policy_is_served_as_before_beside_a_skipping_one(client):
    """A policy changes only its own stream: the other's answers equal those it gets alone."""
    video = frames(5, seed=5)
    alone = stream_frames(client, "other", video)
    client.put("/v1/streams/skipper/policy", json={"policy": "skip", "interval": 2})
    together = stream_beside(client, "other2", "skipper", video)
    for got, want in zip(together, alone, strict=True):  # the same classes; scores as a batch of 2 computes them
        assert [c["index"] for c in got["outputs"]["top"]] == [c["index"] for c in want["outputs"]["top"]]
        for c, d in zip(got["outputs"]["top"], want["outputs"]["top"], strict=True):
            assert c["score"] == pytest.approx(d["score"], abs=1e-6)


def test_adaptive_streams_are_audited_and_report_their_fidelity(make_client):
    client = make_client(stream_ttl_s=60)
    body = {"policy": "adaptive", "ratio": 2, "audit_share": 0.5, "max_rel_l2": 5.0}
    put = client.put("/v1/streams/cam/policy", json=body)
    assert put.status_code == 200, put.text
    messages = stream_frames(client, "cam", frames(40, seed=6))
    assert all(m["type"] == "result" for m in messages)
    view = client.get("/v1/streams/cam/policy").json()
    assert view["policy"] == "adaptive" and view["effective_ratio"] >= 1
    assert view["fidelity"]["audits"] >= 1 and view["floor_met"] is True
    listed = client.get("/v1/streams").json()["streams"]
    assert next(s for s in listed if s["stream_id"] == "cam")["policy"]["fidelity"]["audits"] >= 1
    metrics = client.get("/metrics").text
    audits = [line for line in metrics.splitlines() if line.startswith("eventful_audits_total")]
    assert audits and float(audits[0].split()[-1]) >= 1


def _side_by_side(client, first: str, second: str, video) -> tuple[list[dict], list[dict]]:
    """Each frame sent to both streams at once (the two may share a step); the messages each answered with."""
    answers: tuple[list[dict], list[dict]] = ([], [])
    with client.websocket_connect(f"/v1/streams/{first}") as a, client.websocket_connect(f"/v1/streams/{second}") as b:
        for frame in video:
            a.send_bytes(encode(frame))
            b.send_bytes(encode(frame))
            answers[0].append(a.receive_json())
            answers[1].append(b.receive_json())
    return answers


def test_with_report_fidelity_each_result_carries_the_estimate_and_other_streams_results_do_not(make_client):
    client = make_client(stream_ttl_s=60)
    body = {"policy": "adaptive", "ratio": 2, "audit_share": 0.5, "report_fidelity": True}
    assert client.put("/v1/streams/cam/policy", json=body).status_code == 200
    together, plain = _side_by_side(client, "cam", "plain", frames(41, seed=7))
    view = client.get("/v1/streams/cam/policy").json()
    assert view["setting"]["report_fidelity"] is True
    reported = [m["fidelity"] for m in together]
    assert all(set(r) == set(view["fidelity"]) for r in reported)  # the policy view's fields (rel_l2, top1, ...)
    # refreshed every 10 frames: the estimate as of frames 0, 10, 20, 30, 40 (the audits it counts grow)
    assert all(reported[t] == reported[10 * (t // 10)] for t in range(41))
    assert [r["audits"] for r in reported[::10]] == sorted(r["audits"] for r in reported[::10])
    assert reported[40]["audits"] >= 1 and reported[40]["audits"] <= view["fidelity"]["audits"]
    assert all(m["type"] == "result" and "fidelity" not in m for m in plain)


def test_a_trial_serves_keyframe_candidates_and_a_probing_stream_beside_it_serves_only_its_choice(make_client):
    client = make_client(stream_ttl_s=60)
    body = {"policy": "adaptive", "ratio": 1.5, "audit_share": 0.1}  # the tiny model's candidates: k = 3 and 4
    put = client.put("/v1/streams/trial/policy", json=body)  # trial: the default
    assert put.status_code == 200 and put.json()["explore"] == "trial"  # (what the stream will run, before it runs)
    assert client.put("/v1/streams/probe/policy", json={**body, "explore": "probe"}).json()["explore"] == "probe"
    assert client.put("/v1/streams/fixed/policy", json={"policy": "skip", "interval": 2}).json()["explore"] is None
    trial, probe = _side_by_side(client, "trial", "probe", frames(40, seed=8))
    sparse = lambda m: not m["dense"] and not m.get("reused")  # noqa: E731
    assert any(sparse(m) for m in trial)  # candidates served between their keyframes, measured on them
    views = {s: client.get(f"/v1/streams/{s}/policy").json() for s in ("trial", "probe")}
    assert views["trial"]["setting"]["explore"] is None and views["probe"]["setting"]["explore"] == "probe"
    assert views["trial"]["explore"] == "trial" and views["probe"]["explore"] == "probe"  # what is in effect
    if views["probe"]["serving"].startswith("skip"):  # a probing stream that chose skipping never served sparse
        assert not any(sparse(m) for m in probe)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"policy": "sometimes"}, "policy"),
        ({"policy": "adaptive", "ratio": 2, "audit_share": 0.6}, "audit_share"),
        ({"policy": "adaptive", "ratio": 2, "min_top1_agreement": 1.5}, "min_top1_agreement"),
        ({"policy": "adaptive", "ratio": 2, "max_rel_l2": 0}, "max_rel_l2"),
        ({"policy": "adaptive", "ratio": 0.5}, "ratio"),
        ({"policy": "adaptive"}, "ratio"),
        ({"policy": "keyframe"}, "interval"),
        ({"policy": "skip", "interval": 2, "max_rel_l2": 0.1}, "max_rel_l2"),
        ({"policy": "adaptive", "ratio": 2, "min_box_f1": 0.5}, "min_box_f1"),  # a detector's floor
        ({"policy": "adaptive", "ratio": 2, "min_box_f1": 1.5}, "min_box_f1"),
        ({"policy": "skip", "interval": "2"}, "interval"),
        ({"policy": "skip", "interval": 2, "report_fidelity": True}, "report_fidelity"),
        ({"policy": "adaptive", "ratio": 2, "report_fidelity": "yes"}, "report_fidelity"),
        ({"policy": "adaptive", "ratio": 2, "explore": "sometimes"}, "explore"),
        ({"policy": "skip", "interval": 2, "explore": "trial"}, "explore"),
        ({"policy": "eventful", "explore": "probe"}, "explore"),  # (either value: it needs adaptive)
    ],
)
def test_bad_policies_are_422_naming_the_field(client, body, field):
    response = client.put("/v1/streams/cam/policy", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["message"]
    assert client.get("/v1/streams/cam/policy").json()["policy"] == "eventful"  # nothing changed


def test_a_fidelity_floor_the_stream_misses_gets_it_more_compute(make_client):
    client = make_client(stream_ttl_s=60)
    body = {"policy": "adaptive", "ratio": 4, "audit_share": 0.2, "max_rel_l2": 1e-6}  # only dense frames meet it
    assert client.put("/v1/streams/cam/policy", json=body).status_code == 200
    messages = stream_frames(client, "cam", frames(95, seed=7))
    view = client.get("/v1/streams/cam/policy").json()
    assert view["effective_ratio"] < 4  # lowered at each missed check (every 30 frames): more compute
    dense_share_late = sum(m["dense"] for m in messages[-30:]) / 30
    dense_share_early = sum(m["dense"] for m in messages[:30]) / 30
    assert dense_share_late > dense_share_early


def test_an_audit_waits_for_idle_time_and_is_skipped_where_it_would_make_a_due_frame_late(make_client):
    """Audits run when nothing is due (lockstep frames leave the device idle between them: every planned audit runs).
    Before a due frame, an audit runs only if that frame stays within the latency target; otherwise the frame is
    counted unaudited (`eventful_audits_skipped_total{reason="late"}`) and its stream's policy keeps the credit."""
    client = make_client(stream_ttl_s=60)
    engine = client.app.state.engine
    assert client.put("/v1/streams/cam/policy", json={"policy": "adaptive", "ratio": 2,
                                                       "audit_share": 0.5}).status_code == 200
    stream_frames(client, "cam", frames(30, seed=8))
    metrics = client.get("/metrics").text
    assert 'eventful_audits_skipped_total{reason="late"} 0.0' in metrics
    audits = client.get("/v1/streams/cam/policy").json()["fidelity"]["audits"]
    assert audits >= 1

    assert client.put("/v1/budget", json={"mode": "auto", "target_latency_ms": 100}).status_code == 200
    now = time.perf_counter()
    fresh, old = SimpleNamespace(queued_at=now), SimpleNamespace(queued_at=now - 0.099)
    with engine._cond:
        engine._audit_s, engine._recent_step_s = 0.01, 0.0
        assert engine._audit_fits([fresh], 1) and not engine._audit_fits([fresh], 11)
        assert not engine._audit_fits([fresh, old], 1)  # the oldest due frame decides

    record = engine._registry.records["cam"]
    schedule = record.schedule
    schedule.adaptive._audit_draw = True  # the next frame's audit was drawn: it meets a due frame that is too late
    ran = []
    deferred = _DeferredAudit(record, lambda audit: schedule.after("reuse", record.last_result[1], audit, None, 0, 0),
                              lambda: ran.append(1))
    engine._settle(deferred, run=False)
    assert not ran and schedule.adaptive.estimate()["audits"] == audits  # served and counted, not audited
    assert 'eventful_audits_skipped_total{reason="late"} 1.0' in client.get("/metrics").text
