"""Per-layer INT8 sensitivity of a Q/DQ ONNX model, and the fewest float layers that meet an
accuracy budget while giving up the least speed.

How it is computed (all on the deployable Q/DQ graph in onnxruntime, on validation images):
1. One at a time: each quantized layer (and each arithmetic op on dequantized activations, such
   as a residual add or a squeeze-excite multiply) is put back in float in the all-INT8 model
   (`compress.quant.qdq_layers.with_float_layers`) and the model is scored. What the layer costs
   as INT8 is the top-1 it recovers (points) and the reduction of the output's KL divergence from
   the FP32 model's. The KL is continuous where the top-1 of a few hundred images moves in whole
   images, so it orders the layers; both are recorded. One pass is N graph edits and N evaluations
   of a few hundred images: about a second a layer for a 50-layer CNN at 32 px on 2 cores. A
   Hessian or gradient proxy would need a differentiable model, which the onnxruntime route does
   not have, and it measures the PyTorch simulation rather than onnxruntime's integer kernels.
2. Speed cost: what the layer in float adds to the latency, from onnxruntime's profiler. The
   all-INT8 model and the one-float-layer model are profiled at each batch size; the kernels the
   two do not share (the layer's float kernel and the Q/DQ and layout conversions around it
   against its integer kernel) give the layer's cost, as a fraction of the all-INT8 latency.
   Kernel times of single nodes are much steadier than whole-model timings of two models that
   differ by one layer in fifty. Each float unit in an INT8 graph pays for the Q/DQ and layout
   conversions at its edges, which two adjacent float units share; so each pair of adjacent
   units that both recover accuracy is profiled in float too, and what the pair saves against
   its two units apart is taken off a unit's cost once its neighbour is in float.
3. Choice: layers greedily in order of KL recovered per unit of that marginal speed cost (or of
   KL recovered alone), and the shortest prefix of that order whose model is within the budget,
   found by a galloping search (about 2 log2 k evaluations; every evaluated prefix is recorded).
   Layers whose float version alone recovers nothing come last, by what they recover.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from tqdm import tqdm

from compress.deploy.timing import default_threads
from compress.quant.qdq_layers import (
    FloatReference,
    QuantLayer,
    adjacent_units,
    quantized_layers,
    with_float_layers,
    with_node_names,
)

Ranking = Literal["speed", "accuracy"]
SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_PNG = "sensitivity.png"
# A layer whose float kernel costs less than this fraction of the INT8 latency counts as free.
MIN_COST = 0.002
_TOKEN = re.compile(r"_token_\d+")


class BudgetUnreachable(Exception):
    """No mix of float and INT8 layers short of all-float meets the budget."""


@dataclass
class Scores:
    """Top-1 (%) and mean KL divergence from the FP32 model's outputs on the validation images,
    and which images the model gets right."""

    top1: float
    kl: float
    correct: np.ndarray = field(repr=False, compare=False)


def budget_drop(float_correct: np.ndarray, scores: Scores, margin_se: float = 0.0) -> float:
    """The top-1 points `scores`' model loses against the float model (right on `float_correct`),
    plus `margin_se` standard errors of that paired per-image difference: what a budget is held
    to when it must hold beyond the validation images too."""
    drop = float(np.mean(float_correct)) * 100.0 - scores.top1
    if not margin_se or len(float_correct) < 2:
        return drop
    diff = float_correct.astype(np.float64) - scores.correct
    return drop + margin_se * 100.0 * float(diff.std(ddof=1)) / np.sqrt(len(diff))


@dataclass
class ValidationSet:
    """Validation images (float32 NCHW), their labels, and the FP32 model's logits on them."""

    images: np.ndarray
    labels: np.ndarray
    reference: np.ndarray

    @property
    def reference_correct(self) -> np.ndarray:
        """Which images the FP32 model gets right."""
        return self.reference.argmax(axis=1) == self.labels

    def score(self, model: onnx.ModelProto | bytes, threads: int | None = None) -> Scores:
        logits = onnx_logits(model, self.images, threads)
        return Scores(
            top1_percent(logits, self.labels),
            mean_kl(self.reference, logits),
            logits.argmax(axis=1) == self.labels,
        )


