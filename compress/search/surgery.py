"""Candidate surgery: removed units become identities, kept units' inner convs lose their least
important output channels (Torch-Pruning's dependency graph keeps BatchNorm, the next conv and
depthwise groups consistent). The result is a real, smaller module with the teacher's weights."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from compress.models.registry import ModelSpec, build_model
from compress.search.units import Unit

SPEC_PREFIX = "search:"


@dataclass(frozen=True)
class Candidate:
    """An architecture reachable from the teacher: units removed, and width scales of kept units."""

    removed: tuple[str, ...] = ()
    scales: tuple[tuple[str, float], ...] = ()  # (unit name, scale) for scales below 1

    @classmethod
    def make(cls, removed, scales: dict[str, float] | None = None) -> Candidate:
        kept = {k: float(v) for k, v in (scales or {}).items() if v < 1.0 and k not in removed}
        return cls(tuple(sorted(removed)), tuple(sorted(kept.items())))

    def key(self) -> str:
        """Architecture hash: equal candidates are evaluated once."""
        text = json.dumps([self.removed, self.scales])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"removed": list(self.removed), "scales": dict(self.scales)}


def kept_channels(channels: int, scale: float, round_to: int) -> int:
    """Channels left at `scale`, rounded to a multiple of `round_to` (at least one multiple)."""
    if scale >= 1.0 or channels <= round_to:
        return channels
    kept = round(channels * scale / round_to) * round_to
    return min(channels, max(round_to, kept))


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def shrink(
    model: nn.Module,
    targets: dict[str, dict[str, int]],
    input_size: tuple[int, int, int],
    by_importance: bool = True,
) -> None:
    """Cut output channels to `targets[block][conv]` (conv paths relative to their block), in place.

    `by_importance` keeps the channels with the largest group L2 magnitude; otherwise the first
    ones (used to rebuild a saved architecture before its weights are loaded). A conv whose
    channels are coupled to anything outside its own block (the residual stream) is refused.
    """
    import torch_pruning as tp

    todo = {
        (block, f"{block}.{conv}"): kept
        for block, convs in targets.items()
        for conv, kept in convs.items()
        if kept < model.get_submodule(f"{block}.{conv}").out_channels
    }
    if not todo:
        return
    device = next(model.parameters()).device
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.zeros(1, *input_size, device=device)
    )
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    names = _module_names(model)
    for (block, name), kept in todo.items():
        conv = model.get_submodule(name)
        n = conv.out_channels
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
        for dep, _ in group:
            other = names.get(id(dep.target.module))  # None: a functional op (relu, add)
            if other is not None and not other.startswith(block + "."):
                raise ValueError(
                    f"shrinking {name} would also change {other}: "
                    "its channels are shared beyond its block"
                )
        if by_importance:
            drop = importance(group).argsort()[: n - kept].tolist()
        else:
            drop = list(range(kept, n))
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=sorted(drop)).prune()


def build_candidate(
    teacher: nn.Module,
    units: list[Unit],
    candidate: Candidate,
    input_size: tuple[int, int, int],
    round_to: int = 8,
    reinit: bool = False,
) -> nn.Module:
    """The candidate as a new module: a copy of `teacher` with the surgery applied and checked by
    a forward pass; `reinit` re-initialises every layer (the original method's children)."""
    model = copy.deepcopy(teacher).cpu()
    for name in candidate.removed:
        model.set_submodule(name, nn.Identity())
    by_name = {u.name: u for u in units}
    targets = {
        unit: {
            conv: kept_channels(model.get_submodule(f"{unit}.{conv}").out_channels, scale, round_to)
            for conv in by_name[unit].shrinkable
        }
        for unit, scale in candidate.scales
    }
    shrink(model, targets, input_size)
    if reinit:
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *input_size))
    if out.ndim != 2:
        raise ValueError(f"candidate forward pass gave shape {tuple(out.shape)}")
    return model


def candidate_spec(
    base: ModelSpec,
    model: nn.Module,
    units: list[Unit],
    candidate: Candidate,
    input_size: tuple[int, int, int],
) -> ModelSpec:
    """A spec that rebuilds the candidate's architecture (then `load_weights` fills it)."""
    by_name = {u.name: u for u in units}
    channels = {
        unit: {c: model.get_submodule(f"{unit}.{c}").out_channels for c in by_name[unit].shrinkable}
        for unit, _ in candidate.scales
    }
    kwargs = {
        "base": base.to_dict(),
        "removed": list(candidate.removed),
        "channels": channels,
        "input_size": list(input_size),
    }
    return ModelSpec(SPEC_PREFIX + base.name, kwargs)


def rebuild(spec: ModelSpec) -> nn.Module:
    """The architecture a `search:` spec describes, with placeholder weights."""
    kw = spec.kwargs
    model = build_model(ModelSpec.from_dict(kw["base"]))
    for name in kw["removed"]:
        model.set_submodule(name, nn.Identity())
    shrink(model, kw["channels"], tuple(kw["input_size"]), by_importance=False)
    return model
