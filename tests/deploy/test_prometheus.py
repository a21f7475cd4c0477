"""Must-show 1: Debian's Prometheus with the project's own config and rules, scraping a live `eventful-serve` while
the load generator streams real video; every expression of the dashboard, the recording rules and the alert rules
is then evaluated through Prometheus' HTTP API and must return data. Plus `promtool check config/rules`."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess

import httpx
import yaml

from bench.live_server import free_port, live_server
from clients.loadgen import LoadConfig, run_load
from tests.deploy.services import (
    CONTROLLER_METRICS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SERIES,
    RULE_FILES,
    all_expressions,
    binary,
    exported_names,
    http_ok,
    metric_names,
    recording_rules,
    render_prometheus_config,
    running,
    wait_for,
    with_bool_comparisons,
)

# auto mode with a ceiling under the 196 patch tokens: with slack (a fast machine) the controller would run every
# step dense, and the MAC-savings panel would read 0 however right it is
SERVER_ARGS = ["--model", "deit-tiny-patch16-224", "--threads", "1", "--budget-mode", "auto", "--target-latency-ms",
               "200", "--budget-min-tokens", "8", "--budget-max-tokens", "160", "--decode-threads", "1",
               "--stream-ttl-s", "5", "--log-level", "warning"]


def test_promtool_accepts_the_config_and_the_rules(tmp_path):
    promtool = binary("promtool")
    # the config as shipped (relative rule paths next to it)
    shutil.copytree(PROMETHEUS_CONFIG.parent, tmp_path / "prometheus")
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus" / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(RULE_FILES)} rule files found" in checked.stdout + checked.stderr
    rules = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True,
                           timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr


def query(http: httpx.Client, promql: str) -> list[dict]:
    answer = http.get("/api/v1/query", params={"query": promql}).json()
    assert answer["status"] == "success", f"{promql}: {answer}"
    return answer["data"]["result"]


def test_every_dashboard_and_rule_expression_returns_data(tmp_path, real_video):
    prometheus = binary("prometheus")
    records = recording_rules()
    with live_server(SERVER_ARGS, tmp_path / "server.log") as base:
        target = base.removeprefix("http://")
        listen = f"127.0.0.1:{free_port()}"
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(render_prometheus_config(target, listen)))
        command = [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
                   f"--web.listen-address={listen}", "--log.level=warn"]
        with running(command, tmp_path / "prometheus.log", lambda: http_ok(f"http://{listen}/-/ready"),
                     "prometheus ready"), \
                httpx.Client(base_url=f"http://{listen}", trust_env=False, timeout=10) as http:
            # the live server, scraped: real video from three camera streams for a few seconds
            report = asyncio.run(run_load(LoadConfig(server=base, streams=3, videos=[str(real_video)], fps=8,
                                                     duration_s=8, size=160)))
            assert report.to_json()["aggregate"]["results"] > 0
            # a scrape after the load and a rule evaluation on it
            wait_for(lambda: any(float(s["value"][1]) > 0
                                 for s in query(http, "instance:eventful_frames_processed:rate1m")),
                     30, "recorded frame rate")
            exported = exported_names(httpx.get(f"{base}/metrics", trust_env=False).text)

            assert CONTROLLER_METRICS <= exported, CONTROLLER_METRICS - exported
            empty = []
            for expression in all_expressions():
                promql = with_bool_comparisons(expression.promql) if expression.alert else expression.promql
                names = metric_names(expression.promql)
                unknown = {n for n in names if n not in records and n not in PROMETHEUS_SERIES and n not in exported}
                assert not unknown, f"{expression.source} reads series nobody makes: {unknown}"
                if not query(http, promql):
                    empty.append(f"{expression.source}: {promql}")
            assert not empty, "expressions without data:\n" + "\n".join(empty)

            # the figures behind the main panels are real numbers, not NaN from empty rates
            for name in ("instance:eventful_frame_latency_seconds:p95_1m", "instance:eventful_step_seconds:mean_1m",
                         "instance:eventful_macs_saved:ratio_rate1m", "instance:eventful_batch_size:mean_1m"):
                value = float(query(http, name)[0]["value"][1])
                assert math.isfinite(value) and value > 0, (name, value)
            up = query(http, 'up{job="eventful"}')
            assert [s["value"][1] for s in up] == ["1"]
            # the controller ran: its target and a measured p95 reached Prometheus
            assert float(query(http, "eventful_target_latency_seconds")[0]["value"][1]) == 0.2
            p95 = float(query(http, "max_over_time(eventful_measured_p95_latency_seconds[1m])")[0]["value"][1])
            assert math.isfinite(p95) and p95 > 0
            # every rule evaluated without error
            groups = http.get("/api/v1/rules").json()["data"]["groups"]
            health = {r["name"]: (r["health"], r.get("lastError")) for g in groups for r in g["rules"]}
            assert len(health) == sum(not e.source.startswith("dashboard") for e in all_expressions())
            assert all(h == "ok" for h, _ in health.values()), health
