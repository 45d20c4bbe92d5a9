"""Projectors from a student map to a teacher tap's width and grid (training only).

- `HintProjector`: 1x1 conv + BN to the teacher's channels, then the student's grid is pooled
  (larger) or bilinearly interpolated (smaller) to the teacher's: the FitNets-style hint.
- `CrossAttentionProjector` (ScaleKD's CAP): conv+BN+ReLU patchify, a learned positional
  embedding, then multi-head cross-attention whose queries are learned (one per teacher token) or
  given (teacher-processed tokens from the previous projector), then LayerNorm + MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn


def align_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample an (N, C, H, W) map to `grid`: average pooling down, bilinear up."""
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    if x.shape[-2] >= grid[0] and x.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


class HintProjector(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.proj = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
        )

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(align_grid(x, self.grid))


def default_heads(channels: int) -> int:
    """About 64 channels per head (ScaleKD: 768/16, 1536/24), and a divisor of `channels`."""
    heads = max(1, channels // 64)
    while channels % heads:
        heads -= 1
    return heads


class CrossAttentionProjector(nn.Module):
    def __init__(
        self,
        student_channels: int,
        student_grid: tuple[int, int],
        teacher_channels: int,
        teacher_grid: tuple[int, int],
        heads: int | None = None,
        softmax_scale: float = 5.0,
        learned_queries: bool = True,
    ):
        super().__init__()
        cs, ct = student_channels, teacher_channels
        self.grid = tuple(teacher_grid)
        self.heads = heads or default_heads(ct)
        if ct % self.heads:
            raise ValueError(f"{ct} teacher channels are not divisible by {self.heads} heads")
        self.scale = (ct // self.heads) ** -0.5 * softmax_scale
        self.patchify = nn.Sequential(
            nn.Conv2d(cs, cs, 3, padding=1, bias=False), nn.BatchNorm2d(cs), nn.ReLU(inplace=True)
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, cs, *student_grid))
        trunc_normal_(self.pos_embed, std=0.02)
        self.query = nn.Embedding(self.grid[0] * self.grid[1], ct) if learned_queries else None
        self.proj_pos = nn.Sequential(nn.Conv2d(ct, ct, 1), nn.ReLU(inplace=True))
        self.q = nn.Linear(ct, ct)
        self.kv = nn.Linear(cs, 2 * ct)
        self.out = nn.Linear(ct, ct)
        self.norm = nn.LayerNorm(ct)
        self.mlp = Mlp(ct, 4 * ct)

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """(N, Cs, Hs, Ws) -> (N, Ct, Ht, Wt); `queries` (N, Ct, Ht, Wt) when not learned."""
        n = x.shape[0]
        h, w = self.grid
        x = self.patchify(x) + self.pos_embed
        if self.query is not None:
            q = self.query.weight.T.reshape(1, -1, h, w).expand(n, -1, -1, -1)
        else:
            assert queries is not None, "this projector takes its queries from the previous one"
            q = queries
        q = self.proj_pos(q).flatten(2).transpose(1, 2)  # (N, Ht*Wt, Ct)
        tokens = x.flatten(2).transpose(1, 2)  # (N, Hs*Ws, Cs)
        k, v = self.kv(tokens).chunk(2, dim=-1)
        split = lambda t: t.reshape(n, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        attn = (split(self.q(q)) @ split(k).transpose(-2, -1)) * self.scale
        fea = (attn.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, h * w, -1)
        fea = self.norm(self.out(fea))
        fea = fea + self.mlp(fea)
        return fea.transpose(1, 2).reshape(n, -1, h, w)
