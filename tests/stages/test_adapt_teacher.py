"""`adapt_teacher`: the teacher is fine-tuned on the run's data and later stages learn from it."""

import torch

from compress.evaluation import evaluate
from compress.io import read_json
from compress.models import create_model, load_model
from compress.pipeline import Pipeline
from compress.recipe import parse_recipe


def _recipe(cifar_root, resnet20_weights) -> dict:
    return {
        "name": "adapt",
        "seed": 0,
        "data": {
            "root": str(cifar_root),
            "limit_per_class": 30,
            "test_limit_per_class": 10,
            "augment": "none",
            "batch_size": 32,
        },
        "teacher": {"model": "cifar_resnet20", "weights": str(resnet20_weights)},
        "student": "cifar_resnet20",
        "stages": [
            {"type": "adapt_teacher", "epochs": 3, "lr": 0.02},
            {"type": "distill", "epochs": 1, "lr": 0.05},
        ],
    }


def test_adapted_teacher_fits_the_data_and_teaches_the_later_stages(
    tmp_path, cifar_root, resnet20_weights
):
    recipe = parse_recipe(_recipe(cifar_root, resnet20_weights))
    out = tmp_path / "run"
    report = Pipeline(recipe, out).run()

    adapted_file = out / "00-adapt_teacher" / "teacher.safetensors"
    adapted, spec = load_model(adapted_file)
    original, _ = create_model("cifar_resnet20", weights=resnet20_weights, num_classes=10)
    assert spec.name == "cifar_resnet20"
    again = Pipeline(recipe, out)  # reruns below
    train = again.data.loader("train")
    before = evaluate(original, train, torch.device("cpu"))["top1"]
    after = evaluate(adapted, train, torch.device("cpu"))["top1"]
    assert after > before  # it was trained on these images

    models = {m["name"]: m for m in report["models"]}
    entry = models["00-adapt_teacher teacher"]
    assert entry["role"] == "teacher" and entry["params"] == models["teacher"]["params"]
    stages = {s["label"]: s for s in report["stages"]}
    assert stages["adapt_teacher"]["model"] == "student"  # the current model passes through
    assert "against the teacher (`00-adapt_teacher teacher`)" in (out / "report.md").read_text()

    # a rerun skips both stages and its later stages see the adapted teacher, not the recipe's
    assert again.run()["status"] == "complete"
    assert read_json(out / "01-distill" / "stage.json")["status"] == "done"
    teacher = again.teacher()
    for name, tensor in adapted.state_dict().items():
        assert torch.equal(teacher.state_dict()[name].cpu(), tensor), name
    assert not torch.equal(
        teacher.state_dict()["linear.weight"].cpu(), original.state_dict()["linear.weight"]
    )


def test_search_can_cut_its_candidates_from_the_adapted_teacher(
    tmp_path, cifar_root, resnet20_weights
):
    recipe = _recipe(cifar_root, resnet20_weights)  # the student: an untrained ResNet-20
    recipe["stages"] = [
        {"type": "adapt_teacher", "epochs": 1, "lr": 0.02},
        {
            "type": "search",
            "start_from": "teacher",
            "updates": 1,
            "rollouts": 2,
            "candidate_steps": 0,  # candidates keep exactly what they inherit
            "max_params": 250000,
        },
    ]
    out = tmp_path / "run"
    Pipeline(parse_recipe(recipe), out).run()
    adapted, _ = load_model(out / "00-adapt_teacher" / "teacher.safetensors")
    student, spec = load_model(out / "01-search" / "model.safetensors")
    assert spec.name == "search:cifar_resnet20"
    assert sum(p.numel() for p in student.parameters()) <= 250000
    for name in ("conv1.weight", "linear.weight"):  # the stem and the head are never cut
        assert torch.equal(student.state_dict()[name], adapted.state_dict()[name]), name
