"""Recipes under `torchrun --nproc_per_node=2` (gloo on CPU): the same artifact layout as one
process, and a search whose candidates are split across the ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

from compress.io import read_json
from compress.models import load_model
from tests.conftest import search_recipe_for, write_recipe


def _torchrun(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "compress",
        "run",
        str(recipe),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_torchrun_two_processes_distill(tmp_path, small_recipe):
    small_recipe["stages"] = [{"type": "distill", "epochs": 1}, {"type": "eval"}]
    out = tmp_path / "out"
    result = _torchrun(write_recipe(tmp_path / "r.yaml", small_recipe), out)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["00-distill", "01-eval", "teacher"]
    assert (out / "00-distill" / "model.safetensors").is_file()
    log = (out / "00-distill" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 1  # one line per epoch, written by rank 0 only
    report = read_json(out / "report.json")
    assert report["status"] == "complete"
    assert {m["name"] for m in report["models"]} == {"teacher", "student", "00-distill"}


def test_torchrun_search_splits_candidates_across_ranks(tmp_path, cifar_root, resnet20_weights):
    search = {
        "mode": "removal",
        "updates": 1,
        "rollouts": 4,
        "candidate_steps": 2,
        "candidate_batch_size": 32,
        "candidate_images": 100,
        "val_images": 60,
    }
    recipe = search_recipe_for(cifar_root, resnet20_weights, 30, search)
    out = tmp_path / "out"
    result = _torchrun(write_recipe(tmp_path / "r.yaml", recipe), out)
    assert result.returncode == 0, result.stderr[-3000:]
    stage = out / "00-search"
    history = [json.loads(line) for line in (stage / "history.jsonl").read_text().splitlines()]
    assert len({h["key"] for h in history}) == len(history) >= 2  # each evaluated once
    assert {h["rank"] for h in history} == {0, 1}  # by one rank or the other
    best = max((h for h in history if not h["violates"]), key=lambda h: h["reward_raw"])
    assert read_json(stage / "best_candidate.json")["key"] == best["key"]
    assert not list(stage.glob("best_candidate.rank*"))
    model, spec = load_model(stage / "model.safetensors")
    assert spec.name == "search:cifar_resnet20"
    assert set(best["removed"]) == {
        name for name, m in model.named_modules() if type(m).__name__ == "Identity" and name
    } - {n for n, m in model.named_modules() if n.endswith("shortcut")}
