"""Cross-architecture feature distillation: taps and shape matching across timm, torchvision and
compress models, the DFM views, TPP through the frozen teacher, and a projector-free student."""

from __future__ import annotations

import onnx
import pytest
import torch
from safetensors import safe_open
from torch import nn

from compress.errors import InputError
from compress.kd.losses import dct2, idct2, remove_direct_component
from compress.kd.objectives import FeatureHintObjective, ScaleKDObjective
from compress.models import create_model
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe

VIT32 = {"img_size": 32, "patch_size": 4}


def _models(teacher: str, t_kwargs: dict, student: str):
    torch.manual_seed(0)
    t, _ = create_model(teacher, t_kwargs, num_classes=10)
    s, _ = create_model(student, num_classes=10)
    return t.eval().requires_grad_(False), s


def _scalekd(teacher, student, size, **kwargs):
    probe = torch.randn(2, 3, size, size)
    return ScaleKDObjective(teacher, student, [-2, -1], [-2, -1], probe, 1.0, 0.5, **kwargs)


@pytest.mark.parametrize(
    "teacher, t_kwargs, student, size, t_shape, s_shapes",
    [
        ("timm:vit_tiny_patch16_224", {**VIT32, "depth": 3}, "cifar_resnet20", 32, (192, 8, 8), [(32, 16, 16), (64, 8, 8)]),
        ("timm:vit_tiny_patch16_224", {"depth": 3}, "torchvision:resnet18", 224, (192, 14, 14), [(256, 14, 14), (512, 7, 7)]),
        ("timm:deit_tiny_distilled_patch16_224", {"depth": 3}, "timm:mobilenetv3_small_100", 224, (192, 14, 14), [(48, 14, 14), (576, 7, 7)]),
    ],
)  # fmt: skip
def test_taps_match_teacher_tokens_to_student_maps(
    teacher, t_kwargs, student, size, t_shape, s_shapes
):
    t, s = _models(teacher, t_kwargs, student)
    objective = _scalekd(t, s, size)
    assert [tuple(x) for x in objective.teacher_shapes] == [t_shape, t_shape]
    assert [tuple(x) for x in objective.student_shapes] == s_shapes
    prefix = 2 if "distilled" in teacher else 1  # class (+ distillation) token dropped
    assert objective.teacher_taps.taps[-1].layout.prefix_tokens == prefix
    s.train()
    images = torch.randn(2, 3, size, size)
    with objective.student_taps.capture() as raw:
        s(images)
    maps = objective.student_taps.maps(raw)
    for views, m in zip(objective.projectors, maps, strict=True):
        queries = torch.randn(2, *t_shape) if views[0].query is None else None
        assert all(tuple(p(m, queries).shape[1:]) == t_shape for p in views)
    loss, logits = objective(s, images, torch.tensor([1, 2]), None)
    assert logits.shape == (2, 10) and torch.isfinite(loss)


def test_swin_nhwc_stages_and_tpp_through_patch_merging():
    kwargs = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
    t, s = _models("timm:swin_tiny_patch4_window7_224", kwargs, "timm:resnet18")
    objective = _scalekd(t, s, 224)
    assert [t.layout.kind for t in objective.teacher_taps.taps] == ["nhwc", "nhwc"]
    assert [tuple(x) for x in objective.teacher_shapes] == [(128, 14, 14), (256, 7, 7)]


def test_feature_hint_aligns_grids_by_pooling_and_interpolation():
    t, s = _models("timm:vit_tiny_patch16_224", {**VIT32, "depth": 2}, "cifar_resnet20")
    probe = torch.randn(2, 3, 32, 32)
    objective = FeatureHintObjective(t, s, [-1, -1], ["layer1", "layer3"], probe, 4.0, 0.9)
    with objective.student_taps.capture() as raw:
        s(probe)
    maps = objective.student_taps.maps(raw)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 32, 32), (64, 8, 8)]
    for p, m in zip(objective.projectors, maps, strict=True):
        assert tuple(p(m).shape[1:]) == (192, 8, 8)


