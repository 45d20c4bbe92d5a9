"""Knowledge distillation on real data: the student improves, and the teacher helps.

Budget: cifar_resnet20 from scratch, 120 train images per class (1,080 after the validation split),
15 epochs without augmentation (so the teacher's logits are computed once and reused), evaluated on
1,000 test images. Measured here: KD 46.3% against cross-entropy 39.2% with seed 0 (2.8 minutes on
2 cores for both runs).
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
            "limit_per_class": 120,
            "test_limit_per_class": 100,
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


def test_teacher_logits_keep_only_computed_rows_and_top_k_when_classes_are_many():
    import torch
    import torch.nn.functional as F

    from compress.train.teacher_logits import TeacherLogits

    torch.manual_seed(0)
    samples = torch.tensor([7, 2, 9])
    few = torch.randn(3, 10)
    store = TeacherLogits.from_rows(1_000_000, samples, few)  # 10 classes: every logit, float32
    assert not store.sparse and store.state["logits"].shape == (3, 10)
    assert torch.equal(store[torch.tensor([9, 7])], few[[2, 0]])
    with pytest.raises(KeyError, match=r"train samples \[3\]"):
        store[torch.tensor([3])]

    many = 3 * torch.randn(3, 1000)  # ImageNet-sized output: top-10 probabilities in fp16
    store = TeacherLogits.from_rows(1_000_000, samples, many)
    dense_bytes = 3 * 1000 * 4 + 1_000_000 * 8
    assert (
        store.sparse and store.nbytes() < dense_bytes and store.state["top_probs"].shape == (3, 10)
    )
    got = store[samples]
    top = many.topk(10, dim=1).indices
    assert torch.equal(got.argmax(1), many.argmax(1))
    # kept classes: the teacher's logits up to a per-row constant (fp16 probabilities)
    diffs = got.gather(1, top) - many.gather(1, top)
    assert (diffs - diffs[:, :1]).abs().max() < 2e-3
    # the rest share the probability the top 10 leave; total probability stays 1
    assert torch.allclose(got.exp().sum(1), torch.ones(3), atol=1e-3)

    def kl(logits):
        return F.kl_div(
            logits.log_softmax(1), many.log_softmax(1), log_target=True, reduction="batchmean"
        )

    assert kl(got) < 0.15 * kl(torch.zeros_like(many))  # far closer than a uniform guess

    older = TeacherLogits.load(few)  # a file written before rows were kept per sample
    assert torch.equal(older[torch.tensor([1])], few[[1]])
