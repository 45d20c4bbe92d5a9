"""Size accounting for quantized models, as Polino et al. count it.

Quantized tensors cost their Huffman-coded level indices (one code pooled over the whole model) plus
two fp32 scales per bucket; full-precision tensors cost 4 bytes a value. Codebooks are not counted.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from typing import Any

from torch import nn

from compress.quant.uniform import Quantized

FP32_BITS = 32


def huffman_code_lengths(frequencies: dict[int, int]) -> dict[int, int]:
    """Code length in bits of each symbol of an optimal prefix code for these frequencies."""
    symbols = [s for s, f in frequencies.items() if f > 0]
    if len(symbols) <= 1:
        return {s: 1 for s in symbols}
    heap = [(frequencies[s], i, [s]) for i, s in enumerate(symbols)]
    heapq.heapify(heap)
    lengths = dict.fromkeys(symbols, 0)
    counter = len(heap)
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, counter, a + b))
        counter += 1
    return lengths


def huffman_mean_bits(index_tensors: Iterable) -> float:
    """Mean Huffman code length (bits per value) of level indices pooled over all tensors."""
    counts: Counter[int] = Counter()
    for t in index_tensors:
        values, freq = t.flatten().unique(return_counts=True)
        counts.update(dict(zip(values.tolist(), freq.tolist(), strict=True)))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    lengths = huffman_code_lengths(dict(counts))
    return sum(counts[s] * lengths[s] for s in counts) / total


def size_report(model: nn.Module, codes: dict[str, Quantized]) -> dict[str, Any]:
    """Bits per weight and model size as Polino et al. count them (parameters; fp32 elsewhere).

    `bits_per_weight` is the fixed-length index width plus the bucket scales' share;
    `huffman_bits_per_weight` replaces the width by the mean Huffman code length pooled over the
    model; `quantized_size_bytes` uses the Huffman figure. Codebooks are counted when learned.
    """
    n_quant = sum(q.shape.numel() for q in codes.values())
    index_bits = sum(q.index_bits * q.shape.numel() for q in codes.values())
    scale_bits = sum(2 * FP32_BITS * q.indices.shape[0] for q in codes.values())
    codebook_bits = sum(FP32_BITS * q.levels for q in codes.values() if q.points is not None)
    extra = scale_bits + codebook_bits
    huffman = huffman_mean_bits(q.indices.flatten()[: q.shape.numel()] for q in codes.values())
    n_total = sum(p.numel() for p in model.parameters())
    size = (n_total - n_quant) * 4 + (n_quant * huffman + extra) / 8
    return {
        "quantized_params": n_quant,
        "full_precision_params": n_total - n_quant,
        "bits_per_weight": (index_bits + extra) / max(n_quant, 1),
        "huffman_bits_per_weight": huffman + extra / max(n_quant, 1),
        "quantized_size_bytes": round(size),
        "fp32_size_bytes": n_total * 4,
        "compression_ratio": n_total * 4 / size,
    }
