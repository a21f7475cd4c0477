"""eventful-camera: the pure parts (URLs, backoff, statistics, drawing, output order), the command against a real
server on 127.0.0.1 with a real clip (every frame answered, the server's counts, the annotated video), and a server
killed and restarted on the same port under a running client (it reconnects and counts the gap)."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.live_server import REPO_ROOT, free_port, live_server
from clients.camera import (
    AnnotationQueue,
    CameraClient,
    CameraConfig,
    CameraStats,
    backoff_delays,
    box_to_pixels,
    describe_outputs,
    draw_result,
    format_summary,
    main,
    parse_resize,
    pattern_frame,
    rest_base_url,
)

SERVER_ARGS = ["--model", "deit-tiny-patch16-224", "--budget-tokens", "50", "--threads", "1", "--log-level", "warning"]
API_KEY = "camera-test-key"


def result(frame: int, budget: int = 50, outputs: dict | None = None) -> dict:
    return {"type": "result", "frame": frame, "budget": budget, "dense": False, "updated_fraction": 0.25,
            "latency_ms": 20.0, "outputs": outputs if outputs is not None else
            {"top": [{"label": "sulphur-crested cockatoo, Kakatoe galerita", "index": 89, "score": 0.91}]}}


def wait_until(condition, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


# ---- pure parts ----------------------------------------------------------------------------------


def test_urls_and_resize():
    assert rest_base_url("ws://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert rest_base_url("wss://cams.example.org/v1/streams/x") == "https://cams.example.org"
    assert rest_base_url("http://h:1/") == "http://h:1"
    for bad in ("ftp://h", "127.0.0.1:8000", "ws://"):
        with pytest.raises(ValueError):
            rest_base_url(bad)
    assert parse_resize("640x480") == (640, 480) and parse_resize("32X24") == (32, 24)
    for bad in ("640", "0x10", "ax4", "-1x5"):
        with pytest.raises(ValueError):
            parse_resize(bad)
    with pytest.raises(ValueError, match="fps"):
        CameraConfig(server="ws://h:1", fps=0)
    with pytest.raises(ValueError):
        CameraConfig(server="ftp://h:1")


def test_backoff_doubles_up_to_the_cap():
    assert list(itertools.islice(backoff_delays(0.2, 5.0), 8)) == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5, 5, 5])
    assert list(itertools.islice(backoff_delays(1.0, 1.0), 3)) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        next(backoff_delays(0, 5))


def test_describe_outputs():
    assert describe_outputs(result(0)["outputs"]) == "sulphur-crested cockatoo 0.91"
    assert describe_outputs({"boxes": [{"label": "a", "score": 0.5, "box": [0, 0, 1, 1]}] * 3}) == "3 detections"
    assert describe_outputs({"boxes": []}) == "0 detections"
    assert describe_outputs({"action": {"label": "juggling", "score": 0.75}, "top": []}) == "action: juggling 0.75"
    assert describe_outputs({"action": "waving"}) == "action: waving"
    assert describe_outputs(None) == "" and describe_outputs({"top": []}) == ""


def test_stats_summary_and_gap_accounting():
    stats = CameraStats()
    stats.start(0.0)
    stats.on_connected(0.0)
    for i in range(10):
        stats.frames_read += 1
        stats.on_sent(i * 0.1)
    for i in range(8):
        stats.on_result(result(i, budget=40 + i), latency_ms=10.0 + i, now=i * 0.1 + 0.05)
    stats.on_dropped(0.9)
    stats.on_disconnected(1.0, unanswered=1)  # one frame in flight is lost with the connection
    assert "DISCONNECTED" in stats.status_line(1.5)
    stats.frames_read += 4
    stats.frames_lost_in_gaps += 4
    stats.on_connected(3.0)  # two seconds later
    stats.frames_read += 1
    stats.on_sent(3.1)
    stats.on_error("undecodable", 3.2)
    summary = stats.summary(4.0)
    assert summary["reconnects"] == 1 and summary["connects"] == 2
    assert summary["gap_s"] == pytest.approx(2.0) and summary["gaps"] == 1
    assert summary["frames_lost_in_gaps"] == 4 and summary["unanswered_at_disconnect"] == 1
    assert summary["frames_read"] == summary["frames_sent"] + summary["frames_lost_in_gaps"] == 15
    assert summary["latency_ms"]["p50"] == pytest.approx(13.5)
    assert summary["error_codes"] == {"undecodable": 1} and summary["mean_budget"] == pytest.approx(43.5)
    assert summary["connections"] == [{"frames_sent": 10, "results": 8, "dropped": 1, "errors": 0},
                                      {"frames_sent": 1, "results": 0, "dropped": 0, "errors": 1}]
    assert "1 reconnect(s), 2.0 s disconnected, 4 frame(s) not sent" in format_summary(summary)
    line = stats.status_line(3.3)
    assert "budget 47" in line and "cockatoo 0.91" in line and "DISCONNECTED" not in line


class _SlowSocket:
    """A socket whose send() waits until the test lets it finish (or fail), so things can happen meanwhile."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.fail = False

    async def send(self, data: bytes) -> None:
        from websockets.exceptions import ConnectionClosedError

        await self.release.wait()
        if self.fail:
            raise ConnectionClosedError(None, None)


