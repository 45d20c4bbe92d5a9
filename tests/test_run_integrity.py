"""A run folder stays whole: one writer at a time, artifacts found in the run folder only, a NaN
model never reported complete, strict JSON, signals and unwritable folders handled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.cli import main
from compress.io import read_json, write_json
from tests.conftest import REPO, write_recipe

BENCH = {"type": "bench", "batch_sizes": [1], "min_iters": 3, "min_duration_s": 0, "warmup": 1}


def _recipe(data: Path, *stages: dict, name: str = "integrity") -> dict:
    return {
        "name": name,
        "data": {"root": str(data), "augment": "none", "batch_size": 16},
        "student": "cifar_resnet20",
        "stages": list(stages) or [{"type": "eval"}],
    }


def _run(capsys, recipe_path: Path, out: Path | str, *extra: str) -> tuple[int, str]:
    code = main(["run", str(recipe_path), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# ------------------------------------------------------------------ one writer per run folder


def test_a_second_run_into_a_locked_folder_exits_2_and_a_stale_lock_is_taken_over(
    tmp_path, capsys, tiny_image_folder
):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_image_folder))
    assert _run(capsys, recipe, out)[0] == 0
    (out / "00-eval" / "precious.txt").write_text("the first run's")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from compress.run_lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        changed = write_recipe(
            tmp_path / "changed.yaml", _recipe(tiny_image_folder, {"type": "eval", "name": "x"})
        )
        code, output = _run(capsys, changed, out, "--fresh")
        assert code == 2, output
        assert (
            f"--out {out}: another compress run is writing this folder (pid {holder.pid}" in output
        )
        assert "Traceback" not in output
        assert (out / "00-eval" / "precious.txt").exists()  # nothing of the live run was touched
    finally:
        holder.kill()  # killed: its lock file stays behind, naming a process that is gone
        holder.wait()
    assert str(holder.pid) in (out / ".lock").read_text()
    code, output = _run(capsys, recipe, out)
    assert code == 0, output
    assert f"took over the lock left by pid {holder.pid}" in output
    assert not (out / ".lock").exists()  # released when the run ends


# ------------------------------------------------------------------ artifacts and resumes


def test_a_resume_from_another_directory_uses_its_own_run_not_a_same_named_one(
    tmp_path, capsys, tiny_image_folder, monkeypatch
):
    recipe = write_recipe(
        tmp_path / "r.yaml", _recipe(tiny_image_folder, {"type": "export"}, BENCH)
    )
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    assert _run(capsys, recipe, "run")[0] == 0
    state = read_json(first / "run" / "00-export" / "stage.json")
    assert state["artifacts"] == {"onnx": "00-export/model.onnx"}

    # Beside the second directory, a same-named run whose ONNX file is garbage.
    shutil.copytree(first / "run", second / "run")
    (second / "run" / "00-export" / "model.onnx").write_bytes(b"not an onnx model")
    (first / "run" / "01-bench" / "stage.json").unlink()  # the bench stage runs again
    monkeypatch.chdir(second)
    code, output = _run(capsys, recipe, first / "run")
    assert code == 0, output
    assert "[0] export: done earlier, skipped" in output
    assert read_json(first / "run" / "01-bench" / "stage.json")["status"] == "done"


def test_a_finished_stage_whose_files_are_gone_runs_again(tmp_path, capsys, tiny_image_folder):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_image_folder, {"type": "export"}))
    out = tmp_path / "out"
    assert _run(capsys, recipe, out)[0] == 0
    (out / "00-export" / "model.onnx").unlink()
    (out / "00-export" / ".stage.json.x1y2.tmp").write_text("{")  # left by a killed write
    (out / "00-export" / "stage.json").write_text('{"status": "do')  # damaged by a full disk
    code, output = _run(capsys, recipe, out)
    assert code == 0, output
    assert "skipped" not in output
    assert (out / "00-export" / "model.onnx").is_file()
    assert not list(out.rglob(".*.tmp"))


def test_fresh_through_a_symlink_clears_the_run_it_points_to(tmp_path, capsys, tiny_image_folder):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_image_folder))
    assert _run(capsys, recipe, tmp_path / "out")[0] == 0
    (tmp_path / "link").symlink_to(tmp_path / "out")
    code, output = _run(capsys, recipe, tmp_path / "link", "--fresh")
    assert code == 0, output
    assert "skipped" not in output and (tmp_path / "link").is_symlink()


# ------------------------------------------------------------------ a broken model is never complete


def test_a_diverging_run_stops_with_the_epoch_and_step_and_strict_json(
    tmp_path, capsys, tiny_image_folder
):
    train = {"type": "train", "epochs": 2, "lr": 1e30, "momentum": 0}
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_image_folder, train))
    code, output = _run(capsys, recipe, tmp_path / "out")
    assert code == 1, output
    assert "failed: train: the loss is nan at epoch 1, step" in output or (
        "the loss is inf at epoch 1, step" in output
    ), output
    report = _strict_json(tmp_path / "out" / "report.json")
    assert report["status"] == "failed"


def test_the_parity_gate_fails_on_a_model_with_non_finite_logits(
    tmp_path, capsys, tiny_image_folder
):
    import torch

    from compress.models import create_model, save_model

    model, spec = create_model("cifar_resnet20", num_classes=4)
    with torch.no_grad():
        model.linear.weight.fill_(float("nan"))
    broken = save_model(model, spec, tmp_path / "broken.safetensors")
    raw = _recipe(tiny_image_folder, {"type": "export"})
    raw["student"] = str(broken)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code, output = _run(capsys, recipe, tmp_path / "out")
    assert code == 1, output
    assert "the PyTorch model's logits are not finite" in output
    report = _strict_json(tmp_path / "out" / "report.json")
    assert report["status"] == "failed"


def test_report_json_is_strict_json_naming_each_non_finite_value(tmp_path):
    from compress.report import RunReport

    report = RunReport(tmp_path, "x")
    report.ensure_model("student", role="input", top1=float("nan"), latency_ms=float("inf"))
    report.write()
    data = _strict_json(tmp_path / "report.json")
    assert data["models"][0]["top1"] is None
    assert data["non_finite"] == [
        "models[0].top1: nan (written as null)",
        "models[0].latency_ms: inf (written as null)",
    ]


def test_complete_is_written_after_report_md_and_the_plot(
    tmp_path, capsys, tiny_image_folder, monkeypatch
):
    from compress.report import RunReport

    def killed(self):
        raise KeyboardInterrupt  # as if killed while rendering

    monkeypatch.setattr(RunReport, "render", killed)
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_image_folder))
    assert _run(capsys, recipe, tmp_path / "out")[0] == 130
    assert read_json(tmp_path / "out" / "report.json")["status"] != "complete"


def test_sigterm_marks_the_run_failed_and_exits_143(tmp_path, tiny_image_folder):
    train = {"type": "train", "epochs": 1000, "lr": 0.01}
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_image_folder, train))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "compress", "run", str(recipe), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 120
    while not (out / "00-train" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated: finished stages and the last epoch checkpoint are kept" in err
    assert read_json(out / "report.json")["status"] == "failed"
    assert not (out / ".lock").exists()


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    write_json(tmp_path / "x.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask


# ------------------------------------------------------------------ folders that cannot be written


def test_out_that_is_a_file_is_refused(tmp_path, capsys, tiny_image_folder):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_image_folder))
    (tmp_path / "file").write_text("x")
    code, output = _run(capsys, recipe, tmp_path / "file")
    assert code == 2 and f"--out {tmp_path / 'file'}: is a file, not a folder" in output


@pytest.fixture()
def tmpfs(tmp_path):
    """Mount a small tmpfs (needs root); yields a function mounting one with options."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    from compress.log import setup_logging

    setup_logging()  # close the run log the run opened there
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_read_only_or_full_folder_is_one_message(tmp_path, capsys, tiny_image_folder, tmpfs):
    recipe = write_recipe(
        tmp_path / "r.yaml", _recipe(tiny_image_folder, {"type": "train", "epochs": 1})
    )
    read_only = tmpfs("ro,size=1m")
    code, output = _run(capsys, recipe, read_only / "run")
    assert code == 2 and "Read-only file system" in output and "Traceback" not in output, output

    full = tmpfs("size=2m")
    code, output = _run(capsys, recipe, full / "run")
    assert code == 2, output
    assert "error: cannot write" in output and "No space left on device" in output
    assert "Traceback" not in output


