"""Feature taps: name intermediate outputs of any timm, torchvision or compress model by index.

A tap is an index into the model's stage list (negative counts from the end) or a module name.
The stage list is what timm's `features_only` returns (`feature_info` module names) for timm
models, and otherwise the model's `layerN` children or the children of `features`,
`encoder.layers`, `blocks`, `stages` or `layers`. Taps are read with forward hooks on the full
model, so one forward pass gives the logits and every tapped feature.

Every tap is brought to an NCHW map: token sequences (ViT, DeiT with its prefix tokens) lose their
prefix tokens and are reshaped to the patch grid, NHWC maps (Swin) are permuted, pooled vectors
become 1x1 maps. `TapLayout` remembers how, so a map can go back (teacher parameter perception).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import InputError

TapSpec = int | str
CONTAINERS = ("features", "encoder.layers", "blocks", "stages", "layers")


def stage_names(model: nn.Module) -> list[str]:
    """The module names a tap index counts over (see the module docstring)."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[0], dict) and "module" in info[0]:
        return [d["module"] for d in info]
    if hasattr(info, "module_name"):  # timm FeatureInfo object
        return list(info.module_name())
    layers = [n for n, _ in model.named_children() if n.startswith("layer") and n[5:].isdigit()]
    if layers:
        return layers
    for name in CONTAINERS:
        try:
            container = model.get_submodule(name)
        except AttributeError:
            continue
        children = [f"{name}.{n}" for n, _ in container.named_children()]
        if children:
            return children
    raise ValueError(
        f"no stage list found in {type(model).__name__}: name taps by module name instead"
    )


def _channels_hint(model: nn.Module, name: str) -> int | None:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        for d in info:
            if isinstance(d, dict) and d.get("module") == name:
                return d.get("num_chs")
    return None


@dataclass
class TapLayout:
    """How a tap's raw output becomes an NCHW map: `nchw`, `nhwc`, `tokens` or `vector`."""

    kind: str
    prefix_tokens: int = 0
    grid: tuple[int, int] = (1, 1)


@dataclass
class Tap:
    """One resolved tap: how the recipe named it, the module it reads and its output layout."""

    spec: TapSpec
    name: str
    module: nn.Module
    layout: TapLayout | None = None
    shape: tuple[int, ...] | None = None  # raw output shape seen when probing

    def describe(self) -> str:
        shape = "?" if self.shape is None else "x".join(str(s) for s in self.shape)
        return f"tap {self.spec!r} ({self.name}, output {shape})"


def _token_grid(model: nn.Module, length: int) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, patch grid) explaining a token sequence of `length`, or None."""
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if prefix is not None and grid is not None and prefix + grid[0] * grid[1] == length:
        return prefix, (int(grid[0]), int(grid[1]))
    candidates = [prefix] if prefix is not None else range(0, 9)
    if hasattr(model, "class_token") and prefix is None:  # torchvision ViT: one class token
        candidates = [1]
    for p in candidates:
        side = math.isqrt(max(length - p, 0))
        if side > 0 and side * side == length - p:
            return p, (side, side)
    return None


def resolve_taps(model: nn.Module, specs: Sequence[TapSpec], role: str) -> list[Tap]:
    """Tap objects for `specs` on `model`; InputError naming the bad tap otherwise."""
    try:
        stages = stage_names(model)
    except ValueError:
        stages = []
    taps = []
    for spec in specs:
        if isinstance(spec, int):
            if not stages:
                raise InputError(
                    f"{role}_taps: {type(model).__name__} has no stage list to index; "
                    "name the tap by module name (e.g. 'layer3')"
                )
            if not -len(stages) <= spec < len(stages):
                raise InputError(
                    f"{role}_taps: index {spec} is out of range; the {role} has "
                    f"{len(stages)} stages: {stages}"
                )
            name = stages[spec]
        else:
            name = spec
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputError(
                f"{role}_taps: no module '{name}' in {type(model).__name__} "
                f"(stages: {stages or 'none found'})"
            ) from None
        taps.append(Tap(spec, name, module))
    return taps


def first_tensor(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


class FeatureTaps:
    """Captures the tapped outputs of one model during `with taps.capture() as feats: model(x)`."""

    def __init__(self, model: nn.Module, specs: Sequence[TapSpec], role: str):
        self.model, self.role = model, role
        self.taps = resolve_taps(model, specs, role)
        self._nhwc = "swin" in type(model).__name__.lower()

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Raw outputs of the taps in recipe order (hooks are removed on exit)."""
        found: dict[int, torch.Tensor] = {}
        handles = [
            tap.module.register_forward_hook(
                lambda _m, _i, out, i=i: found.__setitem__(i, first_tensor(out))
            )
            for i, tap in enumerate(self.taps)
        ]
        feats: list[torch.Tensor] = []
        try:
            yield feats
        finally:
            for h in handles:
                h.remove()
        feats.extend(found[i] for i in range(len(self.taps)) if i in found)

    def learn_layouts(self, raw: list[torch.Tensor]) -> None:
        """Fix each tap's layout from one probe pass; InputError naming taps that cannot map."""
        if len(raw) != len(self.taps):
            missing = [t.name for i, t in enumerate(self.taps) if i >= len(raw)]
            raise InputError(f"{self.role}_taps: modules not run in forward: {missing}")
        for tap, x in zip(self.taps, raw, strict=True):
            tap.shape = tuple(x.shape)
            tap.layout = self._layout(tap, x)

    def _layout(self, tap: Tap, x: torch.Tensor) -> TapLayout:
        if x.ndim == 4:
            hint = _channels_hint(self.model, tap.name)
            nhwc = (hint is not None and x.shape[1] != hint and x.shape[3] == hint) or (
                hint is None and self._nhwc
            )
            return TapLayout("nhwc") if nhwc else TapLayout("nchw")
        if x.ndim == 3:
            found = _token_grid(self.model, x.shape[1])
            if found is None:
                raise InputError(
                    f"{self.role} {tap.describe()}: {x.shape[1]} tokens do not form a square "
                    "patch grid after prefix tokens; tap a block with patch tokens"
                )
            return TapLayout("tokens", found[0], found[1])
        if x.ndim == 2:
            return TapLayout("vector")
        raise InputError(
            f"{self.role} {tap.describe()}: expected a feature map, token sequence or vector"
        )

    def maps(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        """The captured outputs as NCHW maps."""
        return [to_map(x, tap.layout) for x, tap in zip(raw, self.taps, strict=True)]


def to_map(x: torch.Tensor, layout: TapLayout | None) -> torch.Tensor:
    """A tap's raw output as an (N, C, H, W) map."""
    assert layout is not None, "learn_layouts() first"
    if layout.kind == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layout.kind == "tokens":
        tokens = x[:, layout.prefix_tokens :]
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], *layout.grid)
    if layout.kind == "vector":
        return x[:, :, None, None]
    return x


def from_map(m: torch.Tensor, layout: TapLayout, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_map`; prefix tokens are taken from `like` (the tap's own raw output)."""
    if layout.kind == "nhwc":
        return m.permute(0, 2, 3, 1)
    if layout.kind == "tokens":
        tokens = m.flatten(2).transpose(1, 2)
        return torch.cat([like[:, : layout.prefix_tokens].detach(), tokens], dim=1)
    if layout.kind == "vector":
        return m.flatten(1)
    return m
