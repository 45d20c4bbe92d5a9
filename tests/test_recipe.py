"""Malformed recipes exit 2 with one message naming the field, never a traceback."""

import re
from pathlib import Path

import pytest

from compress.recipe import load_recipe, parse_recipe
from tests.conftest import REPO, run_cli, write_recipe


def _bad(tmp_path: Path, recipe: dict, *extra: str):
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = run_cli("validate", str(path), *extra)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "mutate, field, expected",
    [
        (lambda r: r["stages"][1].update(colour="red"), "stages[1].colour", "unknown key"),
        (lambda r: r["stages"][1].update(epochs="three"), "stages[1].epochs", "integer"),
        (lambda r: r["stages"][1].update(epochs=-2), "stages[1].epochs", "must be > 0"),
        (lambda r: r["stages"][1].update(temperature=0), "stages[1].temperature", "must be > 0"),
        (lambda r: r["data"].update(root="/no/such/folder"), "data.root", "not found"),
        (lambda r: r.update(student="resnet9000"), "student.model", "unknown model"),
        (
            lambda r: r.update(teacher={"model": "timm:not_a_model"}),
            "teacher.model",
            "unknown timm",
        ),
        (lambda r: r["stages"].append({"type": "sing"}), "stages[4].type", "unknown stage type"),
        (lambda r: r.update(speed=3), "speed", "unknown key"),
    ],
)
def test_malformed_recipe_names_the_field(tmp_path, small_recipe, mutate, field, expected):
    mutate(small_recipe)
    err = _bad(tmp_path, small_recipe)
    assert re.search(rf"{re.escape(field)}: .*{expected}", err), err


def test_overrides_are_validated_like_the_file(tmp_path, small_recipe):
    path = write_recipe(tmp_path / "r.yaml", small_recipe)
    recipe = load_recipe(path, ["stages.1.epochs=5", "data.batch_size=16"])
    assert recipe.stages[1].epochs == 5 and recipe.data.batch_size == 16
    err = _bad(tmp_path, small_recipe, "--set", "stages.1.alpha=1.5")
    assert "stages[1].alpha: must be <= 1" in err
    err = _bad(tmp_path, small_recipe, "--set", "stages.9.epochs=1")
    assert "stages.9" in err


def test_paths_are_relative_to_the_recipe_and_env_is_interpolated(
    tmp_path, cifar_root, monkeypatch
):
    def root_of(data_root: str):
        recipe = {
            "name": "x",
            "data": {"root": data_root},
            "student": "cifar_resnet20",
            "stages": [{"type": "eval"}],
        }
        return parse_recipe(recipe, base_dir=tmp_path).data.root

    monkeypatch.setenv("MY_DATA", str(cifar_root))
    assert root_of("${MY_DATA}").resolve() == cifar_root.resolve()
    (tmp_path / "mydata").mkdir()
    assert root_of("mydata") == (tmp_path / "mydata").resolve()
    assert root_of("${UNSET_VAR_X:-mydata}") == (tmp_path / "mydata").resolve()
    with pytest.raises(Exception, match="environment variable NOPE_UNSET is not set"):
        parse_recipe({"name": "x", "data": {"root": "${NOPE_UNSET}"}, "stages": []})


def test_bench_without_export_is_rejected(tmp_path, small_recipe):
    del small_recipe["stages"][2]
    assert "stages[2] (bench) needs an earlier export stage" in _bad(tmp_path, small_recipe)


def test_distill_without_teacher_is_rejected(tmp_path, small_recipe):
    del small_recipe["teacher"]
    assert "stages[1] (distill) learns from a teacher: set `teacher`" in _bad(
        tmp_path, small_recipe
    )
    small_recipe["stages"][1] = {"type": "quantize", "method": "qat_int8", "epochs": 1}
    message = _bad(tmp_path, small_recipe)
    assert "stages[1] (quantize) learns from a teacher" in message
    assert "distill_from: input" in message


def test_shipped_recipes_validate(tmp_path, monkeypatch, cifar_root, resnet56_weights):
    """The shipped recipes name the shared data and weights: without them this test skips."""
    from compress.models import create_model, save_model

    # vit_to_cnn_cifar10 distils the ViT that vit_teacher_cifar10 trains: stand in a saved one.
    vit, spec = create_model(
        "timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 1}, num_classes=10
    )
    monkeypatch.setenv(
        "COMPRESS_VIT_TEACHER", str(save_model(vit, spec, tmp_path / "vit.safetensors"))
    )
    from compress.cli import main

    for path in sorted((REPO / "recipes").glob("*.yaml")):  # in-process: the same command
        assert main(["validate", str(path)]) == 0, path


def test_recipe_reference_documents_every_field():
    """recipes/README.md is generated from the schema: regenerate with tools/recipe_docs.py."""
    from tools.recipe_docs import render

    assert (REPO / "recipes" / "README.md").read_text() == render()
