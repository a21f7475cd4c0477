"""A real `eventful-serve` (the console command's module) on 127.0.0.1 and a free port, for benchmarks and tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, port: int | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> Iterator[str]:
    """Start `python -m server.cli ARGS --host 127.0.0.1 --port N`; yield its base URL once /readyz says ready.

    EVENTFUL_* variables of the caller are not inherited (only `env`). `on_start` gets the process (e.g. to kill
    it in a test). The server is stopped on exit; an exit while in use raises with its log."""
    port = port or free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVENTFUL_")}
    # the repository first, then whatever the caller's PYTHONPATH holds (packages installed to a folder of their own)
    python_path = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    environment.update(PYTHONPATH=os.pathsep.join(python_path), **(env or {}))
    command = [sys.executable, "-m", "server.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        if on_start is not None:
            on_start(process)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            with httpx.Client(trust_env=False, timeout=5) as http:
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
                    with contextlib.suppress(httpx.TransportError):
                        if http.get(f"{base}/readyz").status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"server not ready in {START_TIMEOUT_S} s:\n{log_path.read_text()}")
                    time.sleep(0.1)
            yield base
            if process.poll() is not None:
                raise RuntimeError(f"the server died:\n{log_path.read_text()}")
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
