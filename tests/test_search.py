"""The search stage: unit extraction and surgery on each supported family, the reward, the
policy gradient, resume, and a real search on CIFAR-10 with the pretrained ResNet-20."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from compress.errors import InputError
from compress.evaluation import count_flops
from compress.io import read_json
from compress.models import create_model, load_model, save_model
from compress.search.budget import CostBound, cost_bounds, shrink_mask
from compress.search.loop import HISTORY_FILE, PolicySearch, SearchSettings
from compress.search.policies import MovingBaseline, RemovalPolicy, reinforce_step
from compress.search.reward import constrained_reward, reward
from compress.search.surgery import (
    Candidate,
    ShortcutPath,
    build_candidate,
    candidate_spec,
    remove_units,
    shrink,
)
from compress.search.units import FEATURES, Unit, conv_path, feature_matrix, find_units, followers
from tests.conftest import run_cli, search_recipe_for, write_recipe

SIZE = (3, 32, 32)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- reward


def test_reward_formula_and_budget_penalties():
    # C = 1 - 25/100 = 0.75: R = 0.75 * 1.25 * 90/92
    assert reward(90.0, 92.0, 25.0, 100.0) == pytest.approx(0.75 * 1.25 * 90 / 92)
    assert reward(92.0, 92.0, 100.0, 100.0) == 0.0  # the teacher itself earns nothing
    assert reward(92.0, 92.0, 0.0, 100.0) == pytest.approx(1.0)
    raw = 0.6
    assert constrained_reward(raw, False, 3, 15) == raw  # within budget: untouched
    soft = constrained_reward(raw, True, 0, 15)  # eps = 1 at the start: (1 - 1) + 1 * R
    assert soft == pytest.approx(raw)
    middle = constrained_reward(raw, True, 5, 15)  # eps = (2/3)^4
    eps = (2 / 3) ** 4
    assert middle == pytest.approx(eps - 1 + eps * raw)
    assert constrained_reward(raw, True, 15, 15) == -1.0  # annealed: a hard -1
    assert constrained_reward(raw, True, 40, 15) == -1.0


# ---------------------------------------------------------------- policies and loop


def _synthetic_units(n: int) -> list[Unit]:
    g = torch.Generator().manual_seed(0)
    values = torch.rand(n, len(FEATURES), generator=g).tolist()
    return [
        Unit(f"block{i}", "basic", True, ["conv1"], dict(zip(FEATURES, values[i], strict=True)))
        for i in range(n)
    ]


TARGET_REMOVED = {"block0", "block1", "block2"}


def _synthetic_reward(candidate: Candidate) -> dict:
    """Highest when exactly TARGET_REMOVED is removed; scales of 0.5 are rewarded in shrinkage."""
    names = [f"block{i}" for i in range(6)]
    hits = sum((u in candidate.removed) == (u in TARGET_REMOVED) for u in names)
    halves = sum(s == 0.5 for _, s in candidate.scales)
    return {"reward_raw": hits / 6 + 0.1 * halves, "violates": False}


def _target_probability(policy: RemovalPolicy, units: list[Unit]) -> float:
    with torch.no_grad():
        probs = policy(feature_matrix(units)).softmax(-1)
    keep = [0 if u.name in TARGET_REMOVED else 1 for u in units]
    return float(torch.stack([probs[i, a] for i, a in enumerate(keep)]).prod())


def test_policy_gradient_raises_probability_of_the_best_removal(tmp_path):
    units = _synthetic_units(6)
    settings = SearchSettings(mode="removal", updates=25, rollouts=8, policy_lr=0.01, seed=1)
    search = PolicySearch(units, _synthetic_reward, settings, tmp_path)
    before = _target_probability(search.removal, units)
    shrink_before = [p.detach().clone() for p in search.shrink.parameters()]
    search.run()
    after = _target_probability(search.removal, units)
    assert before < 0.05 and after > 0.5, (before, after)
    means = [s["mean_reward"] for s in search.summaries]
    assert sum(means[-5:]) / 5 > sum(means[:5]) / 5 + 0.2, means
    assert search.best()["removed"] == sorted(TARGET_REMOVED)
    # The removal phase never touches the shrink policy; the shrink phase trains every part of it
    assert all(
        torch.equal(a, b) for a, b in zip(shrink_before, search.shrink.parameters(), strict=True)
    )
    shrink_search = PolicySearch(
        units,
        _synthetic_reward,
        SearchSettings(mode="shrink", updates=3, rollouts=4, seed=1),
        tmp_path / "shrink",
    )
    start = [p.detach().clone() for p in shrink_search.shrink.parameters()]
    shrink_search.run()
    changed = [
        not torch.equal(a, b) for a, b in zip(start, shrink_search.shrink.parameters(), strict=True)
    ]
    assert all(changed), "every shrink-policy tensor (LSTM cell included) must be trained"


def _budget_reward(candidate: Candidate) -> dict:
    """Removing blocks costs accuracy, shrinking costs less; the budget is 3.5 of 6 "params"."""
    params = 6 - len(candidate.removed) - 0.5 * len(candidate.scales)
    raw = 1 - 0.1 * len(candidate.removed) - 0.02 * len(candidate.scales)
    return {"reward_raw": raw, "violates": params > 3.5}


def test_sequential_removal_is_scored_without_the_budget_the_shrink_phase_meets(tmp_path):
    units = _synthetic_units(6)
    settings = SearchSettings(
        mode="sequential", updates=2, rollouts=6, penalty_anneal_updates=0, seed=2
    )  # a hard -1 for every over-budget candidate, from the first update
    search = PolicySearch(units, _budget_reward, settings, tmp_path)
    search.run()
    removal = [r for r in search.records.values() if r["phase"] == "removal"]
    first = search.summaries[0]
    raws = [search.records[k]["reward_raw"] for k in first["candidates"]]
    assert any(search.records[k]["violates"] for k in first["candidates"])
    assert first["rewards"] == raws  # over budget, yet not penalised in the removal phase
    start = max(removal, key=lambda r: r["reward_raw"])
    assert start["violates"] and search.stage1["candidate"]["removed"] == start["removed"]
    shrink = search.summaries[settings.updates]
    assert shrink["phase"] == "shrink"
    for key, got in zip(shrink["candidates"], shrink["rewards"], strict=True):
        record = search.records[key]
        assert got == (-1.0 if record["violates"] else record["reward_raw"])
    assert not search.best()["violates"]
    # A one-phase search keeps the budget in force
    alone = PolicySearch(
        units,
        _budget_reward,
        SearchSettings(mode="removal", updates=1, rollouts=6, penalty_anneal_updates=0, seed=2),
        tmp_path / "alone",
    )
    alone.run()
    rewards = alone.summaries[0]["rewards"]
    violating = [alone.records[k]["violates"] for k in alone.summaries[0]["candidates"]]
    assert any(violating)
    assert all(r == -1.0 for r, v in zip(rewards, violating, strict=True) if v)


def test_policies_transfer_to_a_teacher_with_more_units(tmp_path):
    settings = SearchSettings(mode="joint", updates=2, rollouts=2, seed=3)
    small = PolicySearch(_synthetic_units(4), _synthetic_reward, settings, tmp_path / "small")
    small.run()
    small.save_policies(tmp_path / "policy.pt")
    large = PolicySearch(
        _synthetic_units(6),
        _synthetic_reward,
        settings,
        tmp_path / "large",
        warm_start=tmp_path / "policy.pt",
    )
    for a, b in zip(small.removal.parameters(), large.removal.parameters(), strict=True):
        assert torch.equal(a, b)
    rollout, candidate = large._rollout("joint")
    assert len(rollout.actions) >= 6  # a keep/remove action for each of the 6 units, then scales
    with pytest.raises(ValueError, match="scales"):
        PolicySearch(
            _synthetic_units(6),
            _synthetic_reward,
            SearchSettings(scales=[0.5, 1.0]),
            tmp_path / "other",
            warm_start=tmp_path / "policy.pt",
        )


def test_each_rollout_gets_its_own_advantage():
    policy = RemovalPolicy(len(FEATURES))
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.01)
    x = feature_matrix(_synthetic_units(4))
    rollouts = [policy.sample(x, torch.Generator().manual_seed(i)) for i in range(3)]
    baseline = MovingBaseline(0.9, value=0.5)
    advantages = reinforce_step(optimizer, rollouts, [0.2, 0.5, 0.9], baseline)
    assert advantages == pytest.approx([-0.3, 0.0, 0.4])
    assert baseline.value == pytest.approx(0.9 * 0.5 + 0.1 * (1.6 / 3))


def _without_times(path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "eval_s"}
        for line in path.read_text().splitlines()
    ]


class _Interrupted(Exception):
    pass


def test_an_interrupted_search_resumes_where_it_stopped(tmp_path):
    units = _synthetic_units(6)
    settings = SearchSettings(mode="joint", updates=4, rollouts=3, seed=2)
    calls = []

    def counting(candidate):
        calls.append(candidate.key())
        return _synthetic_reward(candidate)

    PolicySearch(units, counting, settings, tmp_path / "whole").run()
    whole = _without_times(tmp_path / "whole" / HISTORY_FILE)
    whole_calls = len(calls)

    calls.clear()

    def dying(candidate):
        if len(calls) == 7:  # killed during the third update
            raise _Interrupted
        return counting(candidate)

    with pytest.raises(_Interrupted):
        PolicySearch(units, dying, settings, tmp_path / "cut").run()
    state = torch.load(tmp_path / "cut" / "search_state.pt", weights_only=True)
    assert state["update"] == 2  # checkpointed after each finished update
    resumed = PolicySearch(units, counting, settings, tmp_path / "cut")
    assert resumed.update == 2
    resumed.run()
    assert _without_times(tmp_path / "cut" / HISTORY_FILE) == whole
    assert len(calls) == whole_calls  # nothing evaluated twice


# ---------------------------------------------------------------- surgery


# name: (kwargs, what removing each kind of its units leaves)
FAMILIES = {
    "cifar_resnet20": ({}, {"identity", "shortcut"}),  # zero-pad shortcuts
    "torchvision:resnet18": ({}, {"identity", "shortcut"}),  # BasicBlock, 1x1 conv shortcuts
    "timm:resnet26": ({}, {"identity", "shortcut"}),  # Bottleneck
    # inverted residuals (with squeeze-excitation); no shortcut where the shape changes
    "torchvision:mobilenet_v3_small": ({}, {"identity", "projection"}),
    "timm:mobilenetv2_050": ({}, {"identity", "projection"}),
    # a plain CNN (with a small classifier MLP)
    "timm:vgg11_bn": ({"mlp_ratio": 1 / 64}, {"identity", "next_input"}),
}


def _assert_removed(student: nn.Module, teacher: nn.Module, unit: Unit) -> None:
    """The removed unit's modules are what its `removal` says."""
    replaced = student.get_submodule(unit.name)
    if unit.kind == "conv":
        for part in [unit.name, *followers(teacher, unit.name)]:
            assert isinstance(student.get_submodule(part), nn.Identity), part
    elif unit.removal == "identity":
        assert isinstance(replaced, nn.Identity)
    elif unit.removal == "shortcut":  # the block's own shortcut, with the teacher's weights
        assert isinstance(replaced, ShortcutPath)
        block = teacher.get_submodule(unit.name)
        own = block.shortcut if hasattr(block, "shortcut") else block.downsample
        torch.testing.assert_close(replaced.shortcut.state_dict(), own.state_dict(), rtol=0, atol=0)
    else:  # a new 1x1 conv + BN from the block's input to its output channels
        conv, bn = replaced
        assert conv.kernel_size == (1, 1) and isinstance(bn, nn.BatchNorm2d)
        assert (conv.in_channels, conv.out_channels) == (
            unit.features["in_channels"],
            unit.features["out_channels"],
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_surgery_keeps_forward_valid_and_lowers_params(name, tmp_path):
    torch.manual_seed(0)
    kwargs, removals = FAMILIES[name]
    teacher, spec = create_model(name, kwargs, num_classes=10)
    teacher.eval()
    units = find_units(teacher, SIZE, project_shape_changes=True)
    removable = [u for u in units if u.removable]
    assert removable and any(u.shrinkable for u in units)
    # two units of each removal the family has (identity, shortcut, projection, next input)
    by_kind: dict[str, list[Unit]] = {}
    for u in removable:
        by_kind.setdefault(u.removal, []).append(u)
    assert set(by_kind) == removals
    removed = [u for kind in by_kind.values() for u in kind[:2]]
    candidate = Candidate.make([u.name for u in removed], {u.name: 0.5 for u in units})
    student = build_candidate(teacher, units, candidate, SIZE)
    x = torch.randn(2, *SIZE)
    assert student(x).shape == (2, 10)
    assert _params(student) < _params(teacher)
    for unit in removed:
        _assert_removed(student, teacher, unit)
    # Kept units shrink after the removals
    kept = next(u for u in units if u.shrinkable and u.name not in candidate.removed)
    conv = conv_path(kept.name, kept.shrinkable[0])
    assert student.get_submodule(conv).out_channels < teacher.get_submodule(conv).out_channels
    # Saved like any model, it rebuilds from its spec with the same outputs
    path = save_model(
        student, candidate_spec(spec, student, units, candidate, SIZE), tmp_path / "s.safetensors"
    )
    again, again_spec = load_model(path)
    assert again_spec.name == "search:" + name
    torch.testing.assert_close(again.eval()(x), student(x))


def test_a_downsampling_block_is_removed_only_with_a_projection():
    torch.manual_seed(0)
    teacher, _ = create_model("cifar_resnet20")
    teacher.eval()
    default = {u.name: u for u in find_units(teacher, SIZE)}
    assert not default["layer2.0"].removable and not default["layer3.0"].removable
    units = find_units(teacher, SIZE, project_shape_changes=True)
    shape_changing = [u.name for u in units if u.removal != "identity"]
    assert shape_changing == ["layer2.0", "layer3.0"] and all(u.removable for u in units)
    assert [u.features for u in units] == list(default[u.name].features for u in units)
    # The candidate is the teacher with layer2.0 replaced by its zero-pad shortcut
    student = build_candidate(teacher, units, Candidate.make(["layer2.0"]), SIZE)
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        h = teacher.layer1(torch.relu(teacher.bn1(teacher.conv1(x))))
        h = teacher.layer3(teacher.layer2[1:](teacher.layer2[0].shortcut(h)))
        manual = teacher.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))
        torch.testing.assert_close(student(x), manual)
    # Torch-Pruning still shrinks the other blocks, the one after the replacement included
    shrunk = build_candidate(
        teacher, units, Candidate.make(["layer2.0"], {"layer2.1": 0.5, "layer3.0": 0.5}), SIZE
    )
    assert (shrunk.layer2[1].conv1.out_channels, shrunk.layer3[0].conv1.out_channels) == (16, 32)
    assert shrunk(x).shape == (4, 10)