def validation_arrays(data: Any, images: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `images` of the data's val split (never test), spread evenly over it so every class
    is represented, as float32 arrays (the eval transform and normalisation applied)."""
    n = len(data.samples("val"))
    indices = np.unique(np.linspace(0, n - 1, min(images, n)).round().astype(int)).tolist()
    xs, ys = [], []
    for x, y, *_ in data.loader("val", train=False, indices=indices):
        xs.append(x.numpy().astype(np.float32))
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def onnx_logits(
    model: onnx.ModelProto | bytes | Path,
    images: np.ndarray,
    threads: int | None = None,
    batch_size: int = 100,
) -> np.ndarray:
    """The model's outputs on `images` in onnxruntime (CPU), in batches."""
    from compress.deploy.onnx_export import onnxruntime_session

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = onnxruntime_session(data, threads or default_threads())
    name = session.get_inputs()[0].name
    out = [
        session.run(None, {name: images[i : i + batch_size]})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float64)


def top1_percent(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * np.mean(logits.argmax(1) == labels))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(logits)) over the samples."""
    p_log, q_log = _log_softmax(reference), _log_softmax(logits)
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=1)))


def kernel_times(
    model: onnx.ModelProto | bytes,
    batch_size: int,
    threads: int,
    runs: int = 10,
    warmup: int = 2,
    budget_s: float = 0.5,
) -> dict[str, tuple[float, float]]:
    """Per kernel (node name without onnxruntime's `_token_N`, and op): (calls per run, median ms
    per run), from onnxruntime's profiler over up to `runs` runs after `warmup` on random inputs;
    fewer runs (at least 3) where `runs` would take longer than `budget_s`."""
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    with tempfile.TemporaryDirectory(prefix="compress-profile-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [batch_size] + [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape[1:]]
        feed = {inp.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        start = time.perf_counter()
        for _ in range(warmup):
            start = time.perf_counter()
            session.run(None, feed)
        runs = max(3, min(runs, int(budget_s / max(time.perf_counter() - start, 1e-6))))
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[
        warmup:
    ]
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(windows))
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        run = next((i for i, (a, b) in enumerate(windows) if a <= e["ts"] <= b), None)
        if run is None:
            continue
        key = f"{_TOKEN.sub('', e['name'].removesuffix('_kernel_time'))}|{e['args']['op_name']}"
        per_run[key][run] += e["dur"] / 1e3
        calls[key] += 1
    n = max(len(windows), 1)
    return {k: (calls[k] / n, float(np.median(v))) for k, v in per_run.items()}


def cost_ms(base: dict[str, tuple[float, float]], other: dict[str, tuple[float, float]]) -> float:
    """What `other` adds to `base`'s latency (ms): the kernels the two do not share, i.e. those
    only one of them has or that one calls more often; kernels run alike in both cancel out."""
    total = 0.0
    for key in base.keys() | other.keys():
        b, o = base.get(key, (0.0, 0.0)), other.get(key, (0.0, 0.0))
        if b[0] != o[0]:
            total += o[1] - b[1]
    return total


@dataclass
class LayerRecord:
    """One quantized layer's sensitivity and speed cost."""

    layer: QuantLayer
    top1: float  # validation top-1 with this layer alone in float
    kl: float
    top1_recovered: float = 0.0  # points this layer costs as INT8
    kl_recovered: float = 0.0
    cost_ms: dict[int, float] = field(default_factory=dict)
    cost: float | None = None  # fraction of the all-INT8 latency, mean over batch sizes
    marginal_cost: float | None = None  # its cost next to the units ranked before it
    score: float = 0.0
    rank: int | None = None
    float: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.layer.to_dict(),
            "top1_with_layer_float": self.top1,
            "top1_drop": self.top1_recovered,
            "kl_with_layer_float": self.kl,
            "kl_recovered": self.kl_recovered,
            "speed_cost_ms": {str(b): c for b, c in self.cost_ms.items()},
            "speed_cost": self.cost,
            "marginal_speed_cost": self.marginal_cost,
            "score": self.score,
            "rank": self.rank,
            "float": self.float,
        }


