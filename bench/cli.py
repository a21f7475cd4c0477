"""`eventful-bench`: benchmarks run on real video, printing a table and writing JSON."""

from __future__ import annotations

import argparse
import sys

import torch

from bench.report import write_json


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must look like 224 or 432x768, got {text!r}") from None


def _parse_budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (0 <= v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be non-negative numbers, got {text!r}")
    return values


def _parse_budget_specs(text: str) -> list[tuple[float, ...]]:
    """`98,64:32` -> [(98,), (64, 32)]: one row per comma; within a row, streams take the ':' values in turn."""
    try:
        specs = [tuple(float(v) for v in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budgets must be comma-separated numbers, each optionally 'a:b' per stream, got {text!r}"
        ) from None
    if not specs or any(not (0 <= v < float("inf")) for spec in specs for v in spec):
        raise argparse.ArgumentTypeError(f"budgets must be non-negative numbers, got {text!r}")
    return specs


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXECUTIONS = ("eager", "compile", "graph", "compile-graph")


def _check_readable(paths: list[str]) -> None:
    """Raise FileNotFoundError (exit 2) for the first path that cannot be opened, before any work starts."""
    for path in paths:
        with open(path, "rb"):
            pass


def _torch_threads(threads: int | None) -> None:
    """Intra-op threads (default: torch's choice); denormals flushed (denormal GELU tails cost 3x on some CPUs,
    and every path measured gets the same setting)."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def _finish(table: str, report, json_path: str | None) -> int:
    """Print the table; write the JSON when asked."""
    print(table)
    if json_path:
        write_json(report, json_path)
        print(f"wrote {json_path}")
    return 0


def _live_server_arguments(parser: argparse.ArgumentParser) -> None:
    """What every benchmark of a live `eventful-serve` takes: the model, the videos, the client and the report."""
    parser.add_argument("--model", required=True, help="as for `eventful-serve --model`")
    parser.add_argument("--labels", default=None, help="class names file for timm checkpoints")
    parser.add_argument("--video", nargs="+", required=True, help="video files; stream i plays video i mod count")
    parser.add_argument("--size", type=int, default=None, help="client-side resize: short side in pixels")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra eventful-serve flag, e.g. --server-arg=--threads=1 (repeatable)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventful-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="dense vs eventful ViT at several budgets on a video")
    m.add_argument("--model", required=True, help="checkpoint file (timm), HF directory, HF id or named architecture")
    m.add_argument("--video", required=True, help="any video file PyAV can decode")
    m.add_argument("--budgets", type=_parse_budget_specs, default=[(196,), (128,), (64,), (32,)],
                   help="tokens per gate (topr) or thresholds (threshold policy), comma-separated; 64:32 gives "
                        "alternating streams 64 and 32 in the same steps")
    m.add_argument("--streams", type=int, default=1,
                   help="streams per batched step: the video from B offsets (stream j from frame j*T//B)")
    m.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model and input dtype")
    m.add_argument("--execution", choices=EXECUTIONS, default="eager",
                   help="how steps run (EventfulConfig.execution); the dense baseline runs alike: compile -> "
                        "torch.compile(model), graph (CUDA) -> the model captured as a CUDA graph")
    m.add_argument("--frames", type=int, default=60,
                   help="frames read from the start of the video; every stream plays all of them (one step each)")
    m.add_argument("--level", choices=["tokenwise", "qk", "full"], default="tokenwise")
    m.add_argument("--policy", choices=["topr", "threshold"], default="topr")
    m.add_argument("--gate-position", choices=["residual", "normed"], default="residual")
    m.add_argument("--gate-rank", choices=["auto", "topk", "count"], default="auto",
                   help="how compiled gates rank tokens: topk, count (fused: fewer kernels), auto (count on CUDA)")
    m.add_argument("--refresh", type=int, default=None, help="force a dense frame every K frames")
    m.add_argument("--image-size", type=_parse_size, default=None, help="model input size, e.g. 432x768")
    m.add_argument("--num-heads", type=int, default=None, help="attention heads (timm files do not record it)")
    m.add_argument("--labels", default=None, help="class names file for timm checkpoints")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    m.add_argument("--warmup", type=int, default=2, help="untimed steps per path after a seeding step (0: none)")
    m.add_argument("--json", dest="json_path", default=None, help="write the report here")
    f = sub.add_parser("fidelity", help="every policy and the adaptive chooser vs frame skipping at equal compute")
    f.add_argument("--model", required=True, help="checkpoint file (timm), HF directory, HF id or named architecture")
    f.add_argument("--videos", nargs="+", required=True, help="video files PyAV can decode")
    f.add_argument("--ratios", type=_parse_budgets, default=[1.5, 2, 3, 4],
                   help="compute ratios (dense MACs over the policy's), comma-separated, each >= 1")
    f.add_argument("--frames", type=int, default=90, help="frames per video, from the start")
    f.add_argument("--image-size", type=_parse_size, default=None, help="model input size, e.g. 352x640")
    f.add_argument("--labels", default=None, help="class names file for timm checkpoints")
    f.add_argument("--level", choices=["tokenwise", "qk", "full"], default="tokenwise")
    f.add_argument("--gate-position", choices=["residual", "normed"], default="residual",
                   help="what the gates compare: the residual stream, or the block's LayerNorm output")
    f.add_argument("--policies", default="skip,keyframe,topr,adaptive",
                   help="policy families to run, comma-separated (skip always runs: it is the yardstick)")
    f.add_argument("--audit-share", type=float, default=0.02, help="adaptive: share of compute spent measuring")
    f.add_argument("--seed", type=int, default=0, help="adaptive: the audit draw's seed")
    f.add_argument("--explore", choices=("probe", "trial"), default="trial",
                   help="adaptive: serve a keyframe candidate for a few cycles (trial) or run it unserved (probe)")
    f.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    f.add_argument("--json", dest="json_path", default=None, help="write the report here")
    b = sub.add_parser("reuse-bound", help="keyframe + sparse with the gate's choice of tokens against an oracle's, "
                                           "and frame skipping, at equal compute")
    b.add_argument("--model", required=True, help="checkpoint file (timm), HF directory, HF id or named architecture")
    b.add_argument("--videos", nargs="+", required=True, help="video files PyAV can decode")
    b.add_argument("--ratios", type=_parse_budgets, default=[1.5, 2, 3, 4],
                   help="compute ratios (dense MACs over the policy's), comma-separated, each >= 1")
    b.add_argument("--intervals", default=None,
                   help="keyframe intervals, comma-separated, each >= 2 (default: those `fidelity` runs, 2,3,4,6,8)")
    b.add_argument("--frames", type=int, default=90, help="frames per video, from the start")
    b.add_argument("--image-size", type=_parse_size, default=None, help="model input size, e.g. 352x640")
    b.add_argument("--labels", default=None, help="class names file for timm checkpoints")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--json", dest="json_path", default=None, help="write the report here")
    s = sub.add_parser("server", help="the live server under N streams of real video: eventful vs dense")
    _live_server_arguments(s)
    s.add_argument("--streams", default="1,4", help="stream counts, comma-separated")
    s.add_argument("--budget-tokens", type=int, default=50, help="the eventful budget (dense: every patch token)")
    s.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    s.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians are reported)")
    s.add_argument("--fps", type=float, default=0.0, help="frames/s per stream; 0 = closed loop (capacity)")
    s.add_argument("--in-flight", type=int, default=2, help="closed loop: unanswered frames per stream")
    d = sub.add_parser("detect", help="dense vs eventful detectors (YOLOS, OWLv2) at several budgets on a video: box "
                                      "agreement beside frame skipping")
    d.add_argument("--model", required=True, help="HF YOLOS or OWLv2 directory or id, or a named architecture "
                                                  "(yolos-tiny, owlv2-base-patch16)")
    d.add_argument("--queries", default="person,car",
                   help="OWLv2: comma-separated text queries (the labels of its boxes)")
    d.add_argument("--tokenizer", default=None, help="OWLv2: a directory with the CLIP tokenizer (default: the model "
                                                     "directory's; a named random-weight model: hashed words)")
    d.add_argument("--video", required=True, help="any video file PyAV can decode")
    d.add_argument("--budgets", type=_parse_budgets, default=None,
                   help="image tokens per gate, comma-separated (default: all, 1/2, 1/4, 1/8 of the patches)")
    d.add_argument("--frames", type=int, default=30, help="frames to process from the start of the video")
    d.add_argument("--level", choices=["tokenwise", "qk", "full"], default="tokenwise")
    d.add_argument("--image-size", type=_parse_size, default=None, help="model input size, e.g. 240x320")
    d.add_argument("--threshold", type=float, default=0.5, help="detection score threshold")
    d.add_argument("--top-k", type=int, default=100, help="at most this many boxes per frame")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--json", dest="json_path", default=None, help="write the report here")
    r = sub.add_parser("rlt", help="VideoMAE with Run-Length Tokenization at several tau vs no RLT on a video")
    r.add_argument("--model", required=True, help="HF VideoMAE directory or id, or a named architecture")
    r.add_argument("--video", required=True, help="any video file PyAV can decode")
    r.add_argument("--tau", type=_parse_budgets, default=[0.0, 0.05, 0.1, 0.2], help="RLT thresholds, comma-separated")
    r.add_argument("--clips", type=int, default=4, help="consecutive clips from the start of the video")
    r.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: clip length)")
    r.add_argument("--image-size", type=_parse_size, default=None, help="model input size, e.g. 112")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--json", dest="json_path", default=None, help="write the report here")
    k = sub.add_parser("controller", help="the budget controller on the live server under load steps vs fixed r")
    _live_server_arguments(k)
    k.add_argument("--phases", default="1,4,8,4,1", help="streams per phase, comma-separated")
    k.add_argument("--phase-s", type=float, default=10.0, help="seconds per phase")
    k.add_argument("--target-ms", type=float, default=150.0, help="the p95 latency target")
    k.add_argument("--fps", type=float, default=10.0, help="frames/s per stream (paced, like a camera)")
    k.add_argument("--min-tokens", type=int, default=4, help="the controller's floor")
    k.add_argument("--fixed-s", type=float, default=10.0, help="seconds per fixed-budget run")
    k.add_argument("--repeats", type=int, default=2,
                   help="rounds of an auto run and a run per fixed budget, interleaved (medians)")
    c = sub.add_parser("clip", help="compose a static-camera H.264 clip from real photographs")
    c.add_argument("--background", required=True, help="image used as the fixed scene")
    c.add_argument("--sprite", action="append", default=[], help="image that moves over the scene (repeatable)")
    c.add_argument("--out", required=True, help="output .mp4 path")
    c.add_argument("--frames", type=int, default=150)
    c.add_argument("--noise", type=float, default=3.0, help="sensor noise std in 8-bit levels")
    c.add_argument("--crf", type=int, default=26)
    return parser


def run_clip(args: argparse.Namespace) -> int:
    from bench.clips import StaticClipSpec, make_static_clip

    _check_readable([args.background, *args.sprite])  # a missing file: FileNotFoundError -> exit 2
    spec = StaticClipSpec(frames=args.frames, noise_std=args.noise, crf=args.crf)
    print(f"wrote {make_static_clip(args.out, args.background, args.sprite, spec)}")
    return 0


def run_controller(args: argparse.Namespace) -> int:
    from bench.controller_bench import ControllerBenchConfig, format_table, run_controller_bench

    phases = tuple(int(v) for v in args.phases.split(",") if v.strip())  # ValueError -> exit 2
    if not phases or min(phases) < 1 or min(args.phase_s, args.fps, args.target_ms, args.repeats) <= 0:
        print("error: --phases must be >= 1 each, --phase-s, --fps, --target-ms and --repeats > 0", file=sys.stderr)
        return 2
    _check_readable(args.video)  # a missing file: FileNotFoundError -> exit 2
    config = ControllerBenchConfig(
        model=args.model, videos=args.video, phases=phases, phase_s=args.phase_s, target_ms=args.target_ms,
        fps=args.fps, min_tokens=args.min_tokens, fixed_s=args.fixed_s, repeats=args.repeats, size=args.size,
        labels=args.labels,
        server_args=tuple(args.server_arg),
    )
    report = run_controller_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return _finish(format_table(report), report, args.json_path)


def run_server(args: argparse.Namespace) -> int:
    from bench.server_bench import ServerBenchConfig, format_table, run_server_bench

    try:
        streams = [int(v) for v in args.streams.split(",") if v.strip()]
    except ValueError:
        print(f"error: --streams must be comma-separated integers, got {args.streams!r}", file=sys.stderr)
        return 2
    if not streams or min(streams) < 1 or args.repeats < 1 or args.duration <= 0:
        print("error: --streams must be >= 1, --repeats >= 1, --duration > 0", file=sys.stderr)
        return 2
    _check_readable(args.video)  # a missing file: FileNotFoundError -> exit 2
    config = ServerBenchConfig(
        model=args.model, videos=args.video, streams=streams, budget_tokens=args.budget_tokens,
        duration_s=args.duration, repeats=args.repeats, fps=args.fps, in_flight=args.in_flight, size=args.size,
        labels=args.labels,
        server_args=tuple(args.server_arg),
    )
    report = run_server_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return _finish(format_table(report), report, args.json_path)


def _clip_images(model, path: str, frames: int) -> torch.Tensor | None:
    """The first `frames` frames of a video, preprocessed for the model ([T, 3, H, W]); None, the error printed,
    where fewer than 4 decode."""
    from model.preprocess import Preprocessor, read_video_frames

    decoded = read_video_frames(path, max_frames=frames)
    if len(decoded) < 4:
        print(f"error: {path} has fewer than 4 decodable frames", file=sys.stderr)
        return None
    return Preprocessor(model.config.preprocess)(decoded)


def run_fidelity(args: argparse.Namespace) -> int:
    from bench.fidelity_bench import POLICY_FAMILIES, coverage, print_table, run_video
    from model.chooser import AdaptiveConfig
    from model.loaders import load_model

    _check_readable(args.videos)
    if args.frames < 4:
        print("error: --frames must be at least 4", file=sys.stderr)
        return 2
    if any(r < 1 for r in args.ratios):
        print("error: --ratios must each be >= 1", file=sys.stderr)
        return 2
    try:
        adaptive = AdaptiveConfig(audit_share=args.audit_share, seed=args.seed, explore=args.explore)
    except ValueError as err:
        print(f"error: --audit-share: {err}", file=sys.stderr)
        return 2
    families = tuple(f.strip() for f in args.policies.split(",") if f.strip())
    unknown = set(families) - set(POLICY_FAMILIES)
    if unknown:
        choices = ", ".join(POLICY_FAMILIES)
        print(f"error: --policies: unknown {sorted(unknown)}; choose from {choices}", file=sys.stderr)
        return 2
    _torch_threads(args.threads)
    model = load_model(args.model, image_size=args.image_size, labels_path=args.labels).eval()
    report = {"model": args.model, "level": args.level, "gate_position": args.gate_position,
              "image_size": list(model.config.image_size),
              "tokens": model.config.num_tokens, "ratios": args.ratios, "audit_share": args.audit_share,
              "explore": args.explore,
              "videos": []}
    for path in args.videos:
        images = _clip_images(model, path, args.frames)
        if images is None:
            return 2
        report["videos"].append(run_video(model, images, args.ratios, video=path, level=args.level,
                                          adaptive=adaptive, families=families, gate_position=args.gate_position,
                                          progress=lambda v, r, p: print(f"  {v} x{r:g} {p}", file=sys.stderr)))
    report["coverage"] = coverage(report)
    return _finish(print_table(report), report, args.json_path)


def run_reuse_bound(args: argparse.Namespace) -> int:
    from bench.fidelity_bench import KEYFRAME_INTERVALS
    from bench.reuse_bound import print_table, run_video
    from model.loaders import load_model
    from model.vit import VisionTransformer

    _check_readable(args.videos)
    try:
        intervals = (KEYFRAME_INTERVALS if args.intervals is None
                     else tuple(int(v) for v in args.intervals.split(",") if v.strip()))
    except ValueError:
        intervals = ()
    if not intervals or min(intervals) < 2:
        print(f"error: --intervals must be comma-separated integers >= 2, got {args.intervals!r}", file=sys.stderr)
        return 2
    if args.frames < 4 or any(r < 1 for r in args.ratios):
        print("error: --frames must be at least 4 and --ratios each >= 1", file=sys.stderr)
        return 2
    _torch_threads(args.threads)
    model = load_model(args.model, image_size=args.image_size, labels_path=args.labels).eval()
    if type(model) is not VisionTransformer or not model.config.num_classes:
        print(f"error: {args.model} is not a ViT classifier (reuse-bound scores class logits)", file=sys.stderr)
        return 2
    report = {"model": args.model, "image_size": list(model.config.image_size), "tokens": model.config.num_tokens,
              "ratios": args.ratios, "intervals": list(intervals), "videos": []}
    for path in args.videos:
        images = _clip_images(model, path, args.frames)
        if images is None:
            return 2
        report["videos"].append(run_video(model, images, args.ratios, video=path, intervals=intervals,
                                          progress=lambda v, r, k: print(f"  {v} x{r:g} k={k}", file=sys.stderr)))
    return _finish(print_table(report), report, args.json_path)


def run_model(args: argparse.Namespace) -> int:
    from bench.model_bench import dense_baseline, print_table, run_model_bench
    from model.eventful import EventfulConfig
    from model.loaders import load_model
    from model.preprocess import Preprocessor, read_video_frames

    _torch_threads(args.threads)
    if args.frames < 2 or args.streams < 1 or args.warmup < 0:
        print("error: --frames must be at least 2, --streams at least 1, --warmup at least 0", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.execution in ("graph", "compile-graph") and device.type != "cuda":
        print(f"error: --execution {args.execution} captures CUDA graphs: it needs --device cuda", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    model = load_model(args.model, image_size=args.image_size, num_heads=args.num_heads, labels_path=args.labels)
    model = model.to(device=device, dtype=dtype)
    frames = read_video_frames(args.video, max_frames=args.frames)
    if len(frames) < 2:
        print(f"error: {args.video} has fewer than 2 decodable frames", file=sys.stderr)
        return 2
    images = Preprocessor(model.config.preprocess)(frames).to(device=device, dtype=dtype)
    eventful = EventfulConfig(level=args.level, gate_position=args.gate_position, refresh_interval=args.refresh,
                              execution=args.execution, gate_rank=args.gate_rank)
    dense_forward, dense_execution = dense_baseline(model, args.execution, device)

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\rframe {done}/{total}", end="", file=sys.stderr, flush=True)

    report = run_model_bench(
        model, images, args.budgets, model_name=args.model, video_name=args.video, eventful=eventful,
        policy=args.policy, warmup=args.warmup, streams=args.streams, dense_forward=dense_forward,
        dense_execution=dense_execution, progress=progress,
    )
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return _finish(print_table(report), report, args.json_path)


def run_detect(args: argparse.Namespace) -> int:
    from bench.detect_bench import format_table, owlv2_detector, run_detect_bench
    from model.eventful import EventfulConfig
    from model.loaders import load_model
    from model.preprocess import Preprocessor, read_video_frames
    from model.yolos import YolosDetector

    _torch_threads(args.threads)
    if args.frames < 2 or args.top_k < 1:
        print("error: --frames must be at least 2 and --top-k at least 1", file=sys.stderr)
        return 2
    from model.owlv2 import Owlv2Detector, Owlv2Preprocessor, load_tokenizer
    from server.engine.queries import has_tokenizer_files, parse_query_list

    model = load_model(args.model, image_size=args.image_size).eval()
    if isinstance(model, YolosDetector):
        detector, preprocess = model, Preprocessor(model.config.preprocess)
    elif isinstance(model, Owlv2Detector):
        queries = parse_query_list(args.queries)
        if not queries:
            print("error: --queries gives no query", file=sys.stderr)
            return 2
        directory = args.tokenizer or (args.model if has_tokenizer_files(args.model) else None)
        detector = owlv2_detector(model, queries, load_tokenizer(directory) if directory else None)
        preprocess = Owlv2Preprocessor(model.config)
    else:
        print(f"error: {args.model} is not a YOLOS or OWLv2 detector (use `eventful-bench model` for classifiers)",
              file=sys.stderr)
        return 2
    frames = read_video_frames(args.video, max_frames=args.frames)
    if len(frames) < 2:
        print(f"error: {args.video} has fewer than 2 decodable frames", file=sys.stderr)
        return 2
    frame_size = tuple(frames[0].shape[:2])  # (height, width): boxes are reported in these pixels
    images = preprocess(frames)
    n = model.config.num_patches
    budgets = [int(b) for b in args.budgets] if args.budgets else [n, n // 2, n // 4, n // 8]
    report = run_detect_bench(
        detector, images, frame_size, budgets, model_name=args.model, video_name=args.video,
        eventful=EventfulConfig(level=args.level), threshold=args.threshold, top_k=args.top_k,
    )
    return _finish(format_table(report), report, args.json_path)


def run_rlt(args: argparse.Namespace) -> int:
    from bench.rlt_bench import format_table, run_rlt_bench, video_clips
    from model.loaders import load_model
    from model.preprocess import Preprocessor, read_video_frames
    from model.videomae import VideoMAE

    _torch_threads(args.threads)
    if args.clips < 1:
        print("error: --clips must be at least 1", file=sys.stderr)
        return 2
    model = load_model(args.model, image_size=args.image_size)
    if not isinstance(model, VideoMAE):
        print(f"error: {args.model} is not a VideoMAE clip model", file=sys.stderr)
        return 2
    num_frames = model.config.num_frames
    stride = args.stride or num_frames
    frames = read_video_frames(args.video, max_frames=num_frames + stride * (args.clips - 1))
    clips = video_clips(Preprocessor(model.config.preprocess)(frames), num_frames, args.clips, stride)
    report = run_rlt_bench(model, clips, args.tau, model_name=args.model, video_name=args.video)
    return _finish(format_table(report), report, args.json_path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "model":
            return run_model(args)
        if args.command == "fidelity":
            return run_fidelity(args)
        if args.command == "reuse-bound":
            return run_reuse_bound(args)
        if args.command == "clip":
            return run_clip(args)
        if args.command == "detect":
            return run_detect(args)
        if args.command == "rlt":
            return run_rlt(args)
        if args.command == "server":
            return run_server(args)
        if args.command == "controller":
            return run_controller(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
