"""The Runner protocol: every model family's runner implements it, it names exactly what the engine, the planner
and the API use of a runner, and the app and the API import nothing from model/ (the factory builds runners)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Generic, Protocol, get_args

import pytest
import torch

from model.owlv2 import Owlv2Detector
from model.videomae import VideoMAE
from model.yolos import YolosDetector
from server.engine.budget import BudgetPolicy, GlobalBudget
from server.engine.clip_runner import ClipRunner
from server.engine.controller import BudgetController, ControllerConfig
from server.engine.detect_runner import DetectRunner
from server.engine.factory import build_runner
from server.engine.owlv2_runner import Owlv2Runner
from server.engine.planner import Planner
from server.engine.registry import StreamRecord
from server.engine.runner import ModelRunner, Runner, Task
from server.engine.scheduler import PendingFrame
from server.settings import Settings
from tests.server.test_detect_clip import CLIP, DETECTOR
from tests.server.test_owlv2_server import CONFIG as OWLV2
from tests.server.test_owlv2_server import write_tokenizer

SERVER = Path(__file__).resolve().parents[2] / "server"
RUNNER_CLASSES = (ModelRunner, DetectRunner, Owlv2Runner, ClipRunner)
TASKS = {ModelRunner: "classify", DetectRunner: "detect", Owlv2Runner: "detect", ClipRunner: "clip"}


def protocol_members(proto: type) -> set[str]:
    """The members a protocol declares, its protocol bases' included (methods, properties, annotated attributes)."""
    members = set()
    for base in proto.__mro__:
        if base in (Protocol, Generic, object) or not getattr(base, "_is_protocol", False):
            continue
        members |= {name for name in (*vars(base), *vars(base).get("__annotations__", {})) if not name.startswith("_")}
    return members


MEMBERS = protocol_members(Runner)


@pytest.fixture(scope="module")
def models(tiny_model) -> dict[type, torch.nn.Module]:
    return {ModelRunner: tiny_model, DetectRunner: YolosDetector(DETECTOR).eval(),
            Owlv2Runner: Owlv2Detector(OWLV2).eval(), ClipRunner: VideoMAE(CLIP).eval()}


def test_the_protocol_names_what_the_engine_and_the_api_need():
    assert MEMBERS == {
        "num_patches", "dense_first_frame", "plain_dense", "fidelity", "rlt_tau", "config", "new_state",  # RunnerFacts
        "task", "device", "dtype", "refresh_interval", "execution", "pool_bytes", "graph_bytes",
        "prepare", "execute", "warmup", "default_queries", "tokenizer", "check_queries",
    }  # fmt: skip


@pytest.mark.parametrize("cls", RUNNER_CLASSES, ids=lambda c: c.__name__)
def test_every_runner_class_has_every_member_with_the_protocol_s_signatures(cls):
    """Static: each member is defined on the class (method, property, constant) or declared for its instances."""
    declared = {name for c in cls.__mro__ for name in vars(c).get("__annotations__", {})}
    missing = sorted(m for m in MEMBERS if not hasattr(cls, m) and m not in declared)
    assert not missing, f"{cls.__name__} lacks {missing}"
    for base in Runner.__mro__:
        for name, member in vars(base).items():
            if name in MEMBERS and inspect.isfunction(member):
                expected = list(inspect.signature(member).parameters)
                assert list(inspect.signature(getattr(cls, name)).parameters) == expected, name
    assert TASKS[cls] in get_args(Task)


