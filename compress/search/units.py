"""The units a search acts on. In residual networks a unit is a residual block, removable when its
input and output shapes match (or, when projections are allowed, through its own shortcut path),
with the inner convolutions whose widths may shrink without touching the residual stream. In a
plain CNN (convs in `nn.Sequential` stacks) a unit is a stride-1 conv with the BatchNorm and
activation that follow it, removable when the next layer's inputs can be adapted, and shrinkable."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from compress.errors import InputError

# Unit kinds the policies see as the `kind` feature (append only: saved policies know the indices).
KINDS = ("basic", "bottleneck", "inverted_residual", "conv", "convnext", "shuffle")
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
    "residual blocks (CIFAR ResNet BasicBlock, torchvision/timm ResNet BasicBlock and Bottleneck, "
    "torchvision/timm RegNet bottlenecks, timm ConvNeXtBlock, torchvision MobileNetV2/V3 and timm "
    "InvertedResidual, torchvision ShuffleNetV2 units), or else the stride-1 convs of "
    "nn.Sequential Conv-BN-ReLU stacks (a plain, VGG-style CNN)"
)
# Modules that follow a plain conv and go with it when it is removed.
FOLLOWERS = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
    nn.ELU,
    nn.Mish,
)


@dataclass
class Unit:
    """One residual block, or one conv of a plain CNN."""

    name: str  # module path, e.g. layer2.3 (a block) or features.4 (a plain conv)
    kind: str
    removable: bool
    # Convs (or Linear layers) whose outputs may shrink: paths relative to the block; "" is the
    # unit's own conv.
    shrinkable: list[str]
    features: dict[str, float]
    # What removal leaves: "identity"; "shortcut", the block's own shortcut path (then its
    # post-add activation); "projection", a new 1x1 conv + BN (a block without a shortcut);
    # "next_input", for a plain conv, identities with the next layer's input channels resized;
    # "shuffle", for a ShuffleNetV2 unit, its split, concat and channel shuffle around an identity
    # branch (the later units' inputs keep the order they were trained on).
    removal: str = "identity"
    # Shrunk widths stay multiples of this: the group width of a grouped conv that reads the
    # shrinkable convs' outputs (whole groups are cut).
    group_width: int = 1

    def width_multiple(self, round_to: int) -> int:
        """What shrunk channel counts are multiples of: `round_to` and whole groups."""
        return math.lcm(round_to, self.group_width)


def conv_path(unit: str, conv: str) -> str:
    """The module path of a unit's shrinkable conv (`conv` relative to the unit, "" for itself)."""
    return f"{unit}.{conv}" if conv else unit


