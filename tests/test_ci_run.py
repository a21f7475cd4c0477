""".ci/run with stand-ins for python3, apt-get and sudo on PATH (nothing is installed): outside a virtual environment
it creates .venv in the repository and installs and tests there, inside one it uses that one; never the system
Python, never PIP_BREAK_SYSTEM_PACKAGES; torch==2.13.0 first; `python -m pytest -q` last."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# A stand-in interpreter: logs "<its path> <args>" (and whether PIP_BREAK_SYSTEM_PACKAGES is set), answers the few
# questions .ci/run asks; `-m venv DIR` makes DIR a virtual environment of stand-ins.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$0 $* ${PIP_BREAK_SYSTEM_PACKAGES:+PIP_BREAK_SYSTEM_PACKAGES}" >> "$CI_LOG"
case "$*" in
    *"sys.prefix == sys.base_prefix"*) [ "${FAKE_BASE_PREFIX:-}" = "$(dirname "$(dirname "$0")")" ] && exit 1; exit 0 ;;
    "-m venv "*)
        venv="${@: -1}"; mkdir -p "$venv/bin"; cp "$0" "$venv/bin/python"; cp "$0" "$venv/bin/python3"
        printf 'export VIRTUAL_ENV=%s\nexport PATH=%s/bin:$PATH\n' "$PWD/$venv" "$PWD/$venv" > "$venv/bin/activate" ;;
esac
exit 0
"""
FAKE_TOOL = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CI_LOG"
[ "$(basename "$0")" = sudo ] && exec "$@"
exit 0
"""


def fake_bin(folder: Path, names: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for name, text in names.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def run_ci(tmp_path: Path, env_extra: dict[str, str], path_first: list[Path]) -> tuple[Path, list[str]]:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO_ROOT / ".ci" / "run", repo / ".ci" / "run")
    log = tmp_path / "ci.log"
    tools = fake_bin(tmp_path / "tools", {"apt-get": FAKE_TOOL, "sudo": FAKE_TOOL})
    system_path = ":".join(p for p in ("/usr/bin", "/bin") if Path(p).is_dir())
    env = {"PATH": ":".join(str(p) for p in [*path_first, tools]) + ":" + system_path, "CI_LOG": str(log),
           "HOME": str(tmp_path), **env_extra}
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return repo, log.read_text().splitlines()


def python_calls(lines: list[str]) -> list[tuple[str, str]]:
    """(interpreter, arguments) of every call of a stand-in interpreter, in order."""
    calls = []
    for line in lines:
        program, _, args = line.partition(" ")
        if program.endswith(("/python", "/python3")):
            calls.append((program, args.strip()))
    return calls


def check_steps(calls: list[tuple[str, str]], python: str) -> None:
    """Installs and tests ran with `python`: torch pinned first, the project next, the tests last."""
    used = [args for program, args in calls if program == python]
    pip = [args for args in used if args.startswith("-m pip install")]
    assert pip and "torch==2.13.0" in pip[0] and "-e" not in pip[0].split(), pip
    assert any(".[test]" in args for args in pip[1:]), pip
    assert "-m ruff check ." in used
    assert used[-1] == "-m pytest -q", used
    assert calls[-1] == (python, "-m pytest -q")
    assert not any("PIP_BREAK_SYSTEM_PACKAGES" in args for _, args in calls)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_outside_a_venv_it_creates_dot_venv_and_installs_there(tmp_path):
    system = fake_bin(tmp_path / "system" / "bin", {"python3": FAKE_PYTHON, "python": FAKE_PYTHON})
    repo, lines = run_ci(tmp_path, {"FAKE_BASE_PREFIX": str(tmp_path / "system")}, [system])
    assert (repo / ".venv" / "bin" / "python").is_file()
    calls = python_calls(lines)
    assert (str(system / "python3"), "-m venv .venv") in calls
    venv_python = str(repo / ".venv" / "bin" / "python")
    check_steps(calls, venv_python)
    system_calls = [args for program, args in calls if program.startswith(str(system))]
    assert not any("pip install" in args or "pytest" in args for args in system_calls), system_calls
    apt = [line for line in lines if line.startswith("apt-get install")]
    assert apt and all(p in apt[0].split() for p in ("prometheus", "nginx", "chromium", "chromium-driver"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_inside_a_venv_it_uses_that_one(tmp_path):
    venv = fake_bin(tmp_path / "active-venv" / "bin", {"python3": FAKE_PYTHON, "python": FAKE_PYTHON})
    repo, lines = run_ci(tmp_path, {"VIRTUAL_ENV": str(venv.parent), "FAKE_BASE_PREFIX": "/usr"}, [venv])
    assert not (repo / ".venv").exists()
    calls = python_calls(lines)
    assert not any("-m venv" in args for _, args in calls)
    check_steps(calls, str(venv / "python"))


def test_dot_venv_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs git and a checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", ".venv/bin/python"], cwd=REPO_ROOT)
    assert ignored.returncode == 0
