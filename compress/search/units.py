"""The units a search acts on: residual blocks, each removable (same input and output shape) or
not, with the inner convolutions whose widths may shrink without touching the residual stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import InputError

# Block kinds the policies see as the `type` feature.
KINDS = ("basic", "bottleneck", "inverted_residual")
FEATURES = (
    "kind",
    "kernel",
    "stride",
    "padding",
    "in_channels",
    "out_channels",
    "params",
    "flops",
    "position",
)
SUPPORTED = (
    "CIFAR ResNet BasicBlock, torchvision/timm ResNet BasicBlock and Bottleneck, "
    "torchvision MobileNetV2/V3 and timm InvertedResidual"
)


@dataclass
class Unit:
    """One residual block of the model."""

    name: str  # module path, e.g. layer2.3
    kind: str
    removable: bool  # input and output shapes match: the block may become an identity
    shrinkable: list[str]  # inner convs (paths relative to the block) whose outputs may shrink
    features: dict[str, float]


def _block_kind(module: nn.Module) -> tuple[str, bool] | None:
    """(kind, removable) of a supported residual block, or None for anything else."""
    from torchvision.models import mobilenetv2, mobilenetv3, resnet

    from compress.models import cifar_resnet

    if isinstance(module, cifar_resnet.BasicBlock):
        return "basic", isinstance(module.shortcut, nn.Identity)
    if isinstance(module, (resnet.BasicBlock, resnet.Bottleneck)):
        kind = "basic" if isinstance(module, resnet.BasicBlock) else "bottleneck"
        return kind, module.downsample is None
    if isinstance(module, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual)):
        return "inverted_residual", bool(module.use_res_connect)
    try:
        from timm.models import _efficientnet_blocks as eb
        from timm.models import resnet as timm_resnet
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if isinstance(module, (timm_resnet.BasicBlock, timm_resnet.Bottleneck)):
        kind = "basic" if isinstance(module, timm_resnet.BasicBlock) else "bottleneck"
        return kind, module.downsample is None
    if isinstance(module, (eb.InvertedResidual, eb.DepthwiseSeparableConv)):
        return "inverted_residual", bool(module.has_skip)
    return None


def _inner_convs(block: nn.Module) -> list[str]:
    """Dense convs before the block's last conv, outside shortcuts and squeeze-excitation: their
    output channels stay inside the block (the last conv writes the residual stream)."""
    convs = [
        (name, m)
        for name, m in block.named_modules()
        if isinstance(m, nn.Conv2d)
        and name.split(".")[0] not in ("downsample", "shortcut")  # projection shortcuts
        and not any(type(p).__name__.startswith("Squeeze") for p in _parents(block, name))
    ]
    return [name for name, m in convs[:-1] if m.groups == 1]


def _parents(root: nn.Module, path: str) -> list[nn.Module]:
    parts, out, node = path.split("."), [], root
    for part in parts[:-1]:
        node = getattr(node, part)
        out.append(node)
    return out


def _conv_flops(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, float]:
    """Multiply-add FLOPs (x2) of every conv and linear layer, by module path, for one image."""
    flops: dict[str, float] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(mod, inp, out, name=name):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                flops[name] = 2.0 * k * out[0].numel()

            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return flops


def find_units(model: nn.Module, input_size: tuple[int, int, int]) -> list[Unit]:
    """Every supported residual block in forward order; InputError when the model has none."""
    blocks = []
    for name, module in model.named_modules():
        if any(name.startswith(b + ".") for b, _, _ in blocks):
            continue  # a block inside a block (not in the supported families)
        found = _block_kind(module)
        if found is not None:
            blocks.append((name, module, found))
    if not blocks:
        kinds = sorted({type(m).__name__ for m in model.children()}) or [type(model).__name__]
        raise InputError(
            f"search: cannot decompose {type(model).__module__}.{type(model).__name__} "
            f"(children: {', '.join(kinds)}): no residual block of a supported kind "
            f"({SUPPORTED}); plain CNNs are not supported"
        )
    flops = _conv_flops(model, input_size)
    units = []
    for i, (name, block, (kind, removable)) in enumerate(blocks):
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        first, last = convs[0], convs[-1]
        units.append(
            Unit(
                name=name,
                kind=kind,
                removable=removable,
                shrinkable=_inner_convs(block),
                features={
                    "kind": float(KINDS.index(kind)),
                    "kernel": float(max(m.kernel_size[0] for m in convs)),
                    "stride": float(max(m.stride[0] for m in convs)),
                    "padding": float(max(m.padding[0] for m in convs)),
                    "in_channels": float(first.in_channels),
                    "out_channels": float(last.out_channels),
                    "params": float(sum(p.numel() for p in block.parameters())),
                    "flops": sum(v for k, v in flops.items() if k.startswith(name + ".")),
                    "position": i / max(1, len(blocks) - 1),
                },
            )
        )
    return units


def feature_matrix(units: list[Unit]) -> torch.Tensor:
    """One row per unit, each feature divided by its largest absolute value over the units."""
    x = torch.tensor([[u.features[f] for f in FEATURES] for u in units], dtype=torch.float32)
    scale = x.abs().amax(dim=0).clamp_min(1e-12)
    return x / scale
