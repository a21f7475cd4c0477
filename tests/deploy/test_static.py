"""Must-show 3: static checks of the Dockerfile, docker-compose.yml, the Kubernetes manifests and the monitoring
files (no Docker engine or cluster here): they parse, what they reference exists, the commands they run are the
project's console commands with flags `eventful-serve` accepts, and the names that must agree across files do."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from prometheus_client import CollectorRegistry

from clients import budget as budget_cli
from server.app import create_app
from server.cli import build_parser, parse_settings
from server.metrics import Metrics
from server.settings import Settings
from tests.deploy.services import (
    DASHBOARD,
    DEPLOY,
    NGINX_CONF,
    PROMETHEUS_CONFIG,
    REPO_ROOT,
    binary,
    metric_names,
    with_bool_comparisons,
)

K8S = DEPLOY / "k8s"
COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCS = REPO_ROOT / "docs" / "deploy.md"
K8S_UID = 10001  # the image's user (Dockerfile) and the pods' runAsUser


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def k8s_docs() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s(kind: str, name: str | None = None) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def server_metric_types() -> dict[str, str]:
    registry = CollectorRegistry()
    Metrics(registry)
    return {family.name: family.type for family in registry.collect()}


def app_paths() -> set[str]:
    """The server's HTTP paths, from its OpenAPI schema."""
    return set(create_app(Settings()).openapi()["paths"])


def nginx_stream_map(text: str) -> str:
    match = re.search(r"map \$uri \$eventful_stream_id \{(.*?)\}", text, re.DOTALL)
    assert match, "no map $uri $eventful_stream_id"
    return " ".join(match.group(1).split())


def assert_serve_flags(args: list[str], env: dict[str, str], monkeypatch) -> Settings:
    """The flags and EVENTFUL_* variables are ones `eventful-serve` accepts, with valid values."""
    for name, value in env.items():
        assert name.startswith("EVENTFUL_"), name
        assert name.removeprefix("EVENTFUL_").lower() in Settings.model_fields, f"{name} is no server setting"
        monkeypatch.setenv(name, value)
    return parse_settings(args)


# ---- all files ------------------------------------------------------------------------------------------------


def test_every_deploy_file_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    assert {p.suffix for p in files} <= {".yml", ".yaml", ".json", ".conf"}, files
    for path in files:
        if path.suffix in (".yml", ".yaml"):
            assert [d for d in yaml.safe_load_all(path.read_text()) if d], path
        elif path.suffix == ".json":
            json.loads(path.read_text())
    assert compose()["services"]


def test_docs_page_names_existing_files_and_every_deploy_file():
    text = DOCS.read_text()
    named = set(re.findall(r"(?<![\w/.])((?:deploy/[\w./{},-]+[\w}])|Dockerfile|docker-compose\.yml)", text))
    expanded = set()
    for name in named:  # deploy/grafana/provisioning/{datasources,dashboards}/... style
        if match := re.search(r"\{([^}]*)\}", name):
            expanded |= {name.replace(match.group(0), part) for part in match.group(1).split(",")}
        else:
            expanded.add(name)
    for name in expanded:
        assert (REPO_ROOT / name).exists(), f"docs/deploy.md names {name}, which does not exist"
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            relative = path.relative_to(REPO_ROOT).as_posix()
            assert relative in expanded, f"docs/deploy.md does not mention {relative}"


# ---- Dockerfile -----------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_runs_the_console_command_on_cpu_by_default_as_non_root():
    steps = dockerfile_instructions()
    kinds = [k for k, _ in steps]
    value = {k: v for k, v in steps}  # the last of each kind
    # a build argument selects the base; CPU by default, with the CPU torch wheel pinned
    assert kinds.index("ARG") < kinds.index("FROM") and value["FROM"] == "${BASE_IMAGE}"
    base_arg = next(v for k, v in steps if k == "ARG" and v.startswith("BASE_IMAGE="))
    assert "cuda" not in base_arg.lower() and "python:3.11" in base_arg
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in runs
    assert "timm" not in runs and "torchvision" not in runs
    # the entrypoint is the documented console command, the image listens where the settings say
    entrypoint = json.loads(value["ENTRYPOINT"])
    assert entrypoint == ["eventful-serve"] and entrypoint[0] in console_scripts()
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(v for k, v in steps if k == "ENV")))
    assert env["EVENTFUL_PORT"] == value["EXPOSE"] == "8000" and env["EVENTFUL_HOST"] == "0.0.0.0"
    # non-root, health checked on /healthz at that port
    user = value["USER"]
    assert user not in ("root", "0")
    assert f"--uid {K8S_UID}" in runs and user in runs
    assert "/healthz" in value["HEALTHCHECK"] and "/healthz" in app_paths()
    # weights are not baked in: volumes for a weights folder and the Hugging Face cache
    volumes = json.loads(value["VOLUME"])
    assert "/weights" in volumes and env["HF_HOME"] in volumes
    copies = [v.split()[0] for k, v in steps if k == "COPY"]
    for source in copies:
        assert (REPO_ROOT / source).exists(), source
        assert not re.search(r"\.(pth|pt|safetensors|bin)$|shared|weights", source), f"COPY {source} bakes weights"
    packages = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= set(copies), "every package of pyproject is copied"
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", "*.pth", "*.safetensors", "tests"} <= set(ignored)


