"""The `search` stage: its config is the search settings, flat under the stage; the search package
stays below the stages; and a real search on CIFAR-10 with the pretrained ResNet-20, whose files
read back as typed records and state."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import compress.search
from compress.errors import InputError
from compress.io import read_json
from compress.models import load_model
from compress.recipe import parse_recipe
from compress.search import read_history, read_search_state
from compress.search.settings import N2N_SCALES, SearchSettings
from compress.stages.search import SearchStage
from tests.conftest import run_cli, search_recipe_for, write_recipe


def test_the_stage_config_is_the_search_settings_flat_under_the_stage(tmp_path):
    assert issubclass(SearchStage, SearchSettings)
    assert list(SearchStage.model_fields) == ["type", "name", *SearchSettings.model_fields]
    assert SearchStage().scales == SearchSettings().scales == N2N_SCALES
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    recipe = {
        "name": "flat",
        "data": {"root": str(tmp_path / "data")},
        "teacher": "cifar_resnet20",
        "stages": [{"type": "search", "mode": "shrink", "updates": 3, "candidate_steps": 0}],
    }
    stage = parse_recipe(recipe).stages[0]
    assert isinstance(stage, SearchStage)
    assert (stage.mode, stage.updates, stage.candidate_steps) == ("shrink", 3, 0)
    dumped = stage.model_dump()
    assert list(dumped)[:2] == ["type", "name"] and "seed" not in dumped
    bad = {"stages[0].scales: every scale": {"scales": [0.5, 1.5]}, "stages[0].seed": {"seed": 3}}
    for message, fields in bad.items():
        with pytest.raises(InputError, match=re.escape(message)):
            parse_recipe({**recipe, "stages": [{"type": "search", **fields}]})


def test_the_search_package_does_not_import_the_stages():
    for path in Path(compress.search.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("compress.stages") for n in names), path.name


def test_search_stage_finds_a_smaller_student_on_cifar(tmp_path, cifar_root, resnet20_weights):
    search = {
        "updates": 1,
        "rollouts": 3,
        "candidate_steps": 4,
        "candidate_batch_size": 32,
        "candidate_images": 200,
        "val_images": 100,
        "max_params": 250000,
    }
    recipe = search_recipe_for(cifar_root, resnet20_weights, 40, search)
    recipe["stages"].append({"type": "distill", "epochs": 1, "lr": 0.002, "max_steps_per_epoch": 2})
    path = write_recipe(tmp_path / "search.yaml", recipe)
    out = tmp_path / "run"
    result = run_cli("run", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    stage = out / "00-search"
    history = read_history(stage)
    assert 2 <= len(history) <= 6  # 2 phases x 1 update x 3 rollouts, repeats evaluated once
    assert len({h.key for h in history}) == len(history)
    assert {"removal", "shrink"} == {h.phase for h in history}
    report = read_json(out / "report.json")
    metrics = next(s for s in report["stages"] if s["type"] == "search")["metrics"]
    models = {m["name"]: m for m in report["models"]}
    assert models["00-search"]["params"] == metrics["best_params"] <= 250000
    assert models["00-search"]["params"] < models["teacher"]["params"]
    best = max((h for h in history if not h.violates), key=lambda h: h.reward_raw)
    assert metrics["best_reward"] == best.reward_raw > 0
    assert metrics["best_candidate"] == {"removed": best.removed, "scales": best.scales}
    assert metrics["teacher_val_top1"] > 60  # the pretrained ResNet-20 on held-out train images
    assert best.val_top1 > 20  # far above chance (10%) after a few KD steps
    assert best.train_images == metrics["candidate_train_images"] == 4 * 32
    state = read_search_state(stage)
    assert (state.phase_index, state.update) == (2, 0)  # both phases finished
    removal = [h for h in history if h.phase == "removal" and h.valid]
    assert state.stage1.key == max(removal, key=lambda h: h.reward_raw).key
    assert all(set(h.removed) == set(state.stage1.removed) for h in history if h.phase == "shrink")
    student, spec = load_model(out / "01-distill" / "model.safetensors")
    assert spec.name == "search:cifar_resnet20"
    assert (stage / "policy.pt").is_file()
    assert not list(stage.glob("best_candidate.rank*"))  # each rank's kept weights cleaned up
