"""The detection model (YOLOS) and the clip model (VideoMAE with RLT) served end to end: a real `eventful-serve` with
a small named random architecture on 127.0.0.1, the real `eventful-camera` command on a real clip (every frame
answered, the annotated video written), a direct WebSocket check of what the server answers for the same frames
(boxes inside the frame / an action label), and the annotated video showing exactly those results drawn: the
drawing's pixels changed where `draw_result` puts the server's boxes or action caption, the rest of the picture
kept."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.live_server import REPO_ROOT, live_server
from clients.camera import AnnotationQueue, describe_outputs, draw_result, encode_jpeg
from model.config import COCO_LABELS

COMMON = ["--threads", "1", "--log-level", "warning"]
DETECT_ARGS = ["--model", "yolos-tiny", "--image-size", "240x320", "--detect-threshold", "0.0", "--max-boxes", "5",
               "--budget-tokens", "75", *COMMON]  # fmt: skip
CLIP_ARGS = ["--model", "videomae-small", "--image-size", "112", "--clip-stride", "4", *COMMON]
CLIP_FRAMES, CLIP_WINDOW, CLIP_STRIDE = 24, 16, 4  # actions on frames 15, 19 and 23 (window full, every 4th)
JPEG_QUALITY = 85  # eventful-camera's default: the direct check sends the very bytes the command sent


def decode_frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def run_camera(ws_base: str, video: Path, stream_id: str, frames: int, fps: float, out_dir: Path) -> dict:
    """The eventful-camera command (its module, as the console script runs it); returns the --json summary."""
    out_video, out_json = out_dir / f"{stream_id}.mp4", out_dir / f"{stream_id}.json"
    command = [sys.executable, "-m", "clients.camera", "--source", str(video), "--server", ws_base,
               "--stream-id", stream_id, "--frames", str(frames), "--fps", str(fps), "--quiet",
               "--output", str(out_video), "--json", str(out_json)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    print(done.stdout)
    summary = json.loads(out_json.read_text())
    assert summary["output"] == str(out_video)
    return summary


def direct_results(ws_base: str, stream_id: str, frames: list[np.ndarray]) -> list[dict]:
    """Send frames one at a time on a fresh stream, each after the previous answer (nothing is dropped)."""
    from websockets.sync.client import connect

    answers = []
    with connect(f"{ws_base}/v1/streams/{stream_id}", open_timeout=10, max_size=None) as ws:
        for frame in frames:
            ws.send(encode_jpeg(Image.fromarray(frame), JPEG_QUALITY))
            while True:
                message = json.loads(ws.recv(timeout=30))
                if message.get("type") in ("result", "dropped", "error"):
                    break
            answers.append(message)
    assert [m["type"] for m in answers] == ["result"] * len(frames), answers
    assert [m["frame"] for m in answers] == list(range(len(frames)))
    return answers


def check_counts(summary: dict, frames: int, base: str, stream_id: str) -> None:
    """Every frame sent and answered (results + dropped), no errors; the server counted the same."""
    assert summary["frames_read"] == summary["frames_sent"] == frames
    assert summary["errors"] == 0 and summary["unanswered"] == 0 and summary["reconnects"] == 0
    assert summary["results"] + summary["dropped"] == frames and summary["results"] > frames // 2
    assert summary["frames_written"] == frames
    with httpx.Client(base_url=base, trust_env=False) as http:
        seen = http.get(f"/v1/streams/{stream_id}").json()
    assert seen["frames_received"] == frames and seen["frames_failed"] == 0
    assert seen["frames_processed"] == summary["results"] and seen["frames_dropped"] == summary["dropped"]


def drawn_mask(source: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Where draw_result changes the source frame (the boxes, their labels, the caption banner)."""
    return np.abs(expected.astype(int) - source.astype(int)).max(-1) > 24


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def assert_drawn(written: np.ndarray, source: np.ndarray, result: dict) -> dict[str, float]:
    """The written frame is the source with this result drawn on it: large changes where draw_result draws the
    caption banner and (below it) the boxes with their labels, close to what it draws there, and the picture kept
    elsewhere (H.264 blurs a few pixels around sharp edges: a margin is left out)."""
    assert written.shape == source.shape
    expected = np.asarray(draw_result(Image.fromarray(source), result))
    mask = drawn_mask(source, expected)
    diff = np.abs(written.astype(int) - source.astype(int)).mean(-1)
    to_expected = np.abs(written.astype(int) - expected.astype(int)).mean(-1)
    grey = np.asarray(draw_result(Image.new("RGB", source.shape[1::-1], (128, 128, 128)), result))
    banner_rows = int(np.argmin((grey[:, 0] == 0).all(-1)))  # the caption's black banner: the top rows at x=0
    regions = {"caption": mask.copy(), "boxes": mask.copy()}
    regions["caption"][banner_rows:] = False
    regions["boxes"][:banner_rows] = False
    figures: dict[str, float] = {}
    for name, region in regions.items():
        if name == "caption" or result["outputs"].get("boxes"):
            assert region.mean() > 0.002, f"draw_result drew (almost) no {name} for this result"
            figures[f"{name}_vs_source"] = float(diff[region].mean())
            figures[f"{name}_vs_expected"] = float(to_expected[region].mean())
            figures[f"{name}_off"] = float((to_expected[region] > 80).mean())
            assert figures[f"{name}_vs_source"] > 40, figures  # drawn...
            # ...and it is this result's drawing (H.264 smears thin coloured lines: some mean error; few far off)
            assert figures[f"{name}_vs_expected"] < figures[f"{name}_vs_source"] / 2, figures
            # (a box drawn 1 px off leaves ~40 % of its pixels far off; a caption one digit off, ~1 %)
            assert figures[f"{name}_off"] < (0.01 if name == "caption" else 0.05), figures
    away = ~dilate(mask, 4)
    figures["elsewhere_changed"] = float((diff[away] > 50).mean())
    assert figures["elsewhere_changed"] < 0.002, figures  # nothing drawn anywhere else
    return figures


