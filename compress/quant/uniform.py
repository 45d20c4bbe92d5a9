"""Bucketed uniform quantization (Polino et al. 2018, 'linear' scaling).

A tensor is flattened and cut into buckets of `bucket_size` values (the last bucket padded with the
last value); each bucket is scaled to [0, 1] by its own min (beta) and range (alpha), rounded to
one of 2**bits evenly spaced levels that include both ends, and scaled back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def index_bits(levels: int) -> int:
    """Bits of a fixed-length code for `levels` symbols (at least 1)."""
    return max(1, (levels - 1).bit_length())


@dataclass
class Quantized:
    """A quantized tensor: level indices per bucket, the per-bucket scales, and the original shape."""

    indices: torch.Tensor  # (n_buckets, bucket_size) int64 in [0, levels)
    alpha: torch.Tensor  # (n_buckets, 1) bucket range (max - min); 1 where the range is ~0
    beta: torch.Tensor  # (n_buckets, 1) bucket minimum
    levels: int
    shape: torch.Size

    points: torch.Tensor | None = None  # (levels,) codebook in [0, 1]; None = evenly spaced

    @property
    def index_bits(self) -> int:
        """Bits of a fixed-length code for one level index."""
        return index_bits(self.levels)

    def codebook(self) -> torch.Tensor:
        if self.points is not None:
            return self.points
        return torch.arange(self.levels, dtype=self.alpha.dtype) / (self.levels - 1)

    def dequantize(self) -> torch.Tensor:
        values = self.codebook().to(self.alpha.device)[self.indices] * self.alpha + self.beta
        return values.flatten()[: self.shape.numel()].view(self.shape)


def bucketize(t: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """Flatten `t` into rows of `bucket_size`, padding the last row with the last value."""
    flat = t.detach().flatten()
    pad = (-flat.numel()) % bucket_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, bucket_size)


def bucket_scales(buckets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket (alpha, beta) of 'linear' scaling: range and minimum; a ~0 range becomes 1."""
    beta = buckets.min(dim=1, keepdim=True).values
    alpha = buckets.max(dim=1, keepdim=True).values - beta
    return torch.where(alpha < 1e-10, torch.ones_like(alpha), alpha), beta


def quantize_uniform(
    t: torch.Tensor,
    bits: int,
    bucket_size: int | None = 256,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Quantized:
    """Quantize `t` to 2**bits levels per bucket (deterministic or stochastic rounding)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    levels = 2**bits
    buckets = bucketize(t, bucket_size or t.numel()).float()
    alpha, beta = bucket_scales(buckets)
    scaled = (buckets - beta) / alpha * (levels - 1)
    if stochastic:
        floor = scaled.floor()
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device)
        indices = floor + (noise < (scaled - floor)).float()
    else:
        indices = scaled.round()
    indices = indices.clamp_(0, levels - 1).long()
    return Quantized(indices, alpha, beta, levels, t.shape)