def _plain_cnn() -> nn.Sequential:
    def conv(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    torch.manual_seed(0)
    return nn.Sequential(
        *conv(3, 16),  # 0: the first conv stays
        *conv(16, 32),  # 3
        nn.MaxPool2d(2),
        *conv(32, 16),  # 7: removing it widens the inputs of 10
        *conv(16, 24),  # 10: removing it narrows the Linear's inputs
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24 * 4, 10),
    ).eval()


def test_removing_a_plain_conv_resizes_the_next_layers_inputs():
    teacher, _ = create_model("timm:vgg11_bn", {"mlp_ratio": 1 / 64}, num_classes=10)
    teacher.eval()
    units = {u.name: u for u in find_units(teacher, SIZE)}
    assert not units["features.0"].removable and units["features.4"].removable
    student = build_candidate(
        teacher, list(units.values()), Candidate.make(["features.4", "features.11"]), SIZE
    )
    # 64 -> 128 removed: the next conv takes 64 channels, its 64 strongest input filters kept
    before, after = teacher.features[8], student.features[8]
    assert (before.in_channels, after.in_channels) == (128, 64)
    keep = before.weight.pow(2).sum(dim=(0, 2, 3)).argsort(descending=True)[:64].sort().values
    torch.testing.assert_close(after.weight, before.weight[:, keep], rtol=0, atol=0)
    assert student.features[15].in_channels == 256  # 256 -> 256 removed: an identity
    assert all(isinstance(student.features[i], nn.Identity) for i in (4, 5, 6, 11, 12, 13))

    plain = _plain_cnn()
    units = find_units(plain, SIZE)
    assert [(u.name, u.removable) for u in units] == [
        ("0", False),
        ("3", True),
        ("7", True),
        ("10", True),
    ]
    wider = build_candidate(plain, units, Candidate.make(["7"]), SIZE)
    assert wider[10].in_channels == 32  # the teacher's 16 input filters, then 16 at zero
    torch.testing.assert_close(wider[10].weight[:, :16], plain[10].weight, rtol=0, atol=0)
    assert not wider[10].weight[:, 16:].any()
    narrower = build_candidate(plain, units, Candidate.make(["10"], {"3": 0.5}), SIZE)
    # flatten: each of the 16 kept channels keeps its block of 4 Linear inputs
    weight = plain[15].weight.view(10, 24, 4)
    keep = weight.pow(2).sum(dim=(0, 2)).argsort(descending=True)[:16].sort().values
    torch.testing.assert_close(narrower[15].weight.view(10, 16, 4), weight[:, keep])
    assert narrower[3].out_channels == 16 and narrower[7].in_channels == 16
    # The surgery replayed on a fresh model (as `rebuild` does) takes the weights back
    x = torch.randn(2, *SIZE)
    for candidate, student in [(["7"], wider), (["10"], narrower)]:
        fresh = _plain_cnn()
        remove_units(fresh, candidate, SIZE, by_importance=False)
        shrink(fresh, {"3": {"": student[3].out_channels}}, SIZE, by_importance=False)
        fresh.load_state_dict(student.state_dict())
        torch.testing.assert_close(fresh(x), student(x))


