"""Must-show 2: three `eventful-serve` replicas on 127.0.0.1 behind a real nginx running the project's own
deploy/nginx/nginx.conf (consistent hashing on the stream id). Streams spread over the replicas; a stream's REST
calls through the balancer reach its replica; a reconnect resumes on the same replica; `eventful-budget` changes the
global budget on all three; killing one replica moves only its streams, which restart densely elsewhere."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

from bench.live_server import free_port, live_server
from model.preprocess import read_video_frames
from tests.deploy.services import binary, http_ok, render_nginx_conf, running

REPLICAS = 3
STREAMS = 24  # with three replicas, each one gets at least one stream unless the ring is very uneven (p ~ 2e-4)
GLOBAL_TOKENS = 30
RECV_TIMEOUT_S = 30.0
SERVER_ARGS = ["--model", "deit-tiny-patch16-224", "--threads", "1", "--decode-threads", "1", "--budget-tokens",
               "50", "--max-streams", "32", "--stream-ttl-s", "120", "--top-k", "1", "--log-level", "warning"]


def stream_ids() -> list[str]:
    return [f"cam-{i:02d}" for i in range(STREAMS)]


def jpeg_frames(video: Path, count: int = 4) -> list[bytes]:
    frames = []
    for frame in read_video_frames(video)[:count]:
        buffer = io.BytesIO()
        Image.fromarray(frame).resize((160, 120)).save(buffer, format="JPEG", quality=90)
        frames.append(buffer.getvalue())
    return frames


def send_frames(balancer: str, stream_id: str, frames: list[bytes]) -> list[dict]:
    """Open the stream's WebSocket through the balancer, send frames in lockstep, return the answers."""
    answers = []
    with connect(f"ws://{balancer}/v1/streams/{stream_id}", proxy=None, open_timeout=10) as ws:
        for frame in frames:
            ws.send(frame)
            answers.append(json.loads(ws.recv(timeout=RECV_TIMEOUT_S)))
    return answers


def where_streams_are(replicas: list[str]) -> dict[str, str]:
    """stream id -> the replica (base URL) whose /v1/streams lists it (connected or retained), asked directly."""
    owner: dict[str, str] = {}
    with httpx.Client(trust_env=False, timeout=10) as http:
        for replica in replicas:
            for stream in http.get(f"{replica}/v1/streams").json()["streams"]:
                assert stream["stream_id"] not in owner, f"{stream['stream_id']} is on two replicas"
                owner[stream["stream_id"]] = replica
    return owner


@contextlib.contextmanager
def replicas_running(tmp_path: Path, processes: dict[str, subprocess.Popen]):
    """Start the replicas in parallel; yield their base URLs."""
    managers = [live_server(SERVER_ARGS, tmp_path / f"replica-{i}.log",
                            on_start=lambda p, i=i: processes.__setitem__(str(i), p)) for i in range(REPLICAS)]
    with ThreadPoolExecutor(REPLICAS) as pool:
        bases = list(pool.map(lambda m: m.__enter__(), managers))
    try:
        yield bases, dict(zip(bases, managers, strict=True))
    finally:
        for manager in managers:
            with contextlib.suppress(RuntimeError):  # the killed one says it died
                manager.__exit__(None, None, None)


