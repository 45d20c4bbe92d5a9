"""Quantizers, the straight-through estimator, size accounting, and quantized distillation on real data."""

import pytest
import torch
from torch import nn

from compress.config import DataConfig
from compress.data import ImageFolderData
from compress.evaluation import evaluate
from compress.io import read_json
from compress.models import ModelSpec, build_model, load_model, load_weights
from compress.quant.size import (
    huffman_code_lengths,
    huffman_mean_bits,
    size_report,
)
from compress.quant.uniform import bucketize, quantize_uniform
from compress.quant.weights import WeightQuantizer, default_full_precision
from tests.conftest import run_cli, write_recipe


def test_levels_and_bucket_scaling():
    torch.manual_seed(0)
    t = torch.randn(1000) * 3
    q = quantize_uniform(t, bits=3, bucket_size=256)
    deq = q.dequantize()
    assert q.indices.shape == (4, 256) and deq.shape == t.shape
    for raw, got in zip(bucketize(t, 256), bucketize(deq, 256), strict=True):
        assert got.unique().numel() <= 8
        assert torch.isclose(got.min(), raw.min()) and torch.isclose(got.max(), raw.max())
        step = (raw.max() - raw.min()) / 7
        assert (got - raw).abs().max() <= step / 2 + 1e-6


def test_constant_tensor_and_partial_bucket():
    t = torch.full((10, 3), 0.5)
    torch.testing.assert_close(quantize_uniform(t, 2, bucket_size=7).dequantize(), t)


def test_stochastic_rounding_is_unbiased():
    t = torch.tensor([0.0, 1.0] + [0.3] * 98)  # levels 0, 1/3, 2/3, 1 for 2 bits
    gen = torch.Generator().manual_seed(0)
    runs = torch.stack(
        [
            quantize_uniform(t, 2, None, stochastic=True, generator=gen).dequantize()
            for _ in range(2000)
        ]
    )
    assert torch.allclose(runs[:, 2].unique(), torch.tensor([0.0, 1 / 3]))  # the two nearest levels
    assert runs[:, 2:].mean().item() == pytest.approx(0.3, abs=0.005)


def test_straight_through_gradient_reaches_full_precision_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(5, 3, 5, 5)
    quantizer = WeightQuantizer(model, bits=2, bucket_size=16)
    assert quantizer.names == ["1"]  # first conv and last linear stay full precision
    fp = model[1].weight.detach().clone()

    quantizer.before_forward(model)
    quantized = model[1].weight.detach().clone()
    model(x).square().sum().backward()
    quantizer.before_step(model)
    torch.testing.assert_close(model[1].weight.detach(), fp)  # shadow weights are back

    reference = nn.Conv2d(4, 4, 3)
    reference.load_state_dict(model[1].state_dict())
    with torch.no_grad():
        reference.weight.copy_(quantized)
    out = model[2](reference(model[0](x)))
    model[3](out).square().sum().backward()
    torch.testing.assert_close(model[1].weight.grad, reference.weight.grad)