@pytest.mark.parametrize("during_send, send_fails, expect", [
    ("disconnect", True, {"frames_sent": 0, "frames_lost_in_gaps": 1, "unanswered_at_disconnect": 0, "results": 0}),
    ("disconnect", False, {"frames_sent": 1, "frames_lost_in_gaps": 0, "unanswered_at_disconnect": 1, "results": 0}),
    ("answer then disconnect", True,
     {"frames_sent": 1, "frames_lost_in_gaps": 0, "unanswered_at_disconnect": 0, "results": 1}),
])
def test_a_connection_closing_while_a_frame_is_written_counts_that_frame_once(during_send, send_fails, expect):
    """Every frame read is sent or lost, and every frame sent is answered or unanswered, exactly once, even when the
    connection closes (or the answer comes) while ws.send() is still awaited. (CI once counted one frame as both lost
    in the gap and unanswered at the disconnect.)"""

    async def scenario() -> dict:
        client = CameraClient(CameraConfig(server="ws://127.0.0.1:1", source="pattern"), log=lambda _: None)
        socket = _SlowSocket()
        client._ws = socket
        client.stats.start(0.0)
        client.stats.on_connected(0.0)
        client.stats.frames_read += 1
        sending = asyncio.create_task(client._send(0, b"jpeg"))
        await asyncio.sleep(0)  # the send is now waiting on the socket
        if during_send.startswith("answer"):
            async def one_answer():
                yield json.dumps(result(0))
            await client._receive(one_answer())
        client._on_disconnected()
        socket.fail = send_fails
        socket.release.set()
        if not await sending:
            client.stats.frames_lost_in_gaps += 1
        return client.stats.summary(1.0)

    summary = asyncio.run(scenario())
    assert {key: summary[key] for key in expect} == expect
    assert summary["frames_read"] == summary["frames_sent"] + summary["frames_lost_in_gaps"]
    answered = summary["results"] + summary["dropped"] + summary["errors"]
    assert answered + summary["unanswered_at_disconnect"] + summary["unanswered"] == summary["frames_sent"]


def test_open_gap_counts_up_to_now():
    stats = CameraStats()
    stats.on_disconnected(0.5, unanswered=0)  # before the first connection: start-up, not a gap
    stats.on_connected(1.0)
    assert stats.gap_s(5.0) == 0.0
    stats.on_disconnected(2.0, unanswered=0)
    assert stats.gap_s(5.0) == pytest.approx(3.0) and stats.summary(5.0)["gaps"] == 1


