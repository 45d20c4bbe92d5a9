"""The search plot: mean reward per policy update, and every candidate's validation accuracy
against its parameter count with the Pareto front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.io import atomic_path
from compress.search.records import HISTORY_FILE, read_history

PLOT_FILE = "search.png"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower cost (x) and higher accuracy (y), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def render_search(stage_dir: Path, metrics: dict[str, Any]) -> Path | None:
    """Write `stage_dir/search.png`; None when the stage left no history."""
    if not (stage_dir / HISTORY_FILE).is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = [r for r in read_history(stage_dir) if r.valid]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rewards = metrics.get("mean_reward_per_update", [])
    left.plot(range(1, len(rewards) + 1), rewards, marker="o")
    left.set_xlabel("policy update")
    left.set_ylabel("mean reward of its rollouts")
    left.grid(alpha=0.3)
    for over in (False, True):
        pts = [(r.params / 1e3, r.val_top1) for r in valid if r.violates == over]
        if pts:
            right.scatter(
                *zip(*pts, strict=True),
                s=18,
                alpha=0.7,
                label="over budget" if over else "candidates",
            )
    front = pareto_front([(r.params / 1e3, r.val_top1) for r in valid])
    if front:
        right.plot(*zip(*front, strict=True), color="C3", label="Pareto front")
    right.set_xlabel("parameters (thousands)")
    right.set_ylabel("validation top-1 (%)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"search: best reward {metrics.get('best_reward', float('nan')):.3f}")
    fig.tight_layout()
    path = stage_dir / PLOT_FILE
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
