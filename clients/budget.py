"""`eventful-budget`: set (or show) the global budget on every replica of a scaled-out deployment.

`PUT /v1/budget` changes one server. Behind a load balancer a request reaches one replica, so a global setting
goes to each replica directly: from a list (`--replicas`) or from DNS (`--dns HOST:PORT`: every address the name
resolves to, e.g. a Kubernetes headless Service with one A record per ready pod). Speaks HTTP only (stdlib).

    eventful-budget --replicas 127.0.0.1:8001,127.0.0.1:8002 fixed --tokens 50
    eventful-budget --dns eventful-headless:8000 auto --target-latency-ms 40
    eventful-budget --dns eventful-headless:8000 show
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReplicaAnswer:
    """What one replica said: its budget after the call, or why the call failed."""

    replica: str  # base URL, http://host:port
    budget: dict[str, Any] | None  # the /v1/budget response body
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def base_url(replica: str) -> str:
    """'host:port' or 'http://host:port[/]' -> 'http://host:port'."""
    replica = replica.strip().rstrip("/")
    return replica if "://" in replica else f"http://{replica}"


def resolve_replicas(dns_name: str) -> list[str]:
    """'name:port' -> a base URL per distinct address the name resolves to (sorted, IPv6 in brackets)."""
    host, sep, port = dns_name.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--dns needs HOST:PORT, got {dns_name!r}")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    addresses = sorted({info[4][0] for info in infos})
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]


def budget_body(mode: str, tokens: int | None = None, fraction: float | None = None,
                target_latency_ms: float | None = None) -> dict[str, Any]:
    """The PUT /v1/budget body (docs/protocol.md)."""
    if mode == "fixed":
        if (tokens is None) == (fraction is None):
            raise ValueError("fixed mode needs exactly one of tokens or fraction")
        return {"mode": "fixed", "tokens": tokens} if tokens is not None else {"mode": "fixed", "fraction": fraction}
    if mode == "auto":
        if target_latency_ms is None:
            raise ValueError("auto mode needs target_latency_ms")
        return {"mode": "auto", "target_latency_ms": target_latency_ms}
    raise ValueError(f"mode must be 'fixed' or 'auto', got {mode!r}")


def call_replica(replica: str, body: dict[str, Any] | None, api_key: str | None, timeout_s: float) -> ReplicaAnswer:
    """PUT `body` to /v1/budget (GET when body is None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{replica}/v1/budget", data=data, method="GET" if body is None else "PUT")
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # replicas are direct, never proxied
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return ReplicaAnswer(replica, json.loads(response.read()))
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        return ReplicaAnswer(replica, None, f"HTTP {err.code}: {detail}")
    except (OSError, ValueError) as err:
        return ReplicaAnswer(replica, None, f"{type(err).__name__}: {err}")


def set_budget_everywhere(replicas: list[str], body: dict[str, Any] | None, api_key: str | None = None,
                          timeout_s: float = 5.0) -> list[ReplicaAnswer]:
    """Call every replica concurrently; one answer per replica, in the order given."""
    urls = [base_url(r) for r in replicas]
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(urls))) as pool:
        return list(pool.map(lambda url: call_replica(url, body, api_key, timeout_s), urls))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventful-budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--replicas", type=lambda v: [r for r in v.split(",") if r.strip()], metavar="A,B,...",
                       help="comma-separated replica addresses (host:port) or base URLs")
    where.add_argument("--dns", metavar="HOST:PORT", help="a name with one address per replica (headless Service)")
    parser.add_argument("--api-key", help="API key (default: EVENTFUL_API_KEY)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per replica")
    modes = parser.add_subparsers(dest="mode", required=True)
    fixed = modes.add_parser("fixed", help="a fixed budget on every replica")
    amount = fixed.add_mutually_exclusive_group(required=True)
    amount.add_argument("--tokens", type=int, help="patch tokens per gate")
    amount.add_argument("--fraction", type=float, help="fraction of the patch tokens")
    auto = modes.add_parser("auto", help="each replica's controller holds this latency target")
    auto.add_argument("--target-latency-ms", type=float, required=True)
    modes.add_parser("show", help="print every replica's budget, change nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every replica answered, 1 when one failed, 2 for bad arguments or no replica found."""
    args = build_parser().parse_args(argv)
    try:
        replicas = args.replicas or resolve_replicas(args.dns)
        body = None if args.mode == "show" else budget_body(
            args.mode, tokens=getattr(args, "tokens", None), fraction=getattr(args, "fraction", None),
            target_latency_ms=getattr(args, "target_latency_ms", None),
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not replicas:
        print("error: no replica found", file=sys.stderr)
        return 2
    answers = set_budget_everywhere(replicas, body, args.api_key or os.environ.get("EVENTFUL_API_KEY"), args.timeout)
    for answer in answers:
        if answer.ok:
            b = answer.budget
            print(f"{answer.replica}  ok  mode={b.get('mode')} effective_tokens={b.get('effective_tokens')} "
                  f"target_latency_ms={b.get('target_latency_ms')}")
        else:
            print(f"{answer.replica}  FAILED  {answer.error}")
    failed = sum(not a.ok for a in answers)
    print(f"{len(answers) - failed}/{len(answers)} replicas {'set' if body else 'answered'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