def test_huffman_and_size_accounting_by_hand():
    assert huffman_code_lengths({0: 5, 1: 2, 2: 1, 3: 1}) == {0: 1, 1: 2, 2: 3, 3: 3}
    indices = torch.tensor([0] * 5 + [1] * 2 + [2, 3])
    assert huffman_mean_bits([indices]) == pytest.approx(15 / 9)

    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 512, 1, bias=False), nn.Linear(1, 1))
    report = size_report(model, WeightQuantizer(model, bits=4, bucket_size=256).codes())
    # conv "1": 1024 weights in 4 buckets -> 64 bits/bucket of scales = 0.25 bits/weight extra.
    assert report["quantized_params"] == 1024 and report["bits_per_weight"] == 4.25
    fp_params = 2 * 1 + 2 + 1 + 1  # conv 0 (weight, bias), linear (weight, bias)
    assert report["full_precision_params"] == fp_params
    expected = fp_params * 4 + (1024 * report["huffman_bits_per_weight"]) / 8
    assert report["quantized_size_bytes"] == round(expected)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("bits", 0, "bits: must be >= 1"),
        ("bits", 33, "bits: must be <= 32"),
        ("bucket_size", 0, "bucket_size: must be > 0"),
        ("full_precision", "conv1", "full_precision: Input should be a valid list"),
    ],
)
def test_bad_quantize_fields_exit_2(tmp_path, small_recipe, field, value, message):
    small_recipe["stages"] = [{"type": "quantize", "epochs": 1, field: value}]
    result = run_cli("validate", str(write_recipe(tmp_path / "r.yaml", small_recipe)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"stages[0].{message}" in result.stderr


def test_quantized_distillation_recovers_what_rounding_loses(
    tmp_path, cifar_root, resnet56_weights, resnet20_weights
):
    """2-bit weights: rounding the pretrained ResNet-20 collapses it; 2 epochs of quantized
    distillation (900 images per epoch, teacher logits cached) bring it back near full precision."""
    data_cfg = {
        "root": str(cifar_root),
        "limit_per_class": 100,
        "test_limit_per_class": 100,
        "augment": "none",
        "batch_size": 64,
    }
    student = build_model(ModelSpec("cifar_resnet20"))
    load_weights(student, resnet20_weights)
    data = ImageFolderData(DataConfig(**data_cfg))
    rounder = WeightQuantizer(student, bits=2)
    rounder.on_train_end(student)
    rounded = evaluate(student, data.loader("test"), torch.device("cpu"))["top1"]

    recipe = {
        "name": "qd",
        "data": data_cfg,
        "teacher": {"model": "cifar_resnet56", "weights": str(resnet56_weights)},
        "student": {"model": "cifar_resnet20", "weights": str(resnet20_weights)},
        "stages": [{"type": "eval"}, {"type": "quantize", "bits": 2, "epochs": 2}],
    }
    out = tmp_path / "out"
    result = run_cli("run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    models = {m["name"]: m for m in read_json(out / "report.json")["models"]}
    fp32, qd = models["student"]["top1"], models["01-quantize"]
    assert qd["top1"] > rounded + 15, (rounded, qd["top1"])
    assert qd["top1"] > fp32 - 10, (fp32, qd["top1"])
    assert qd["bits_per_weight"] == pytest.approx(2.25)
    assert qd["compression_ratio"] > 10

    saved, _ = load_model(out / "01-quantize" / "model.safetensors")
    layer = saved.layer2[0].conv1.weight
    assert all(b.unique().numel() <= 4 for b in bucketize(layer, 256))  # saved weights are 2-bit
    assert saved.conv1.weight.unique().numel() > 4  # the first conv stays full precision
    assert default_full_precision(saved) == ["conv1", "linear"]

    compact = out / "01-quantize" / "model.compact.safetensors"
    coded, _ = load_model(compact)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(coded.eval()(x), saved.eval()(x))
    assert qd["compact_bytes"] == compact.stat().st_size < qd["size_bytes"] / 5


def _cifar_batch(cifar_root, n_per_class=6):
    data = ImageFolderData(DataConfig(root=cifar_root, test_limit_per_class=n_per_class))
    return next(iter(data.loader("test", batch_size=10 * n_per_class)))


def test_learned_points_stay_sorted_and_reduce_the_distillation_loss(cifar_root, resnet20_weights):
    from compress.quant.points import PointQuantizer
    from compress.quant.weights import select_layers
    from compress.train.objectives import kd_loss

    torch.manual_seed(0)
    model = build_model(ModelSpec("cifar_resnet20"))
    load_weights(model, resnet20_weights)
    images, labels, _ = _cifar_batch(cifar_root)
    with torch.no_grad():
        teacher_logits = model.eval()(images)
    names, _ = select_layers(model, None)
    hooks = PointQuantizer(model, [4] * len(names), names, 256, "quantiles")
    model.eval()  # fixed BN statistics: only the points change the loss
    points = [p for p in model.parameters() if p.requires_grad]
    assert len(points) == len(names) and all(p.numel() == 4 for p in points)
    opt = torch.optim.SGD(points, lr=1e-5, momentum=0.9)
    losses = []
    for _ in range(15):
        hooks.before_forward(model)
        loss = kd_loss(model(images), teacher_logits, labels, 2.0, 0.7)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    hooks.before_forward(model)
    assert all(bool((p[1:] >= p[:-1]).all()) for p in points)
    assert min(losses[-3:]) < losses[0] * 0.9, losses
    weights_before = dict(model.named_parameters())[
        "layer1.0.conv1.parametrizations.weight.original"
    ]
    assert not weights_before.requires_grad  # the weights themselves never train


def test_point_budget_follows_gradient_norms():
    from compress.quant.points import assign_points

    counts = assign_points([1.0, 3.0, 0.0, 4.0], 16)
    assert sum(counts) == 64 and min(counts) >= 8
    assert counts[3] > counts[1] > counts[0] >= counts[2]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 10])
def test_index_packing_roundtrip(bits):
    from compress.quant.compact import pack_indices, unpack_indices

    idx = torch.randint(0, 2**bits, (1001,))
    packed = pack_indices(idx, bits)
    if bits <= 8:
        assert packed.numel() == (1001 * bits + 7) // 8
    torch.testing.assert_close(unpack_indices(packed, bits, 1001), idx)


def test_compact_file_reloads_the_quantized_model_exactly(tmp_path, resnet20_weights):
    from compress.models import save_model
    from compress.quant.compact import save_compact
    from compress.quant.points import PointQuantizer
    from compress.quant.weights import select_layers

    x = torch.randn(4, 3, 32, 32)
    for method in ("uniform", "points"):
        spec = ModelSpec("cifar_resnet20", {"num_classes": 10})
        model = build_model(spec)
        load_weights(model, resnet20_weights)
        if method == "uniform":
            hooks = WeightQuantizer(model, bits=3)
        else:
            names, _ = select_layers(model, None)
            hooks = PointQuantizer(model, [8] * len(names), names, 256, "quantiles")
        hooks.on_train_end(model)
        codes = hooks.codes()
        path = save_compact(model, spec, codes, tmp_path / f"{method}.compact.safetensors")
        reloaded, reloaded_spec = load_model(path)
        assert reloaded_spec == spec
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(x), model.eval()(x)), method
        fp32 = save_model(model, spec, tmp_path / f"{method}.safetensors")
        assert path.stat().st_size < fp32.stat().st_size / 5
