"""The WebSocket protocol through FastAPI's TestClient: results, drops, errors, flushes, budgets, limits, state."""

from __future__ import annotations

import time

import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect

from tests.server.conftest import API_KEY, encode, frames, png_header_only, receive_until, wait_until


def test_concurrent_streams_get_their_results_in_order(client):
    videos = {f"cam{i}": frames(6, seed=i) for i in range(3)}
    with (
        client.websocket_connect("/v1/streams/cam0") as ws0,
        client.websocket_connect("/v1/streams/cam1") as ws1,
        client.websocket_connect("/v1/streams/cam2") as ws2,
    ):
        sockets = {"cam0": ws0, "cam1": ws1, "cam2": ws2}
        results: dict[str, list[dict]] = {name: [] for name in sockets}
        for t in range(6):  # lockstep: every stream sends frame t, then every stream reads its answer
            for name, ws in sockets.items():
                ws.send_bytes(encode(videos[name][t]))
            for name, ws in sockets.items():
                results[name].append(ws.receive_json())
    for name, messages in results.items():
        assert [m["type"] for m in messages] == ["result"] * 6, name
        assert [m["frame"] for m in messages] == list(range(6))
        assert messages[0]["dense"] and not any(m["dense"] for m in messages[1:])
        assert [m["budget"] for m in messages] == [16, 4, 4, 4, 4, 4]
        for m in messages:
            top = m["outputs"]["top"]
            assert len(top) == 3 and top[0]["label"] == f"class_{top[0]['index']}"
            assert top[0]["score"] >= top[1]["score"] >= top[2]["score"] > 0
            assert m["latency_ms"] > 0 and m["timing"]["step_ms"] > 0
    # different videos give different outputs: results went to the right stream
    assert results["cam0"][-1]["outputs"] != results["cam1"][-1]["outputs"]


def _queued_together(client, video: list, rounds: int) -> list[list[dict]]:
    """Three streams; per round, each sends the round's frame while the engine is paused, then it resumes: every
    stream's answer per round."""
    engine = client.app.state.engine
    sockets = [client.websocket_connect(f"/v1/streams/b{i}") for i in range(3)]
    answers = []
    try:
        for ws in sockets:
            ws.__enter__()
        for frame in video[:rounds]:
            engine.pause()
            for ws in sockets:
                ws.send_bytes(encode(frame))
            wait_until(lambda: engine.queued_frames == 3, what="three decoded frames")
            engine.resume()
            answers.append([ws.receive_json() for ws in sockets])
    finally:
        engine.resume()
        for ws in sockets:
            ws.__exit__(None, None, None)
    return answers


def test_streams_joining_together_are_seeded_one_a_step_then_share_steps(client):
    """A first frame seeds the stream's state densely: one a step (the others wait a step and go first then), so
    that joiners do not make one long step for everyone; after that, ready frames share one step."""
    first, second = _queued_together(client, frames(2, seed=3), 2)
    assert all(m["type"] == "result" and m["dense"] for m in first)
    assert sorted(m["batch_size"] for m in first) == [1, 1, 1]
    assert [m["batch_size"] for m in second] == [3, 3, 3] and not any(m["dense"] for m in second)


def test_ready_frames_of_several_streams_share_one_step(make_client):
    """With --seeds-per-step 3, first frames too (the same frame on fresh states: the same answer in any position)."""
    (messages,) = _queued_together(make_client(seeds_per_step=3), frames(1), 1)
    assert [m["batch_size"] for m in messages] == [3, 3, 3]
    # same frame, same model, fresh states: the same answer whatever the position in the batch
    tops = [m["outputs"]["top"] for m in messages]
    for top in tops[1:]:
        assert [t["index"] for t in top] == [t["index"] for t in tops[0]]
        assert [t["score"] for t in top] == pytest.approx([t["score"] for t in tops[0]], abs=1e-6)


def test_stale_frames_are_dropped_and_latest_wins(client):
    engine = client.app.state.engine
    video = frames(4)
    with client.websocket_connect("/v1/streams/slow") as ws:
        ws.send_bytes(encode(video[0]))
        assert ws.receive_json()["type"] == "result"
        engine.pause()  # the model is "busy": frames 1, 2, 3 arrive faster than it steps
        for frame in video[1:]:
            ws.send_bytes(encode(frame))
        dropped = [ws.receive_json(), ws.receive_json()]
        engine.resume()
        result = ws.receive_json()
        info = client.get("/v1/streams/slow").json()
    assert sorted((m["type"], m["frame"]) for m in dropped) == [("dropped", 1), ("dropped", 2)]
    assert result["type"] == "result" and result["frame"] == 3
    assert (info["frames_received"], info["frames_processed"], info["frames_dropped"]) == (4, 2, 2)