# ---- docker-compose.yml ---------------------------------------------------------------------------------------


def test_compose_serves_the_console_command_with_monitoring_mounted(monkeypatch):
    services = compose()["services"]
    assert {"eventful", "balancer", "prometheus", "grafana"} <= set(services)
    server = services["eventful"]
    # built from this Dockerfile, whose entrypoint is eventful-serve: the command is eventful-serve's flags
    assert (REPO_ROOT / server["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
    assert "BASE_IMAGE" in server["build"]["args"]
    settings = assert_serve_flags(server["command"], {k: interpolate(v) for k, v in server["environment"].items()},
                                  monkeypatch)
    assert settings.host == "0.0.0.0" and server["expose"] == [str(settings.port)]

    # every bind mount from the repository exists, and lands where the service reads it
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name}: {source} does not exist"
            mounts[(name, target)] = source
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    config_target = config_flag.split("=", 1)[1]
    assert mounts[("prometheus", config_target)] == "./deploy/prometheus/prometheus.yml"
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for rule_file in prometheus["rule_files"]:  # relative to the config file, inside the container too
        container_dir = str(Path(config_target).parent / Path(rule_file).parent)
        assert (REPO_ROOT / mounts[("prometheus", container_dir)] / Path(rule_file).name).is_file()
    assert mounts[("grafana", "/etc/grafana/provisioning")] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/eventful.yml").read_text())["providers"][0]
    assert mounts[("grafana", provider["options"]["path"])] == "./deploy/grafana/dashboards"
    assert mounts[("balancer", "/etc/nginx/nginx.conf")] == "./deploy/nginx/nginx.conf"

    # the names and ports the files use to find each other
    sd = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "eventful")["dns_sd_configs"][0]
    assert sd["names"] == ["eventful"] and sd["port"] == settings.port
    nginx = re.sub(r"#.*", "", NGINX_CONF.read_text())
    assert re.findall(r"^\s*server\s+([^\s;{]+)[^;{]*;", nginx, re.MULTILINE) == [f"eventful:{settings.port}"] * 2
    listen = re.search(r"listen\s+(\d+);", nginx).group(1)
    assert services["balancer"]["ports"] == [f"{settings.port}:{listen}"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


# ---- Kubernetes -----------------------------------------------------------------------------------------------


def test_k8s_deployments_run_eventful_serve_with_probes_resources_and_a_gpu_variant(monkeypatch):
    deployments = k8s("Deployment", "eventful")
    assert len(deployments) == 2, "deployment.yaml (CPU) and deployment-gpu.yaml"
    config = k8s("ConfigMap", "eventful-config")[0]["data"]
    paths = app_paths()
    gpu_requests = []
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] == K8S_UID
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["eventful-serve"] and "eventful-serve" in console_scripts()
        settings = assert_serve_flags(container["args"], config, monkeypatch)
        port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert port_names == {"http": settings.port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in paths and get["port"] in port_names, probe
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
        gpu_requests.append(resources["limits"].get("nvidia.com/gpu"))
        if "nvidia.com/gpu" in resources["limits"]:
            assert settings.device == "cuda" and resources["requests"]["nvidia.com/gpu"] == 1
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert config["EVENTFUL_MODEL"].startswith(mounts["weights"] + "/"), "weights come from the volume"
        assert {v["name"] for v in pod["spec"]["volumes"]} == set(mounts)
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.port)
    assert sorted(gpu_requests, key=str) == [1, None]