# ---- the pure part: a clip model's action held on the frames between labels ----------------------------------


def test_annotation_queue_holds_the_clip_action_between_labels():
    def clip_result(frame: int, outputs: dict) -> dict:
        return {"type": "result", "frame": frame, "budget": 0, "dense": False, "updated_fraction": 0.0,
                "outputs": outputs}  # fmt: skip

    action = {"label": "juggling", "score": 0.5}
    queue = AnnotationQueue(timeout_s=1.0)
    answers = [{"window": 3, "of": 4}, {"window": 4, "of": 4, "ignored": 1}, {"action": action, "top": []},
               {"window": 4, "of": 4}, {"window": 1, "of": 4}, {"window": 2, "of": 4}]  # fmt: skip
    for i, outputs in enumerate(answers):
        queue.add(i, Image.new("RGB", (8, 8)), now=0.0)
        queue.answer(i, clip_result(i, outputs))
    captions = [describe_outputs(result["outputs"]) for _, result, _ in queue.release(0.1)]
    # before the first label: the window fill; after it: the label until the window starts over (flushed)
    assert captions == ["clip window 3/4", "clip window 4/4", "action: juggling 0.50", "action: juggling 0.50",
                        "clip window 1/4", "clip window 2/4"]  # fmt: skip


# ---- against a real server -----------------------------------------------------------------------------------


