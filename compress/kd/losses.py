"""Dual-view feature mimicking (ScaleKD's DFM): a spatial view and a frequency view of a map.

Both views compare (N, C, H, W) maps L2-normalised over channels with a summed squared error
divided by the batch size, as ScaleKD's code does. The frequency view first removes the direct
component (the (0, 0) coefficient of the 2-D DCT-II, i.e. each channel's spatial mean), so the
student is not pushed towards the teacher's dominant low-frequency response.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): coefficients = D @ x, and x = D.T @ coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D DCT-II over the last two axes."""
    dh, dw = (dct_matrix(s).to(x) for s in x.shape[-2:])
    return dh @ x @ dw.T


def idct2(c: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2`."""
    dh, dw = (dct_matrix(s).to(c) for s in c.shape[-2:])
    return dh.T @ c @ dw


def remove_direct_component(x: torch.Tensor) -> torch.Tensor:
    """`x` with its DCT (0, 0) coefficient set to zero and every other coefficient kept.

    Computed in float32 even under autocast: bf16 transforms would leave part of the direct
    component behind."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        c = dct2(x.float())
        c[..., 0, 0] = 0
        return idct2(c)


def spatial_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed squared error of channel-normalised maps, per sample."""
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    return F.mse_loss(s, t, reduction="sum") / student.shape[0]


def frequency_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`spatial_loss` after removing the direct component of both maps."""
    return spatial_loss(remove_direct_component(student), remove_direct_component(teacher))