def test_candidates_inherit_the_teachers_weights(resnet20_weights):
    teacher, _ = create_model("cifar_resnet20", weights=resnet20_weights)
    teacher.eval()
    units = find_units(teacher, SIZE)
    x = torch.randn(4, *SIZE)
    same = build_candidate(teacher, units, Candidate(), SIZE)
    torch.testing.assert_close(same(x), teacher(x), rtol=0, atol=0)
    shrunk = build_candidate(teacher, units, Candidate.make([], {"layer3.1": 0.5}), SIZE)
    kept = shrunk.layer3[1].conv1.weight
    full = teacher.layer3[1].conv1.weight
    assert kept.shape[0] == 32
    # every kept filter is one of the teacher's filters, the largest ones by group magnitude
    matches = [(full == k).all(dim=(1, 2, 3)).nonzero().flatten().tolist() for k in kept]
    assert all(len(m) == 1 for m in matches)
    torch.testing.assert_close(shrunk.layer3[0].conv1.weight, teacher.layer3[0].conv1.weight)
    fresh = build_candidate(teacher, units, Candidate(), SIZE, reinit=True)
    assert not torch.equal(fresh.conv1.weight, teacher.conv1.weight)


def test_shrinkage_keeps_the_zero_pad_shortcut_stream(resnet56_weights):
    teacher, _ = create_model("cifar_resnet56", weights=resnet56_weights)
    teacher.eval()
    units = find_units(teacher, SIZE)
    assert len(units) == 27 and sum(u.removable for u in units) == 25  # 2 blocks downsample
    student = build_candidate(
        teacher, units, Candidate.make([], {u.name: 0.25 for u in units}), SIZE
    )
    blocks = [m for layer in (student.layer1, student.layer2, student.layer3) for m in layer]
    assert [b.conv2.out_channels for b in blocks] == [16] * 9 + [32] * 9 + [64] * 9
    assert [b.conv1.out_channels for b in blocks] == [8] * 9 + [8] * 9 + [16] * 9
    assert student(torch.randn(1, *SIZE)).shape == (1, 10)
    assert _params(student) < 0.5 * _params(teacher)
    # The stream is coupled across blocks by the parameter-free shortcut: shrinking it is refused
    with pytest.raises(ValueError, match="shared beyond its block"):
        shrink(teacher, {"layer1.0": {"conv2": 8}}, SIZE)


