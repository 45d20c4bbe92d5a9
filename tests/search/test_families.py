"""Search units and surgery on ConvNeXt, RegNet and ShuffleNetV2 (random init, 32x32 inputs, no
downloads), the error for a model without supported units, and what a search that finds no valid
candidate says."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compress.errors import InputError
from compress.models import create_model
from compress.models.registry import build_model
from compress.search import Evaluation
from compress.search.loop import PolicySearch
from compress.search.settings import SearchSettings
from compress.search.surgery import Candidate, build_candidate, candidate_spec
from compress.search.units import FEATURES, Unit, conv_path, find_units, out_width
from compress.train.distributed import DistInfo
from compress.train.loop import TrainingConfig, fit
from compress.train.objectives import DistillationObjective
from tests.search.conftest import SIZE, params

FAMILIES = [
    "timm:convnext_atto",
    "timm:regnetx_002",
    "timm:regnety_002",
    "torchvision:regnet_x_400mf",
    "torchvision:shufflenet_v2_x0_5",
]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _reader(block: nn.Module, path: str) -> nn.Conv2d | None:
    """The conv after the one at `path` inside `block` (module order)."""
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
    i = names.index(path)
    return block.get_submodule(names[i + 1]) if i + 1 < len(names) else None


@pytest.mark.parametrize("name", FAMILIES)
def test_a_family_candidate_runs_trains_and_rebuilds(name, tmp_path):
    torch.manual_seed(0)
    teacher, spec = create_model(name, num_classes=10)
    teacher.eval()
    units = find_units(teacher, SIZE)
    removable = [u for u in units if u.removable]
    assert removable and any(u.shrinkable for u in units)
    gone = removable[len(removable) // 2]
    kept = next(u for u in units if u.shrinkable and u.name != gone.name)
    candidate = Candidate.make([gone.name], {kept.name: 0.5})
    student = build_candidate(teacher, units, candidate, SIZE)

    x = torch.randn(2, *SIZE)
    assert student(x).shape == (2, 10)
    assert params(student) < params(teacher)
    replaced = student.get_submodule(gone.name)
    if gone.removal == "shuffle":  # the unit keeps its channel shuffle around an identity branch
        assert isinstance(replaced.branch2, nn.Identity)
    else:
        assert gone.removal == "identity" and isinstance(replaced, nn.Identity)
    path = conv_path(kept.name, kept.shrinkable[0])
    assert out_width(student.get_submodule(path)) < out_width(teacher.get_submodule(path))
    if kept.group_width > 1:  # RegNet: the grouped conv keeps its group width, loses groups
        before = _reader(teacher.get_submodule(kept.name), kept.shrinkable[0])
        after = _reader(student.get_submodule(kept.name), kept.shrinkable[0])
        assert before.in_channels // before.groups == kept.group_width
        assert after.in_channels // after.groups == kept.group_width
        assert after.groups < before.groups

    # One SGD step of KD fine-tuning, as the search stage trains candidates, on a batch of 16
    # images (a random-init RegNet's BatchNorm at 1x1 maps gives exploding gradients at 4)
    images = torch.randn(16, *SIZE)
    data = TensorDataset(images, torch.arange(16) % 10, torch.arange(16))
    weights = {k: v.detach().clone() for k, v in student.named_parameters()}
    metrics = fit(
        student,
        DistillationObjective(teacher, temperature=4.0, alpha=0.9),
        DataLoader(data, batch_size=16),
        None,
        TrainingConfig(epochs=1, optimizer="sgd", lr=0.002, max_steps_per_epoch=1),
        torch.device("cpu"),
        tmp_path,
        DistInfo(),
    )
    assert math.isfinite(metrics["final_train_loss"])
    assert any(not torch.equal(weights[k], v) for k, v in student.named_parameters())

    # The spec rebuilds the same architecture, which takes the fine-tuned weights
    again = build_model(candidate_spec(spec, student, units, candidate, SIZE))
    assert _shapes(again) == _shapes(student)
    again.load_state_dict(student.state_dict())
    student.eval()
    torch.testing.assert_close(again.eval()(x), student(x))


def test_regnet_shrinkage_keeps_whole_groups_of_the_teacher():
    torch.manual_seed(0)
    teacher, _ = create_model("timm:regnetx_002", num_classes=10)
    teacher.eval()
    units = find_units(teacher, SIZE)
    student = build_candidate(teacher, units, Candidate.make([], {"s3.b2": 0.5}), SIZE)
    before, after = teacher.s3.b2, student.s3.b2
    assert (before.conv2.conv.groups, after.conv2.conv.groups) == (19, 10)  # 152 -> 80 channels
    full, cut = before.conv1.conv.weight, after.conv1.conv.weight
    rows = [int((full == w).all(dim=(1, 2, 3)).nonzero()) for w in cut]
    groups = sorted({r // 8 for r in rows})  # group width 8: 10 of the 19 groups, each whole
    assert len(groups) == 10 and rows == [g * 8 + i for g in groups for i in range(8)]
    torch.testing.assert_close(after.conv2.conv.weight, before.conv2.conv.weight[rows])
    torch.testing.assert_close(after.conv3.conv.weight, before.conv3.conv.weight[:, rows])


def test_shufflenet_units_keep_the_channel_shuffle_when_removed():
    from torchvision.models.shufflenetv2 import channel_shuffle

    torch.manual_seed(0)
    teacher, _ = create_model("torchvision:shufflenet_v2_x0_5", num_classes=10)
    teacher.eval()
    units = {u.name: u for u in find_units(teacher, SIZE, project_shape_changes=True)}
    assert units["stage2.1"].removal == "shuffle" and units["stage2.0"].removal == "projection"
    assert units["stage2.0"].features["out_channels"] == 48  # both branches
    assert units["stage2.1"].features["in_channels"] == 48
    student = build_candidate(
        teacher, list(units.values()), Candidate.make(["stage2.0", "stage2.1"]), SIZE
    )
    h = torch.randn(2, 48, 8, 8)
    torch.testing.assert_close(student.stage2[1](h), channel_shuffle(h, 2), rtol=0, atol=0)
    conv, _ = student.stage2[0]  # a 1x1 conv + BN from 24 to both branches' 48 channels
    assert (conv.in_channels, conv.out_channels, conv.stride) == (24, 48, (2, 2))
    assert student(torch.randn(2, *SIZE)).shape == (2, 10)


class _StridedOnly(nn.Module):
    """Convs outside any nn.Sequential stack, each one strided: nothing a search can act on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_a_model_without_supported_units_is_refused_by_name():
    with pytest.raises(InputError) as caught:
        find_units(_StridedOnly(), SIZE)
    message = str(caught.value)
    assert "cannot decompose tests.search.test_families._StridedOnly" in message
    assert "no residual block of a supported kind" in message
    for family in ("ConvNeXtBlock", "RegNet", "ShuffleNetV2", "ResNet", "MobileNetV2"):
        assert family in message


