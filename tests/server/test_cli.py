"""`eventful-serve` flags and EVENTFUL_* environment variables."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest

from server.cli import build_parser, main, parse_settings
from server.settings import Settings


def flag_actions() -> dict[str, argparse.Action]:
    """Each setting's argparse action, by field name."""
    return {a.dest: a for a in build_parser()._actions if a.dest in Settings.model_fields}


def test_every_setting_is_a_flag_with_help():
    actions = flag_actions()
    assert set(actions) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in actions[name].option_strings, name
        assert field.description and actions[name].default is None, name  # None: leave it to the environment


def test_help_shows_each_description_and_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping inside a description
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in text and field.description in text, name
    assert "--port PORT port to listen on (default: 8000)" in " ".join(text.split())
    assert "--budget-fraction BUDGET_FRACTION default budget as a fraction of patches (default: 0.25)" in " ".join(
        text.split())
    assert "--metrics-require-key, --no-metrics-require-key" in text


def test_existing_flag_names_still_parse():
    """Every flag the hand-written list had, with a value of its kind (the deploy files use some of them)."""
    settings = parse_settings([
        "--model", "vit-base", "--labels", "l.txt", "--image-size", "224", "--num-heads", "3", "--device", "cpu",
        "--dtype", "float16", "--execution", "compile", "--level", "qk", "--gate-position", "normed",
        "--refresh-interval", "9", "--threads", "3", "--budget-tokens", "40", "--budget-fraction", "0.5",
        "--budget-mode", "auto", "--target-latency-ms", "80", "--budget-min-tokens", "1", "--budget-max-tokens", "99",
        "--top-k", "3", "--detect-threshold", "0.7", "--max-boxes", "10", "--clip-stride", "4", "--rlt-tau", "0",
        "--max-streams", "2", "--max-batch-size", "2", "--batch-window-ms", "1.5", "--stream-ttl-s", "0",
        "--decode-threads", "1", "--seeds-per-step", "2", "--idle-timeout-s", "5", "--first-frame-grace-s", "1",
        "--max-idle-streams", "0", "--max-frame-bytes", "2048", "--max-frame-width", "640",
        "--max-frame-height", "480", "--max-frame-pixels", "307200", "--max-frame-aspect-ratio", "2",
        "--api-key", "k", "--metrics-require-key", "--health-require-key", "--host", "0.0.0.0", "--port", "9000",
        "--log-level", "debug",
    ])
    assert settings.image_size == (224, 224) and settings.torch_threads == 3 and settings.level == "qk"
    assert settings.api_key.get_secret_value() == "k" and settings.health_require_key
    assert (settings.batch_window_ms, settings.max_idle_streams, settings.port) == (1.5, 0, 9000)
    assert parse_settings(["--torch-threads", "5"]).torch_threads == 5  # the field's own name works too


def test_flag_wins_over_environment_wins_over_default(monkeypatch):
    monkeypatch.setenv("EVENTFUL_TOP_K", "7")
    monkeypatch.setenv("EVENTFUL_TORCH_THREADS", "2")
    monkeypatch.setenv("EVENTFUL_METRICS_REQUIRE_KEY", "true")
    monkeypatch.setenv("EVENTFUL_LEVEL", "full")
    from_env = parse_settings([])
    assert (from_env.top_k, from_env.torch_threads, from_env.metrics_require_key, from_env.level) == (
        7, 2, True, "full")
    assert from_env.max_streams == Settings.model_fields["max_streams"].default  # neither: the default
    from_flags = parse_settings(["--top-k", "9", "--threads", "4", "--no-metrics-require-key", "--level", "qk"])
    assert (from_flags.top_k, from_flags.torch_threads, from_flags.metrics_require_key, from_flags.level) == (
        9, 4, False, "qk")


@pytest.mark.parametrize("name", [n for n, f in Settings.model_fields.items() if "Literal" in str(f.annotation)])
def test_choices_are_the_literal(name, capsys):
    action = flag_actions()[name]
    assert tuple(action.choices) == get_args(Settings.model_fields[name].annotation)
    with pytest.raises(SystemExit) as exit_:
        parse_settings([action.option_strings[0], "no-such-choice"])
    assert exit_.value.code == 2 and "invalid choice: 'no-such-choice'" in capsys.readouterr().err


def test_numbers_are_checked_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--max-streams", "many"])
    assert exit_.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("EVENTFUL_MAX_STREAMS", "3")
    monkeypatch.setenv("EVENTFUL_BUDGET_TOKENS", "20")
    monkeypatch.setenv("EVENTFUL_API_KEY", "from-env")
    settings = parse_settings(["--budget-tokens", "50", "--image-size", "432x768", "--metrics-require-key"])
    assert settings.max_streams == 3  # from the environment
    assert settings.budget_tokens == 50  # the flag wins
    assert settings.image_size == (432, 768)
    assert settings.api_key.get_secret_value() == "from-env" and "from-env" not in repr(settings)
    assert settings.metrics_require_key and not settings.health_require_key


def test_defaults():
    settings = parse_settings([])
    assert (settings.host, settings.port, settings.model) == ("127.0.0.1", 8000, "deit-tiny-patch16-224")
    assert settings.api_key is None and settings.budget_fraction == 0.25
    assert str(settings.torch_device) in ("cpu", "cuda")


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--budget-fraction", "1.5"], "budget_fraction"),
        (["--max-streams", "0"], "max_streams"),
        (["--device", "tpu"], "device"),
        (["--image-size", "axb"], "image_size"),
    ],
)
def test_bad_settings_exit_2_naming_the_field(argv, field, capsys):
    assert main(argv) == 2
    assert field in capsys.readouterr().err


def test_unloadable_model_exits_2_before_serving(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing.pth"), "--port", "1"]) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_dtype_and_execution_resolve_for_the_device():
    import torch

    from server.settings import Settings

    cpu = Settings(device="cpu")
    assert (cpu.torch_dtype, cpu.step_execution) == (torch.float32, "eager")
    cuda = Settings(device="cuda")
    assert (cuda.torch_dtype, cuda.step_execution) == (torch.bfloat16, "graph")
    assert Settings(device="cuda", dtype="float32", execution="compile").step_execution == "compile"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Settings(device="cpu", execution="graph")