def out_width(layer: nn.Module) -> int:
    """Output channels of a conv, output features of a Linear layer."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def prune_out_fn(layer: nn.Module):
    """Torch-Pruning's function that cuts `layer`'s outputs."""
    import torch_pruning as tp

    if isinstance(layer, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_conv_out_channels


def block_kind(module: nn.Module) -> tuple[str, bool] | None:
    """(kind, keeps_shape) of a supported residual block, or None for anything else."""
    from torchvision.models import mobilenetv2, mobilenetv3, regnet, resnet, shufflenetv2

    from compress.models import cifar_resnet

    if isinstance(module, cifar_resnet.BasicBlock):
        return "basic", isinstance(module.shortcut, nn.Identity)
    if isinstance(module, (resnet.BasicBlock, resnet.Bottleneck)):
        kind = "basic" if isinstance(module, resnet.BasicBlock) else "bottleneck"
        return kind, module.downsample is None
    if isinstance(module, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual)):
        return "inverted_residual", bool(module.use_res_connect)
    if isinstance(module, regnet.ResBottleneckBlock):
        return "bottleneck", module.proj is None
    if isinstance(module, shufflenetv2.InvertedResidual):
        return "shuffle", module.stride == 1
    try:
        from timm.models import _efficientnet_blocks as eb
        from timm.models import convnext
        from timm.models import regnet as timm_regnet
        from timm.models import resnet as timm_resnet
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if isinstance(module, (timm_resnet.BasicBlock, timm_resnet.Bottleneck)):
        kind = "basic" if isinstance(module, timm_resnet.BasicBlock) else "bottleneck"
        return kind, module.downsample is None
    if isinstance(module, timm_regnet.Bottleneck):  # downsample None: no shortcut at all
        return "bottleneck", isinstance(module.downsample, nn.Identity)
    if isinstance(module, convnext.ConvNeXtBlock):
        return "convnext", isinstance(module.shortcut, nn.Identity)
    if isinstance(module, (eb.InvertedResidual, eb.DepthwiseSeparableConv)):
        return "inverted_residual", bool(module.has_skip)
    return None


def block_channels(block: nn.Module) -> tuple[int, int]:
    """(input, output) channels of a supported residual block."""
    from torchvision.models import shufflenetv2

    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if isinstance(block, shufflenetv2.InvertedResidual):  # concatenates two branches
        out = 2 * block.branch2[-3].out_channels
        return (out if block.stride == 1 else convs[0].in_channels), out
    return convs[0].in_channels, convs[-1].out_channels


def shortcut_path(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(shortcut, activation after the residual add) of a shape-changing residual block: with its
    residual branch gone the block computes activation(shortcut(x)). None for a block with no
    shortcut path (an inverted residual without a skip)."""
    from torchvision.models import regnet, resnet

    from compress.models import cifar_resnet

    if isinstance(block, cifar_resnet.BasicBlock):
        return block.shortcut, nn.ReLU()
    if isinstance(block, (resnet.BasicBlock, resnet.Bottleneck)):
        return block.downsample, block.relu
    if isinstance(block, regnet.ResBottleneckBlock):
        return block.proj, block.activation
    from timm.models import convnext
    from timm.models import regnet as timm_regnet
    from timm.models import resnet as timm_resnet

    if isinstance(block, timm_resnet.BasicBlock):
        return block.downsample, block.act2
    if isinstance(block, timm_resnet.Bottleneck):
        return block.downsample, block.act3
    if isinstance(block, timm_regnet.Bottleneck) and block.downsample is not None:
        return block.downsample, block.act3
    if isinstance(block, convnext.ConvNeXtBlock):
        return block.shortcut, nn.Identity()
    return None


def _is_squeeze_excitation(module: nn.Module) -> bool:
    name = type(module).__name__  # torchvision SqueezeExcitation, timm SqueezeExcite, SEModule
    return name.startswith("Squeeze") or name.endswith("SEModule")


def _inner_convs(block: nn.Module) -> list[str]:
    """Dense convs (and Linear layers) before the block's last one, outside shortcuts, a
    ShuffleNet unit's left branch and squeeze-excitation: their output channels stay inside the
    block (the last one writes the residual stream)."""
    layers = [
        (name, m)
        for name, m in block.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        and name.split(".")[0] not in ("downsample", "shortcut", "proj", "branch1")
        and not any(_is_squeeze_excitation(p) for p in _parents(block, name))
    ]
    return [name for name, m in layers[:-1] if getattr(m, "groups", 1) == 1]


def _group_width(block: nn.Module, path: str) -> int:
    """The group width of the conv right after the one at `path` when it is a grouped conv (not
    a depthwise one, whose channels Torch-Pruning cuts with its inputs); 1 otherwise."""
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
    if path not in names or path == names[-1]:
        return 1
    after = block.get_submodule(names[names.index(path) + 1])
    if after.groups == 1 or after.groups == after.out_channels:
        return 1
    return after.in_channels // after.groups


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
        if isinstance(m, (nn.Conv2d, nn.Linear)):

            def hook(mod, inp, out, name=name):
                if isinstance(mod, nn.Linear):
                    k = mod.in_features
                else:
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


