"""Quantized weights during training: quantize on forward, keep full-precision shadow weights.

Before each forward pass the chosen weights are replaced by their quantized values; after backward
the full-precision values come back and the optimiser steps on them with the gradient computed at the
quantized point (the straight-through estimator of Polino et al. 2018).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from compress.quant.uniform import Quantized, quantize_uniform
from compress.train.hooks import TrainHooks

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def default_full_precision(model: nn.Module) -> list[str]:
    """The first convolution and the last linear layer: kept in full precision by default."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Conv1d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [*convs[:1], *linears[-1:]]


def quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def select_layers(
    model: nn.Module, full_precision: list[str] | None
) -> tuple[list[str], list[str]]:
    """(layers to quantize, layers kept in full precision); ValueError for unknown names."""
    layers = quantizable_layers(model)
    keep = default_full_precision(model) if full_precision is None else list(full_precision)
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise ValueError(
            f"not conv/linear layers of the model: {unknown} (layers: {layers[:8]}...)"
        )
    return [n for n in layers if n not in keep], keep


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
        self.names, self.full_precision = select_layers(model, full_precision)
        modules = dict(model.named_modules())
        self._modules = {n: modules[n] for n in self.names}
        self._saved: dict[str, torch.Tensor] = {}
        self._final: dict[str, Quantized] | None = None

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
        self._final = self.codes()
        with torch.no_grad():
            for name, w in self._weights():
                w.copy_(self._final[f"{name}.weight"].dequantize().to(w.dtype))
        self._saved.clear()

    def codes(self) -> dict[str, Quantized]:
        """Level indices and scales of each quantized weight (`<layer>.weight`)."""
        if self._final is not None:
            return self._final
        return {
            f"{name}.weight": quantize_uniform(
                self._saved.get(name, w.detach()), self.bits, self.bucket_size
            )
            for name, w in self._weights()
        }
