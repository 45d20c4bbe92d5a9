"""The search loop on synthetic rewards: the policy gradient learns, a sequential search scores its
removal phase without the budget, policies transfer, and a stopped search resumes where it stopped
from its typed history and state files."""

from __future__ import annotations

import json

import pytest
import torch

from compress.errors import InputError
from compress.search import (
    CandidateRecord,
    Evaluation,
    RemovalResult,
    UpdateSummary,
    read_history,
    read_search_state,
)
from compress.search.loop import HISTORY_FILE, STATE_FILE, PolicyMismatch, PolicySearch
from compress.search.policies import RemovalPolicy
from compress.search.records import SearchState
from compress.search.settings import SearchSettings
from compress.search.surgery import Candidate
from compress.search.units import Unit, feature_matrix
from tests.search.conftest import TARGET_REMOVED, synthetic_reward, synthetic_units


def _target_probability(policy: RemovalPolicy, units: list[Unit]) -> float:
    with torch.no_grad():
        probs = policy(feature_matrix(units)).softmax(-1)
    keep = [0 if u.name in TARGET_REMOVED else 1 for u in units]
    return float(torch.stack([probs[i, a] for i, a in enumerate(keep)]).prod())


def test_policy_gradient_raises_probability_of_the_best_removal(tmp_path):
    units = synthetic_units(6)
    settings = SearchSettings(mode="removal", updates=25, rollouts=8, policy_lr=0.01)
    search = PolicySearch(units, synthetic_reward, settings, tmp_path, seed=1)
    before = _target_probability(search.removal, units)
    shrink_before = [p.detach().clone() for p in search.shrink.parameters()]
    search.run()
    after = _target_probability(search.removal, units)
    assert before < 0.05 and after > 0.5, (before, after)
    means = [s.mean_reward for s in search.summaries]
    assert sum(means[-5:]) / 5 > sum(means[:5]) / 5 + 0.2, means
    assert search.best().removed == sorted(TARGET_REMOVED)
    # The removal phase never touches the shrink policy; the shrink phase trains every part of it
    assert all(
        torch.equal(a, b) for a, b in zip(shrink_before, search.shrink.parameters(), strict=True)
    )
    shrink_search = PolicySearch(
        units,
        synthetic_reward,
        SearchSettings(mode="shrink", updates=3, rollouts=4),
        tmp_path / "shrink",
        seed=1,
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
    units = synthetic_units(6)
    settings = SearchSettings(mode="sequential", updates=2, rollouts=6, penalty_anneal_updates=0)
    # a hard -1 for every over-budget candidate, from the first update
    search = PolicySearch(units, _budget_reward, settings, tmp_path, seed=2)
    search.run()
    removal = [r for r in search.records.values() if r.phase == "removal"]
    first = search.summaries[0]
    raws = [search.records[k].reward_raw for k in first.candidates]
    assert any(search.records[k].violates for k in first.candidates)
    assert first.rewards == raws  # over budget, yet not penalised in the removal phase
    start = max(removal, key=lambda r: r.reward_raw)
    assert start.violates and search.stage1 == RemovalResult(start.removed, start.key)
    shrink = search.summaries[settings.updates]
    assert shrink.phase == "shrink"
    for key, got in zip(shrink.candidates, shrink.rewards, strict=True):
        record = search.records[key]
        assert got == (-1.0 if record.violates else record.reward_raw)
        assert set(record.removed) == set(start.removed)  # the shrink phase starts from stage 1
    assert not search.best().violates
    # A one-phase search keeps the budget in force
    alone = PolicySearch(
        units,
        _budget_reward,
        SearchSettings(mode="removal", updates=1, rollouts=6, penalty_anneal_updates=0),
        tmp_path / "alone",
        seed=2,
    )
    alone.run()
    rewards = alone.summaries[0].rewards
    violating = [alone.records[k].violates for k in alone.summaries[0].candidates]
    assert any(violating)
    assert all(r == -1.0 for r, v in zip(rewards, violating, strict=True) if v)


def test_policies_transfer_to_a_teacher_with_more_units(tmp_path):
    settings = SearchSettings(mode="joint", updates=2, rollouts=2)
    small = PolicySearch(synthetic_units(4), synthetic_reward, settings, tmp_path / "small", seed=3)
    small.run()
    small.save_policies(tmp_path / "policy.pt")
    large = PolicySearch(
        synthetic_units(6),
        synthetic_reward,
        settings,
        tmp_path / "large",
        seed=3,
        warm_start=tmp_path / "policy.pt",
    )
    for a, b in zip(small.removal.parameters(), large.removal.parameters(), strict=True):
        assert torch.equal(a, b)
    rollout, candidate = large._rollout("joint")
    assert len(rollout.actions) >= 6  # a keep/remove action for each of the 6 units, then scales
    with pytest.raises(PolicyMismatch, match="scales"):
        PolicySearch(
            synthetic_units(6),
            synthetic_reward,
            SearchSettings(scales=[0.5, 1.0]),
            tmp_path / "other",
            warm_start=tmp_path / "policy.pt",
        )


def _without_times(path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "eval_s"}
        for line in path.read_text().splitlines()
    ]


