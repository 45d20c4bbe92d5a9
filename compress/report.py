"""report.json (kept current during a run), report.md (a table) and pareto.png (accuracy vs cost)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import torch

from compress.io import atomic_path, read_json_if_intact, without_non_finite, write_json, write_text
from compress.markdown import fmt, table
from compress.runs import REPORT_JSON


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def environment(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from compress import __version__
    from compress.deploy.timing import cpu_name

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "compress": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": v("torchvision"),
        "timm": v("timm"),
        "onnx": v("onnx"),
        "onnxruntime": v("onnxruntime"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


class RunReport:
    """The run's report.json: models (teacher, input, each stage's output) and stages."""

    def __init__(self, run_dir: Path, name: str, writer: bool = True):
        self.run_dir, self.writer = Path(run_dir), writer
        self.data: dict[str, Any] = {
            "name": name,
            "status": "running",
            "started": _now(),
            "updated": _now(),
            "environment": {},
            "models": [],
            "stages": [],
        }
        previous = read_json_if_intact(self.run_dir / REPORT_JSON)
        if isinstance(previous, dict):  # a resumed run keeps its first start time
            self.data["started"] = previous.get("started", self.data["started"])

    def set_environment(self, device: torch.device) -> None:
        self.data["environment"] = environment(device)

    def set_data(
        self, class_counts: dict[str, dict[str, int]], fingerprints: dict[str, str]
    ) -> None:
        """The images each split used, per class, and the splits' fingerprints (run keys)."""
        self.data["data"] = {"class_counts": class_counts, "fingerprints": fingerprints}

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.data["models"] if m["name"] == name), None)

    def ensure_model(self, name: str, **fields: Any) -> dict[str, Any]:
        entry = self.model(name)
        if entry is None:
            entry = {"name": name}
            self.data["models"].append(entry)
        entry.update(fields)
        return entry

    def record_stage(
        self, index: int, cfg: Any, stage_dir: Path, state: dict[str, Any], current: str
    ) -> None:
        self.data["stages"] = [s for s in self.data["stages"] if s["index"] != index]
        self.data["stages"].append(
            {
                "index": index,
                "type": cfg.type,
                "label": cfg.label,
                "dir": stage_dir.name,
                "status": state.get("status", "done"),
                "wall_time_s": state.get("wall_time_s"),
                "model": current,
                "metrics": state.get("metrics", {}),
            }
        )
        if "model" in state:
            self.ensure_model(
                current,
                role="stage",
                stage=index,
                **state["model"],
                wall_time_s=state.get("wall_time_s"),
            )
        if state.get("model_metrics"):
            self.ensure_model(current, **state["model_metrics"])
        if state.get("teacher_model"):  # an adapted teacher, the later stages' reference
            self.ensure_model(
                f"{stage_dir.name} teacher",
                role="teacher",
                stage=index,
                **state["teacher_model"],
                wall_time_s=state.get("wall_time_s"),
            )
        teachers = [m for m in self.data["models"] if m.get("role") == "teacher"]
        if state.get("teacher_metrics") and teachers:  # the teacher the stage used: the latest
            teachers[-1].update(state["teacher_metrics"])

    def finish(self) -> None:
        self.data["status"] = "complete"
        self.data.pop("error", None)

    def fail(self, error: str) -> None:
        self.data["status"] = "failed"
        self.data["error"] = error

    def write(self) -> None:
        """Save report.json (only in the process that writes artifacts)."""
        if not self.writer:
            return
        self.data["updated"] = _now()
        self.data.pop("non_finite", None)
        _, found = without_non_finite(self.data)
        if found:  # written as null; say which and why
            self.data["non_finite"] = [f"{f} (written as null)" for f in found]
        write_json(self.run_dir / REPORT_JSON, self.data)

    def render(self) -> tuple[Path, Path]:
        """Write report.md and pareto.png from the report in memory (before report.json says
        `complete`, so a complete run always has them)."""
        return render(self.run_dir, without_non_finite(self.data)[0])


# ---------------------------------------------------------------- rendering


COLUMNS = [
    ("model", "name", "str"),
    ("role", "role", "str"),
    ("top-1 %", "top1", "pct"),
    ("top-5 %", "top5", "pct"),
    ("params", "params", "count"),
    ("size", "size_bytes", "bytes"),
    ("FLOPs/img", "flops", "count"),
    ("latency p50 ms", "latency_ms", "ms"),
    ("ONNX max diff", "onnx_max_abs_diff", "sci"),
    ("wall s", "wall_time_s", "s"),
]


