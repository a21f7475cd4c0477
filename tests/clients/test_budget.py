"""`eventful-budget`: request bodies, replica discovery, and what it reports when a replica does not answer.
The fan-out against real replicas runs in tests/deploy/test_scale_out.py."""

from __future__ import annotations

import pytest

from bench.live_server import free_port
from clients.budget import base_url, budget_body, main, resolve_replicas


def test_budget_bodies_follow_the_protocol():
    assert budget_body("fixed", tokens=50) == {"mode": "fixed", "tokens": 50}
    assert budget_body("fixed", fraction=0.25) == {"mode": "fixed", "fraction": 0.25}
    assert budget_body("auto", target_latency_ms=40) == {"mode": "auto", "target_latency_ms": 40}
    with pytest.raises(ValueError, match="exactly one"):
        budget_body("fixed", tokens=5, fraction=0.5)
    with pytest.raises(ValueError, match="target_latency_ms"):
        budget_body("auto")


def test_replicas_come_from_a_list_or_from_every_address_of_a_name():
    assert base_url("10.0.0.5:8000/") == "http://10.0.0.5:8000"
    assert base_url("https://a.example:443") == "https://a.example:443"
    assert "http://127.0.0.1:8123" in resolve_replicas("localhost:8123")
    with pytest.raises(ValueError, match="HOST:PORT"):
        resolve_replicas("eventful-headless")


def test_a_replica_that_does_not_answer_fails_the_command(capsys):
    dead = f"127.0.0.1:{free_port()}"
    assert main(["--replicas", dead, "--timeout", "2", "fixed", "--tokens", "10"]) == 1
    out = capsys.readouterr().out
    assert f"http://{dead}  FAILED" in out and "0/1 replicas set" in out
    assert main(["--dns", "no-port-here", "show"]) == 2