class _Tokens(nn.Module):
    """A model whose blocks emit 45 tokens: no square grid after up to 8 prefix tokens."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Unflatten(1, (45, -1)), nn.Linear(64, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(x.flatten(1)[:, : 45 * 64]).mean(1))


def test_unmatchable_taps_are_named_with_their_shapes():
    _, s = _models("cifar_resnet20", {}, "cifar_resnet20")
    probe = torch.randn(2, 3, 32, 32)
    with pytest.raises(InputError, match=r"teacher tap -1 \(blocks.1, output 2x45x16\).*square"):
        ScaleKDObjective(_Tokens().eval(), s, [-1], [-1], probe, 1, 0.5, tpp=False)
    with pytest.raises(InputError, match=r"teacher_taps \[-1\] and student_taps \[-2, -1\]"):
        ScaleKDObjective(_Tokens().eval(), s, [-1], [-2, -1], probe, 1, 0.5)
    with pytest.raises(InputError, match=r"student_taps: index 7 is out of range.*layer3"):
        ScaleKDObjective(_Tokens().eval(), s, [-1], [7], probe, 1, 0.5)


def test_frequency_view_removes_exactly_the_direct_component():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5)
    assert torch.allclose(idct2(dct2(x)), x, atol=1e-5)
    c, c_removed = dct2(x), dct2(remove_direct_component(x))
    assert torch.allclose(c_removed[..., 0, 0], torch.zeros(2, 3), atol=1e-5)
    c[..., 0, 0] = 0
    assert torch.allclose(c_removed, c, atol=1e-5)  # every other coefficient is kept
    assert torch.allclose(remove_direct_component(x), x - x.mean((2, 3), keepdim=True), atol=1e-5)


def test_frequency_view_stays_exact_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8) + 5.0  # a large direct component, as real feature maps have
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        removed = remove_direct_component(x)
    assert removed.dtype == torch.float32
    assert torch.allclose(removed, x - x.mean((2, 3), keepdim=True), atol=1e-5)


def test_tpp_keeps_the_teacher_fixed_and_trains_the_student_through_it():
    t, s = _models("timm:vit_tiny_patch16_224", {**VIT32, "depth": 4}, "cifar_resnet20")
    before = {k: v.clone() for k, v in t.state_dict().items()}
    objective = _scalekd(t, s, 32)
    params = [*s.parameters(), *objective.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, _ = objective(s, images, labels, None)
    loss.backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in t.state_dict().items())
    assert all(p.grad is None for p in t.parameters())
    assert s.conv1.weight.grad.abs().sum() > 0
    # The first pair's projectors reach the loss only through the teacher's last block.
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in objective.projectors[0][0].q.parameters()
    )


class _ShiftedStages(nn.Module):
    """Something happens between its two stages: TPP cannot rerun the teacher from a tap."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(x) + 1).mean((2, 3)))


def test_tpp_runs_through_the_vit_final_norm_and_checks_the_chain():
    t, s = _models("timm:vit_tiny_patch16_224", {**VIT32, "depth": 3}, "cifar_resnet20")
    probe = torch.randn(2, 3, 32, 32)
    # ScaleKD's last ViT stage is the last block and the final norm
    objective = ScaleKDObjective(t, s, [-2, "norm"], [-2, -1], probe, 1.0, 0.5)
    assert objective.last_stage._stage_modules == (t.blocks[2], t.norm)
    loss, _ = objective(s, probe, torch.tensor([0, 1]), None)
    assert torch.isfinite(loss)
    with pytest.raises(InputError, match=r"does not reproduce tap -1 \(layer2"):
        ScaleKDObjective(_ShiftedStages().eval(), s, [-2, -1], [-2, -1], probe, 1.0, 0.5)
    with pytest.raises(InputError, match=r"a later stage or a module after the stages"):
        ScaleKDObjective(t, s, [-1, -2], [-2, -1], probe, 1.0, 0.5)