def test_annotation_queue_releases_in_order_with_the_latest_result():
    queue = AnnotationQueue(timeout_s=1.0)
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(5)]
    for i, image in enumerate(images):
        queue.add(i, image, now=0.0)
    queue.answer(1, {"type": "dropped", "frame": 1})  # may come before frame 0's result
    assert queue.release(0.1) == []  # frame 0 not answered yet: nothing leaves out of order
    queue.answer(0, result(0))
    released = queue.release(0.2)
    assert [(img is images[i], res is not None and res["frame"], stale) for i, (img, res, stale) in
            enumerate(released)] == [(True, 0, False), (True, 0, True)]  # frame 1 shows frame 0's result
    queue.answer(2, result(2))
    assert [r["frame"] for _, r, _ in queue.release(0.3)] == [2]
    assert queue.release(0.5) == []
    timed_out = queue.release(1.5)  # frames 3 and 4 never answered: released after the timeout, stale
    assert [(r["frame"], stale) for _, r, stale in timed_out] == [(2, True), (2, True)] and len(queue) == 0


def test_draw_result_draws_caption_and_boxes():
    base = Image.new("RGB", (200, 100), (128, 128, 128))
    boxes = {"boxes": [{"label": "cat", "score": 0.8, "box": [100, 40, 180, 90]},
                       {"label": "dog", "score": 0.7, "box": [0.05, 0.5, 0.3, 0.95]}]}  # normalised
    drawn = np.asarray(draw_result(base, result(3, outputs=boxes)))
    assert np.asarray(base).shape == drawn.shape and np.asarray(base).max() == 128  # the input is untouched
    assert (drawn[2:8, 2:40] < 60).any()  # the dark caption banner
    assert tuple(drawn[65, 100]) != (128, 128, 128) and tuple(drawn[65, 179]) != (128, 128, 128)  # box edges
    assert tuple(drawn[60, 140]) == (128, 128, 128)  # inside the box: untouched
    assert box_to_pixels([0.05, 0.5, 0.3, 0.95], 200, 100) == pytest.approx((10, 50, 60, 95))
    assert tuple(drawn[75, 10]) != (128, 128, 128)  # the normalised box's left edge
    plain = np.asarray(draw_result(base, None))
    assert (plain == 128).all()  # nothing to draw


def test_pattern_moves_and_is_deterministic():
    a, b = np.asarray(pattern_frame(0)), np.asarray(pattern_frame(5))
    assert a.shape == (240, 320, 3) and (np.asarray(pattern_frame(0)) == a).all()
    changed = (np.abs(a.astype(int) - b.astype(int)).sum(-1) > 0).mean()
    assert 0 < changed < 0.2  # a static camera: the square moved, the rest did not


def remux_faststart(src: Path, dst: Path) -> Path:
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


def test_sources_file_loop_and_http_url(real_video, tmp_path):
    """A file (paced, optionally looped; its frames carry their timestamps, which go on across a loop) and the same
    file behind an HTTP URL (PyAV; a known duration: not live)."""
    import functools
    import http.server

    from clients.camera import open_source

    n = len(decode_frames(real_video))
    source = open_source(str(real_video))
    assert not source.live and source.rate and source.rate > 1
    times = [frame.time_s for frame in source.frames]
    assert len(times) == n and times[0] == 0.0
    assert np.diff(times) == pytest.approx([1 / source.rate] * (n - 1), rel=0.01)
    looped = open_source(str(real_video), loop=True)
    looped_times = [frame.time_s for frame in itertools.islice(looped.frames, n + 5)]  # went round again
    assert len(looped_times) == n + 5 and looped_times[:n] == times
    assert np.diff(looped_times) == pytest.approx([1 / source.rate] * (n + 4), rel=0.01)  # no jump back
    looped.close()
    with pytest.raises(ValueError, match="no such video"):
        open_source(str(tmp_path / "missing.mp4"))

    remux_faststart(real_video, tmp_path / "clip.mp4")  # the index first: the plain HTTP server cannot seek

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            remote = open_source(f"http://127.0.0.1:{httpd.server_address[1]}/clip.mp4")
            first = next(remote.frames)
            assert not remote.live and first.image.size == next(open_source(str(real_video)).frames).image.size
            assert 1 + sum(1 for _ in remote.frames) == n
            remote.close()
        finally:
            httpd.shutdown()