@pytest.mark.parametrize("strategy", ["random", "policy_gradient"])
def test_bounded_shrink_actions_keep_real_candidates_within_the_budget(strategy, tmp_path):
    model, _ = create_model("cifar_resnet20")
    model.eval()
    units = find_units(model, SIZE)
    total = _params(model)
    limit = 0.35 * total
    settings = SearchSettings(mode="joint", strategy=strategy, updates=2, rollouts=5, seed=0)
    bounds = cost_bounds(
        model, units, settings.scales, 8, {"params": limit}, {"params": total}, SIZE
    )

    def built_params(search_dir, bounds) -> list[int]:
        counts = []

        def evaluate(candidate: Candidate) -> dict:
            counts.append(_params(build_candidate(model, units, candidate, SIZE)))
            return {"reward_raw": 0.5, "violates": counts[-1] > limit}

        PolicySearch(units, evaluate, settings, tmp_path / search_dir, bounds=bounds).run()
        return counts

    free = built_params("free", None)
    bounded = built_params("bounded", bounds)
    assert any(n > limit for n in free)  # the same search without bounds breaks the budget
    assert len(bounded) >= 6 and all(n <= limit for n in bounded)
    assert max(bounded) > 0.8 * limit  # bounded, not simply shrunk to the minimum


@pytest.mark.parametrize("name", ["cifar_resnet20", "timm:resnet26"])
def test_bound_savings_match_built_candidates(name):
    """Params and FLOPs of bounded candidates are known exactly before they are built."""
    size = SIZE
    model, _ = create_model(name, num_classes=10)
    model.eval()
    units = find_units(model, size)
    scales = SearchSettings().scales
    totals = {"params": _params(model), "flops": count_flops(model, size)}
    bounds = cost_bounds(model, units, scales, 8, {"params": 1.0, "flops": 1.0}, totals, size)
    rng = random.Random(0)
    for _ in range(3):
        actions = {u.name: rng.randrange(len(scales)) for u in units}
        built = build_candidate(
            model, units, Candidate.make([], {u: scales[a] for u, a in actions.items()}), size
        )
        actual = {"params": _params(built), "flops": count_flops(built, size)}
        for bound, key in zip(bounds, ("params", "flops"), strict=True):
            estimate = bound.total - sum(bound.saving(u, a) for u, a in actions.items())
            assert estimate == pytest.approx(actual[key], rel=1e-9), key