@pytest.mark.parametrize("method", ["scalekd", "feature"])
def test_feature_distillation_lowers_its_loss_on_a_fixed_batch(method):
    t, s = _models("timm:vit_tiny_patch16_224", {**VIT32, "depth": 2}, "cifar_resnet20")
    probe = torch.randn(8, 3, 32, 32)
    cls = ScaleKDObjective if method == "scalekd" else FeatureHintObjective
    objective = cls(t, s, [-2, -1], [-2, -1], probe, 1.0, 0.5)
    opt = torch.optim.AdamW([*s.parameters(), *objective.parameters()], lr=1e-3)
    labels = torch.arange(8) % 10
    losses = []
    for _ in range(12):
        loss, _ = objective(s, probe, labels, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_scalekd_stage_saves_and_exports_a_student_without_projectors(tmp_path, cifar_root):
    torch.manual_seed(0)
    vit = {**VIT32, "depth": 2, "embed_dim": 64, "num_heads": 2}
    teacher, _ = create_model("timm:vit_tiny_patch16_224", vit, num_classes=10)
    weights = tmp_path / "vit.pth"
    torch.save(teacher.state_dict(), weights)  # a local weights file for a timm: teacher
    recipe = {
        "name": "crosskd",
        "data": {"root": str(cifar_root), "limit_per_class": 4, "test_limit_per_class": 2},
        "teacher": {"model": "timm:vit_tiny_patch16_224", "kwargs": vit, "weights": str(weights)},
        "student": "cifar_resnet20",
        "stages": [
            {"type": "distill", "method": "scalekd", "epochs": 1, "max_steps_per_epoch": 2},
            {"type": "export"},
        ],
    }
    Pipeline(parse_recipe(recipe), tmp_path / "run").run()
    stage = tmp_path / "run" / "00-distill"
    student, _ = create_model("cifar_resnet20", num_classes=10)
    with safe_open(str(stage / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(student.state_dict())
    graph = onnx.load(str(tmp_path / "run" / "01-export" / "model.onnx")).graph
    exported = sum(int(torch.tensor(i.dims).prod()) for i in graph.initializer)
    student_params = sum(p.numel() for p in student.parameters())
    assert exported < student_params * 1.1  # BN folding may merge; no projector's 100k+ weights
    assert not any("projector" in i.name for i in graph.initializer)


@pytest.mark.parametrize(
    "stage, expected",
    [
        ({"spatial_weight": 0.1}, "only for method scalekd"),
        ({"method": "feature", "tpp": False}, "only for method scalekd"),
        ({"teacher_taps": [-1]}, "only for methods feature and scalekd"),
        ({"method": "scalekd", "cache_teacher_logits": True}, "needs the teacher's features"),
    ],
)
def test_method_options_are_checked(small_recipe, stage, expected):
    small_recipe["stages"][1].update(stage)
    with pytest.raises(InputError, match=expected):
        parse_recipe(small_recipe)


def test_scalekd_defaults_are_the_papers(small_recipe):
    small_recipe["stages"][1].update(method="scalekd")
    cfg = parse_recipe(small_recipe).stages[1]
    assert (cfg.temperature, cfg.alpha, cfg.spatial_weight, cfg.frequency_weight) == (
        1.0, 0.5, 0.08, 0.06
    )  # fmt: skip
    assert cfg.teacher_taps == cfg.student_taps == [-2, -1]
    assert cfg.cap and cfg.dfm and cfg.tpp and cfg.cache_teacher_logits is False


def test_the_loop_trains_checkpoints_and_resumes_the_projectors(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from compress.train.distributed import DistInfo
    from compress.train.loop import CHECKPOINT, TrainingConfig, fit

    t, s = _models("timm:vit_tiny_patch16_224", {**VIT32, "depth": 2}, "cifar_resnet20")
    images = torch.randn(8, 3, 32, 32)
    data = DataLoader(TensorDataset(images, torch.arange(8) % 10, torch.arange(8)), batch_size=4)

    def objective():
        return FeatureHintObjective(t, s, [-1], [-1], images[:2], 4.0, 0.9)

    first = objective()
    initial = {k: v.clone() for k, v in first.state_dict().items()}
    cfg = TrainingConfig(epochs=1, lr=0.01)
    fit(s, first, data, None, cfg, torch.device("cpu"), tmp_path, DistInfo())
    trained = first.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in trained.items())  # projectors learned
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert set(saved["model"]) == set(s.state_dict())  # the student's checkpoint stays bare
    assert set(saved["objective"]) == set(trained)
    resumed = objective()  # fresh projectors, then the checkpoint's
    fit(s, resumed, data, None, cfg, torch.device("cpu"), tmp_path, DistInfo())
    assert all(torch.equal(v, trained[k]) for k, v in resumed.state_dict().items())