class _Interrupted(Exception):
    pass


def _interrupted(folder, units, settings, after: int, calls: list) -> None:
    """Run a search in `folder` that is killed at its `after`-th evaluation."""

    def dying(candidate):
        if len(calls) == after:
            raise _Interrupted
        calls.append(candidate.key())
        return synthetic_reward(candidate)

    with pytest.raises(_Interrupted):
        PolicySearch(units, dying, settings, folder, seed=2).run()


def _counting(calls: list):
    def evaluate(candidate):
        calls.append(candidate.key())
        return synthetic_reward(candidate)

    return evaluate


def _uninterrupted(folder, units, settings, calls: list) -> list:
    """The history of the same search run start to finish (times left out)."""
    PolicySearch(units, _counting(calls), settings, folder, seed=2).run()
    return _without_times(folder / HISTORY_FILE)


def test_an_interrupted_search_resumes_where_it_stopped(tmp_path):
    units = synthetic_units(6)
    settings = SearchSettings(mode="joint", updates=4, rollouts=3)
    calls: list[str] = []
    whole = _uninterrupted(tmp_path / "whole", units, settings, calls)
    whole_calls = len(calls)

    calls.clear()
    _interrupted(tmp_path / "cut", units, settings, 7, calls)  # during the third update
    state = torch.load(tmp_path / "cut" / STATE_FILE, weights_only=True)
    assert state["update"] == 2  # checkpointed after each finished update
    assert read_search_state(tmp_path / "cut").update == 2
    resumed = PolicySearch(units, _counting(calls), settings, tmp_path / "cut", seed=2)
    assert resumed.update == 2 and len(resumed.records) == 7  # the 7th update's first ones kept
    resumed.run()
    assert _without_times(tmp_path / "cut" / HISTORY_FILE) == whole
    assert len(calls) == whole_calls  # nothing evaluated twice


