"""Units and surgery: what each supported family's units become when removed or shrunk, the
teacher's weights kept, the spec that rebuilds a candidate, and `build_student`, which rebuilds a
searched student in one call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import InputError
from compress.models import create_model, load_model, save_model
from compress.search import CandidateRecord, build_student
from compress.search.surgery import (
    Candidate,
    ShortcutPath,
    build_candidate,
    candidate_spec,
    remove_units,
    shrink,
)
from compress.search.units import Unit, conv_path, find_units, followers
from tests.search.conftest import SIZE, params

# name: (kwargs, what removing each kind of its units leaves)
FAMILIES = {
    "cifar_resnet20": ({}, {"identity", "shortcut"}),  # zero-pad shortcuts
    "torchvision:resnet18": ({}, {"identity", "shortcut"}),  # BasicBlock, 1x1 conv shortcuts
    "timm:resnet26": ({}, {"identity", "shortcut"}),  # Bottleneck
    # inverted residuals (with squeeze-excitation); no shortcut where the shape changes
    "torchvision:mobilenet_v3_small": ({}, {"identity", "projection"}),
    "timm:mobilenetv2_050": ({}, {"identity", "projection"}),
    # a plain CNN (with a small classifier MLP)
    "timm:vgg11_bn": ({"mlp_ratio": 1 / 64}, {"identity", "next_input"}),
}


def _assert_removed(student: nn.Module, teacher: nn.Module, unit: Unit) -> None:
    """The removed unit's modules are what its `removal` says."""
    replaced = student.get_submodule(unit.name)
    if unit.kind == "conv":
        for part in [unit.name, *followers(teacher, unit.name)]:
            assert isinstance(student.get_submodule(part), nn.Identity), part
    elif unit.removal == "identity":
        assert isinstance(replaced, nn.Identity)
    elif unit.removal == "shortcut":  # the block's own shortcut, with the teacher's weights
        assert isinstance(replaced, ShortcutPath)
        block = teacher.get_submodule(unit.name)
        own = block.shortcut if hasattr(block, "shortcut") else block.downsample
        torch.testing.assert_close(replaced.shortcut.state_dict(), own.state_dict(), rtol=0, atol=0)
    else:  # a new 1x1 conv + BN from the block's input to its output channels
        conv, bn = replaced
        assert conv.kernel_size == (1, 1) and isinstance(bn, nn.BatchNorm2d)
        assert (conv.in_channels, conv.out_channels) == (
            unit.features["in_channels"],
            unit.features["out_channels"],
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_surgery_keeps_forward_valid_and_lowers_params(name, tmp_path):
    torch.manual_seed(0)
    kwargs, removals = FAMILIES[name]
    teacher, spec = create_model(name, kwargs, num_classes=10)
    teacher.eval()
    units = find_units(teacher, SIZE, project_shape_changes=True)
    removable = [u for u in units if u.removable]
    assert removable and any(u.shrinkable for u in units)
    # two units of each removal the family has (identity, shortcut, projection, next input)
    by_kind: dict[str, list[Unit]] = {}
    for u in removable:
        by_kind.setdefault(u.removal, []).append(u)
    assert set(by_kind) == removals
    removed = [u for kind in by_kind.values() for u in kind[:2]]
    candidate = Candidate.make([u.name for u in removed], {u.name: 0.5 for u in units})
    student = build_candidate(teacher, units, candidate, SIZE)
    x = torch.randn(2, *SIZE)
    assert student(x).shape == (2, 10)
    assert params(student) < params(teacher)
    for unit in removed:
        _assert_removed(student, teacher, unit)
    # Kept units shrink after the removals
    kept = next(u for u in units if u.shrinkable and u.name not in candidate.removed)
    conv = conv_path(kept.name, kept.shrinkable[0])
    assert student.get_submodule(conv).out_channels < teacher.get_submodule(conv).out_channels
    # Saved like any model, it rebuilds from its spec with the same outputs
    path = save_model(
        student, candidate_spec(spec, student, units, candidate, SIZE), tmp_path / "s.safetensors"
    )
    again, again_spec = load_model(path)
    assert again_spec.name == "search:" + name
    torch.testing.assert_close(again.eval()(x), student(x))


def test_a_downsampling_block_is_removed_only_with_a_projection():
    torch.manual_seed(0)
    teacher, _ = create_model("cifar_resnet20")
    teacher.eval()
    default = {u.name: u for u in find_units(teacher, SIZE)}
    assert not default["layer2.0"].removable and not default["layer3.0"].removable
    units = find_units(teacher, SIZE, project_shape_changes=True)
    shape_changing = [u.name for u in units if u.removal != "identity"]
    assert shape_changing == ["layer2.0", "layer3.0"] and all(u.removable for u in units)
    assert [u.features for u in units] == list(default[u.name].features for u in units)
    # The candidate is the teacher with layer2.0 replaced by its zero-pad shortcut
    student = build_candidate(teacher, units, Candidate.make(["layer2.0"]), SIZE)
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        h = teacher.layer1(torch.relu(teacher.bn1(teacher.conv1(x))))
        h = teacher.layer3(teacher.layer2[1:](teacher.layer2[0].shortcut(h)))
        manual = teacher.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))
        torch.testing.assert_close(student(x), manual)
    # Torch-Pruning still shrinks the other blocks, the one after the replacement included
    shrunk = build_candidate(
        teacher, units, Candidate.make(["layer2.0"], {"layer2.1": 0.5, "layer3.0": 0.5}), SIZE
    )
    assert (shrunk.layer2[1].conv1.out_channels, shrunk.layer3[0].conv1.out_channels) == (16, 32)
    assert shrunk(x).shape == (4, 10)


