"""`eventful-bench server` end to end on a real server (random DeiT-Tiny weights): both modes measured in the same
run, the latency breakdown adds up, the JSON has what the README table shows."""

from __future__ import annotations

import json

import pytest

from bench.cli import main


def test_server_bench_runs_both_modes_and_writes_json(real_video, tmp_path, capsys):
    out = tmp_path / "server.json"
    code = main(["server", "--model", "deit-tiny-patch16-224", "--video", str(real_video), "--streams", "1,2",
                 "--duration", "1.5", "--repeats", "1", "--budget-tokens", "40", "--server-arg=--threads=1",
                 "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["streams"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["eventful"]["tokens"] == 40 and row["dense"]["tokens"] == 196
        for mode in ("eventful", "dense"):
            assert row[mode]["fps"] > 0 and row[mode]["errors"] == 0 and row[mode]["unanswered"] == 0
        assert row["throughput_ratio"] == pytest.approx(row["eventful"]["fps"] / row["dense"]["fps"], rel=1e-6)
    one = report["latency"]["eventful"]["breakdown"]  # the latency probe: 1 stream, 1 frame in flight
    parts = one["decode_ms"] + one["queue_ms"] + one["step_ms"] + one["other_ms"]
    assert parts == pytest.approx(one["server_latency_ms"], rel=0.25)  # medians of parts vs median of the sum
    assert 0 < one["overhead_fraction"] < 1
    assert report["latency"]["eventful"]["unanswered"] == 0 and report["latency"]["dense"]["fps"] > 0
    assert len(report["runs"]) == 6  # (latency probe + 2 stream counts) x 2 modes x 1 repeat
    assert "server overhead" in capsys.readouterr().out


def test_server_bench_rejects_bad_arguments(real_video):
    assert main(["server", "--model", "deit-tiny-patch16-224", "--video", str(real_video), "--streams", "0"]) == 2
    assert main(["server", "--model", "deit-tiny-patch16-224", "--video", "/no/such.mp4"]) == 2