# ------------------------------------------------------------------ other commands


def test_export_bench_and_report_inputs_that_cannot_work(tmp_path, capsys):
    from compress.models import create_model, save_model

    model, spec = create_model("cifar_resnet20", num_classes=4)
    saved = save_model(model, spec, tmp_path / "m.safetensors")
    assert main(["export", str(saved), "--out", str(tmp_path)]) == 2
    assert "is a folder; name the ONNX file to write" in capsys.readouterr().err
    assert (
        main(["export", str(saved), "--out", str(tmp_path / "m.onnx"), "--input-size", "0,0,0"])
        == 2
    )
    assert "expected 1..64 channels and sides of 1..4096 pixels" in capsys.readouterr().err

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text('{"status": "comp')
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "report.json: not valid JSON" in err and "Traceback" not in err


def test_changed_images_re_run_and_the_report_records_class_counts(
    tmp_path, capsys, tiny_image_folder
):
    data = tmp_path / "data"
    shutil.copytree(tiny_image_folder, data)
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(data))
    out = tmp_path / "out"
    assert _run(capsys, recipe, out)[0] == 0
    report = read_json(out / "report.json")
    counts = report["data"]["class_counts"]
    assert sum(counts["test"].values()) == len(list((data / "test").glob("*/*")))
    (data / "train" / "notes.txt").write_text("not an image")  # ignored: nothing re-runs
    assert "done earlier, skipped" in _run(capsys, recipe, out)[1]

    cls = sorted(p for p in (data / "test").iterdir())[0]
    shutil.copy(next(cls.iterdir()), cls / "added.png")
    code, output = _run(capsys, recipe, out)
    assert code == 0 and "skipped" not in output, output
    assert read_json(out / "report.json")["data"]["class_counts"]["test"][cls.name] == (
        counts["test"][cls.name] + 1
    )


def test_bench_times_student_and_teacher_in_alternating_rounds(tmp_path, capsys, tiny_image_folder):
    bench = {**BENCH, "repeats": 3, "min_iters": 5}
    raw = _recipe(tiny_image_folder, {"type": "export"}, bench)
    raw["teacher"] = "cifar_resnet56"
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code, output = _run(capsys, recipe, tmp_path / "out")
    assert code == 0, output
    metrics = read_json(tmp_path / "out" / "01-bench" / "stage.json")["metrics"]
    assert metrics["results"][0]["rounds"] == metrics["teacher_results"][0]["rounds"] == 3
    paired = metrics["speedup_vs_teacher"]["1"]
    assert paired["n_pairs"] == 3 and paired["ratio_q1"] <= paired["median_ratio"]
    assert paired["median_ratio"] > 1.2, paired  # ResNet-20 against ResNet-56: ~3x less compute
