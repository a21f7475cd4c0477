"""Helpers for the deployment tests: the project's deploy/ files read and rendered for a local run, PromQL
expressions extracted from them, and real nginx / Prometheus processes on 127.0.0.1 with their state in a tmp dir."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "eventful.json"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"

# Series of the budget controller (server/engine/controller.py); the server exports them in every mode.
CONTROLLER_METRICS = frozenset({
    "eventful_target_latency_seconds", "eventful_measured_p95_latency_seconds", "eventful_stream_budget_tokens",
    "eventful_controller_saturated",
})
PROMETHEUS_SERIES = frozenset({"up"})  # made by Prometheus itself, not by the server


def binary(name: str) -> str:
    """Path of an installed program, or skip (CI apt-installs prometheus and nginx)."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip(f"{name} is not installed (apt-get install prometheus nginx)")


# ---- PromQL from the project's files --------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    source: str  # where it is used, e.g. "dashboard: Active streams [A]" or "alert EventfulServerDown"
    promql: str
    alert: bool = False  # an alert condition: evaluated with `bool` comparisons (see with_bool_comparisons)


def rule_groups() -> list[dict]:
    return [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]


def recording_rules() -> dict[str, str]:
    """record name -> expression."""
    return {r["record"]: r["expr"] for g in rule_groups() for r in g["rules"] if "record" in r}


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title [refId], expression) for every query of every panel, rows' nested panels included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    return [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in panels for t in p.get("targets", []) if "expr" in t]


def dashboard_variables() -> dict[str, dict]:
    return {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}


def all_expressions(rate_interval: str = "1m") -> list[Expression]:
    """Every PromQL expression the dashboard, the recording rules and the alert rules use; dashboard variables
    replaced as Grafana would with every instance selected."""
    values = {name: v.get("allValue", ".*") for name, v in dashboard_variables().items()}
    values["__rate_interval"] = rate_interval
    found = [Expression(f"dashboard: {title}", grafana_to_promql(expr, values)) for title, expr in dashboard_targets()]
    for group in rule_groups():
        for rule in group["rules"]:
            if "record" in rule:
                found.append(Expression(f"record {rule['record']}", rule["expr"]))
            else:
                found.append(Expression(f"alert {rule['alert']}", rule["expr"], alert=True))
    return found


def grafana_to_promql(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}); an unknown variable is an error."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")


def with_bool_comparisons(expr: str) -> str:
    """`a > b` -> `a > bool b` for every comparison outside label matchers and strings: the condition is then
    evaluated for every series (0 or 1) instead of filtering to the firing ones, so it returns data when healthy."""
    out, depth, quote, i = [], 0, None, 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(expr):
                out.append(expr[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
            out.append(ch)
        elif ch in "{[":
            depth += 1
            out.append(ch)
        elif ch in "}]":
            depth -= 1
            out.append(ch)
        elif depth == 0 and (match := COMPARISON.match(expr, i)):
            out.append(match.group(1))
            i = match.end()
            if not re.match(r"\s*bool\b", expr[i:]):
                out.append(" bool")
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def metric_names(expr: str) -> set[str]:
    """Series names an expression reads: eventful_*, recorded level:metric:op names, and Prometheus' `up`."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    names = set(re.findall(r"(?<![\w:])([a-zA-Z_][\w]*(?::[\w]+)+|eventful_\w+|up)(?![\w:(])", bare))
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Metric family names in an exposition text (histograms' _bucket/_sum/_count included as sampled)."""
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{|\s)", metrics_text, re.MULTILINE)}


# ---- rendered configs ----------------------------------------------------------------------------------------


def render_nginx_conf(replicas: list[str], listen: str, runtime_dir: Path) -> str:
    """deploy/nginx/nginx.conf with these replicas (host:port) in every upstream, this listen address, and logs and
    temp files under runtime_dir. Everything else (the hashing, the locations) is the project's file as is."""
    text = NGINX_CONF.read_text()
    server_line = re.compile(r"^(\s*)server\s+eventful:8000(\s[^;]*)?;\s*$", re.MULTILINE)
    assert len(server_line.findall(text)) >= 2, "nginx.conf: expected `server eventful:8000 ...;` in each upstream"
    text = server_line.sub(
        lambda m: "\n".join(f"{m.group(1)}server {r}{m.group(2) or ''};" for r in replicas), text
    )
    text, listens = re.subn(r"^(\s*)listen\s+[^;]+;", rf"\1listen {listen};", text, flags=re.MULTILINE)
    assert listens == 1, "nginx.conf: expected one listen directive"
    text = re.sub(r"^(\s*)access_log\s+[^;]+;", rf"\1access_log {runtime_dir}/access.log;", text, flags=re.MULTILINE)
    text = re.sub(r"^(\s*)(\w+_temp_path)\s+\S+?/(\w+);", rf"\1\2 {runtime_dir}/\3;", text, flags=re.MULTILINE)
    text = re.sub(r"^worker_processes\s+[^;]+;", "worker_processes 1;", text, flags=re.MULTILINE)
    return text


def render_prometheus_config(target: str, listen: str, interval: str = "1s") -> dict:
    """deploy/prometheus/prometheus.yml scraping `target` (host:port) instead of the compose DNS name, itself at
    `listen`, with the project's rule files by absolute path and a short interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["eventful"].pop("dns_sd_configs")
    jobs["eventful"]["static_configs"] = [{"targets": [target]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [listen]}]
    return config


# ---- processes ------------------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if predicate():
                return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}\n"
                               f"{log.read_text() if log and log.exists() else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log.read_text() if log and log.exists() else ''}")
        time.sleep(0.1)


@contextlib.contextmanager
def running(command: list[str], log_path: Path, ready: Callable[[], bool], what: str,
            timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """Run a command (in the foreground, not daemonised), wait for `ready`, stop it on exit."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent)
        try:
            wait_for(ready, timeout, what, process, log_path)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def http_ok(url: str) -> bool:
    with httpx.Client(trust_env=False, timeout=2) as http:
        return http.get(url).status_code == 200