def test_a_search_without_a_valid_candidate_says_why(tmp_path):
    torch.manual_seed(0)
    model, _ = create_model("cifar_resnet20")
    model.eval()
    # conv2 writes the residual stream: every shrunk candidate is refused by the surgery
    units = [dataclasses.replace(u, shrinkable=["conv2"]) for u in find_units(model, SIZE)][:3]

    def evaluate(candidate: Candidate) -> Evaluation:  # as the search's evaluator records it
        try:
            build_candidate(model, units, candidate, SIZE)
        except (ValueError, RuntimeError) as e:
            return Evaluation(reward_raw=None, error=str(e))
        return Evaluation(reward_raw=0.5, violates=True)

    settings = SearchSettings(mode="shrink", strategy="random", updates=1, rollouts=3)
    search = PolicySearch(units, evaluate, settings, tmp_path / "failing", seed=0)
    assert search.run() is None
    first = next(r for r in search.records.values() if not r.valid)
    message = search.why_no_best()
    assert f"the first ({first.key}) with: {first.error}" in message
    assert "shared beyond its block" in message

    fixed = [Unit(f"b{i}", "basic", False, [], dict.fromkeys(FEATURES, 1.0)) for i in range(2)]
    idle = PolicySearch(fixed, evaluate, settings, tmp_path / "idle")
    assert idle.run() is None
    assert "had no unit to act on (2 units, 0 removable, 0 shrinkable)" in idle.why_no_best()