def _against_teacher(report: dict[str, Any]) -> list[str]:
    teachers = [m for m in report["models"] if m.get("role") == "teacher"]
    teacher = teachers[-1] if teachers else None  # the adapted teacher when a stage made one
    finals = [m for m in report["models"] if m.get("role") == "stage"]
    if not (teacher and finals):
        return []
    s = finals[-1]
    lines = ["", f"Final model `{s['name']}` against the teacher (`{teacher['name']}`):"]
    if teacher.get("params") and s.get("params"):
        lines.append(f"- {teacher['params'] / s['params']:.2f}x fewer parameters")
    if teacher.get("flops") and s.get("flops"):
        lines.append(f"- {teacher['flops'] / s['flops']:.2f}x fewer FLOPs per image")
    paired = next(
        (
            st["metrics"]["speedup_vs_teacher"]
            for st in reversed(report.get("stages", []))
            if st.get("model") == s["name"] and st.get("metrics", {}).get("speedup_vs_teacher")
        ),
        None,
    )
    if paired:  # the bench stage's paired rounds: the median of the per-round ratios
        faster = ", ".join(
            f"{r['median_ratio']:.2f}x at batch {b}"
            + ("" if r.get("reliable", True) else " (noisy)")
            for b, r in paired.items()
        )
        lines.append(
            f"- faster than the teacher, p50 in paired rounds: {faster} ({s.get('backend')})"
        )
    elif teacher.get("latency_ms") and s.get("latency_ms"):
        lines.append(
            f"- {teacher['latency_ms'] / s['latency_ms']:.2f}x lower p50 latency "
            f"(batch {s.get('latency_batch_size')}, {s.get('backend')})"
        )
    if teacher.get("top1") is not None and s.get("top1") is not None:
        lines.append(f"- top-1 {s['top1'] - teacher['top1']:+.2f} points")
    return lines


def stage_sections(report: dict[str, Any], run_dir: Path) -> list[str]:
    """Each stage type's own section (its `report_section`), once per type, in recipe order."""
    from compress.stages import STAGES

    lines: list[str] = []
    types = list(dict.fromkeys(s["type"] for s in report.get("stages", [])))
    for name in types:
        section = STAGES[name].report_section if name in STAGES else None
        if section is not None:
            entries = [s for s in report["stages"] if s["type"] == name]
            lines += section(report, entries, run_dir)
    return lines


def render_markdown(report: dict[str, Any], run_dir: Path | None = None) -> str:
    """report.md: the models, each stage type's section, the stages and the environment."""
    env = report.get("environment", {})
    lines = [f"# Run `{report['name']}`", ""]
    lines.append(
        f"Status: **{report.get('status')}**; started {report.get('started')}, "
        f"updated {report.get('updated')}."
    )
    lines += ["", "## Models", ""]
    lines += table(
        [c[0] for c in COLUMNS],
        ([fmt(m.get(k), kind) for _, k, kind in COLUMNS] for m in report.get("models", [])),
    )
    lines += _against_teacher(report)
    lines += [
        "",
        "Latency in milliseconds, p50 at the smallest benched batch; "
        "FLOPs by torch's flop counter (a multiply-add counts 2).",
        "",
    ]
    if run_dir is not None:
        lines += stage_sections(report, run_dir)
    lines += ["## Stages", ""]
    lines += table(
        ["#", "stage", "status", "wall s", "output model"],
        (
            [
                s["index"],
                f"{s['label']} ({s['type']})",
                s["status"],
                fmt(s.get("wall_time_s"), "s"),
                s.get("model"),
            ]
            for s in report.get("stages", [])
        ),
    )
    lines += ["", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if v is not None]
    return "\n".join(lines) + "\n"


def render_pareto(report: dict[str, Any], path: Path) -> None:
    """Top-1 against latency (if benched) and against size: one point per model, one colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in report.get("models", []) if m.get("top1") is not None]
    colours = {m["name"]: f"C{i}" for i, m in enumerate(models)}
    panels = [("size_bytes", "size (MiB, fp32 state dict)", 2**20)]
    benched = [m for m in models if m.get("latency_ms")]
    if benched:
        b = benched[0]
        unit = f"latency p50 (ms, batch {b.get('latency_batch_size')}, {b.get('backend')})"
        panels.insert(0, ("latency_ms", unit, 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    tops = [m["top1"] for m in models] or [0.0]
    low, high = min(tops), max(tops)
    pad = max(1.0, 0.15 * (high - low))
    for ax, (key, label, scale) in zip(axes[0], panels, strict=True):
        for m in models:
            if not m.get(key):
                continue
            x, y = m[key] / scale, m["top1"]
            ax.scatter(x, y, s=45, color=colours[m["name"]], zorder=3)
            ax.annotate(m["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlim(left=0)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['name']}: accuracy against cost")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def render(run_dir: Path | str, report: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write report.md and pareto.png from `report`, by default `run_dir/report.json`'s."""
    from compress.runs import RunFolder

    run_dir = Path(run_dir)
    if report is None:
        report = RunFolder(run_dir).report
    md, png = run_dir / "report.md", run_dir / "pareto.png"
    write_text(md, render_markdown(report, run_dir))
    render_pareto(report, png)
    return md, png