@pytest.mark.parametrize("cls", RUNNER_CLASSES, ids=lambda c: c.__name__)
def test_the_factory_builds_each_family_s_runner_and_it_is_a_runner(cls, models, tmp_path):
    tokenizer = write_tokenizer(tmp_path / "tokenizer") if cls is Owlv2Runner else None
    settings = Settings(model="unused", device="cpu", refresh_interval=12, tokenizer=tokenizer, default_queries="cat")
    runner = build_runner(settings, models[cls])
    assert type(runner) is cls and isinstance(runner, Runner)
    assert runner.task == TASKS[cls]
    assert (runner.device.type, runner.dtype) == ("cpu", torch.float32)
    assert runner.default_queries == (("cat",) if cls is Owlv2Runner else None)
    assert runner.graph_bytes is None  # eager (or no eventful step): nothing captured
    if cls is ClipRunner:  # no eventful step, no pool, nothing to reseed, no plain dense step
        assert (runner.execution, runner.pool_bytes, runner.refresh_interval, runner.plain_dense) == (
            None, None, None, False)
    else:
        assert (runner.execution, runner.refresh_interval, runner.plain_dense) == ("eager", 12, True)
        assert runner.pool_bytes > 0


def _runner_uses(path: Path) -> set[str]:
    """Attributes read off a runner in a file: `runner.x`, `self.runner.x`, `engine.runner.x`, getattr/hasattr."""

    def is_runner(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == "runner") or (
            isinstance(node, ast.Attribute) and node.attr == "runner")

    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and is_runner(node.value):
            used.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and is_runner(node.args[0]) and isinstance(node.args[1], ast.Constant)):
            used.add(node.args[1].value)
    return used


def test_the_engine_the_planner_and_the_api_use_exactly_the_protocol():
    files = [SERVER / "engine" / "engine.py", SERVER / "engine" / "planner.py", *sorted((SERVER / "api").glob("*.py"))]
    used = set().union(*(_runner_uses(f) for f in files))
    assert used - MEMBERS == set(), "runner attributes used but not in the Runner protocol"
    assert MEMBERS - used == set(), "Runner protocol members nothing uses"


def _model_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n == "model" or n.startswith("model.")]


@pytest.mark.parametrize("path", [SERVER / "app.py", *sorted((SERVER / "api").glob("*.py"))],
                         ids=lambda p: str(p.relative_to(SERVER)))
def test_the_app_and_the_api_import_nothing_from_model(path):
    assert _model_imports(path) == []


def test_the_import_check_sees_model_imports(tmp_path):
    source = tmp_path / "app.py"
    source.write_text("import model\nfrom model.vit import VisionTransformer\nfrom server.api import model\n"
                      "def f():\n    import model.loaders\n")
    assert _model_imports(source) == ["model", "model.vit", "model.loaders"]


def test_the_clip_runner_times_its_warm_up_for_the_controller(models):
    runner = ClipRunner(models[ClipRunner], stride=2)
    timings = runner.warmup((1, 3))
    n = runner.num_patches
    assert set(timings.dense_s) == {1, 3} and all(s > 0 for s in timings.dense_s.values())
    # a step of windows filling (no tokens, as the engine counts it), and one of every clip due (num_patches each)
    assert [(batch, tokens) for batch, tokens, _ in timings.eventful] == [(1, 0), (1, n), (3, 0), (3, 3 * n)]
    assert all(seconds > 0 for *_, seconds in timings.eventful)
    controller = BudgetController(ControllerConfig(0.1, n), n)
    controller.calibrate(timings.eventful, timings.dense_s)
    assert controller.dense_model.predict(3) == timings.dense_s[3]
    assert controller.model.observations == 4


@pytest.mark.parametrize("cls", [ModelRunner, ClipRunner], ids=lambda c: c.__name__)
def test_full_budgets_make_a_plain_dense_step_only_where_the_runner_has_one(cls, models):
    runner = build_runner(Settings(model="unused", device="cpu"), models[cls])
    planner = Planner(runner, BudgetPolicy(runner.num_patches, GlobalBudget("fixed", fraction=1.0)))
    offered = [(PendingFrame(s, 1, 0, torch.zeros(3, 32, 32), (32, 32), 0.0, 0.0, 0.0), StreamRecord(s))
               for s in ("a", "b")]
    plan = planner.plan(offered).plan
    assert len(plan.frames) == 2 and plan.plain_dense is runner.plain_dense
    assert plan.seeds == 0
