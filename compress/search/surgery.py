"""Candidate surgery: removed units become identities (a shape-changing block its shortcut path;
a plain conv whose channels change leaves the next layer's inputs resized), kept units' convs lose
their least important output channels (Torch-Pruning's dependency graph keeps BatchNorm, the next
conv and depthwise groups consistent; a grouped conv they feed loses whole groups). The result is
a real, smaller module with the teacher's weights."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from compress.models.registry import ModelSpec, build_model, check_spec, register_spec_kind
from compress.search.units import (
    Unit,
    block_channels,
    block_kind,
    channel_roles,
    conv_path,
    conv_roles,
    dependency_graph,
    followers,
    next_input,
    out_width,
    prune_out_fn,
    shortcut_path,
)

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


def shrink(
    model: nn.Module,
    targets: dict[str, dict[str, int]],
    input_size: tuple[int, int, int],
    by_importance: bool = True,
) -> None:
    """Cut output channels (of a conv or a Linear layer) to `targets[unit][conv]` (paths relative
    to their unit, "" for a plain conv unit itself), in place.

    `by_importance` keeps the channels with the largest group L2 magnitude; otherwise the first
    ones (used to rebuild a saved architecture before its weights are loaded). A block's conv whose
    channels are coupled to anything outside its own block (the residual stream) is refused; a
    plain conv may take its BatchNorm and the next layer's inputs along, nothing else. Channels
    that feed a grouped conv go by whole groups (the grouped conv keeps its group width and loses
    those groups' outputs too); a count that is not a multiple of the group width is refused.
    """
    import torch_pruning as tp

    todo = {
        (unit, conv_path(unit, conv)): kept
        for unit, convs in targets.items()
        for conv, kept in convs.items()
        if kept < out_width(model.get_submodule(conv_path(unit, conv)))
    }
    if not todo:
        return
    graph = dependency_graph(model, input_size)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    for (unit, name), kept in todo.items():
        layer = model.get_submodule(name)
        n = out_width(layer)
        group = graph.get_pruning_group(layer, prune_out_fn(layer), idxs=list(range(n)))
        _check_within(model, graph, group, unit, name)
        grouped = _grouped_reader(graph, group)
        size = grouped.in_channels // grouped.groups if grouped is not None else 1
        if kept % size:
            raise ValueError(
                f"shrinking {name} to {kept} channels would split a group of the grouped conv "
                f"it feeds (group width {size})"
            )
        if by_importance:
            scores = importance(group).view(-1, size).sum(dim=1)
            cut = scores.argsort()[: (n - kept) // size].tolist()
        else:
            cut = list(range(kept // size, n // size))
        drop = sorted(g * size + i for g in cut for i in range(size))
        if grouped is None:
            graph.get_pruning_group(layer, prune_out_fn(layer), idxs=drop).prune()
        else:
            _cut_groups(model, graph, layer, grouped, sorted(cut), unit, name)


def _check_within(model: nn.Module, graph, group, unit: str, name: str) -> None:
    """Refuse a cut (`group`) whose channels reach beyond `unit` (for a plain conv unit: beyond
    its BatchNorm and the next layer's inputs)."""
    roles = channel_roles(model, graph, group)
    if name == unit:  # a plain conv
        beyond = roles["other"]
    else:
        beyond = {m for r in roles.values() for m in r if not m.startswith(unit + ".")}
    if beyond:
        raise ValueError(
            f"shrinking {name} would also change {sorted(beyond)[0]}: "
            "its channels are shared beyond its block"
        )


def _grouped_reader(graph, group) -> nn.Conv2d | None:
    """The grouped conv (not depthwise, whose channels Torch-Pruning cuts with its inputs) that
    takes a cut's channels as its inputs, if any."""
    for dep, _ in group:
        m = dep.target.module
        if (
            isinstance(m, nn.Conv2d)
            and 1 < m.groups != m.out_channels
            and graph.is_in_channel_pruning_fn(dep.handler)
        ):
            return m
    return None


def _cut_groups(
    model: nn.Module,
    graph,
    layer: nn.Module,
    grouped: nn.Conv2d,
    cut: list[int],
    unit: str,
    name: str,
) -> None:
    """Remove groups `cut` of `grouped` with the channels of `layer` that feed them. Torch-Pruning
    cuts the grouped conv's outputs with what reads them (BatchNorm, squeeze-excitation, the next
    conv) and `layer`'s outputs with their BatchNorm; the grouped conv's inputs lose whole groups
    here, as its weight holds each group's inputs once (Torch-Pruning would cut within groups)."""
    import torch_pruning as tp

    size_in = grouped.in_channels // grouped.groups
    size_out = grouped.out_channels // grouped.groups
    drop_out = [g * size_out + i for g in cut for i in range(size_out)]
    outputs = graph.get_pruning_group(grouped, tp.prune_conv_out_channels, idxs=drop_out)
    _check_within(model, graph, outputs, unit, name)
    outputs.prune()
    drop_in = [g * size_in + i for g in cut for i in range(size_in)]
    for dep, idxs in graph.get_pruning_group(layer, prune_out_fn(layer), idxs=drop_in):
        if dep.target.module is not grouped:
            dep(idxs)
    grouped.in_channels -= len(drop_in)
    grouped.groups -= len(cut)


class ShortcutPath(nn.Module):
    """A residual block without its residual branch: activation(shortcut(x)), the block's own
    shortcut (and its weights) mapping the input shape to the output shape."""

    def __init__(self, shortcut: nn.Module, activation: nn.Module):
        super().__init__()
        self.shortcut, self.activation = shortcut, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.shortcut(x))


def channel_copy_projection(block: nn.Module) -> nn.Sequential:
    """A new 1x1 conv (the block's stride) + BatchNorm from the block's input to its output
    channels, for a block with no shortcut of its own. Initialised as the parameter-free option-A
    shortcut maps: output channel o copies input channel o mod C_in at the strided positions, and
    the BatchNorm starts neutral; candidate fine-tuning then trains it."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    c_in, c_out = block_channels(block)
    stride = max(m.stride[0] for m in convs)
    conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        out = torch.arange(c_out)
        conv.weight[out, out % c_in] = 1.0
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


def _resize_inputs(model: nn.Module, path: str, old: int, new: int, by_importance: bool) -> None:
    """Give the dense conv or Linear at `path`, which takes `old` channels (a Linear after flatten:
    a block of features per channel), `new` channels, keeping the teacher's weights. Fewer: its
    `new` input channels with the largest weight L2 norm stay (the first ones without
    `by_importance`), cut by Torch-Pruning; more: every old channel stays and the added ones start
    at zero weight, so the layer first sees what it saw before."""
    import torch_pruning as tp

    layer = model.get_submodule(path)
    weight = layer.weight.detach()
    per_channel = weight.reshape(weight.shape[0], old, -1)  # (out, channel, kernel or features)
    if new < old:
        if by_importance:
            keep = per_channel.pow(2).sum(dim=(0, 2)).argsort(descending=True)[:new]
        else:
            keep = torch.arange(new)
        drop = sorted(set(range(old)) - set(keep.tolist()))
        if isinstance(layer, nn.Linear):
            size = per_channel.shape[2]
            drop = [c * size + j for c in drop for j in range(size)]
            tp.prune_linear_in_channels(layer, drop)
        else:
            tp.prune_conv_in_channels(layer, drop)
        return
    grown = torch.cat(
        [per_channel, per_channel.new_zeros(len(weight), new - old, per_channel.shape[2])], 1
    )
    if isinstance(layer, nn.Linear):
        bigger = nn.Linear(grown[0].numel(), layer.out_features, bias=layer.bias is not None)
    else:
        bigger = nn.Conv2d(
            new,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
        )
    bigger = bigger.to(weight.device, weight.dtype)
    with torch.no_grad():
        bigger.weight.copy_(grown.reshape(bigger.weight.shape))
        if layer.bias is not None:
            bigger.bias.copy_(layer.bias)
    model.set_submodule(path, bigger)


def _remove_conv(
    model: nn.Module, name: str, input_size: tuple[int, int, int], by_importance: bool
) -> None:
    conv = model.get_submodule(name)
    if conv.in_channels != conv.out_channels:
        roles = conv_roles(model, dependency_graph(model, input_size), name)
        layer = next_input(model, name, roles)
        if layer is None:
            raise ValueError(
                f"removing {name} changes its channels ({conv.in_channels} in, "
                f"{conv.out_channels} out) and no single next conv or Linear can take that"
            )
        _resize_inputs(model, layer, conv.out_channels, conv.in_channels, by_importance)
    for part in [name, *followers(model, name)]:
        model.set_submodule(part, nn.Identity())


def remove_units(
    model: nn.Module,
    names: list[str] | tuple[str, ...],
    input_size: tuple[int, int, int],
    by_importance: bool = True,
) -> None:
    """Remove units in place, in forward (module) order: a residual block whose shape holds becomes
    an identity (a ShuffleNetV2 unit keeps its channel shuffle around an identity branch), one that
    changes shape its `ShortcutPath` (or a `channel_copy_projection`); a plain conv, with the
    BatchNorm and activations after it, becomes identities, the next layer's inputs resized when
    its channels change (`by_importance` as in `shrink`)."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for name in sorted(names, key=lambda n: order[n]):
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            _remove_conv(model, name, input_size, by_importance)
            continue
        found = block_kind(module)
        if found == ("shuffle", True):
            model.set_submodule(f"{name}.branch2", nn.Identity())
            continue
        if found is None or found[1]:
            model.set_submodule(name, nn.Identity())
            continue
        path = shortcut_path(module)
        model.set_submodule(
            name, ShortcutPath(*path) if path is not None else channel_copy_projection(module)
        )


def reinitialise(model: nn.Module) -> None:
    """Fresh weights for every layer, in place (the original method's children)."""
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()


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
    remove_units(model, candidate.removed, input_size)
    by_name = {u.name: u for u in units}
    targets = {
        unit: {
            conv: kept_channels(
                out_width(model.get_submodule(conv_path(unit, conv))),
                scale,
                by_name[unit].width_multiple(round_to),
            )
            for conv in by_name[unit].shrinkable
        }
        for unit, scale in candidate.scales
    }
    shrink(model, targets, input_size)
    if reinit:
        reinitialise(model)
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
        unit: {
            c: out_width(model.get_submodule(conv_path(unit, c))) for c in by_name[unit].shrinkable
        }
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
    remove_units(model, kw["removed"], tuple(kw["input_size"]), by_importance=False)
    shrink(model, kw["channels"], tuple(kw["input_size"]), by_importance=False)
    return model


register_spec_kind(SPEC_PREFIX, check_spec, rebuild)  # search:BASE checks as its base spec