def test_three_replicas_behind_nginx(tmp_path, real_video):
    nginx = binary("nginx")
    frames = jpeg_frames(real_video)
    processes: dict[str, subprocess.Popen] = {}
    with replicas_running(tmp_path, processes) as (replicas, managers):
        process_of = {base: processes[str(i)] for i, base in enumerate(replicas)}
        balancer = f"127.0.0.1:{free_port()}"
        runtime = tmp_path / "nginx"
        runtime.mkdir()
        conf = runtime / "nginx.conf"
        conf.write_text(render_nginx_conf([r.removeprefix("http://") for r in replicas], balancer, runtime))
        command = [nginx, "-p", str(runtime), "-c", str(conf),
                   "-g", f"daemon off; pid {runtime}/nginx.pid; error_log {runtime}/error.log warn;"]
        with running(command, runtime / "stdout.log", lambda: http_ok(f"http://{balancer}/healthz"), "nginx"), \
                httpx.Client(base_url=f"http://{balancer}", trust_env=False, timeout=10) as http:
            ids = stream_ids()

            # 1. streams spread over the replicas
            first = {sid: send_frames(balancer, sid, frames[:2]) for sid in ids}
            assert all([a["type"] for a in answers] == ["result", "result"] for answers in first.values())
            owner = where_streams_are(replicas)
            assert set(owner) == set(ids)
            spread = Counter(owner.values())
            assert set(spread) == set(replicas), f"a replica got no stream: {spread}"

            # 2. a per-stream budget set through the balancer reaches the stream's replica and shows in its results;
            #    3. the reconnect lands on the same replica: its state is found there (no dense frame)
            override = {sid: 5 + i for i, sid in enumerate(ids)}
            for sid in ids:
                answer = http.put(f"/v1/streams/{sid}/budget", json={"tokens": override[sid]})
                assert answer.status_code == 200 and answer.json()["effective_tokens"] == override[sid]
            for sid in ids:
                (result,) = send_frames(balancer, sid, frames[2:3])
                assert result["type"] == "result" and result["budget"] == override[sid], (sid, result)
                assert result["dense"] is False, f"{sid} did not resume its state: another replica?"
            assert where_streams_are(replicas) == owner
            with httpx.Client(trust_env=False, timeout=10) as direct:
                for sid in ids:
                    stream = direct.get(f"{owner[sid]}/v1/streams/{sid}").json()
                    assert stream["frames_received"] == 3 and stream["budget_source"] == "override"

            # 4. a global budget change reaches all three (the fan-out command, against each replica)
            fan_out = subprocess.run(
                [sys.executable, "-m", "clients.budget", "--replicas", ",".join(replicas), "fixed", "--tokens",
                 str(GLOBAL_TOKENS)], capture_output=True, text=True, timeout=60,
            )
            assert fan_out.returncode == 0, fan_out.stdout + fan_out.stderr
            with httpx.Client(trust_env=False, timeout=10) as direct:
                assert [direct.get(f"{r}/v1/budget").json()["effective_tokens"] for r in replicas] == \
                    [GLOBAL_TOKENS] * REPLICAS
            for sid in ids:  # drop the overrides (through the balancer): every stream follows the global budget
                assert http.delete(f"/v1/streams/{sid}/budget").status_code == 204
            budgets = {sid: send_frames(balancer, sid, frames[3:4])[0]["budget"] for sid in ids}
            assert set(budgets.values()) == {GLOBAL_TOKENS}

            # 5. kill one replica: only its streams move, restart densely elsewhere and continue
            victim = spread.most_common(1)[0][0]
            process_of[victim].send_signal(signal.SIGKILL)
            process_of[victim].wait(timeout=10)
            with pytest.raises(RuntimeError, match="died"):
                managers[victim].__exit__(None, None, None)
            moved = sorted(sid for sid in ids if owner[sid] == victim)
            after = {sid: send_frames(balancer, sid, frames[:2]) for sid in ids}
            survivors = [r for r in replicas if r != victim]
            new_owner = where_streams_are(survivors)
            assert set(new_owner) == set(ids)
            for sid in ids:
                kinds = [(a["type"], a["dense"], a["budget"]) for a in after[sid]]
                if sid in moved:
                    assert new_owner[sid] != victim
                    # fresh state on the new replica: a dense first frame, then eventful at the global budget
                    assert kinds == [("result", True, 196), ("result", False, GLOBAL_TOKENS)], (sid, kinds)
                else:
                    assert new_owner[sid] == owner[sid], f"{sid} moved although its replica is alive"
                    assert kinds == [("result", False, GLOBAL_TOKENS)] * 2, (sid, kinds)

            figures = {
                "streams_per_replica": {r.rsplit(":", 1)[1]: spread[r] for r in replicas},
                "killed": victim.rsplit(":", 1)[1],
                "moved": moved,
                "moved_to": dict(Counter(new_owner[s].rsplit(":", 1)[1] for s in moved)),
                "unmoved": len(ids) - len(moved),
            }
            print("scale-out figures:", json.dumps(figures))