def test_malformed_frames_get_errors_and_the_stream_keeps_its_state(make_client):
    client = make_client(max_frame_bytes=64 * 1024, max_frame_width=256, max_frame_height=256)
    video = frames(3)
    jpeg = encode(video[1], "JPEG")
    bad = [
        ("truncated jpeg", jpeg[: len(jpeg) // 2], "undecodable"),
        ("random bytes", np.random.default_rng(0).bytes(500), "undecodable"),
        ("0x0 png", png_header_only(0, 0), "empty_image"),
        ("huge image", png_header_only(20_000, 20_000), "image_too_large"),
        ("256x1 strip", encode(np.zeros((1, 256, 3), np.uint8)), "bad_aspect_ratio"),
        ("too many bytes", b"\x89PNG" + bytes(70 * 1024), "frame_too_large"),
        ("empty message", b"", "empty_frame"),
    ]
    with client.websocket_connect("/v1/streams/bad") as ws, client.websocket_connect("/v1/streams/good") as other:
        ws.send_bytes(encode(video[0]))
        first = ws.receive_json()
        assert first["type"] == "result" and first["dense"]
        for index, (name, data, code) in enumerate(bad, start=1):
            ws.send_bytes(data)
            message = ws.receive_json()
            assert message == {"type": "error", "frame": index, "code": code, "message": message["message"]}, name
            assert message["message"], name
            other.send_bytes(encode(video[index % 3]))  # the other stream is unaffected
            assert other.receive_json()["type"] == "result", name
        ws.send_text("this is not JSON")
        text_error = ws.receive_json()
        ws.send_bytes(encode(video[2]))  # a frame after the errors: answered, from the kept state (not dense)
        after = ws.receive_json()
    assert text_error["type"] == "error" and text_error["code"] == "invalid_message" and text_error["frame"] is None
    assert after["type"] == "result" and after["frame"] == len(bad) + 1 and not after["dense"]
    metrics = client.get("/metrics").text
    assert 'eventful_decode_errors_total{code="undecodable"} 2.0' in metrics
    assert 'eventful_decode_errors_total{code="image_too_large"} 1.0' in metrics
    assert 'eventful_decode_errors_total{code="bad_aspect_ratio"} 1.0' in metrics
    assert "eventful_frames_failed_total 7.0" in metrics


def test_ping_and_unknown_control_messages(client):
    with client.websocket_connect("/v1/streams/ctl") as ws:
        ws.send_text('{"type": "ping"}')
        assert ws.receive_json() == {"type": "pong", "frames": 0}
        ws.send_text('{"type": "subscribe"}')
        assert ws.receive_json()["code"] == "invalid_message"


def test_a_burst_of_pings_is_rate_limited_and_the_reading_client_stays(client):
    """2000 pings at once from a client that reads: a burst of pongs, then one rate_limited error per run of pings
    over the limit (the rest get no answer); never a close, and frames keep being served."""
    from server.api.connection import CONTROL_BURST

    with client.websocket_connect("/v1/streams/pinger") as ws:
        for _ in range(2000):
            ws.send_text('{"type": "ping"}')
        ws.send_bytes(encode(frames(1)[0]))
        result, answers = receive_until(ws, "result", limit=2001)
        time.sleep(0.3)  # the bucket refills
        ws.send_text('{"type": "ping"}')
        later = ws.receive_json()
    pongs = [m for m in answers if m["type"] == "pong"]
    errors = [m for m in answers if m["type"] == "error"]
    assert len(pongs) + len(errors) == len(answers)
    assert {e["code"] for e in errors} == {"rate_limited"} and all(e["frame"] is None for e in errors)
    assert CONTROL_BURST <= len(pongs) < 2 * CONTROL_BURST and 1 <= len(errors) <= len(pongs)
    assert result["frame"] == 0 and later == {"type": "pong", "frames": 1}


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deeply_nested_json_is_an_invalid_message_and_the_stream_goes_on(client, depth):
    with client.websocket_connect("/v1/streams/deep") as ws:
        ws.send_text("[" * depth + "]" * depth)
        error = ws.receive_json()
        ws.send_bytes(encode(frames(1)[0]))
        after = ws.receive_json()
    assert error["type"] == "error" and error["code"] == "invalid_message" and error["frame"] is None
    assert after["type"] == "result" and after["frame"] == 0


def test_frame_size_change_flushes_the_stream(client):
    small, large = frames(3, 48, 64), frames(2, 60, 80, seed=5)
    with client.websocket_connect("/v1/streams/resize") as ws:
        dense = []
        for frame in [*small, *large]:
            ws.send_bytes(encode(frame))
            dense.append(ws.receive_json()["dense"])
        info = client.get("/v1/streams/resize").json()
    assert dense == [True, False, False, True, False]
    assert info["frame_size"] == [60, 80]


def test_budget_change_takes_effect_on_the_next_frame(client):
    video = frames(6)
    with client.websocket_connect("/v1/streams/steer") as ws:

        def budget_of(t: int) -> int:
            ws.send_bytes(encode(video[t]))
            return ws.receive_json()["budget"]

        assert budget_of(0) == 16  # first frame: dense
        assert budget_of(1) == 4
        assert client.put("/v1/budget", json={"mode": "fixed", "tokens": 9}).status_code == 200
        assert budget_of(2) == 9
        assert client.put("/v1/streams/steer/budget", json={"fraction": 0.5}).json()["effective_tokens"] == 8
        assert budget_of(3) == 8
        assert client.put("/v1/streams/steer/budget", json={"max_tokens": 3}).status_code == 200
        assert budget_of(4) == 3
        assert client.delete("/v1/streams/steer/budget").status_code == 204
        assert budget_of(5) == 9
        assert client.get("/v1/streams/steer").json()["last_budget_tokens"] == 9


def test_max_streams_refuses_with_a_close_reason(make_client):
    client = make_client(max_streams=2)
    with client.websocket_connect("/v1/streams/a"), client.websocket_connect("/v1/streams/b"):
        with client.websocket_connect("/v1/streams/c") as ws, pytest.raises(WebSocketDisconnect) as refused:
            ws.receive_json()
        assert refused.value.code == 1013 and "limit of 2 streams" in refused.value.reason
    with client.websocket_connect("/v1/streams/c") as ws:  # room again once the others left
        ws.send_bytes(encode(frames(1)[0]))
        assert ws.receive_json()["type"] == "result"
    assert 'eventful_streams_refused_total{reason="max_streams"} 1.0' in client.get("/metrics").text


def test_a_connection_without_frames_is_closed_after_the_idle_timeout_and_frees_its_slot(make_client):
    client = make_client(max_streams=1, idle_timeout_s=1.0, first_frame_grace_s=0.1)
    video = frames(5)
    with client.websocket_connect("/v1/streams/idle") as ws:
        wait_until(lambda: client.get("/v1/streams").json()["streams"] == [], timeout=5, what="the idle close")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 4408 and closed.value.reason == "idle: no frame in 1 s"
    with client.websocket_connect("/v1/streams/camera") as ws:  # the slot is free again
        for frame in video:  # a stream that keeps sending is never idle, however long it lives
            ws.send_bytes(encode(frame))
            assert ws.receive_json()["type"] == "result"
            time.sleep(0.2)
        ws.send_text('{"type": "ping"}')  # control messages do not count as frames
        assert ws.receive_json()["type"] == "pong"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 4408


def test_connections_waiting_for_a_first_frame_are_bounded(make_client):
    """Past the first frame's grace, at most max_idle_streams connections may wait without a frame; another is
    closed (4408) at the end of its grace. A camera that sends at once is served all along."""
    client = make_client(max_idle_streams=1, first_frame_grace_s=0.5, idle_timeout_s=30)
    connections = client.app.state.connections
    video = frames(2)
    with client.websocket_connect("/v1/streams/idle1") as first:
        wait_until(lambda: connections.idle_count == 1, timeout=5, what="the first to be idle")
        with client.websocket_connect("/v1/streams/idle2") as second, pytest.raises(WebSocketDisconnect) as closed:
            second.receive_json()
        assert closed.value.code == 4408 and "limit of 1 connections waiting longer" in closed.value.reason
        with client.websocket_connect("/v1/streams/camera") as camera:
            camera.send_bytes(encode(video[0]))
            assert camera.receive_json()["type"] == "result"
        first.send_bytes(encode(video[1]))  # the idle one may still start
        assert first.receive_json()["type"] == "result"
        assert connections.idle_count == 0
    streams = client.get("/v1/streams").json()["streams"]
    assert streams == []


def test_a_stream_id_is_one_connection_at_a_time(client):
    with client.websocket_connect("/v1/streams/dup"):
        with client.websocket_connect("/v1/streams/dup") as ws, pytest.raises(WebSocketDisconnect) as refused:
            ws.receive_json()
    assert refused.value.code == 4409


def test_invalid_stream_id_is_refused(client):
    with client.websocket_connect("/v1/streams/bad id!") as ws, pytest.raises(WebSocketDisconnect) as refused:
        ws.receive_json()
    assert refused.value.code == 4400


def test_state_is_freed_on_disconnect(client):
    with client.websocket_connect("/v1/streams/gone") as ws:
        ws.send_bytes(encode(frames(1)[0]))
        ws.receive_json()
        listed = client.get("/v1/streams").json()
        assert listed["total_state_bytes"] > 0 and listed["streams"][0]["state_bytes"] > 0
    wait_until(lambda: client.get("/v1/streams").json()["streams"] == [], what="the stream to be freed")
    assert "eventful_state_bytes 0.0" in client.get("/metrics").text


def test_quick_reconnect_resumes_the_state_within_the_ttl(make_client):
    client = make_client(stream_ttl_s=0.5)
    video = frames(3)
    with client.websocket_connect("/v1/streams/resume") as ws:
        ws.send_bytes(encode(video[0]))
        assert ws.receive_json()["dense"]
    retained = client.get("/v1/streams").json()["streams"]
    assert [(s["stream_id"], s["connected"]) for s in retained] == [("resume", False)]
    assert retained[0]["state_bytes"] > 0
    with client.websocket_connect("/v1/streams/resume") as ws:
        ws.send_bytes(encode(video[1]))
        resumed = ws.receive_json()
    assert resumed["frame"] == 0 and not resumed["dense"]  # frame index restarts, state does not
    wait_until(lambda: client.get("/v1/streams").json()["streams"] == [], timeout=5, what="the TTL to expire")
    with client.websocket_connect("/v1/streams/resume") as ws:
        ws.send_bytes(encode(video[2]))
        assert ws.receive_json()["dense"]


def test_retained_states_stay_within_max_streams(make_client):
    client = make_client(max_streams=2, stream_ttl_s=60)
    video = frames(1)
    for i in range(5):
        with client.websocket_connect(f"/v1/streams/gone{i}") as ws:
            ws.send_bytes(encode(video[0]))
            assert ws.receive_json()["type"] == "result"
    wait_until(lambda: not any(s["connected"] for s in client.get("/v1/streams").json()["streams"]),
               what="every stream to be closed")
    listed = client.get("/v1/streams").json()
    assert [s["stream_id"] for s in listed["streams"]] == ["gone3", "gone4"]  # the newest are kept
    assert "eventful_retained_streams 2.0" in client.get("/metrics").text


def test_websocket_needs_the_api_key_when_one_is_set(make_client):
    client = make_client(api_key=API_KEY)
    with client.websocket_connect("/v1/streams/k") as ws, pytest.raises(WebSocketDisconnect) as refused:
        ws.receive_json()
    assert refused.value.code == 1008
    with client.websocket_connect("/v1/streams/k?token=wrong") as ws, pytest.raises(WebSocketDisconnect) as refused:
        ws.receive_json()
    assert refused.value.code == 1008
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    for url, headers in [(f"/v1/streams/k?token={API_KEY}", {}), ("/v1/streams/k", bearer)]:
        with client.websocket_connect(url, headers=headers) as ws:
            ws.send_bytes(encode(frames(1)[0]))
            assert ws.receive_json()["type"] == "result"


def test_a_failed_step_answers_an_error_and_flushes_the_stream(client, monkeypatch):
    runner = client.app.state.engine.runner
    video = frames(3)
    with client.websocket_connect("/v1/streams/boom") as ws:
        ws.send_bytes(encode(video[0]))
        assert ws.receive_json()["dense"]

        def broken(plan):
            raise RuntimeError("simulated device error")

        monkeypatch.setattr(runner, "execute", broken)
        ws.send_bytes(encode(video[1]))
        error = ws.receive_json()
        monkeypatch.undo()
        ws.send_bytes(encode(video[2]))
        after = ws.receive_json()
    assert error["type"] == "error" and error["frame"] == 1 and error["code"] == "inference_failed"
    assert "simulated device error" in error["message"]
    assert after["type"] == "result" and after["frame"] == 2 and after["dense"]  # state flushed: dense again


def test_a_client_that_stops_reading_is_bounded_and_marked_for_closing():
    """The outbound queue never grows past its bound; past it the connection is marked to close (1008)."""
    from server.api.connection import MAX_UNSENT_MESSAGES, StreamConnection

    connection = StreamConnection(websocket=None, engine=None, stream_id="slow")
    for i in range(MAX_UNSENT_MESSAGES + 10):
        connection._enqueue({"type": "pong", "frames": i})
    assert connection.outbound.qsize() == MAX_UNSENT_MESSAGES
    assert connection.overflowed