def test_shrink_mask_offers_the_largest_saving_when_the_budget_cannot_be_met():
    bound = CostBound(
        limit=50.0,
        total=100.0,
        unit_cost={"a": 40.0, "b": 40.0},
        savings={"a": [30.0, 20.0, 0.0], "b": [30.0, 20.0, 0.0]},
    )
    allowed = shrink_mask([bound], [], ["a", "b"], 3)
    # a at 1.0 leaves 100 - 30 (b at its smallest) = 70 > 50; at 0.5: 50; at 0.25: 40
    assert allowed([]).tolist() == [True, True, False]
    assert allowed([1]).tolist() == [True, False, False]  # 80 - 30 = 50 at b's 0.25 only
    tight = CostBound(10.0, 100.0, {"a": 40.0}, {"a": [30.0, 20.0, 0.0]})
    assert shrink_mask([tight], [], ["a"], 3)([]).tolist() == [True, False, False]


def test_unsupported_model_is_named():
    import timm

    no_conv = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(
        InputError, match=r"cannot decompose torch\.nn\.modules\.container\.Sequential"
    ):
        find_units(no_conv, SIZE)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    with pytest.raises(InputError, match=r"cannot decompose timm\.models\.vision_transformer"):
        find_units(vit, SIZE)


# ---------------------------------------------------------------- the stage, end to end


