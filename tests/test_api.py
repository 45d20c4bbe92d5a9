"""The Python API: the documented example runs as written, and names resolve lazily."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import compress
from tests.conftest import CIFAR, REPO, WEIGHTS


def test_every_public_name_resolves():
    for name in compress.__all__:
        assert getattr(compress, name) is not None, name
    assert callable(compress.run) and callable(compress.bench)


def test_import_compress_does_not_load_torch():
    code = "import sys, compress; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_documented_example_runs(tmp_path: Path, cifar_root, resnet56_weights):
    text = (REPO / "docs" / "api.md").read_text()
    code = re.search(r"## Example\n.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "recipes").mkdir()
    shutil.copy(REPO / "recipes" / "quickstart.yaml", tmp_path / "recipes")
    env = {**os.environ, "COMPRESS_DATA": str(CIFAR), "COMPRESS_WEIGHTS": str(WEIGHTS)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    printed = ("zero weights:", "student top-1:", "batch ")
    lines = [line for line in out.stdout.splitlines() if line.startswith(printed)]
    assert lines[0].startswith("zero weights: ") and float(lines[0].split()[-1]) < 0.01
    assert 10 < float(lines[1].split()[-1]) <= 100  # 10 classes: better than chance
    assert [line.split(":")[0] for line in lines[2:]] == ["batch 1", "batch 8"]
    run = compress.RunFolder(tmp_path / "runs" / "api-example")
    assert [s.type for s in run.stages] == ["eval", "distill", "sparsity", "export", "bench"]
    assert (tmp_path / "runs" / "api-example" / "student.onnx").is_file()