def _plain_cnn() -> nn.Sequential:
    def conv(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    torch.manual_seed(0)
    return nn.Sequential(
        *conv(3, 16),  # 0: the first conv stays
        *conv(16, 32),  # 3
        nn.MaxPool2d(2),
        *conv(32, 16),  # 7: removing it widens the inputs of 10
        *conv(16, 24),  # 10: removing it narrows the Linear's inputs
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24 * 4, 10),
    ).eval()


def test_removing_a_plain_conv_resizes_the_next_layers_inputs():
    teacher, _ = create_model("timm:vgg11_bn", {"mlp_ratio": 1 / 64}, num_classes=10)
    teacher.eval()
    units = {u.name: u for u in find_units(teacher, SIZE)}
    assert not units["features.0"].removable and units["features.4"].removable
    student = build_candidate(
        teacher, list(units.values()), Candidate.make(["features.4", "features.11"]), SIZE
    )
    # 64 -> 128 removed: the next conv takes 64 channels, its 64 strongest input filters kept
    before, after = teacher.features[8], student.features[8]
    assert (before.in_channels, after.in_channels) == (128, 64)
    keep = before.weight.pow(2).sum(dim=(0, 2, 3)).argsort(descending=True)[:64].sort().values
    torch.testing.assert_close(after.weight, before.weight[:, keep], rtol=0, atol=0)
    assert student.features[15].in_channels == 256  # 256 -> 256 removed: an identity
    assert all(isinstance(student.features[i], nn.Identity) for i in (4, 5, 6, 11, 12, 13))

    plain = _plain_cnn()
    units = find_units(plain, SIZE)
    assert [(u.name, u.removable) for u in units] == [
        ("0", False),
        ("3", True),
        ("7", True),
        ("10", True),
    ]
    wider = build_candidate(plain, units, Candidate.make(["7"]), SIZE)
    assert wider[10].in_channels == 32  # the teacher's 16 input filters, then 16 at zero
    torch.testing.assert_close(wider[10].weight[:, :16], plain[10].weight, rtol=0, atol=0)
    assert not wider[10].weight[:, 16:].any()
    narrower = build_candidate(plain, units, Candidate.make(["10"], {"3": 0.5}), SIZE)
    # flatten: each of the 16 kept channels keeps its block of 4 Linear inputs
    weight = plain[15].weight.view(10, 24, 4)
    keep = weight.pow(2).sum(dim=(0, 2)).argsort(descending=True)[:16].sort().values
    torch.testing.assert_close(narrower[15].weight.view(10, 16, 4), weight[:, keep])
    assert narrower[3].out_channels == 16 and narrower[7].in_channels == 16
    # The surgery replayed on a fresh model (as `rebuild` does) takes the weights back
    x = torch.randn(2, *SIZE)
    for candidate, student in [(["7"], wider), (["10"], narrower)]:
        fresh = _plain_cnn()
        remove_units(fresh, candidate, SIZE, by_importance=False)
        shrink(fresh, {"3": {"": student[3].out_channels}}, SIZE, by_importance=False)
        fresh.load_state_dict(student.state_dict())
        torch.testing.assert_close(fresh(x), student(x))