def test_bad_arguments_exit_2():
    assert main(["--source", "/no/such/video.mp4", "--server", "ws://127.0.0.1:1"]) == 2
    assert main(["--server", "ftp://127.0.0.1:1", "--frames", "1"]) == 2


def test_gives_up_when_nothing_listens():
    config = CameraConfig(server=f"ws://127.0.0.1:{free_port()}", source="pattern", give_up_after_s=1.0)
    logs: list[str] = []
    started = time.monotonic()
    summary = asyncio.run(CameraClient(config, log=logs.append).run())
    assert time.monotonic() - started < 5
    assert "no connection" in summary["failure"] and summary["frames_read"] == summary["frames_sent"] == 0
    assert summary["connects"] == 0 and summary["gap_s"] == 0  # never connected: start-up, not a gap
    assert len(logs) >= 2 and all("retrying in" in line for line in logs)


# ---- against a stand-in server (answers every frame at once, records when each arrived) -----------


def write_mislabelled_avi(path: Path, frames: int, header_fps: int = 50, content_fps: int = 25) -> Path:
    """An AVI whose header claims header_fps while its frames are content_fps apart: the frames carry pts 0, 2, 4, ...
    in the stream's 1/header_fps time base (the muxer fills the gaps with empty chunks, as a capture tool that
    duplicates nothing but declares 50 fps does)."""
    import av

    step = header_fps // content_fps
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=header_fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, header_fps)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (i * 9) % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = step * i, Fraction(1, header_fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:  # what a player (and the old client) believes
        assert container.streams.video[0].average_rate == header_fps
    return path


def run_against_stand_in(config_kwargs: dict, answer=None) -> tuple[dict, list[float], list[str]]:
    """Run a CameraClient against an in-process WebSocket server that answers each frame with `answer(index)` (a
    result by default); returns (summary, arrival times of the frames at the server, the client's log lines)."""
    from websockets.asyncio.server import serve

    arrivals: list[float] = []
    logs: list[str] = []
    answer = answer or result

    async def handler(ws) -> None:
        index = 0
        async for message in ws:
            if isinstance(message, bytes):
                arrivals.append(time.monotonic())
                await ws.send(json.dumps(answer(index)))
                index += 1

    async def scenario() -> dict:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            config = CameraConfig(server=f"ws://127.0.0.1:{port}", **config_kwargs)
            return await CameraClient(config, log=logs.append).run()

    return asyncio.run(scenario()), arrivals, logs


def test_a_file_is_paced_by_its_timestamps_not_its_header_rate(tmp_path):
    """An AVI that says 50 fps for frames 40 ms apart: frames leave 40 ms apart (1 s of video takes 1 s, not 0.5 s)
    and the annotated video keeps the source's timing (plays at the right speed, 25 fps)."""
    import av

    frames = 25  # 0.96 s of video by its timestamps; 0.48 s by its header
    video = write_mislabelled_avi(tmp_path / "mislabelled.avi", frames)
    out = tmp_path / "annotated.mp4"
    summary, arrivals, logs = run_against_stand_in({"source": str(video), "output": str(out), "stream_id": "ts"})
    assert summary["frames_sent"] == summary["results"] == frames and "failure" not in summary
    span = arrivals[-1] - arrivals[0]
    assert 0.85 < span < 1.5, f"{frames} frames 40 ms apart were sent over {span:.2f} s"
    assert summary["fps_target"] == pytest.approx(25, rel=0.05) and summary["pacing"] == "timestamps"
    assert summary["source_declared_fps"] == 50
    assert any("declares 50 fps but its timestamps advance at 25 fps" in line for line in logs), logs
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        times = [float(frame.pts * frame.time_base) for frame in container.decode(stream)]
        rate = stream.average_rate
    assert len(times) == summary["frames_written"] == frames
    assert times[-1] - times[0] == pytest.approx(0.96, abs=0.01)
    assert np.diff(times) == pytest.approx([0.04] * (frames - 1), abs=0.002)
    assert float(rate) == pytest.approx(25, rel=0.1)


def test_a_fixed_fps_sends_every_frame_at_that_rate_and_keeps_the_source_timing_in_the_output(tmp_path):
    """--fps 50 on a 25 fps file: every frame goes, 20 ms apart; the annotated video still plays at 25 fps."""
    import av

    frames = 25
    video = write_mislabelled_avi(tmp_path / "mislabelled.avi", frames)
    out = tmp_path / "annotated.mp4"
    summary, arrivals, _ = run_against_stand_in({"source": str(video), "output": str(out), "fps": 50})
    assert summary["frames_sent"] == frames and 0.4 < arrivals[-1] - arrivals[0] < 0.8
    with av.open(str(out)) as container:
        times = [float(frame.pts * frame.time_base) for frame in container.decode(video=0)]
    assert times[-1] - times[0] == pytest.approx(0.96, abs=0.01)


def test_warns_when_the_server_drops_frames():
    """A sender faster than the server: the server answers `dropped`; the client says so while it runs (once, not
    per frame) and in its summary."""

    def every_other_dropped(index: int) -> dict:
        return {"type": "dropped", "frame": index} if index % 2 else result(index)

    summary, _, logs = run_against_stand_in({"source": "pattern", "fps": 50, "frames": 20}, every_other_dropped)
    assert summary["dropped"] == 10 and summary["results"] == 10
    warnings = [line for line in logs if "dropped" in line]
    assert len(warnings) == 1 and "--fps" in warnings[0], logs
    assert "50 % of the frames sent were dropped" in format_summary(summary)
    quiet, _, quiet_logs = run_against_stand_in({"source": "pattern", "fps": 50, "frames": 5})
    assert quiet["dropped"] == 0 and not any("dropped" in line for line in quiet_logs)
    assert "dropped by the server" not in format_summary(quiet)


# ---- against a real server -----------------------------------------------------------------------


def decode_frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_cli_streams_a_real_clip_every_frame_answered(real_video, tmp_path):
    source_frames = decode_frames(real_video)
    out_video, out_json = tmp_path / "annotated.mp4", tmp_path / "summary.json"
    with live_server(SERVER_ARGS, tmp_path / "server.log") as base:
        ws_base = base.replace("http://", "ws://")
        command = [sys.executable, "-m", "clients.camera", "--source", str(real_video), "--server", ws_base,
                   "--stream-id", "cli-real", "--fps", "12", "--budget", "40", "--output", str(out_video),
                   "--json", str(out_json)]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr + done.stdout
        with httpx.Client(base_url=base, trust_env=False) as http:
            seen = http.get("/v1/streams/cli-real").json()
    summary = json.loads(out_json.read_text())
    print(done.stdout)  # the printed summary
    assert "frames: read" in done.stdout and "latency (client)" in done.stdout
    n = len(source_frames)
    assert summary["frames_read"] == summary["frames_sent"] == n
    assert summary["unanswered"] == 0 and summary["errors"] == 0 and summary["reconnects"] == 0
    assert summary["results"] + summary["dropped"] == n and summary["results"] > n // 2
    # what the server saw of this stream is what the client counted
    assert seen["frames_received"] == summary["frames_sent"]
    assert seen["frames_processed"] == summary["results"] and seen["frames_dropped"] == summary["dropped"]
    assert seen["frames_failed"] == summary["errors"]
    assert seen["budget_source"] == "override" and seen["budget_tokens"] == 40 and seen["last_budget_tokens"] == 40
    assert summary["budget_set"]["effective_tokens"] == 40
    assert summary["latency_ms"]["p50"] > 0 and summary["latency_ms"]["p95"] >= summary["latency_ms"]["p50"]
    # the annotated video: every source frame, decodable, the caption drawn at the top, the picture kept below
    written = decode_frames(out_video)
    assert len(written) == summary["frames_written"] == n
    assert written[0].shape == source_frames[0].shape
    top_diff = np.abs(written[10][:12, :80].astype(int) - source_frames[10][:12, :80].astype(int)).mean()
    rest_diff = np.abs(written[10][60:].astype(int) - source_frames[10][60:].astype(int)).mean()
    assert top_diff > 20 and rest_diff < 10, (top_diff, rest_diff)


def test_client_reconnects_after_the_server_is_killed_and_restarted(tmp_path):
    port = free_port()
    env = {"EVENTFUL_API_KEY": API_KEY}
    config = CameraConfig(
        server=f"ws://127.0.0.1:{port}", source="pattern", stream_id="recon", fps=10, resize=(160, 120),
        api_key=API_KEY, budget=30, duration_s=90, backoff_initial_s=0.2, backoff_max_s=1.0,
        give_up_after_s=60, output=str(tmp_path / "recon.mp4"),
    )
    logs: list[str] = []
    client = CameraClient(config, log=logs.append)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = asyncio.run(client.run())
        except BaseException as err:  # surfaced by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    processes = []
    try:
        with pytest.raises(RuntimeError, match="the server died"):
            with live_server(SERVER_ARGS, tmp_path / "server1.log", env=env, port=port, on_start=processes.append):
                thread.start()
                wait_until(lambda: client.stats.results >= 8 or "error" in outcome, 30, "results from server 1")
                processes[0].kill()  # no goodbye: the socket just drops
                processes[0].wait(timeout=10)
                wait_until(lambda: client.stats.disconnected_since is not None, 15, "the client to notice")
                time.sleep(0.5)  # frames are read and lost while nobody listens
        lost_before_restart = client.stats.frames_lost_in_gaps
        with live_server(SERVER_ARGS, tmp_path / "server2.log", env=env, port=port) as base:
            wait_until(lambda: client.stats.reconnects >= 1 and client.stats.connections[-1]["results"] >= 8
                       or "error" in outcome, 60, "results from server 2")
            client.stop()
            thread.join(timeout=30)
            with httpx.Client(base_url=base, trust_env=False, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                seen = http.get("/v1/streams/recon").json()
                budget = http.get("/v1/streams/recon/budget").json()
    finally:
        client.stop()
        thread.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert "failure" not in summary, summary
    assert summary["reconnects"] == 1 and summary["connects"] == 2 and summary["gaps"] == 1
    assert summary["gap_s"] > 0.5
    assert summary["frames_lost_in_gaps"] >= lost_before_restart > 0
    assert summary["frames_read"] == summary["frames_sent"] + summary["frames_lost_in_gaps"]
    answered = summary["results"] + summary["dropped"] + summary["errors"]
    assert answered + summary["unanswered_at_disconnect"] + summary["unanswered"] == summary["frames_sent"]
    first, second = summary["connections"]
    assert first["results"] >= 8 and second["results"] >= 8
    # the restarted server knows only the second connection, and got the budget override again
    assert seen["frames_received"] == second["frames_sent"] and seen["frames_processed"] == second["results"]
    assert budget["source"] == "override" and budget["effective_tokens"] == 30
    assert any("server went away" in line for line in logs) and any("reconnected" in line for line in logs)
    assert any("retrying in" in line for line in logs)
    assert len(decode_frames(tmp_path / "recon.mp4")) == summary["frames_written"] == summary["frames_read"]
    print(format_summary(summary))
