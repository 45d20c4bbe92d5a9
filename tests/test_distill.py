"""Knowledge distillation on real data: the student improves, and the teacher helps.

Budget: cifar_resnet20 from scratch, 200 train images per class (1,800 after the validation split),
15 epochs without augmentation (so the teacher's logits are computed once and reused), evaluated on
2,000 test images. Measured here: KD 51.6% against cross-entropy 45.2% with seed 0.
"""

import pytest

from compress.io import read_json
from compress.train.objectives import kd_loss
from tests.conftest import run_cli, write_recipe


def _recipe(cifar_root, resnet56_weights, stage_type: str) -> dict:
    stage = {"type": stage_type, "epochs": 15, "lr": 0.05, "warmup_epochs": 1}
    if stage_type == "distill":
        stage.update(temperature=4.0, alpha=0.9)
    return {
        "name": f"kd-{stage_type}",
        "seed": 0,
        "data": {
            "root": str(cifar_root),
            "limit_per_class": 200,
            "test_limit_per_class": 200,
            "augment": "none",
            "batch_size": 64,
        },
        "teacher": {"model": "cifar_resnet56", "weights": str(resnet56_weights)},
        "student": "cifar_resnet20",
        "stages": [{"type": "eval", "name": "initial"}, stage],
    }


@pytest.mark.slow
def test_distillation_beats_the_same_budget_without_teacher(tmp_path, cifar_root, resnet56_weights):
    top1 = {}
    for stage_type in ("distill", "train"):
        path = write_recipe(
            tmp_path / f"{stage_type}.yaml", _recipe(cifar_root, resnet56_weights, stage_type)
        )
        out = tmp_path / stage_type
        result = run_cli("run", str(path), "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
        report = read_json(out / "report.json")
        models = {m["name"]: m for m in report["models"]}
        initial, final = models["student"]["top1"], models[f"01-{stage_type}"]["top1"]
        assert initial < 20.0  # an untrained 10-class model
        assert final > initial + 20.0, (stage_type, initial, final)
        top1[stage_type] = final
    stage = read_json(tmp_path / "distill" / "01-distill" / "stage.json")
    assert stage["metrics"]["teacher_logits_cached"] is True
    assert top1["distill"] > top1["train"] + 2.0, top1


def test_kd_loss_matches_its_definition():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    T, alpha = 3.0, 0.7
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(kd_loss(s, t, y, T, alpha), expected)
    assert kd_loss(t, t, y, T, 1.0).abs() < 1e-6  # identical logits: no KL
