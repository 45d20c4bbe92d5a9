"""Points where a method changes the one training loop without writing its own (e.g. quantization)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


class TrainHooks:
    """No-op hooks; subclasses override what they need."""

    def before_forward(self, model: nn.Module) -> None:
        """Called before every training forward pass."""

    def before_step(self, model: nn.Module) -> None:
        """Called after backward, before the optimiser updates the weights."""

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        """Wraps each validation pass (evaluate the model as it will be deployed)."""
        yield

    def on_train_end(self, model: nn.Module) -> None:
        """Called once after the last epoch."""
