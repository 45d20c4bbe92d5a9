"""report.md's tables and each stage type's section, and the run-folder reader, from a report.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.errors import InputError
from compress.report import RunReport, render, render_markdown
from compress.runs import RunFolder


def _latency(batch: int, p50: float) -> dict:
    return {
        "backend": "onnxruntime",
        "batch_size": batch,
        "threads": 2,
        "p50_ms": p50,
        "p90_ms": p50 * 1.1,
        "p99_ms": p50 * 1.2,
        "mean_ms": p50 * 1.05,
        "std_ms": 0.01,
        "throughput_ips": batch * 1e3 / p50,
    }


def report_json() -> dict:
    teacher = {
        "name": "teacher",
        "role": "teacher",
        "top1": 93.0,
        "top5": 99.8,
        "params": 855_770,
        "size_bytes": 3_500_000,
        "flops": 254_000_000,
        "latency_ms": 4.0,
        "latency": [_latency(1, 4.0)],
    }
    student = {"name": "student", "role": "input", "params": 272_474, "flops": 82_000_000}
    distilled = {
        "name": "00-distill",
        "role": "stage",
        "top1": 91.5,
        "top5": 99.6,
        "params": 272_474,
        "size_bytes": 1_100_000,
        "flops": 82_000_000,
        "latency_ms": 1.0,
        "latency_batch_size": 1,
        "backend": "onnxruntime",
        "onnx_max_abs_diff": 2e-6,
        "wall_time_s": 61.0,
        "latency": [_latency(1, 1.0), _latency(32, 20.0)],
    }
    quantized = {
        **{k: v for k, v in distilled.items() if k != "latency"},
        "name": "01-quantize",
        "stage": 1,
        "top1": 91.0,
        "quantization": "qat_int8",
        "int8_route": "brevitas",
        "weight_layers": 22,
        "int8_layers": 22,
        "bits": 8,
        "bits_per_weight": 8.04,
        "quantized_size_bytes": 280_000,
        "onnx_bytes": 300_000,
        "compression_ratio": 3.9,
        "int8_speedup": {"1": 1.4, "32": 1.9},
    }

    def stage(index: int, type_: str, model: str) -> dict:
        return {
            "index": index,
            "type": type_,
            "label": type_,
            "dir": f"{index:02d}-{type_}",
            "status": "done",
            "wall_time_s": 10.0 + index,
            "model": model,
            "metrics": {},
        }

    return {
        "name": "demo",
        "status": "complete",
        "started": "2026-01-01T00:00:00+00:00",
        "updated": "2026-01-01T00:10:00+00:00",
        "environment": {"python": "3.11", "gpu": None},
        "models": [teacher, student, distilled, quantized],
        "stages": [
            stage(0, "distill", "00-distill"),
            stage(1, "quantize", "01-quantize"),
            stage(2, "bench", "01-quantize"),
        ],
    }


def _table(md: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table under `## heading`."""
    lines = md.split(f"## {heading}\n", 1)[1].splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    rows = [line for line in lines[:end] if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_models_table_and_comparison_with_the_teacher(tmp_path: Path):
    md = render_markdown(report_json(), tmp_path)
    models = {row[0]: row for row in _table(md, "Models")}
    assert list(models) == ["teacher", "student", "00-distill", "01-quantize"]
    assert models["teacher"][2:5] == ["93.00", "99.80", "0.856 M"]
    assert models["00-distill"][8] == "2e-06" and models["00-distill"][9] == "61.0"
    assert models["student"][2] == "–"  # not measured
    # The last model a stage made, against the teacher: 855770 / 272474 params, 4.0 / 1.0 ms
    assert "Final model `01-quantize` against the teacher (`teacher`)" in md
    assert "- 3.14x fewer parameters" in md
    assert "- 4.00x lower p50 latency (batch 1, onnxruntime)" in md
    assert "- top-1 -2.00 points" in md


def test_bench_speedup_against_the_adapted_teacher_is_the_paired_one(tmp_path: Path):
    """The bench stage times the teacher later stages learned from (the adapted one), and its
    paired rounds, not a ratio of two medians, give the comparison."""
    report = RunReport(tmp_path, "demo", writer=False)
    report.ensure_model("teacher", role="teacher", top1=83.0, params=850_000)

    class Cfg:
        type = label = "stage"

    report.record_stage(0, Cfg, tmp_path / "00-adapt", {"teacher_model": {"top1": 88.0}}, "x")
    Cfg.type = Cfg.label = "bench"
    paired = {"1": {"median_ratio": 1.99, "reliable": True}, "32": {"median_ratio": 2.26}}
    state = {
        "metrics": {"speedup_vs_teacher": paired},
        "teacher_metrics": {"latency_ms": 1.46},
        "model_metrics": {"latency_ms": 0.73, "backend": "onnxruntime"},
        "model": {"top1": 84.3, "params": 280_000},
    }
    report.record_stage(1, Cfg, tmp_path / "01-bench", state, "01-student")
    assert "latency_ms" not in report.model("teacher")
    assert report.model("00-adapt teacher")["latency_ms"] == 1.46
    md = render_markdown(report.data, tmp_path)
    assert "against the teacher (`00-adapt teacher`)" in md
    assert "p50 in paired rounds: 1.99x at batch 1, 2.26x at batch 32 (onnxruntime)" in md
    assert "lower p50 latency" not in md


def test_each_stage_type_contributes_its_section_in_recipe_order(tmp_path: Path):
    md = render_markdown(report_json(), tmp_path)
    assert md.index("## Quantization") < md.index("## Latency") < md.index("## Stages")
    quant = _table(md, "Quantization")
    assert quant == [
        [
            "01-quantize",
            "qat_int8 (brevitas, 22/22 layers INT8)",
            "8",
            "8.040",
            "–",
            "273.4 KiB",
            "293.0 KiB",
            "3.9x",
            "1.40x (batch 1), 1.90x (batch 32)",
        ]
    ]
    latency = _table(md, "Latency")
    assert [(r[0], r[2], r[4]) for r in latency] == [
        ("teacher", "1", "4.000"),
        ("00-distill", "1", "1.000"),
        ("00-distill", "32", "20.000"),
    ]
    stages = _table(md, "Stages")
    assert [r[1] for r in stages] == ["distill (distill)", "quantize (quantize)", "bench (bench)"]


def test_a_run_without_quantize_or_bench_has_no_such_sections(tmp_path: Path):
    report = report_json()
    report["stages"] = report["stages"][:1]
    md = render_markdown(report, tmp_path)
    assert "## Quantization" not in md and "## Latency" not in md
    assert "- gpu" not in md  # environment entries without a value are left out


def test_render_writes_report_md_and_pareto_png(tmp_path: Path):
    (tmp_path / "report.json").write_text(json.dumps(report_json()))
    md, png = render(tmp_path)
    assert md.read_text().startswith("# Run `demo`")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="is .* a compress run folder"):
        render(tmp_path / "elsewhere")


def test_run_folder_finds_stages_by_type_and_label(tmp_path: Path):
    (tmp_path / "report.json").write_text(json.dumps(report_json()))
    run = RunFolder(tmp_path)
    assert run.status == "complete"
    assert run.stage(type="quantize").dir == tmp_path / "01-quantize"
    assert run.stage(label="bench").index == 2
    assert run.model(type="quantize")["top1"] == 91.0
    assert run.final_model["name"] == "01-quantize"
    with pytest.raises(InputError, match=r"no stage with type='search' \(stages: distill"):
        run.stage(type="search")
    with pytest.raises(InputError, match="saved no model"):
        run.stage(type="bench").load_model()
    with pytest.raises(InputError, match="is .* a compress run folder"):
        RunFolder(tmp_path / "missing")


def test_run_folder_final_stage_and_stage_times(tmp_path: Path):
    (tmp_path / "report.json").write_text(json.dumps(report_json()))
    run = RunFolder(tmp_path)
    assert run.final_stage is not None and run.final_stage.type == "quantize"
    assert [s.wall_time_s for s in run.stages] == [10.0, 11.0, 12.0]