def dependency_graph(model: nn.Module, input_size: tuple[int, int, int]):
    """Torch-Pruning's dependency graph of `model`, traced in eval mode (BatchNorm statistics are
    left as they are). ShuffleNetV2's channel shuffle is traced as an identity: Torch-Pruning
    cannot follow its 5-D view, and it only permutes the stream between units, whose channels are
    never cut (a cut reaching it is refused as shared beyond its block all the same)."""
    import torch_pruning as tp
    from torchvision.models import shufflenetv2

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with (
            mock.patch.object(shufflenetv2, "channel_shuffle", lambda x, groups: x),
            warnings.catch_warnings(),
        ):
            # Layer scales and GRN weights: cut along their one channel dimension, as intended.
            warnings.filterwarnings("ignore", "Unwrapped parameters detected")
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros(1, *input_size, device=device)
            )
    finally:
        model.train(was_training)


def channel_roles(model: nn.Module, graph, group) -> dict[str, set[str]]:
    """The named modules of a Torch-Pruning group (a cut of one conv's output channels) besides
    that conv, by role: `norm` (BatchNorm), `input` (inputs of a dense conv or a Linear) and
    `other` (anything else: another layer's outputs at an add or concat, a depthwise conv)."""
    names = {id(m): n for n, m in model.named_modules()}
    root = group[0][0].target.module
    roles: dict[str, set[str]] = {"norm": set(), "input": set(), "other": set()}
    for dep, _ in group:
        module = dep.target.module
        name = names.get(id(module))
        if name is None or module is root:  # functional ops (activations, pooling, flatten)
            continue
        if isinstance(module, nn.BatchNorm2d):
            roles["norm"].add(name)
        elif graph.is_in_channel_pruning_fn(dep.handler) and (
            isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
        ):
            roles["input"].add(name)
        else:
            roles["other"].add(name)
    return roles


def conv_roles(model: nn.Module, graph, path: str) -> dict[str, set[str]]:
    """`channel_roles` of the conv at `path`'s output channels."""
    import torch_pruning as tp

    conv = model.get_submodule(path)
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, [0])
    return channel_roles(model, graph, group)