def test_candidates_inherit_the_teachers_weights(resnet20_weights):
    teacher, _ = create_model("cifar_resnet20", weights=resnet20_weights)
    teacher.eval()
    units = find_units(teacher, SIZE)
    x = torch.randn(4, *SIZE)
    same = build_candidate(teacher, units, Candidate(), SIZE)
    torch.testing.assert_close(same(x), teacher(x), rtol=0, atol=0)
    shrunk = build_candidate(teacher, units, Candidate.make([], {"layer3.1": 0.5}), SIZE)
    kept = shrunk.layer3[1].conv1.weight
    full = teacher.layer3[1].conv1.weight
    assert kept.shape[0] == 32
    # every kept filter is one of the teacher's filters, the largest ones by group magnitude
    matches = [(full == k).all(dim=(1, 2, 3)).nonzero().flatten().tolist() for k in kept]
    assert all(len(m) == 1 for m in matches)
    torch.testing.assert_close(shrunk.layer3[0].conv1.weight, teacher.layer3[0].conv1.weight)
    fresh = build_candidate(teacher, units, Candidate(), SIZE, reinit=True)
    assert not torch.equal(fresh.conv1.weight, teacher.conv1.weight)


def test_shrinkage_keeps_the_zero_pad_shortcut_stream(resnet56_weights):
    teacher, _ = create_model("cifar_resnet56", weights=resnet56_weights)
    teacher.eval()
    units = find_units(teacher, SIZE)
    assert len(units) == 27 and sum(u.removable for u in units) == 25  # 2 blocks downsample
    student = build_candidate(
        teacher, units, Candidate.make([], {u.name: 0.25 for u in units}), SIZE
    )
    blocks = [m for layer in (student.layer1, student.layer2, student.layer3) for m in layer]
    assert [b.conv2.out_channels for b in blocks] == [16] * 9 + [32] * 9 + [64] * 9
    assert [b.conv1.out_channels for b in blocks] == [8] * 9 + [8] * 9 + [16] * 9
    assert student(torch.randn(1, *SIZE)).shape == (1, 10)
    assert params(student) < 0.5 * params(teacher)
    # The stream is coupled across blocks by the parameter-free shortcut: shrinking it is refused
    with pytest.raises(ValueError, match="shared beyond its block"):
        shrink(teacher, {"layer1.0": {"conv2": 8}}, SIZE)


def test_unsupported_model_is_named():
    import timm

    no_conv = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(
        InputError, match=r"cannot decompose torch\.nn\.modules\.container\.Sequential"
    ):
        find_units(no_conv, SIZE)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    with pytest.raises(InputError, match=r"cannot decompose timm\.models\.vision_transformer"):
        find_units(vit, SIZE)


@pytest.mark.parametrize("given", ["candidate", "record", "metric"])
def test_build_student_is_the_searchs_candidate_with_its_spec(given, tmp_path):
    torch.manual_seed(0)
    teacher, spec = create_model("cifar_resnet20")
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    units = find_units(teacher.eval(), SIZE)
    teacher.train()
    candidate = Candidate.make(["layer1.1", "layer3.2"], {"layer2.1": 0.5, "layer3.0": 0.25})
    chosen = {
        "candidate": candidate,
        "record": CandidateRecord.of(candidate, {"reward_raw": 0.4}, phase="joint"),
        "metric": candidate.to_dict(),  # a search stage's `best_candidate` metric
    }[given]
    student, student_spec = build_student(teacher, spec, chosen, SIZE)
    assert teacher.training  # the teacher's mode and weights are as they were
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    by_hand = build_candidate(teacher.eval(), units, candidate, SIZE)
    assert student_spec == candidate_spec(spec, by_hand, units, candidate, SIZE)
    assert student_spec.name == "search:cifar_resnet20" and not student.training
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(student(x), by_hand(x), rtol=0, atol=0)
    assert params(student) < params(teacher)
    again, _ = load_model(save_model(student, student_spec, tmp_path / "s.safetensors"))
    torch.testing.assert_close(again.eval()(x), student(x))
