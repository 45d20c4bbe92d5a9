"""A saved model file's metadata, a recipe's model kwargs and a `--weights` file are data from
whoever wrote them: each crafted one below is one clear error (exit 2, the file and the field
named, no traceback) before any builder loads, fetches or allocates anything."""

from __future__ import annotations

import json
import os
import pickle
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from compress.cli import main

SPEC_KEY = "compress.model_spec"


def crafted(path: Path, spec: object) -> Path:
    """A safetensors file with one tensor and `spec` (JSON-encoded unless a str) as its spec."""
    text = spec if isinstance(spec, str) else json.dumps(spec)
    save_file({"w": torch.zeros(2)}, str(path), metadata={SPEC_KEY: text})
    return path


def eval_error(capsys, model: str | Path, data: Path, *extra: str) -> str:
    """`compress eval MODEL --data DATA --json` in-process: exit 2 with one error line."""
    capsys.readouterr()
    rc = main(["eval", str(model), "--data", str(data), "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


class _CreatesMarker:
    """Unpickling this creates a folder: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


# (id, the spec in the metadata, the field the error must name). "{th}" and "{other}" stand for a
# pickled .th file and another local file beside the crafted model.
ROWS = [
    (
        "torchvision_weights",
        {"name": "torchvision:mobilenet_v3_small", "kwargs": {"weights": "IMAGENET1K_V1"}},
        "kwargs.weights",
    ),
    (
        "torchvision_weights_backbone",
        {"name": "torchvision:resnet18", "kwargs": {"weights_backbone": "DEFAULT"}},
        "kwargs.weights_backbone",
    ),
    (
        "timm_checkpoint_other_file",
        {"name": "timm:resnet10t", "kwargs": {"num_classes": 3, "checkpoint_path": "{other}"}},
        "kwargs.checkpoint_path",
    ),
    (
        "timm_checkpoint_pickle",
        {"name": "timm:resnet10t", "kwargs": {"checkpoint_path": "{th}"}},
        "kwargs.checkpoint_path",
    ),
    (
        "timm_cfg_overlay_file",
        {"name": "timm:resnet10t", "kwargs": {"pretrained_cfg_overlay": {"file": "{th}"}}},
        "kwargs.pretrained_cfg_overlay",
    ),
    (
        "timm_pretrained",
        {"name": "timm:resnet10t", "kwargs": {"pretrained": True}},
        "kwargs.pretrained",
    ),
    (
        "url_value",
        {"name": "timm:resnet10t", "kwargs": {"act_layer": "https://example.com/act.py"}},
        "kwargs.act_layer",
    ),
    (
        "huge_num_classes",
        {"name": "cifar_resnet32", "kwargs": {"num_classes": 2**41}},
        "kwargs.num_classes",
    ),
    ("huge_img_size", {"name": "timm:resnet10t", "kwargs": {"img_size": 10**5}}, "kwargs.img_size"),
    (
        "huge_widths",  # each width in bounds, the model ~1.4e12 elements: refused on meta
        {
            "name": "timm:vit_tiny_patch16_224",
            "kwargs": {"embed_dim": 99_000, "depth": 12, "num_heads": 1, "img_size": 32},
        },
        "kwargs: timm:vit_tiny_patch16_224 with these arguments has",
    ),
    ("bad_json", "{'name': 'cifar_resnet20'}", "not valid JSON"),
    ("nan_json", '{"name": "cifar_resnet20", "kwargs": {"drop_rate": NaN}}', "not valid JSON"),
    ("list_not_object", [{"name": "cifar_resnet20"}], "must be a JSON object"),
    ("string_not_object", "cifar_resnet20", "not valid JSON"),
    ("no_name", {"kwargs": {"num_classes": 3}}, "name: required field is missing"),
    ("name_is_a_file", {"name": "/etc/hostname"}, "name: names a file"),
    ("unknown_field", {"name": "cifar_resnet20", "code": "print(1)"}, "code: unknown field"),
    (
        "search_without_removed",
        {
            "name": "search:cifar_resnet20",
            "kwargs": {
                "base": {"name": "cifar_resnet20", "kwargs": {"num_classes": 3}},
                "channels": {},
                "input_size": [3, 32, 32],
            },
        },
        "kwargs.removed: required field is missing",
    ),
    (
        "search_base_asks_for_weights",
        {
            "name": "search:torchvision:resnet18",
            "kwargs": {
                "base": {"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}},
                "removed": [],
                "channels": {},
                "input_size": [3, 32, 32],
            },
        },
        "kwargs.base.kwargs.weights",
    ),
    (
        "unknown_kwarg",
        {"name": "cifar_resnet44", "kwargs": {"width_multiplier": 2}},
        "kwargs.width_multiplier",
    ),
    (
        "int8_bad_target",
        {"name": "cifar_resnet20", "int8": {"target": "gpu", "input_size": [3, 32, 32]}},
        "int8.target",
    ),
]


@pytest.mark.parametrize("spec, field", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_a_crafted_spec_is_one_error_naming_the_file_and_the_field(
    tmp_path, tiny_image_folder, capsys, spec, field
):
    marker = tmp_path / "unpickled"
    th = tmp_path / "payload.th"
    th.write_bytes(pickle.dumps({"state_dict": _CreatesMarker(marker)}))
    other = tmp_path / "other.txt"
    other.write_text("not for the builder\n")
    if not isinstance(spec, str):
        spec = json.dumps(spec).replace("{th}", str(th)).replace("{other}", str(other))
    path = crafted(tmp_path / "crafted.safetensors", spec)
    line = eval_error(capsys, path, tiny_image_folder)
    assert f"error: {path}: metadata {SPEC_KEY}: " in line
    assert field in line, line
    assert not marker.exists()


def _guard_sockets(monkeypatch) -> list:
    """Record (and refuse) every attempt to resolve or reach a host."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_a_spec_asking_for_weights_fails_without_a_network_attempt(
    tmp_path, tiny_image_folder, capsys, monkeypatch
):
    attempts = _guard_sockets(monkeypatch)
    spec = {"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}
    path = crafted(tmp_path / "m.safetensors", spec)
    assert "kwargs.weights" in eval_error(capsys, path, tiny_image_folder)
    assert attempts == []


def test_builds_are_offline_even_when_a_builder_asks_for_weights(monkeypatch):
    """The second wall, below the spec rules: a builder's own download is refused."""
    import torchvision

    from compress.errors import InputError
    from compress.models.offline import offline

    attempts = _guard_sockets(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = torch.hub.get_dir()
    with offline():
        import huggingface_hub.constants as hub

        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.HF_HUB_OFFLINE
        assert os.listdir(torch.hub.get_dir()) == []  # no cached download is read either
        with pytest.raises(InputError, match="never downloads"):
            torchvision.models.mobilenet_v3_small(weights="DEFAULT")
    assert "HF_HUB_OFFLINE" not in os.environ and not hub.HF_HUB_OFFLINE
    assert torch.hub.get_dir() == before
    assert attempts == []


def _validate(tmp_path: Path, data: Path, capsys, **models) -> tuple[int, str]:
    recipe = {"name": "t", "data": {"root": str(data)}, **models, "stages": [{"type": "eval"}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    rc = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize(
    "models, field, advice",
    [
        (
            {"teacher": {"model": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}},
            "teacher.kwargs.weights",
            "`weights:` field",
        ),
        (
            {"student": {"model": "torchvision:resnet18", "kwargs": {"pretrained": True}}},
            "student.kwargs.pretrained",
            "`weights:` field",
        ),
        (
            {"teacher": {"model": "timm:resnet10t", "kwargs": {"model_dir": "/tmp"}}},
            "teacher.kwargs.model_dir",
            "pretrained: true",
        ),
        (
            {"teacher": {"model": "cifar_resnet20", "kwargs": {"num_classes": 10**6}}},
            "teacher.kwargs.num_classes",
            "between 0 and 100,000",
        ),
        (
            {"student": {"model": "cifar_resnet20", "kwargs": {"bogus": 1}}},
            "student.kwargs.bogus",
            "does not take this argument",
        ),
        (
            {"student": {"model": "timm:resnet10t", "kwargs": {"bogus": 1}}},
            "student.kwargs.bogus",
            "does not take this argument",
        ),
    ],
    ids=["weights", "torchvision_pretrained", "dir", "num_classes", "bogus", "timm_bogus"],
)
def test_a_recipe_s_model_kwargs_are_checked_at_validation(
    tmp_path, tiny_image_folder, capsys, models, field, advice
):
    rc, err = _validate(tmp_path, tiny_image_folder, capsys, **models)
    assert rc == 2 and field in err and advice in err, err


def test_a_recipe_s_documented_kwargs_validate_beside_a_refused_one(
    tmp_path, tiny_image_folder, capsys
):
    """timm's `pretrained: true` (the local Hugging Face cache), architecture arguments, and an
    absent num_classes (the data's) stay valid while a bogus one beside them is named; the
    builder check runs on the meta device, in ms."""
    vit = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3}
    start = time.perf_counter()
    rc, err = _validate(
        tmp_path,
        tiny_image_folder,
        capsys,
        teacher={"model": "timm:resnet10t", "kwargs": {"pretrained": True, "drop_path_rate": 0.1}},
        student={"model": "timm:vit_tiny_patch16_224", "kwargs": {**vit, "bogus": 1}},
    )
    assert rc == 2 and "student.kwargs.bogus" in err and "teacher" not in err, err
    assert time.perf_counter() - start < 10


def test_a_recipe_model_too_large_for_memory_is_refused_on_meta(
    tmp_path, tiny_image_folder, capsys
):
    wide = {"embed_dim": 60_000, "depth": 24, "num_heads": 1, "img_size": 32, "patch_size": 4}
    rc, err = _validate(
        tmp_path,
        tiny_image_folder,
        capsys,
        student={"model": "timm:vit_tiny_patch16_224", "kwargs": wide},
    )
    assert rc == 2 and "student.kwargs: " in err and "at most 1,000,000,000" in err, err


def test_architecture_arguments_shaped_like_loading_ones_are_allowed():
    """A rate or a window size is not a file: `drop_path`, SwinV2's `pretrained_window_sizes`."""
    from compress.models.spec_schema import kwarg_problems

    kwargs = {"drop_path_rate": 0.1, "pretrained_window_sizes": [0, 0, 0, 0], "shortcut_root": True}
    assert kwarg_problems("timm:swinv2_tiny_window8_256", kwargs, saved=True) == []
    assert kwarg_problems("timm:x", {"transformer_drop_path": "/etc/passwd"}, saved=False)


def test_a_weights_file_that_cannot_be_read_or_does_not_fit_is_one_error(
    tmp_path, tiny_image_folder, capsys
):
    from compress.models.cifar_resnet import cifar_resnet

    eleven = tmp_path / "eleven.safetensors"
    state = {k: v.contiguous() for k, v in cifar_resnet(20, num_classes=11).state_dict().items()}
    save_file(state, str(eleven))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(eleven.read_bytes()[:5000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nope}\x00\x00")
    for path in (truncated, garbage):
        line = eval_error(capsys, "cifar_resnet20", tiny_image_folder, "--weights", str(path))
        assert f"error: {path}: not a readable safetensors file" in line
    line = eval_error(capsys, "cifar_resnet20", tiny_image_folder, "--weights", str(eleven))
    assert f"error: {eleven}: weights do not match the model's shapes" in line
    assert "linear.weight is [11, 64] in the file but [" in line  # the data's class count


def test_a_saved_model_reloads_and_the_same_spec_asking_for_a_file_does_not(
    tmp_path, tiny_image_folder, capsys
):
    from safetensors import safe_open

    from compress.models import create_model, load_model, save_model

    model, spec = create_model("timm:resnet10t", {"drop_path_rate": 0.05}, num_classes=3)
    path = save_model(model, spec, tmp_path / "m.safetensors")
    reloaded, again = load_model(path)
    assert again == spec
    assert torch.equal(reloaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"])
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    doc = json.loads(meta[SPEC_KEY])
    doc["kwargs"]["checkpoint_path"] = str(path)
    save_file(tensors, str(path), metadata={SPEC_KEY: json.dumps(doc)})
    assert "kwargs.checkpoint_path" in eval_error(capsys, path, tiny_image_folder)