@dataclass
class Sensitivity:
    """The analysis of one Q/DQ model and, given a budget, the float layers chosen."""

    float_top1: float
    int8: Scores
    layers: list[LayerRecord]
    ranking: Ranking
    batch_sizes: list[int]
    images: int
    budget: float | None = None
    margin_se: float = 0.0  # standard errors the budget is held with (`budget_drop`)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    final: Scores | None = None
    latency_vs_int8: float | None = None
    seconds: float = 0.0
    note: str = ""
    own_float_top1: float | None = None  # QAT: the trained weights in float
    pair_costs: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def int8_drop(self) -> float:
        return self.float_top1 - self.int8.top1

    @property
    def final_drop(self) -> float | None:
        return None if self.final is None else self.float_top1 - self.final.top1

    def order(self) -> list[str]:
        """Every quantized layer's node, most worth putting in float first."""
        ranked = sorted((r for r in self.layers if r.rank is not None), key=lambda r: r.rank)
        return [r.layer.node for r in ranked]

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": "val",
            "images": self.images,
            "budget_top1_drop": self.budget,
            "budget_margin_se": self.margin_se,
            "float_top1": self.float_top1,
            "kl_reference": "the model's own weights in float (trained after quantization)"
            if self.own_float_top1 is not None
            else "the float model",
            "own_float_top1": self.own_float_top1,
            "int8_top1": self.int8.top1,
            "int8_top1_drop": self.int8_drop,
            "int8_kl": self.int8.kl,
            "ranking": self.ranking,
            "speed_batch_sizes": self.batch_sizes,
            "method": (
                "one at a time: each quantized layer back in float in the all-INT8 Q/DQ model, "
                "scored in onnxruntime; speed cost from onnxruntime's per-kernel profile, less "
                "what an adjacent unit ranked before it shares; the "
                "shortest prefix of the ranking within the budget, by galloping search"
            ),
            "note": self.note,
            "float_layers": self.chosen,
            "float_modules": [r.layer.module for r in self.layers if r.float],
            "final_top1": None if self.final is None else self.final.top1,
            "final_top1_drop": self.final_drop,
            "final_kl": None if self.final is None else self.final.kl,
            "latency_vs_int8": self.latency_vs_int8,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "layers": [r.to_dict() for r in self.layers],
            "adjacent_pairs": [
                {"nodes": list(pair), "speed_cost": cost} for pair, cost in self.pair_costs.items()
            ],
        }