def test_search_stage_finds_a_smaller_student_on_cifar(tmp_path, cifar_root, resnet20_weights):
    search = {
        "updates": 1,
        "rollouts": 3,
        "candidate_steps": 4,
        "candidate_batch_size": 32,
        "candidate_images": 200,
        "val_images": 100,
        "max_params": 250000,
    }
    recipe = search_recipe_for(cifar_root, resnet20_weights, 40, search)
    recipe["stages"].append({"type": "distill", "epochs": 1, "lr": 0.002, "max_steps_per_epoch": 2})
    path = write_recipe(tmp_path / "search.yaml", recipe)
    out = tmp_path / "run"
    result = run_cli("run", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    stage = out / "00-search"
    history = [json.loads(line) for line in (stage / HISTORY_FILE).read_text().splitlines()]
    assert 2 <= len(history) <= 6  # 2 phases x 1 update x 3 rollouts, repeats evaluated once
    assert len({h["key"] for h in history}) == len(history)
    assert {"removal", "shrink"} == {h["phase"] for h in history}
    report = read_json(out / "report.json")
    metrics = next(s for s in report["stages"] if s["type"] == "search")["metrics"]
    models = {m["name"]: m for m in report["models"]}
    assert models["00-search"]["params"] == metrics["best_params"] <= 250000
    assert models["00-search"]["params"] < models["teacher"]["params"]
    best = max((h for h in history if not h["violates"]), key=lambda h: h["reward_raw"])
    assert metrics["best_reward"] == best["reward_raw"] > 0
    assert metrics["teacher_val_top1"] > 60  # the pretrained ResNet-20 on held-out train images
    assert best["val_top1"] > 20  # far above chance (10%) after a few KD steps
    student, spec = load_model(out / "01-distill" / "model.safetensors")
    assert spec.name == "search:cifar_resnet20"
    assert (stage / "policy.pt").is_file()