def _parent(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    parent = path.rpartition(".")[0]
    return parent, model.get_submodule(parent) if parent else model


def _in_plain_sequential(model: nn.Module, path: str) -> bool:
    container = _parent(model, path)[1]
    return isinstance(container, nn.Sequential) and type(container).forward is nn.Sequential.forward


def followers(model: nn.Module, path: str) -> list[str]:
    """The BatchNorm and activation modules right after the conv at `path` in its Sequential."""
    parent, container = _parent(model, path)
    keys = list(container._modules)
    out = []
    for key in keys[keys.index(path.rpartition(".")[2]) + 1 :]:
        if not isinstance(container._modules[key], FOLLOWERS):
            break
        out.append(f"{parent}.{key}" if parent else key)
    return out


def next_input(model: nn.Module, path: str, roles: dict[str, set[str]]) -> str | None:
    """The one dense conv or Linear that takes the outputs of the plain conv at `path` (through
    its own BatchNorm, activations, pooling or flatten): its inputs can be resized when the conv
    is removed. None when those channels reach anything else."""
    if (
        roles["other"]
        or len(roles["input"]) != 1
        or not roles["norm"] <= set(followers(model, path))
    ):
        return None
    (name,) = roles["input"]
    layer = model.get_submodule(name)
    if isinstance(layer, nn.Linear) and layer.in_features % model.get_submodule(path).out_channels:
        return None
    return name


def _features(
    kind: str,
    convs: list[nn.Conv2d],
    channels: tuple[int, int],
    params: float,
    flops: float,
    position: float,
) -> dict[str, float]:
    return {
        "kind": float(KINDS.index(kind)),
        "kernel": float(max(m.kernel_size[0] for m in convs)),
        "stride": float(max(m.stride[0] for m in convs)),
        "padding": float(max(m.padding[0] for m in convs)),
        "in_channels": float(channels[0]),
        "out_channels": float(channels[1]),
        "params": params,
        "flops": flops,
        "position": position,
    }


def _cannot_decompose(model: nn.Module, reason: str) -> InputError:
    kinds = sorted({type(m).__name__ for m in model.children()}) or [type(model).__name__]
    return InputError(
        f"search: cannot decompose {type(model).__module__}.{type(model).__name__} "
        f"(children: {', '.join(kinds)}): {reason}; supported: {SUPPORTED}"
    )


def _plain_units(model: nn.Module, input_size: tuple[int, int, int]) -> list[Unit]:
    """Units of a plain CNN: every stride-1 dense conv in an nn.Sequential stack. As in N2N, the
    first conv, convs with stride != 1 (and grouped convs), pooling and Linear layers stay fixed,
    as does any conv outside such a stack (e.g. a classifier MLP written as convs)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    stacked = [
        n
        for n, m in convs.items()
        if _in_plain_sequential(model, n) and m.stride == (1, 1) and m.groups == 1
    ]
    if not stacked:
        raise _cannot_decompose(
            model,
            "no residual block of a supported kind and no stride-1 conv in an nn.Sequential stack",
        )
    flops = _conv_flops(model, input_size)
    order = [n for n in flops if n in convs]  # forward order
    graph = dependency_graph(model, input_size)
    names = [n for n in order if n in stacked]
    units = []
    for i, name in enumerate(names):
        conv = convs[name]
        roles = conv_roles(model, graph, name)
        same = conv.in_channels == conv.out_channels
        parts = [conv, *(model.get_submodule(f) for f in followers(model, name))]
        units.append(
            Unit(
                name=name,
                kind="conv",
                removable=name != order[0] and (same or next_input(model, name, roles) is not None),
                shrinkable=[] if roles["other"] else [""],
                features=_features(
                    "conv",
                    [conv],
                    (conv.in_channels, conv.out_channels),
                    float(sum(p.numel() for m in parts for p in m.parameters())),
                    flops[name],
                    i / max(1, len(names) - 1),
                ),
                removal="identity" if same else "next_input",
            )
        )
    return units


def find_units(
    model: nn.Module, input_size: tuple[int, int, int], project_shape_changes: bool = False
) -> list[Unit]:
    """Every supported residual block in forward order or, for a model without any, the convs of
    a plain CNN; InputError when it is neither. A block that changes shape is removable only
    with `project_shape_changes` (it then becomes its shortcut path, or a new 1x1 conv + BN)."""
    blocks = []
    for name, module in model.named_modules():
        if any(name.startswith(b + ".") for b, _, _ in blocks):
            continue  # a block inside a block (not in the supported families)
        found = block_kind(module)
        if found is not None:
            blocks.append((name, module, found))
    if not blocks:
        return _plain_units(model, input_size)
    flops = _conv_flops(model, input_size)
    units = []
    for i, (name, block, (kind, keeps_shape)) in enumerate(blocks):
        if keeps_shape:
            removal = "identity"
        else:
            removal = "projection" if shortcut_path(block) is None else "shortcut"
        if kind == "shuffle" and keeps_shape:
            removal = "shuffle"
        shrinkable = _inner_convs(block)
        units.append(
            Unit(
                name=name,
                kind=kind,
                removable=keeps_shape or project_shape_changes,
                shrinkable=shrinkable,
                features=_features(
                    kind,
                    [m for m in block.modules() if isinstance(m, nn.Conv2d)],
                    block_channels(block),
                    float(sum(p.numel() for p in block.parameters())),
                    sum(v for k, v in flops.items() if k.startswith(name + ".")),
                    i / max(1, len(blocks) - 1),
                ),
                removal=removal,
                group_width=math.lcm(1, *(_group_width(block, c) for c in shrinkable)),
            )
        )
    return units


def feature_matrix(units: list[Unit]) -> torch.Tensor:
    """One row per unit, each feature divided by its largest absolute value over the units."""
    x = torch.tensor([[u.features[f] for f in FEATURES] for u in units], dtype=torch.float32)
    scale = x.abs().amax(dim=0).clamp_min(1e-12)
    return x / scale