def analyse(
    qdq: onnx.ModelProto,
    val: ValidationSet,
    float_top1: float,
    ranking: Ranking = "speed",
    batch_sizes: Sequence[int] = (1, 32),
    fp32: FloatReference | None = None,
    threads: int | None = None,
    reference: onnx.ModelProto | None = None,
) -> Sensitivity:
    """Each quantized layer's effect on accuracy (and, for `ranking: speed`, on latency);
    `reference`, the FP32 model, names the layers' modules where the Q/DQ graph renamed them."""
    t0 = time.perf_counter()
    threads = threads or default_threads()
    layers = quantized_layers(qdq, reference)
    int8 = val.score(qdq, threads)
    base_times = (
        {b: kernel_times(qdq, b, threads) for b in batch_sizes} if ranking == "speed" else {}
    )
    total = {b: sum(t for _, t in times.values()) for b, times in base_times.items()}

    def costs_ms(edited: onnx.ModelProto) -> dict[int, float]:
        return {b: cost_ms(base_times[b], kernel_times(edited, b, threads)) for b in batch_sizes}

    def share(costs: dict[int, float]) -> float:  # of the all-INT8 latency, mean over batches
        return float(np.mean([costs[b] / total[b] for b in batch_sizes]))

    records = []
    for layer in tqdm(layers, desc="layer sensitivity", unit="layer", leave=False, disable=None):
        edited = with_float_layers(qdq, [layer.node], fp32)
        scores = val.score(edited, threads)
        record = LayerRecord(
            layer,
            scores.top1,
            scores.kl,
            top1_recovered=scores.top1 - int8.top1,
            kl_recovered=int8.kl - scores.kl,
        )
        if ranking == "speed":
            record.cost_ms = costs_ms(edited)
            record.cost = share(record.cost_ms)
        records.append(record)
    pair_costs = {}
    if ranking == "speed":
        helpful = {r.layer.node for r in records if r.kl_recovered > 0}
        pairs = [p for p in adjacent_units(qdq, layers) if set(p) <= helpful]
        for pair in tqdm(pairs, desc="adjacent pairs", unit="pair", leave=False, disable=None):
            pair_costs[pair] = share(costs_ms(with_float_layers(qdq, list(pair), fp32)))
    rank_units(records, ranking, pair_costs)
    return Sensitivity(
        float_top1,
        int8,
        records,
        ranking,
        list(batch_sizes) if ranking == "speed" else [],
        len(val.labels),
        seconds=time.perf_counter() - t0,
        pair_costs=pair_costs,
    )


def rank_units(
    records: list[LayerRecord],
    ranking: Ranking,
    pair_costs: dict[tuple[str, str], float] | None = None,
) -> None:
    """Rank the units: those whose float version recovers KL first, then the rest by what they
    recover. With `ranking: speed`, greedily by KL recovered per unit of marginal speed cost: a
    unit next to one already ranked costs its own cost less what the two save together
    (`pair_costs`: the measured cost of adjacent pairs in float), so float units gather into
    regions instead of scattering islands, each with its own Q/DQ and layout conversions."""
    pair_costs = pair_costs or {}
    savings: dict[str, dict[str, float]] = defaultdict(dict)
    by_node = {r.layer.node: r for r in records}
    for (a, b), both in pair_costs.items():
        ca, cb = by_node[a].cost, by_node[b].cost
        if ca is not None and cb is not None:
            savings[a][b] = savings[b][a] = max(0.0, ca + cb - both)

    def marginal(r: LayerRecord, chosen: set[str]) -> float:
        saved = sum(v for n, v in savings[r.layer.node].items() if n in chosen)
        return max(r.cost - saved, 0.0)  # type: ignore[operator]

    helpful = [r for r in records if r.kl_recovered > 0]
    ordered: list[LayerRecord] = []
    chosen: set[str] = set()
    speed = ranking == "speed" and all(r.cost is not None for r in records)
    for r in records:
        r.marginal_cost = None
    while helpful:
        for r in helpful:
            if speed:
                r.marginal_cost = marginal(r, chosen)
                r.score = r.kl_recovered / max(r.marginal_cost, MIN_COST)
            else:
                r.score = r.kl_recovered
        best = max(helpful, key=lambda r: r.score)
        helpful.remove(best)
        ordered.append(best)
        chosen.add(best.layer.node)
    rest = sorted((r for r in records if r.kl_recovered <= 0), key=lambda r: -r.kl_recovered)
    for r in rest:
        r.score = r.kl_recovered / max(r.cost, MIN_COST) if speed else r.kl_recovered
    for i, r in enumerate(ordered + rest):  # units that recover nothing alone come last
        r.rank = i


