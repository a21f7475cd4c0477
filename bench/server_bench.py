"""`eventful-bench server`: the live server under N concurrent streams of real video, eventful vs dense.

One `eventful-serve` process on 127.0.0.1; for every repetition and stream count the eventful budget and the dense
budget (every patch token: the dense computation) run back to back in alternating order, each a load generator run
with fresh streams. Medians over repetitions. At one stream, the server latency (receive -> result sent) is split into
decode, queue wait, model step and the rest (protocol, scheduling, hand-offs between threads).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.live_server import live_server
from clients.loadgen import LoadConfig, load_frames, run_load


@dataclass(frozen=True)
class ServerBenchConfig:
    model: str
    videos: list[str]
    streams: list[int]  # stream counts to measure, e.g. [1, 4]
    budget_tokens: int = 50
    duration_s: float = 8.0
    repeats: int = 3
    fps: float = 0.0  # 0: closed loop (capacity); > 0: paced cameras
    in_flight: int = 2  # closed loop: unanswered frames per stream (2: the next frame waits when a step ends)
    size: int | None = None
    labels: str | None = None
    server_args: tuple[str, ...] = ()


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _breakdown(streams: list[Any]) -> dict[str, float | None]:
    """Per-frame medians of the server's latency parts, and the overhead share (everything but the model step)."""
    server = [v for s in streams for v in s.server_ms]
    step = [v for s in streams for v in s.step_ms]
    client = [v for s in streams for v in s.latencies_ms]
    decode = [v for s in streams for v in s.decode_ms]
    queue = [v for s in streams for v in s.queue_ms]
    if not server:
        return {}
    overhead = [1 - st / sv for st, sv in zip(step, server, strict=True) if sv > 0]
    overhead_client = [1 - st / c for st, c in zip(step, client, strict=True) if c > 0]
    return {
        "server_latency_ms": float(np.median(server)),
        "client_latency_ms": float(np.median(client)) if client else None,
        "decode_ms": float(np.median(decode)),
        "queue_ms": float(np.median(queue)),
        "step_ms": float(np.median(step)),
        "other_ms": float(np.median(np.asarray(server) - np.asarray(step) - np.asarray(decode) - np.asarray(queue))),
        "overhead_fraction": float(np.median(overhead)),  # of the server's receive -> sent latency
        "overhead_fraction_client": float(np.median(overhead_client)) if overhead_client else None,
    }


