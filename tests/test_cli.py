"""Each command's output and exit codes: 0 done, 2 bad input (one message), 1 failed, 130 interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress import cli
from compress.errors import StageFailed
from tests.conftest import write_recipe
from tests.test_report import report_json


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _recipe(data: Path, **changes) -> dict:
    recipe = {
        "name": "cli",
        "data": {"root": str(data), "batch_size": 8},
        "student": "cifar_resnet20",
        "stages": [{"type": "train", "epochs": 1}],
    }
    recipe.update(changes)
    return recipe


def test_validate_prints_the_resolved_recipe(capsys, tmp_path, tiny_image_folder):
    path = write_recipe(tmp_path / "r.yaml", _recipe(tiny_image_folder))
    code, out, err = _main(capsys, "validate", str(path), "--set", "stages.0.epochs=3")
    assert code == 0
    assert "epochs: 3" in out and "valid (1 stages)" in err


def test_bad_recipes_exit_2_with_one_message(capsys, tmp_path, tiny_image_folder):
    bad = write_recipe(tmp_path / "bad.yaml", _recipe(tiny_image_folder, stages=[{"type": "nope"}]))
    for command in ("validate", "run"):
        code, out, err = _main(capsys, command, str(bad))
        assert code == 2 and "unknown stage type 'nope'" in err and "Traceback" not in err
    code, _, err = _main(capsys, "run", str(tmp_path / "missing.yaml"))
    assert code == 2 and "recipe file not found" in err
    code, _, err = _main(capsys, "validate", str(bad), "--set", "nokey")
    assert code == 2 and "expected KEY=VALUE" in err


def test_usage_errors_exit_2(capsys):
    assert _main(capsys, "frobnicate")[0] == 2
    code, _, err = _main(capsys, "eval")
    assert code == 2 and "required" in err


def test_eval_prints_accuracy_as_json(capsys, tiny_image_folder):
    code, out, _ = _main(
        capsys, "eval", "cifar_resnet20", "--data", str(tiny_image_folder), "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["model"] == "cifar_resnet20" and result["n"] > 0 and 0 <= result["top1"] <= 100
    code, _, err = _main(capsys, "eval", "cifar_resnet20", "--data", "/no/such/dir")
    assert code == 2 and "data.root: data folder not found" in err
    code, _, err = _main(capsys, "eval", "timm:not_a_model", "--data", str(tiny_image_folder))
    assert code == 2 and "unknown timm model" in err


def test_export_then_bench(capsys, tmp_path):
    onnx = tmp_path / "m.onnx"
    code, out, _ = _main(
        capsys, "export", "cifar_resnet20", "--out", str(onnx), "--num-classes", "4"
    )
    assert code == 0 and onnx.is_file() and "max |onnxruntime - torch|" in out
    args = ["bench", str(onnx), "--json", "--batch-size", "1,2", "--min-iters", "5"]
    code, out, _ = _main(capsys, *args, "--min-duration-s", "0.05", "--warmup", "1")
    assert code == 0
    results = json.loads(out)["results"]
    assert [r["batch_size"] for r in results] == [1, 2] and all(r["p50_ms"] > 0 for r in results)
    code, _, err = _main(capsys, "bench", str(tmp_path / "none.onnx"))
    assert code == 2 and "none.onnx" in err
    code, _, err = _main(capsys, "export", "nope", "--out", str(onnx))
    assert code == 2 and "unknown model 'nope'" in err


def test_report_renders_a_run_folder(capsys, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(report_json()))
    code, out, _ = _main(capsys, "report", str(tmp_path))
    assert code == 0 and (tmp_path / "report.md").is_file() and "wrote" in out
    code, _, err = _main(capsys, "report", str(tmp_path / "nothing"))
    assert code == 2 and "compress run folder" in err


def test_failure_and_interrupt_exit_codes(capsys, monkeypatch):
    def fails(args):
        raise StageFailed("stages[0] (train): diverged")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "report", fails)
    code, _, err = _main(capsys, "report", "x")
    assert code == 1 and "failed: stages[0] (train): diverged" in err
    monkeypatch.setitem(cli.COMMANDS, "report", interrupted)
    code, _, err = _main(capsys, "report", "x")
    assert code == 130 and "resume" in err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: compress " + command in capsys.readouterr().out
