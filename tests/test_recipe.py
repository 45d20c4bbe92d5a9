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


# ------------------------------------------------------------------ hostile and impossible input


def _tiny_recipe_text(data_root: Path, stage: str = "{type: distill, epochs: 1}") -> str:
    return (
        f"name: tiny\ndata: {{root: {data_root}}}\nteacher: cifar_resnet20\nstages:\n  - {stage}\n"
    )


def _refused(tmp_path: Path, capsys, content: str | bytes, *extra: str) -> str:
    """Validate a recipe file in-process: exit 2 with one message and no traceback."""
    from compress.cli import main

    path = tmp_path / "r.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["validate", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys, tiny_image_folder):
    import time

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    text = _tiny_recipe_text(tiny_image_folder) + "\n".join(lines) + "\n"
    start = time.perf_counter()
    err = _refused(tmp_path, capsys, text)
    assert time.perf_counter() - start < 5
    assert "r.yaml: its aliases expand to more than" in err
    assert "refers to the node that contains it" in _refused(tmp_path, capsys, "a: &x [*x]\n")


def test_yaml_anchors_and_merge_keys_still_work(tmp_path, tiny_image_folder):
    text = _tiny_recipe_text(tiny_image_folder, "&d {type: distill, epochs: 1}")
    text += "  - {<<: *d, epochs: 2}\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert [s.epochs for s in load_recipe(path).stages] == [1, 2]


def test_recipe_that_is_not_utf8_names_the_byte(tmp_path, capsys, tiny_image_folder):
    text = _tiny_recipe_text(tiny_image_folder).replace("name: tiny", "name: caf\xe9")
    err = _refused(tmp_path, capsys, text.encode("latin-1"))
    offset = text.index("\xe9")
    assert f"r.yaml: not UTF-8 text (byte 0xe9 at offset {offset})" in err


def test_duplicate_keys_name_both_lines(tmp_path, capsys, tiny_image_folder):
    stage = "type: distill\n    epochs: 1\n    lr: 0.1\n    epochs: 1000"
    text = _tiny_recipe_text(tiny_image_folder, stage)
    err = _refused(tmp_path, capsys, text)
    assert "r.yaml: duplicate key 'epochs' on lines 6 and 8" in err


@pytest.mark.parametrize(
    "stage, field, expected",
    [
        ("{type: distill, epochs: 1, lr: .inf}", "stages[0].lr", "finite number"),
        ("{type: distill, epochs: 1, warmup_epochs: .nan}", "stages[0].warmup_epochs", "finite"),
        ("{type: distill, epochs: true}", "stages[0].epochs", "not the boolean true"),
        ("{type: distill, epochs: 1000000000000000000000000000000}", "stages[0].epochs", "range"),
        ("{type: distill, epochs: 100000}", "stages[0].epochs", "<= 10000"),
        ("{type: export}\n  - {type: bench, min_duration_s: .inf}", "stages[1].min_duration_s", ""),
    ],
)
def test_values_nobody_can_mean_are_refused(
    tmp_path, capsys, tiny_image_folder, stage, field, expected
):
    err = _refused(tmp_path, capsys, _tiny_recipe_text(tiny_image_folder, stage))
    assert re.search(rf"{re.escape(field)}: .*{expected}", err), err


@pytest.mark.parametrize(
    "setting, field, expected",
    [
        ("data.image_size=1000000", "data.image_size", "<= 4096"),
        ("seed=-1", "seed", ">= 0"),
        ("seed=4294967296", "seed", "<= 4294967295"),
        ("data.batch_size=true", "data.batch_size", "boolean"),
    ],
)
def test_impossible_top_level_values_are_refused(
    tmp_path, capsys, tiny_image_folder, setting, field, expected
):
    err = _refused(tmp_path, capsys, _tiny_recipe_text(tiny_image_folder), "--set", setting)
    assert re.search(rf"{re.escape(field)}: .*{expected}", err), err


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("name=[1,", "--set name: not valid YAML"),
        ("name={a: b", "--set name: not valid YAML"),
        ("name=!!python/object/apply:os.system [ls]", "could not determine a constructor"),
    ],
)
def test_malformed_overrides_name_the_flag(tmp_path, capsys, tiny_image_folder, setting, expected):
    err = _refused(tmp_path, capsys, _tiny_recipe_text(tiny_image_folder), "--set", setting)
    assert expected in err, err


def test_cuda_on_a_machine_without_it_warns_at_validation(tmp_path, capsys, tiny_image_folder):
    import torch

    from compress.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = tmp_path / "r.yaml"
    path.write_text(_tiny_recipe_text(tiny_image_folder) + "device: cuda\n")
    assert main(["validate", str(path)]) == 0
    assert "warning: device: cuda, but this machine has no CUDA device" in capsys.readouterr().err