def test_yolos_boxes_served_and_drawn_by_the_camera_command(real_video, tmp_path):
    source = decode_frames(real_video)
    frames, (height, width) = 12, source[0].shape[:2]
    started = time.monotonic()
    with live_server(DETECT_ARGS, tmp_path / "server.log") as base:
        ws_base = base.replace("http://", "ws://")
        summary = run_camera(ws_base, real_video, "cam-det", frames, 8, tmp_path)
        check_counts(summary, frames, base, "cam-det")
        direct = direct_results(ws_base, "direct-det", source[:3])
    elapsed = time.monotonic() - started
    assert summary["last_caption"] == "5 detections"  # --max-boxes 5 at threshold 0: always five
    # the server's results: boxes in the decoded frame's pixels, COCO labels, scores
    for message in direct:
        boxes = message["outputs"]["boxes"]
        assert len(boxes) == 5, boxes
        for det in boxes:
            x0, y0, x1, y1 = det["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, det
            assert det["label"] in COCO_LABELS and 0 < det["score"] <= 1, det
    assert direct[0]["dense"] and direct[0]["budget"] == 300  # the first frame: dense (15x20 patches)
    # the annotated video: every frame; frame 0 (the stream's dense first frame, the same JPEG bytes as the direct
    # check's first frame, so the same boxes) shows exactly those boxes, labels and the caption drawn
    written = decode_frames(Path(summary["output"]))
    assert len(written) == frames
    figures = assert_drawn(written[0], source[0], direct[0])
    # every written frame carries its caption ("5 detections [r=...]") in the dark banner at the top
    for i in range(frames):
        banner = np.abs(written[i][2:12, 4:80].astype(int) - source[i][2:12, 4:80].astype(int)).mean()
        assert banner > 20, (i, banner)
    print(f"detection: {elapsed:.1f} s, dropped {summary['dropped']}, frame 0 pixel figures {figures}")


def test_videomae_actions_served_and_drawn_by_the_camera_command(real_video, tmp_path):
    source = decode_frames(real_video)
    assert len(source) >= CLIP_FRAMES
    started = time.monotonic()
    with live_server(CLIP_ARGS, tmp_path / "server.log") as base:
        ws_base = base.replace("http://", "ws://")
        summary = run_camera(ws_base, real_video, "cam-clip", CLIP_FRAMES, 6, tmp_path)
        check_counts(summary, CLIP_FRAMES, base, "cam-clip")
        direct = direct_results(ws_base, "direct-clip", source[:CLIP_FRAMES])
    elapsed = time.monotonic() - started
    # the server's results: the window fills, then an action (VideoMAE + RLT on the last 16 frames) every 4 frames
    due = [i for i in range(CLIP_FRAMES) if i + 1 >= CLIP_WINDOW and (i + 1 - CLIP_WINDOW) % CLIP_STRIDE == 0]
    assert due == [15, 19, 23]
    for i, message in enumerate(direct):
        outputs = message["outputs"]
        if i in due:
            action = outputs["action"]
            assert action["label"].startswith("class_") and 0 < action["score"] <= 1, outputs
            assert outputs["top"][0]["label"] == action["label"] and 0 < outputs["tokens_kept"] <= outputs["tokens"]
        else:
            assert outputs == {"window": min(i + 1, CLIP_WINDOW), "of": CLIP_WINDOW}, (i, outputs)
    # the annotated video: every frame; with nothing dropped the command's stream saw the same frames (same JPEG
    # bytes) as the direct check, so its results are these: the window fill drawn before the first label, the
    # action on frame 15, and held on the frames after it
    written = decode_frames(Path(summary["output"]))
    assert len(written) == CLIP_FRAMES
    assert summary["last_caption"] == describe_outputs(direct[-1]["outputs"]) or summary["dropped"]
    figures = {}
    if summary["dropped"] == 0:
        figures[0] = assert_drawn(written[0], source[0], direct[0])
        figures[15] = assert_drawn(written[15], source[15], direct[15])
        held = {**direct[17], "outputs": {**direct[17]["outputs"], "action": direct[15]["outputs"]["action"]}}
        figures[17] = assert_drawn(written[17], source[17], held)
        figures[23] = assert_drawn(written[23], source[23], direct[23])
    else:  # a slow machine dropped frames: some frame from 15 on shows an action caption (as wide as one)
        banner = drawn_mask(source[15], np.asarray(draw_result(Image.fromarray(source[15]), direct[15])))[:16]
        assert any(np.abs(written[i][:16].astype(int) - source[i][:16].astype(int)).mean(-1)[banner].mean() > 40
                   for i in range(15, CLIP_FRAMES))  # fmt: skip
    print(f"clip: {elapsed:.1f} s, dropped {summary['dropped']}, pixel figures {figures}")


def test_owlv2_queries_sent_by_the_camera_command_label_its_boxes(tmp_path):
    """The named random-weight OWLv2 (built-in fallback tokenizer) on 127.0.0.1: `eventful-camera --queries` sets
    the stream's queries with the control message, and its boxes come back labelled with them."""
    args = ["--model", "owlv2-base-patch16", "--image-size", "64", "--detect-threshold", "0.0", "--max-boxes", "3",
            "--default-queries", "cat", *COMMON]  # fmt: skip
    with live_server(args, tmp_path / "server.log") as base:
        ws_base = base.replace("http://", "ws://")
        out_json = tmp_path / "owl.json"
        command = [sys.executable, "-m", "clients.camera", "--server", ws_base, "--stream-id", "owl", "--frames", "4",
                   "--fps", "4", "--quiet", "--queries", "person, forklift", "--json", str(out_json)]  # fmt: skip
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr + done.stdout
        assert "queries: person, forklift" in done.stderr
        with httpx.Client(base_url=base, trust_env=False) as http:
            assert http.get("/v1/streams/owl/queries").json() == {
                "stream_id": "owl", "queries": ["person", "forklift"], "source": "stream"}
        summary = json.loads(out_json.read_text())
        assert summary["results"] >= 2 and summary["last_caption"] == "3 detections"
        from websockets.sync.client import connect

        with connect(f"{ws_base}/v1/streams/owl", open_timeout=10) as ws:  # the same stream id: its queries kept
            ws.send(encode_jpeg(Image.new("RGB", (80, 60), (40, 90, 200)), JPEG_QUALITY))
            message = json.loads(ws.recv(timeout=30))
        assert {b["label"] for b in message["outputs"]["boxes"]} <= {"person", "forklift"}
        assert all(0 <= b["score"] <= 1 and len(b["box"]) == 4 for b in message["outputs"]["boxes"])
