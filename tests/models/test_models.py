from pathlib import Path

import pytest
import torch

from compress.config import DataConfig
from compress.data import ImageFolderData
from compress.errors import InputError
from compress.evaluation import count_flops, count_params, evaluate
from compress.models import (
    ModelSpec,
    build_model,
    create_model,
    load_model,
    load_weights,
    save_model,
)


def test_pretrained_resnet56_reaches_its_known_accuracy(cifar_root, resnet56_weights):
    """The shared README measures 83.2% on the full JPEG test set; 50 images per class stay near it."""
    model = build_model(ModelSpec("cifar_resnet56", {"num_classes": 10}))
    load_weights(model, resnet56_weights)
    data = ImageFolderData(DataConfig(root=cifar_root, test_limit_per_class=50))
    result = evaluate(model, data.loader("test"), torch.device("cpu"))
    assert result["n"] == 500
    assert 78.0 <= result["top1"] <= 89.0, result
    assert result["top5"] >= 97.0


def test_architecture_matches_the_published_sizes():
    assert count_params(build_model(ModelSpec("cifar_resnet56"))) == 853_018
    assert count_params(build_model(ModelSpec("cifar_resnet20"))) == 269_722
    # ~41 M multiply-adds for ResNet-20 (He et al.), counted as 2 FLOPs each.
    flops = count_flops(build_model(ModelSpec("cifar_resnet20")), (3, 32, 32))
    assert 75e6 < flops < 90e6


def test_saved_model_reloads_without_pickle(tmp_path: Path):
    spec = ModelSpec("cifar_resnet20", {"num_classes": 7})
    model = build_model(spec).eval()
    path = save_model(model, spec, tmp_path / "m.safetensors")
    reloaded, reloaded_spec = load_model(path)
    x = torch.randn(3, 3, 32, 32)
    assert reloaded_spec == spec
    torch.testing.assert_close(reloaded.eval()(x), model(x))
    assert path.read_bytes()[:8] != b"PK\x03\x04"  # not a zip/pickle archive


def test_timm_and_torchvision_specs_build_offline():
    m = build_model(ModelSpec("timm:resnet18", {"num_classes": 10}))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    m = build_model(ModelSpec("torchvision:mobilenet_v3_small", {"num_classes": 10}))
    assert m.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_timm_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    """`pretrained: true` reads timm's weights from the Hugging Face cache, never the network."""
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match=r"timm/resnet10t.c3_in1k\) are not in the local"):
        create_model("timm:resnet10t", {"pretrained": True})
    torch.manual_seed(0)
    source = timm.create_model("resnet10t")  # stands in for the published weights
    repo = tmp_path / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(source.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    model, spec = create_model("timm:resnet10t", {"pretrained": True}, num_classes=10)
    state = model.state_dict()
    assert torch.equal(state["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert state["fc.weight"].shape == (10, 512)  # a new head for the recipe's classes
    assert "pretrained" not in spec.kwargs  # a saved copy rebuilds without the cache


def test_mismatched_weights_are_a_clear_error(resnet56_weights):
    model = build_model(ModelSpec("cifar_resnet20"))
    with pytest.raises(InputError, match="do not match"):
        load_weights(model, resnet56_weights)
    with pytest.raises(InputError, match="not found"):
        load_weights(model, Path("/nonexistent/w.th"))


def test_a_spec_kind_registered_from_user_code_builds_saves_and_reloads(tmp_path: Path):
    from torch import nn

    from compress.models import create_model, load_model, save_model
    from compress.models.registry import SPEC_KINDS, register_spec_kind

    def check(name: str) -> None:
        if not name.startswith("mlp"):
            raise ValueError(f"unknown toy model '{name}'")

    def build(spec):
        return nn.Sequential(nn.Flatten(), nn.Linear(12, spec.kwargs.get("num_classes", 2)))

    register_spec_kind("toy:", check, build)
    try:
        model, spec = create_model("toy:mlp", num_classes=3)
        assert model[1].out_features == 3
        path = save_model(model, spec, tmp_path / "toy.safetensors")
        reloaded, spec2 = load_model(path)
        assert spec2 == spec and torch.equal(reloaded[1].weight, model[1].weight)
        with pytest.raises(InputError, match="unknown toy model 'cnn'"):
            create_model("toy:cnn")
    finally:
        del SPEC_KINDS["toy:"]
    with pytest.raises(InputError, match="unknown model 'toy:mlp'"):
        create_model("toy:mlp")


def test_owned_spec_kinds_load_in_a_fresh_interpreter(tmp_path: Path):
    """A searched or INT8 model reloads without its owner module imported first."""
    import subprocess
    import sys

    from compress.models import ModelSpec, build_model, save_model
    from compress.search.surgery import Candidate, build_candidate, candidate_spec
    from compress.search.units import find_units

    base, size = ModelSpec("cifar_resnet20", {"num_classes": 10}), (3, 32, 32)
    teacher = build_model(base)
    units = find_units(teacher, size)
    candidate = Candidate.make([units[-1].name])
    student = build_candidate(teacher, units, candidate, size)
    spec = candidate_spec(base, student, units, candidate, size)
    path = save_model(student, spec, tmp_path / "searched.safetensors")
    code = (
        "import sys; from compress.models import load_model; "
        f"m, s = load_model({str(path)!r}); "
        "assert 'compress.search.surgery' in sys.modules; print(s.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "search:cifar_resnet20"