def run_server_bench(config: ServerBenchConfig, log_dir: Path | None = None, progress=print) -> dict[str, Any]:
    """Per repetition: a latency probe (one stream, one frame in flight) and a throughput run per stream count
    (closed loop with `in_flight` frames per stream, or paced at `fps`), each eventful and dense back to back."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="eventful-bench-server-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    args = ["--model", config.model, "--budget-tokens", str(config.budget_tokens), "--stream-ttl-s", "0",
            "--max-streams", str(max(config.streams) + 2), "--log-level", "warning", *config.server_args]
    if config.labels:
        args += ["--labels", config.labels]
    base_load = LoadConfig(server="http://x", streams=1, videos=list(config.videos), fps=config.fps,
                           duration_s=config.duration_s, size=config.size, in_flight=config.in_flight)
    encoded = load_frames(base_load)
    runs: list[dict[str, Any]] = []
    with live_server(args, log_dir / "server.log") as base, httpx.Client(base_url=base, trust_env=False) as http:
        num_patches = http.get("/v1/budget").json().get("num_patches") or _patches_from_metrics(http)
        modes = {"eventful": config.budget_tokens, "dense": num_patches}
        plan = [("latency", 1, 0.0, 1)] + [("throughput", n, config.fps, config.in_flight) for n in config.streams]
        for rep in range(config.repeats):
            for kind, n, fps, in_flight in plan:
                order = list(modes.items()) if rep % 2 == 0 else list(reversed(modes.items()))
                for mode, tokens in order:
                    http.put("/v1/budget", json={"mode": "fixed", "tokens": tokens}).raise_for_status()
                    load = replace(base_load, server=base, streams=n, fps=fps, in_flight=in_flight,
                                   stream_prefix=f"bench{len(runs)}")
                    report = asyncio.run(run_load(load, encoded))
                    agg = report.aggregate()
                    runs.append({"repeat": rep, "kind": kind, "streams": n, "mode": mode, "tokens": tokens,
                                 "aggregate": agg, "breakdown": _breakdown(report.streams)})
                    progress(f"rep {rep} {kind:10s} streams {n} {mode:8s} r={tokens:3d}: "
                             f"{agg['fps_answered']:6.1f} frames/s, p50 {agg['latency_ms']['p50'] or 0:.1f} ms, "
                             f"dropped {agg['dropped']}")
    return summarize(config, runs, modes)


def _patches_from_metrics(http: httpx.Client) -> int:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("eventful_patch_tokens "):
            return int(float(line.split()[1]))
    raise RuntimeError("the server reports no eventful_patch_tokens")


def _mode_summary(mine: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    agg = [r["aggregate"] for r in mine]
    return {
        "tokens": tokens,
        "fps": _median([a["fps_answered"] for a in agg]),
        "p50_ms": _median([a["latency_ms"]["p50"] for a in agg]),
        "p95_ms": _median([a["latency_ms"]["p95"] for a in agg]),
        "p99_ms": _median([a["latency_ms"]["p99"] for a in agg]),
        "dropped": sum(a["dropped"] for a in agg),
        "errors": sum(a["errors"] for a in agg),
        "unanswered": sum(a["unanswered"] for a in agg),
        "mean_batch_size": _median([a["mean_batch_size"] for a in agg]),
        "mean_updated_fraction": _median([a["mean_updated_fraction"] for a in agg]),
        "breakdown": {k: _median([r["breakdown"].get(k) for r in mine]) for k in mine[0]["breakdown"]},
    }


def _paired_ratio(runs: list[dict[str, Any]], key) -> float | None:
    """Median over repetitions of eventful / dense for key(aggregate) (each pair ran back to back)."""
    ratios = []
    for e in runs:
        for d in runs:
            if e["repeat"] == d["repeat"] and e["mode"] == "eventful" and d["mode"] == "dense" and key(d) > 0:
                ratios.append(key(e) / key(d))
    return _median(ratios)


def summarize(config: ServerBenchConfig, runs: list[dict[str, Any]], modes: dict[str, int]) -> dict[str, Any]:
    rows = []
    for n in config.streams:
        mine = [r for r in runs if r["kind"] == "throughput" and r["streams"] == n]
        row: dict[str, Any] = {"streams": n}
        for mode in modes:
            row[mode] = _mode_summary([r for r in mine if r["mode"] == mode], modes[mode])
        row["throughput_ratio"] = _paired_ratio(mine, lambda r: r["aggregate"]["fps_answered"])
        rows.append(row)
    probe = [r for r in runs if r["kind"] == "latency"]
    latency = {mode: _mode_summary([r for r in probe if r["mode"] == mode], modes[mode]) for mode in modes}
    latency["latency_ratio"] = _paired_ratio(probe, lambda r: r["aggregate"]["latency_ms"]["p50"] or 0.0)
    return {"config": asdict(config), "results": rows, "latency": latency, "runs": runs}


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    load = f"closed loop, {cfg['in_flight']} in flight per stream" if not cfg["fps"] else f"{cfg['fps']} fps paced"
    head = (f"{'streams':>7} {'mode':<9}{'r':>5}{'frames/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
            f"{'dropped':>9}{'batch':>7}{'x dense':>9}")
    lines = [f"throughput ({load}):", head, "-" * len(head)]
    for row in report["results"]:
        for mode in ("eventful", "dense"):
            m = row[mode]
            ratio = f"{row['throughput_ratio']:9.2f}" if mode == "eventful" and row["throughput_ratio"] else f"{'':9}"
            lines.append(
                f"{row['streams']:>7} {mode:<9}{m['tokens']:>5}{m['fps'] or 0:10.1f}{m['p50_ms'] or 0:9.1f}"
                f"{m['p95_ms'] or 0:9.1f}{m['p99_ms'] or 0:9.1f}{m['dropped']:>9}"
                f"{m['mean_batch_size'] or 0:7.2f}{ratio}"
            )
    lines.append("")
    lines.append("latency (1 stream, 1 frame in flight), medians per frame:")
    for mode in ("eventful", "dense"):
        b = report["latency"][mode]["breakdown"]
        lines.append(
            f"  {mode:<9} server {b['server_latency_ms']:.1f} ms = decode {b['decode_ms']:.1f} + queue "
            f"{b['queue_ms']:.1f} + step {b['step_ms']:.1f} + other {b['other_ms']:.1f}; client round trip "
            f"{b['client_latency_ms']:.1f} ms (p95 {report['latency'][mode]['p95_ms']:.1f})"
        )
    b = report["latency"]["eventful"]["breakdown"]
    lines.append(
        f"server overhead (all but the model step), eventful: {100 * b['overhead_fraction']:.1f}% of the server "
        f"latency, {100 * b['overhead_fraction_client']:.1f}% of the client round trip"
    )
    return "\n".join(lines)
