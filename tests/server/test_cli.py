"""`eventful-serve` flags and EVENTFUL_* environment variables."""

from __future__ import annotations

import pytest

from server.cli import main, parse_settings


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
