"""The same recipe under `torchrun --nproc_per_node=2` (gloo on CPU) gives the same artifact layout."""

import subprocess
import sys

from compress.io import read_json
from tests.conftest import write_recipe


def test_torchrun_two_processes_distill(tmp_path, small_recipe):
    small_recipe["stages"] = [{"type": "distill", "epochs": 1}, {"type": "eval"}]
    path = write_recipe(tmp_path / "r.yaml", small_recipe)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "compress",
        "run",
        str(path),
        "--out",
        str(out),
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["00-distill", "01-eval", "teacher"]
    assert (out / "00-distill" / "model.safetensors").is_file()
    log = (out / "00-distill" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 1  # one line per epoch, written by rank 0 only
    report = read_json(out / "report.json")
    assert report["status"] == "complete"
    assert {m["name"] for m in report["models"]} == {"teacher", "student", "00-distill"}
