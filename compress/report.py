"""report.json (kept current during a run), report.md (a table) and pareto.png (accuracy vs cost)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from compress.io import atomic_path, read_json, write_json, write_text

REPORT_JSON = "report.json"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def environment(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from compress import __version__
    from compress.deploy.bench import cpu_name

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
        previous = self.run_dir / REPORT_JSON
        if previous.is_file():  # a resumed run keeps its first start time
            self.data["started"] = read_json(previous).get("started", self.data["started"])

    def set_environment(self, device: torch.device) -> None:
        self.data["environment"] = environment(device)

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
        if state.get("teacher_metrics") and self.model("teacher") is not None:
            self.ensure_model("teacher", **state["teacher_metrics"])

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
        write_json(self.run_dir / REPORT_JSON, self.data)

    def render(self) -> tuple[Path, Path]:
        return render(self.run_dir)


# ---------------------------------------------------------------- rendering


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{value:.2f}"
    if kind == "count":
        return f"{value / 1e6:.3f} M" if value >= 1e5 else f"{value:,}"
    if kind == "bytes":
        return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"
    if kind == "ms":
        return f"{value:.3f}"
    if kind == "sci":
        return f"{value:.2g}"
    if kind == "s":
        return f"{value:.1f}"
    return str(value)


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


def _method(m: dict[str, Any]) -> str:
    """The quantization method, with the INT8 route and how many weight layers are INT8."""
    text = str(m.get("quantization"))
    if m.get("int8_route"):
        text += f" ({m['int8_route']}"
        if m.get("weight_layers"):
            text += f", {m['int8_layers']}/{m['weight_layers']} layers INT8"
        text += ")"
    return text


def _speedup(speedup: dict[str, float] | None) -> str:
    if not speedup:
        return "–"
    return ", ".join(f"{ratio:.2f}x (batch {b})" for b, ratio in speedup.items())


def render_markdown(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    lines = [f"# Run `{report['name']}`", ""]
    lines.append(
        f"Status: **{report.get('status')}**; started {report.get('started')}, "
        f"updated {report.get('updated')}."
    )
    lines += ["", "## Models", ""]
    lines.append("| " + " | ".join(c[0] for c in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for m in report.get("models", []):
        lines.append("| " + " | ".join(_fmt(m.get(k), kind) for _, k, kind in COLUMNS) + " |")
    teachers = [m for m in report["models"] if m.get("role") == "teacher"]
    teacher = teachers[-1] if teachers else None  # the adapted teacher when a stage made one
    finals = [m for m in report["models"] if m.get("role") == "stage"]
    if teacher and finals:
        s = finals[-1]
        lines += ["", f"Final model `{s['name']}` against the teacher (`{teacher['name']}`):"]
        if teacher.get("params") and s.get("params"):
            lines.append(f"- {teacher['params'] / s['params']:.2f}x fewer parameters")
        if teacher.get("flops") and s.get("flops"):
            lines.append(f"- {teacher['flops'] / s['flops']:.2f}x fewer FLOPs per image")
        if teacher.get("latency_ms") and s.get("latency_ms"):
            lines.append(
                f"- {teacher['latency_ms'] / s['latency_ms']:.2f}x lower p50 latency "
                f"(batch {s.get('latency_batch_size')}, {s.get('backend')})"
            )
        if teacher.get("top1") is not None and s.get("top1") is not None:
            lines.append(f"- top-1 {s['top1'] - teacher['top1']:+.2f} points")
    lines += [
        "",
        "Latency in milliseconds, p50 at the smallest benched batch; "
        "FLOPs by torch's flop counter (a multiply-add counts 2).",
        "",
    ]
    bench_rows = [(m["name"], r) for m in report["models"] for r in m.get("latency", [])]
    if bench_rows:
        lines += [
            "## Latency",
            "",
            "| model | backend | batch | threads | p50 ms | p90 ms | "
            "p99 ms | mean ms | std ms | images/s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in bench_rows:
            lines.append(
                f"| {name} | {r['backend']} | {r['batch_size']} | {r['threads']} | "
                f"{r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | "
                f"{r['std_ms']:.3f} | {r['throughput_ips']:.1f} |"
            )
        lines.append("")
    quantized = [m for m in report["models"] if m.get("bits") is not None]
    if quantized:
        lines += [
            "## Quantization",
            "",
            "Bits per weight count the bucket scales (and learned codebooks) or the per-channel "
            "INT8 scales. Sub-8-bit models: the size is Polino et al.'s Huffman accounting, not a "
            "file, and the compact file is what is written; INT8 models: the size is the INT8 "
            "weights with their scales, and the Q/DQ ONNX file is what is written.",
            "",
            "| model | method | bits | bits/weight | Huffman bits/weight | size | "
            "written file | fp32 / size | INT8 speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in quantized:
            huffman = m.get("huffman_bits_per_weight")
            written = m.get("compact_bytes") or m.get("onnx_bytes")
            lines.append(
                f"| {m['name']} | {_method(m)} | {m['bits']} | "
                f"{m['bits_per_weight']:.3f} | {'–' if huffman is None else f'{huffman:.3f}'} | "
                f"{_fmt(m['quantized_size_bytes'], 'bytes')} | "
                f"{_fmt(written, 'bytes')} | {m['compression_ratio']:.1f}x | "
                f"{_speedup(m.get('int8_speedup'))} |"
            )
        lines += [
            "",
            "INT8 speed-up: p50 latency of the FP32 export over the Q/DQ model's on onnxruntime "
            "CPU, timed in alternation in the export stage, by batch size.",
            "",
        ]
    lines += [
        "## Stages",
        "",
        "| # | stage | status | wall s | output model |",
        "|---|---|---|---|---|",
    ]
    for s in report.get("stages", []):
        lines.append(
            f"| {s['index']} | {s['label']} ({s['type']}) | {s['status']} | "
            f"{_fmt(s.get('wall_time_s'), 's')} | {s.get('model')} |"
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


def render(run_dir: Path | str) -> tuple[Path, Path]:
    """Write report.md and pareto.png from `run_dir/report.json`."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_JSON
    if not path.is_file():
        raise InputError(f"{path}: not found (is {run_dir} a compress run folder?)")
    report = read_json(path)
    md, png = run_dir / "report.md", run_dir / "pareto.png"
    write_text(md, render_markdown(report))
    render_pareto(report, png)
    from compress.search.plot import render_search

    for stage in report.get("stages", []):
        if stage["type"] == "search":
            render_search(run_dir / stage["dir"], stage.get("metrics", {}))
    return md, png
