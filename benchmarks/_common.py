"""Shared bits of the benchmark scripts: where the shared data is, and how results are saved."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESS_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "benchmarks" / "results"


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"{path} not found: set COMPRESS_SHARED to the folder holding data/ and weights/")
    return path


def save(name: str, result: dict) -> None:
    """Write results/NAME.json and print the result as the last line of stdout."""
    from compress.io import write_json

    write_json(RESULTS / f"{name}.json", result)
    print(json.dumps(result))


def add_search_mode(parser: argparse.ArgumentParser, help: str) -> None:
    """`--mode`: one of the search stage's modes, as its recipe schema lists them."""
    from compress.stages.search import SearchStage

    modes = typing.get_args(SearchStage.model_fields["mode"].annotation)
    parser.add_argument("--mode", choices=modes, default="sequential", help=help)