def test_k8s_services_ingress_and_hpa_agree_with_the_deployment_and_nginx():
    pod_labels = k8s("Deployment", "eventful")[0]["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in k8s("Service")}
    assert {"eventful", "eventful-headless"} <= set(services)
    assert services["eventful-headless"]["spec"]["clusterIP"] == "None"
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    # the ingress hashes on the same key, defined by the same map, as deploy/nginx/nginx.conf
    ingresses = {i["metadata"]["name"]: i for i in k8s("Ingress")}
    hashed = [i for i in ingresses.values()
              if "nginx.ingress.kubernetes.io/upstream-hash-by" in i["metadata"].get("annotations", {})]
    assert len(hashed) == 1
    key = hashed[0]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
    nginx = NGINX_CONF.read_text()
    assert re.search(rf"hash {re.escape(key)} consistent;", nginx)
    snippet = k8s("ConfigMap", "ingress-nginx-controller")[0]["data"]["http-snippet"]
    assert nginx_stream_map(snippet) == nginx_stream_map(nginx)
    assert [p["path"] for r in hashed[0]["spec"]["rules"] for p in r["http"]["paths"]] == ["/v1/streams/"]
    for ingress in ingresses.values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services
                assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}

    # the HPA scales the Deployment on a gauge the server exports, served by prometheus-adapter
    (hpa,) = k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment" and hpa["spec"]["scaleTargetRef"]["name"] == "eventful"
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert server_metric_types()[name] == "gauge"
    adapter = yaml.safe_load(k8s("ConfigMap", "prometheus-adapter")[0]["data"]["config.yaml"])
    assert [r["name"]["as"] for r in adapter["rules"]] == [name]
    assert adapter["rules"][0]["seriesQuery"].startswith(name + "{")


def test_k8s_budget_job_fans_out_through_the_headless_service():
    (job,) = k8s("Job", "eventful-budget")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["eventful-budget"] and "eventful-budget" in console_scripts()
    args = budget_cli.build_parser().parse_args(container["args"])
    host, port = args.dns.split(":")
    headless = k8s("Service", host)[0]
    assert [p["port"] for p in headless["spec"]["ports"]] == [int(port)]


def test_k8s_prometheus_scrape_config_passes_promtool(tmp_path):
    promtool = binary("promtool")
    config = yaml.safe_load(k8s("ConfigMap", "eventful-prometheus")[0]["data"]["prometheus.yml"])
    assert [job["job_name"] for job in config["scrape_configs"]] == ["eventful"]  # as the rules and dashboard use
    # Debian builds Prometheus without Kubernetes discovery: check everything else with a static target in its place
    checked = subprocess.run([binary("prometheus"), "--version"], capture_output=True, text=True, timeout=30)
    if "+ds" in checked.stdout + checked.stderr:
        for job in config["scrape_configs"]:
            job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    shutil.copytree(PROMETHEUS_CONFIG.parent / "rules", tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ---- monitoring files -----------------------------------------------------------------------------------------


def test_monitoring_reads_only_series_the_server_or_the_rules_make():
    from tests.deploy.services import CONTROLLER_METRICS, PROMETHEUS_SERIES, all_expressions, recording_rules

    exported = set()
    for name, kind in server_metric_types().items():
        exported |= {name, f"{name}_total"} if kind == "counter" else {name}
        if kind == "histogram":
            exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    known = exported | set(recording_rules()) | CONTROLLER_METRICS | PROMETHEUS_SERIES
    for expression in all_expressions():
        assert metric_names(expression.promql) <= known, expression
    # the dashboard covers what issue 6 asks for
    text = DASHBOARD.read_text()
    for series in ("p50", "p95", "p99", "slo_attainment", "frames_processed", "frames_dropped", "frames_failed",
                   "eventful_active_streams", "eventful_stream_budget_tokens", "updated_token_fraction",
                   "macs_saved", "step_seconds", "queue_wait_seconds", "batch_size", "eventful_state_bytes"):
        assert series in text, series
    assert "instance" in {v["name"] for v in json.loads(text)["templating"]["list"]}


@pytest.mark.parametrize(("expr", "expected"), [
    ('up{job="eventful"} == 0', 'up{job="eventful"} == bool 0'),
    ('a{x!="1",y=~"a>b"} > on (i) b and c >= 0.2', 'a{x!="1",y=~"a>b"} > bool on (i) b and c >= bool 0.2'),
    ("rate(x[5m]) > bool 1", "rate(x[5m]) > bool 1"),
])
def test_alert_conditions_are_evaluated_with_bool(expr, expected):
    assert with_bool_comparisons(expr) == expected


def test_serve_flag_check_rejects_unknown_flags_and_settings(monkeypatch):
    """The check above can fail: a flag or an environment variable eventful-serve does not have."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split("--no-such-flag 1"))
    with pytest.raises(AssertionError, match="no server setting"):
        assert_serve_flags([], {"EVENTFUL_NO_SUCH_SETTING": "1"}, monkeypatch)
