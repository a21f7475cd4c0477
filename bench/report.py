"""Writing a benchmark report: a dataclass or a dict, as indented JSON (folders created)."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


def write_json(report: Any, path: str | Path) -> None:
    data = asdict(report) if is_dataclass(report) else report
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