def test_history_and_state_round_trip_through_their_files(tmp_path):
    units = synthetic_units(6)

    def evaluate(candidate: Candidate) -> Evaluation:  # a failure, and one with measurements
        if len(candidate.removed) == 2:
            return Evaluation(reward_raw=None, error="does not run")
        return Evaluation(reward_raw=0.5, params=10.0, val_top1=50.0, train_images=64)

    settings = SearchSettings(mode="sequential", updates=2, rollouts=4)
    search = PolicySearch(units, evaluate, settings, tmp_path, seed=0)
    search.run()
    history = read_history(tmp_path)
    assert history == list(search.records.values())
    assert all(isinstance(r, CandidateRecord) for r in history)
    lines = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert lines == [r.to_dict() for r in history]
    for line, record in zip(lines, history, strict=True):
        assert list(line)[:3] == ["key", "removed", "scales"]
        assert line["key"] == record.candidate().key()
        if record.valid:  # what was not measured is not written
            assert "latency_ms" not in line and "error" not in line and line["params"] == 10.0
        else:
            assert line["error"] == "does not run" and "params" not in line
            assert line["reward_raw"] is None and line["violates"] is False
    # The state file holds plain containers only; read back, it is the search's state
    raw = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert raw["version"] == 2 and isinstance(raw["stage1"], dict)
    assert all(isinstance(s, dict) for s in raw["summaries"])
    state = read_search_state(tmp_path)
    assert (state.phase_index, state.update) == (2, 0)
    assert state.summaries == search.summaries and len(state.summaries) == 4
    assert all(isinstance(s, UpdateSummary) for s in state.summaries)
    assert state.stage1 == search.stage1 and isinstance(state.stage1, RemovalResult)
    assert search.records[state.stage1.key].removed == state.stage1.removed
    for a, b in zip(state.removal.values(), search.removal.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no search state"):
        read_search_state(tmp_path / "elsewhere")


def _as_first_layout(state: SearchState) -> dict:
    """The state file as it was written before the typed layout (stage 1 as a JSON string)."""
    old = state.to_dict()
    del old["version"]
    stage1 = None if state.stage1 is None else {"candidate": {"removed": state.stage1.removed}}
    old["stage1"] = json.dumps(stage1)
    return old


def test_a_state_file_of_the_earlier_layout_resumes(tmp_path):
    units = synthetic_units(6)
    settings = SearchSettings(mode="sequential", updates=2, rollouts=3)
    whole = _uninterrupted(tmp_path / "whole", units, settings, [])

    _interrupted(tmp_path / "cut", units, settings, 8, [])  # in the shrink phase
    state = read_search_state(tmp_path / "cut")
    assert state.phase_index == 1 and state.stage1 is not None
    torch.save(_as_first_layout(state), tmp_path / "cut" / STATE_FILE)
    resumed = PolicySearch(units, synthetic_reward, settings, tmp_path / "cut", seed=2)
    assert resumed.stage1 == RemovalResult(state.stage1.removed)  # no key in the earlier layout
    assert resumed.summaries == state.summaries
    resumed.run()
    assert _without_times(tmp_path / "cut" / HISTORY_FILE) == whole


@pytest.mark.parametrize("damage", ["garbage", "newer", "incomplete"])
def test_an_unreadable_state_file_says_how_to_start_over(tmp_path, damage):
    units = synthetic_units(4)
    settings = SearchSettings(mode="removal", updates=1, rollouts=2)
    PolicySearch(units, synthetic_reward, settings, tmp_path).run()
    path = tmp_path / STATE_FILE
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        state = torch.load(path, weights_only=True)
        if damage == "newer":
            state["version"] = 99
        else:
            del state["generator"]
        torch.save(state, path)
    with pytest.raises(InputError) as caught:
        PolicySearch(units, synthetic_reward, settings, tmp_path)
    message = str(caught.value)
    assert str(path) in message and "delete it" in message
    assert {"garbage": "", "newer": "version 99", "incomplete": "missing 'generator'"}[
        damage
    ] in message


def test_a_record_takes_an_evaluation_or_its_fields():
    candidate = Candidate.make(["block1"], {"block2": 0.5})
    where = {"phase": "joint", "update": 3, "eval_s": 1.5, "rank": 1}
    typed = CandidateRecord.of(candidate, Evaluation(reward_raw=0.25, violates=True), **where)
    plain = CandidateRecord.of(candidate, {"reward_raw": 0.25, "violates": True}, **where)
    assert typed == plain and typed.candidate() == candidate
    assert typed.to_dict() == {
        "key": candidate.key(),
        "removed": ["block1"],
        "scales": {"block2": 0.5},
        "reward_raw": 0.25,
        "violates": True,
        **where,
    }
    assert CandidateRecord.from_dict({**typed.to_dict(), "from_a_later_version": 1}) == typed
    with pytest.raises(TypeError, match="accuracy"):
        CandidateRecord.of(candidate, {"reward_raw": 0.25, "accuracy": 1.0}, **where)
