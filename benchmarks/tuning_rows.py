"""Shared by the tuning scripts: `--config` override strings in, JSON rows out."""

from __future__ import annotations

import json
from typing import Any


def parse_overrides(spec: str) -> dict[str, Any]:
    """'distill.lr_coef=0.01;data.n_calib=64' -> {'distill.lr_coef': 0.01, 'data.n_calib': 64}."""
    return {k: json.loads(v) for k, v in (s.split("=", 1) for s in spec.split(";") if s)}


def emit_row(row: dict[str, Any], path: str) -> None:
    """Print one result row and append it to the JSON-lines file at `path`."""
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
