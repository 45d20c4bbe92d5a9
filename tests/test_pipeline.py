"""`compress run` end to end: artifacts, resume after a kill, --fresh, report, export parity, bench."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from compress.io import read_json
from tests.conftest import run_cli, small_recipe_for, write_recipe

BENCH_FIELDS = {
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "throughput_ips",
    "batch_size",
    "threads",
    "backend",
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_root, resnet56_weights):
    tmp = tmp_path_factory.mktemp("run")
    recipe = small_recipe_for(cifar_root, resnet56_weights)
    recipe["stages"] = recipe["stages"][1:]  # distill, export, bench
    recipe["stages"][0]["epochs"] = 1
    recipe["stages"].insert(1, {"type": "eval"})
    path = write_recipe(tmp / "r.yaml", recipe)
    result = run_cli("run", str(path), "--out", str(tmp / "out"))
    assert result.returncode == 0, result.stderr
    return tmp / "out"


def test_run_writes_one_folder_per_stage_and_a_report(finished_run):
    names = sorted(p.name for p in finished_run.iterdir() if p.is_dir())
    assert names == ["00-distill", "01-eval", "02-export", "03-bench", "teacher"]
    assert (finished_run / "00-distill" / "model.safetensors").is_file()
    assert (finished_run / "00-distill" / "metrics.jsonl").is_file()
    assert not (finished_run / "00-distill" / "checkpoint.pt").exists()
    assert (finished_run / "recipe.yaml").is_file()
    report = read_json(finished_run / "report.json")
    assert report["status"] == "complete"
    models = {m["name"]: m for m in report["models"]}
    for name in ("teacher", "00-distill"):
        m = models[name]
        for key in ("params", "size_bytes", "flops", "top1", "top5", "latency_ms", "latency"):
            assert m.get(key) is not None, (name, key)
    assert models["teacher"]["params"] > models["00-distill"]["params"]
    assert models["00-distill"]["onnx_max_abs_diff"] < 1e-3
    assert report["environment"]["onnxruntime"] and report["environment"]["torch"]
    assert all(s["wall_time_s"] is not None for s in report["stages"])
    assert (finished_run / "report.md").read_text().count("| teacher |") >= 1
    assert (finished_run / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_report_command_renders_again(finished_run):
    (finished_run / "report.md").unlink()
    result = run_cli("report", str(finished_run))
    assert result.returncode == 0, result.stderr
    assert "00-distill" in (finished_run / "report.md").read_text()


def test_saved_student_evaluates_and_exports_from_the_cli(finished_run, cifar_root, tmp_path):
    model = finished_run / "00-distill" / "model.safetensors"
    result = run_cli(
        "eval", str(model), "--data", str(cifar_root), "--limit-per-class", "10", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["n"] == 100 and {"top1", "top5"} <= out.keys()
    models = {m["name"]: m for m in read_json(finished_run / "report.json")["models"]}
    assert abs(out["top1"] - models["00-distill"]["top1"]) < 1e-6  # the same 100 test images

    onnx = tmp_path / "m.onnx"
    result = run_cli("export", str(model), "--format", "onnx", "--out", str(onnx))
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "bench",
        str(onnx),
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--json",
        "--min-iters",
        "5",
        "--min-duration",
        "0",
        "--repeats",
        "2",
    )
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    assert bench.keys() >= BENCH_FIELDS
    assert (
        bench["threads"] == 1
        and bench["batch_size"] == 2
        and bench["p99_ms"] >= bench["p50_ms"] > 0
    )


def test_killed_run_resumes_and_fresh_starts_over(tmp_path, small_recipe):
    small_recipe["stages"][1]["epochs"] = 4
    small_recipe["data"]["limit_per_class"] = 60
    path = write_recipe(tmp_path / "r.yaml", small_recipe)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "compress", "run", str(path), "--out", str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = out / "01-distill" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no epoch checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_json(out / "00-eval-initial" / "stage.json")["status"] == "done"
    assert read_json(out / "01-distill" / "stage.json")["status"] == "running"

    result = run_cli("run", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "[0] eval-initial: done earlier, skipped" in result.stdout
    assert "resuming after epoch" in result.stdout + result.stderr
    log = (out / "01-distill" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in log]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    metrics = read_json(out / "01-distill" / "stage.json")["metrics"]
    # the killed attempt's epochs count towards the training time
    assert metrics["train_time_s"] == pytest.approx(sum(e["epoch_time_s"] for e in epochs))

    result = run_cli("run", str(path), "--out", str(out))
    assert result.stdout.count("done earlier, skipped") == 4

    result = run_cli("run", str(path), "--out", str(out), "--set", "stages.3.batch_sizes=[2]")
    assert result.stdout.count("done earlier, skipped") == 3  # only the changed stage re-runs

    result = run_cli("run", str(path), "--out", str(out), "--fresh")
    assert result.returncode == 0, result.stderr
    assert "skipped" not in result.stdout


def test_run_refuses_a_folder_it_did_not_make(tmp_path, small_recipe):
    path = write_recipe(tmp_path / "r.yaml", small_recipe)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    result = run_cli("run", str(path), "--out", str(tmp_path / "mine"), "--fresh")
    assert result.returncode == 2 and "not a compress run" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_each_run_log_holds_only_its_own_runs_lines(tmp_path):
    from compress.log import logger, setup_logging

    first, second = tmp_path / "a" / "run.log", tmp_path / "b" / "run.log"
    first.parent.mkdir(), second.parent.mkdir()
    setup_logging(first)
    logger.info("first run's line")
    setup_logging(second)  # the next run in the same process (as a benchmark script runs them)
    logger.info("second run's line")
    assert "second run's line" not in first.read_text()
    assert "first run's line" in first.read_text()
    assert "second run's line" in second.read_text()


def test_run_keys_follow_file_contents_not_timestamps(tmp_path, small_recipe, resnet56_weights):
    import shutil

    import torch

    weights = tmp_path / "teacher.th"
    shutil.copy(resnet56_weights, weights)
    small_recipe["teacher"]["weights"] = str(weights)
    small_recipe["stages"] = small_recipe["stages"][:1]  # eval only: a few seconds
    path = write_recipe(tmp_path / "r.yaml", small_recipe)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--out", str(out)).returncode == 0

    os.utime(weights, (1_000_000, 1_000_000))  # a copy or a remount: same bytes, new mtime
    result = run_cli("run", str(path), "--out", str(out))
    assert "[0] eval-initial: done earlier, skipped" in result.stdout, result.stdout

    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["module.linear.bias"] += 1.0  # a replaced file: new bytes
    torch.save(checkpoint, weights)
    result = run_cli("run", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "skipped" not in result.stdout and "teacher: measuring" in result.stdout + result.stderr