def shortest_prefix(
    order: Sequence[str], drop_of: Callable[[list[str]], float], budget: float
) -> tuple[int, dict[int, float]]:
    """The smallest k such that the first k of `order` in float meet `budget`, and every k
    evaluated with its drop. k = len(order) + 1 when even the whole order does not meet it.

    Galloping search: k = 1, 2, 4, ... until a prefix meets the budget, then bisection between
    the last that did not and the first that did (2 log2 k evaluations). A top-1 measured on a
    few hundred images moves by whole images, so the drop is not quite monotone in k; searching
    up from small prefixes finds a short one that meets the budget where a bisection over the
    whole order can be sent above it by one noisy failure at a long prefix."""
    seen: dict[int, float] = {}

    def ok(k: int) -> bool:
        if k not in seen:
            seen[k] = drop_of(list(order[:k]))
        return seen[k] <= budget

    if ok(0):
        return 0, seen
    n = len(order)
    if not ok(n):
        return n + 1, seen
    lo, hi = 0, 1
    while hi < n and not ok(hi):
        lo, hi = hi, min(2 * hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, seen


def fit_budget(
    qdq: onnx.ModelProto,
    analysis: Sensitivity,
    val: ValidationSet,
    budget: float,
    fp32: FloatReference | None = None,
    threads: int | None = None,
    float_correct: np.ndarray | None = None,
    margin_se: float = 0.0,
) -> onnx.ModelProto:
    """The Q/DQ model with the fewest, cheapest float layers whose validation top-1 is within
    `budget` points of the FP32 model's (right on `float_correct`; default: `val`'s
    `reference_correct`), with `margin_se` standard errors to spare (`budget_drop`); records the
    choice in `analysis`.

    Of the models evaluated, only the shortest prefix that met the budget so far is kept. Raises
    BudgetUnreachable when only every quantized layer in float (or nothing) meets it."""
    analysis.budget, analysis.margin_se = budget, margin_se
    if float_correct is None:
        float_correct = val.reference_correct
    best: dict[int, onnx.ModelProto] = {}  # the shortest prefix that met the budget so far
    scores: dict[int, Scores] = {}
    order = analysis.order()

    def drop_of(nodes: list[str]) -> float:
        model = with_float_layers(qdq, nodes, fp32) if nodes else qdq
        s = val.score(model, threads) if nodes else analysis.int8
        scores[len(nodes)] = s
        held = budget_drop(float_correct, s, margin_se)
        if held <= budget and (not best or len(nodes) < min(best)):
            best.clear()  # the search ends on the shortest prefix that met it: one model is kept
            best[len(nodes)] = model
        analysis.evaluations.append(
            {
                "float_layers": len(nodes),
                "top1": s.top1,
                "top1_drop": analysis.float_top1 - s.top1,
                "top1_drop_with_margin": held,
            }
        )
        return held

    k, _ = shortest_prefix(order, drop_of, budget)
    every = len(order)
    if k >= every and every:
        analysis.final = scores[every]
        advice = "raise max_accuracy_drop, calibrate on more batches, or use qat_int8"
        if analysis.own_float_top1 is not None:
            advice = (
                "the trained weights score "
                f"{analysis.float_top1 - analysis.own_float_top1:.2f} points below the float "
                "model even without rounding, so QAT's training lost it: train longer or at a "
                "lower lr, or raise max_accuracy_drop"
            )
        raise BudgetUnreachable(
            f"max_accuracy_drop {budget}: the validation top-1 drop is "
            f"{analysis.int8_drop:.2f} points with every layer INT8 and "
            f"{analysis.final_drop:.2f} with all {every} quantized layers and ops in float, so "
            + ("no" if k > every else "only that")
            + f" mix meets it; {advice}"
        )
    if k > every:  # no quantized layer at all
        raise BudgetUnreachable(
            f"max_accuracy_drop {budget}: the model has no quantized conv/linear layer, and its "
            f"validation top-1 drop is {analysis.int8_drop:.2f} points"
        )
    analysis.chosen = list(order[:k])
    for r in analysis.layers:
        r.float = r.layer.node in analysis.chosen
    analysis.final = scores[k]
    return best[k]


def spread_warning(chosen: int, total: int, latency_vs_int8: float | None = None) -> str | None:
    """Advice when a budget took `chosen` of `total` units, more than half, back to float: the
    INT8 error is spread over the model (e.g. swish activations calibrated on a few batches), so
    mixed precision keeps little of INT8's speed, and better calibration or QAT is the remedy."""
    if not total or chosen <= total / 2:
        return None
    latency = (
        "" if latency_vs_int8 is None else f" (latency {latency_vs_int8:.2f}x the all-INT8 model's)"
    )
    return (
        f"{chosen} of {total} quantized layers and ops had to go back to float{latency}: the INT8 "
        "error is spread over most of the model, so little of INT8's speed is left; calibrate on "
        "more batches (calibration_batches) or train with method: qat_int8"
    )


def validation_set(reference: onnx.ModelProto, data: Any, images: int) -> ValidationSet:
    """Up to `images` of `data`'s val split with the FP32 model `reference`'s logits on them."""
    x, labels = validation_arrays(data, images)
    return ValidationSet(x, labels, onnx_logits(reference, x))


def run_sensitivity(
    qdq: onnx.ModelProto,
    reference: onnx.ModelProto,
    val: ValidationSet,
    ranking: Ranking = "speed",
    budget: float | None = None,
    fp32: FloatReference | None = None,
    folder: Path | None = None,
    note: str = "",
    trained: bool = False,
    margin_se: float = 0.0,
) -> tuple[Sensitivity, onnx.ModelProto]:
    """Analyse `qdq` against its FP32 model `reference` on `val` (`validation_set`), and with a
    `budget`, fit it (the model returned). sensitivity.json and sensitivity.png go to
    `folder`, also when the budget cannot be met (BudgetUnreachable).

    The budget is always against `reference`'s top-1. `trained`: the Q/DQ model's weights were
    trained after quantization (QAT), so they differ from `reference`'s; the output error that
    ranks the layers is then measured against the Q/DQ model's own weights in float."""
    from compress.quant.ort_int8 import paired_latency_ratio

    qdq = with_node_names(qdq)
    float_top1 = top1_percent(val.reference, val.labels)
    float_correct = val.reference_correct  # before QAT swaps in its own weights' logits
    own_float = None
    if trained:
        every = [layer.node for layer in quantized_layers(qdq)]
        own_logits = onnx_logits(with_float_layers(qdq, every, fp32), val.images)
        own_float = top1_percent(own_logits, val.labels)
        val = ValidationSet(val.images, val.labels, own_logits)
    analysis = analyse(qdq, val, float_top1, ranking, fp32=fp32, reference=reference)
    analysis.note, analysis.own_float_top1 = note, own_float
    chosen = qdq
    try:
        if budget is not None:
            chosen = fit_budget(
                qdq, analysis, val, budget, fp32, float_correct=float_correct, margin_se=margin_se
            )
            if analysis.chosen and ranking == "speed":
                with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmp:
                    base, mixed = Path(tmp) / "int8.onnx", Path(tmp) / "mixed.onnx"
                    onnx.save(qdq, str(base))
                    onnx.save(chosen, str(mixed))
                    analysis.latency_vs_int8 = paired_latency_ratio(base, mixed, [1, 32], None)
    finally:
        if folder is not None:
            write_sensitivity(analysis, folder)
    return analysis, chosen


def write_sensitivity(analysis: Sensitivity, folder: Path) -> dict[str, Path]:
    """sensitivity.json and sensitivity.png (the bar plot) in `folder`."""
    from compress.io import atomic_path, write_json

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"sensitivity": folder / SENSITIVITY_JSON, "sensitivity_plot": folder / SENSITIVITY_PNG}
    write_json(paths["sensitivity"], analysis.to_dict())
    with atomic_path(paths["sensitivity_plot"]) as tmp:
        plot_sensitivity(analysis, tmp)
    return paths


