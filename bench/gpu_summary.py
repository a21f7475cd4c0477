"""The summary of bench/gpu_check.sh: its steps' outcomes and one line per model or server report in a folder.

    python -m bench.gpu_summary OUT_DIR    (reads OUT_DIR/steps.tsv and every model_*.json / server*.json under it)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _model_name(spec: str) -> str:
    """A checkpoint path by its file name, a named architecture as it is."""
    return Path(spec).stem if ("/" in spec or spec.endswith((".pth", ".pt", ".safetensors"))) else spec


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _step_lines(folder: Path) -> list[str]:
    path = folder / "steps.tsv"
    if not path.exists():
        return []
    lines = ["steps:"]
    for row in path.read_text().splitlines():
        name, rc, seconds = (row.split("\t") + ["", ""])[:3]
        outcome = {"0": "ok", "skipped": "skipped (out of time)", "124": "timed out", "137": "killed (timeout)"}
        lines.append(f"  {name:<36} {outcome.get(rc, f'FAILED (exit {rc})'):<24} {seconds:>5} s")
    return lines


def _model_lines(reports: list[dict[str, Any]]) -> list[str]:
    head = (f"{'model':<28} {'size':>9} {'B':>3} {'dtype':>8} {'exec':>7} {'dense ms':>9} {'budget':>7} "
            f"{'ms':>8} {'speedup':>8} {'MACx':>6} {'top1%':>6} {'ops dense/ev':>13} {'syncs':>5} {'pool MB':>8}")
    lines = ["dense vs eventful, per step of B streams (eventful-bench model):", head, "-" * len(head)]
    reports = sorted(reports, key=lambda r: (_model_name(r["model"]), tuple(r["image_size"]), r.get("streams", 1)))
    for report in reports:
        size = "x".join(str(v) for v in report["image_size"])
        for row in report["results"]:
            pool = row.get("pool_bytes")
            dense_ops, ops = report.get("dense_kernel_ops_per_step"), row.get("kernel_ops_per_step")
            ops = f"{_number(dense_ops, 'd')}/{_number(ops, 'd')}"
            lines.append(
                f"{_model_name(report['model']):<28} {size:>9} {report.get('streams', 1):>3} "
                f"{report.get('dtype', 'float32'):>8} {report.get('execution', 'eager'):>7} "
                f"{report['dense_ms']:9.2f} {row.get('budget_spec') or format(row['budget'], 'g'):>7} "
                f"{row['eventful_ms']:8.2f} {row['speedup']:7.2f}x {row['mac_ratio']:5.2f}x "
                f"{100 * row['top1_agreement']:6.1f} {ops:>13} {_number(row.get('host_syncs_per_step'), 'd'):>5} "
                f"{_number(pool / 1e6 if pool is not None else None, '.0f'):>8}"
            )
    return lines


def _server_lines(name: str, report: dict[str, Any]) -> list[str]:
    head = (f"{'streams':>7} {'eventful fps':>13} {'dense fps':>10} {'x dense':>8} {'p50 ev ms':>10} "
            f"{'p50 dense ms':>13}")
    lines = [f"live server ({name}, eventful-bench server):", head, "-" * len(head)]
    for row in report["results"]:
        ev, dense = row["eventful"], row["dense"]
        lines.append(
            f"{row['streams']:>7} {_number(ev['fps'], '.1f'):>13} {_number(dense['fps'], '.1f'):>10} "
            f"{_number(row['throughput_ratio'], '.2f'):>8} {_number(ev['p50_ms'], '.1f'):>10} "
            f"{_number(dense['p50_ms'], '.1f'):>13}"
        )
    return lines


def summary_lines(folder: str | Path) -> list[str]:
    folder = Path(folder)
    lines = _step_lines(folder)
    models = [json.loads(p.read_text()) for p in sorted(folder.rglob("model_*.json"))]
    if models:
        lines += ["", *_model_lines(models)]
    for path in sorted(folder.rglob("server*.json")):
        lines += ["", *_server_lines(path.stem, json.loads(path.read_text()))]
    return lines or [f"no steps.tsv and no reports under {folder}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.gpu_summary OUT_DIR", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
