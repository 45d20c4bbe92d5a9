"""Quantized weights during training: quantize on forward, keep full-precision shadow weights.

Before each forward pass the chosen weights are replaced by their quantized values; after backward
the full-precision values come back and the optimiser steps on them with the gradient computed at the
quantized point (the straight-through estimator of Polino et al. 2018).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compress.quant.size import FP32_BITS, huffman_mean_bits
from compress.quant.uniform import quantize_uniform
from compress.train.hooks import TrainHooks

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def default_full_precision(model: nn.Module) -> list[str]:
    """The first convolution and the last linear layer: kept in full precision by default."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Conv1d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [*convs[:1], *linears[-1:]]


def quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


class WeightQuantizer(TrainHooks):
    """Quantizes the weights of every conv/linear layer except `full_precision` ones."""

    def __init__(
        self,
        model: nn.Module,
        bits: int,
        bucket_size: int | None = 256,
        stochastic: bool = False,
        full_precision: list[str] | None = None,
    ):
        self.bits, self.bucket_size, self.stochastic = bits, bucket_size, stochastic
        layers = quantizable_layers(model)
        self.full_precision = (
            default_full_precision(model) if full_precision is None else list(full_precision)
        )
        unknown = sorted(set(self.full_precision) - set(layers))
        if unknown:
            raise ValueError(
                f"not conv/linear layers of the model: {unknown} (layers: {layers[:8]}...)"
            )
        modules = dict(model.named_modules())
        self.names = [n for n in layers if n not in self.full_precision]
        self._modules = {n: modules[n] for n in self.names}
        self._saved: dict[str, torch.Tensor] = {}

    def _weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, module in self._modules.items():
            yield name, module.weight

    def quantize_(self, stochastic: bool = False) -> None:
        """Replace each weight by its quantized value, remembering the full-precision one."""
        with torch.no_grad():
            for name, w in self._weights():
                if name not in self._saved:
                    self._saved[name] = w.detach().clone()
                q = quantize_uniform(self._saved[name], self.bits, self.bucket_size, stochastic)
                w.copy_(q.dequantize().to(w.dtype))

    def restore_(self) -> None:
        with torch.no_grad():
            for name, w in self._weights():
                if name in self._saved:
                    w.copy_(self._saved.pop(name))

    def before_forward(self, model: nn.Module) -> None:
        self.quantize_(stochastic=self.stochastic)

    def before_step(self, model: nn.Module) -> None:
        self.restore_()

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        self.quantize_()
        try:
            yield
        finally:
            self.restore_()

    def on_train_end(self, model: nn.Module) -> None:
        """Leave the model quantized (deterministic rounding): what is saved is what is measured."""
        self.quantize_()
        self._saved.clear()

    def size_report(self, model: nn.Module) -> dict[str, Any]:
        """Bits per weight and size as Polino et al. count them (parameters only, fp32 elsewhere)."""
        indices, n_quant, n_buckets = [], 0, 0
        for _, w in self._weights():
            q = quantize_uniform(w.detach(), self.bits, self.bucket_size)
            indices.append(q.indices.flatten()[: w.numel()])
            n_quant += w.numel()
            n_buckets += q.indices.shape[0]
        n_total = sum(p.numel() for p in model.parameters())
        huffman = huffman_mean_bits(indices)
        scale_bits = 2 * FP32_BITS * n_buckets
        quant_bytes = (n_quant * huffman + scale_bits) / 8
        size = (n_total - n_quant) * 4 + quant_bytes
        return {
            "bits": self.bits,
            "bucket_size": self.bucket_size,
            "full_precision_layers": self.full_precision,
            "quantized_params": n_quant,
            "full_precision_params": n_total - n_quant,
            "bits_per_weight": self.bits + scale_bits / max(n_quant, 1),
            "huffman_bits_per_weight": huffman + scale_bits / max(n_quant, 1),
            "quantized_size_bytes": round(size),
            "fp32_size_bytes": n_total * 4,
            "compression_ratio": n_total * 4 / size,
        }