def plot_sensitivity(analysis: Sensitivity, path: Path) -> None:
    """Two bar rows per layer: the top-1 points it costs as INT8, and the KL it adds; the layers
    kept in float in orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = analysis.layers
    n = len(records)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.22 * n + 2), 6), sharex=True)
    colors = ["tab:orange" if r.float else "tab:blue" for r in records]
    x = np.arange(n)
    axes[0].bar(x, [r.top1_recovered for r in records], color=colors)
    axes[0].set_ylabel("top-1 drop as INT8 (points)")
    axes[1].bar(x, [r.kl_recovered for r in records], color=colors)
    axes[1].set_ylabel("KL added as INT8")
    axes[1].set_xticks(x, [r.layer.module or r.layer.node for r in records], rotation=90)
    axes[1].tick_params(axis="x", labelsize=6)
    title = f"INT8 sensitivity per layer ({analysis.images} validation images)"
    if analysis.budget is not None:
        title += f"\norange: kept in float for max_accuracy_drop {analysis.budget}"
    axes[0].set_title(title, fontsize=9)
    for ax in axes:
        ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def report_lines(doc: dict[str, Any], plot: str | None = None, others: int = 10) -> list[str]:
    """Markdown for a sensitivity.json document: the outcome, the plot, and a table of the float
    layers and the `others` next most worth it."""
    from compress.markdown import table

    def num(v: float | None, spec: str = ".2f") -> str:
        return "–" if v is None else format(v, spec)

    layers = doc.get("layers", [])
    kept = sorted((r for r in layers if r.get("float")), key=lambda r: r.get("rank") or 0)
    lines = []
    if doc.get("budget_top1_drop") is not None:
        margin = doc.get("budget_margin_se")
        held = f", held with {margin} standard errors to spare" if margin else ""
        lines.append(
            f"{len(kept)} of {len(layers)} quantized layers and ops kept in float for max_accuracy_drop "
            f"{doc['budget_top1_drop']}: validation top-1 drop {num(doc.get('int8_top1_drop'))} "
            f"points with every layer INT8, {num(doc.get('final_top1_drop'))} with these in float "
            f"({doc.get('images')} validation images; float model {num(doc.get('float_top1'))}%)"
            f"{held}."
        )
    if doc.get("latency_vs_int8") is not None:
        lines.append(
            f"Latency with them in float: {doc['latency_vs_int8']:.2f}x the all-INT8 model's "
            "(onnxruntime CPU, paired, mean over batch 1 and 32)."
        )
    advice = spread_warning(len(kept), len(layers), doc.get("latency_vs_int8"))
    if advice:
        lines.append(f"**Warning:** {advice}.")
    if doc.get("note"):
        lines.append(doc["note"] + ".")
    if plot:
        lines += ["", f"![INT8 sensitivity per layer]({plot})"]
    ranked = sorted((r for r in layers if r.get("rank") is not None), key=lambda r: r["rank"])
    shown = kept + [r for r in ranked if not r.get("float")][:others]
    rows = [
        [
            r["module"] or "–",
            f"`{r['node']}`",
            num(r.get("top1_drop")),
            num(r.get("kl_recovered"), ".4f"),
            "–" if r.get("speed_cost") is None else f"{100 * r['speed_cost']:.1f}%",
            "–"
            if r.get("marginal_speed_cost") is None
            else f"{100 * r['marginal_speed_cost']:.1f}%",
            "–" if r.get("rank") is None else str(r["rank"] + 1),
            "float" if r.get("float") else "INT8",
        ]
        for r in shown
    ]
    headers = [
        "module",
        "ONNX node",
        "top-1 drop as INT8",
        "KL added",
        "speed cost",
        "next to earlier",
        "rank",
    ]
    lines += ["", *table([*headers, "kept"], rows)] if rows else []
    lines += [
        "",
        "Each unit (a conv/linear layer, or an op such as an add or a multiply) alone back in "
        "float in the all-INT8 model: the validation top-1 points and the KL divergence from the "
        "float model's outputs it removes, and what it adds to the latency as a share of the "
        "all-INT8 model's (onnxruntime's kernel profile); next to earlier: that cost less what "
        "it shares with adjacent units ranked before it (one float region instead of two). "
        "Rank: the order in which units return to float (KL removed per unit of that cost, or "
        "KL alone).",
        "",
    ]
    return lines
