"""Paired comparisons (`compress.deploy.timing.paired_ratio`): the order runs alternate in, the
median of the paired ratios, and the unreliable flag, with fake measures on a fake load."""

from __future__ import annotations

import json

import pytest

from compress.deploy.timing import interleave, paired_ratio, paired_result


class FakeMachine:
    """Measures whose value is a fixed cost times the load at the moment they run; records the
    order they ran in."""

    def __init__(self, load: list[float]):
        self.load = load  # by call, in call order
        self.calls: list[str] = []

    def measure(self, name: str, cost: float):
        def run() -> float:
            value = cost * self.load[len(self.calls)]
            self.calls.append(name)
            return value

        return run


def test_runs_alternate_abab_and_abba():
    m = FakeMachine([1.0] * 12)
    paired_ratio(m.measure("a", 1.0), m.measure("b", 1.0), pairs=3, order="abab")
    assert m.calls == ["a", "b", "a", "b", "a", "b"]
    m.calls.clear()
    paired_ratio(m.measure("a", 1.0), m.measure("b", 1.0), pairs=3, order="abba")
    assert m.calls == ["a", "b", "b", "a", "a", "b"]


def test_round_robin_of_three_and_warmup_rounds_dropped():
    m = FakeMachine([1, 1, 1, 2, 3, 4, 5, 6, 7])
    measures = {k: m.measure(k, 1.0) for k in "xyz"}
    values = interleave(measures, rounds=2, order="abab", warmup_rounds=1)
    assert m.calls == list("xyz" * 3)
    assert values == {"x": [2.0, 5.0], "y": [3.0, 6.0], "z": [4.0, 7.0]}


def test_load_shared_by_a_pair_cancels():
    # the load changes 4x from pair to pair but hits both runs of a pair alike: b's time is
    # always 0.8 of a's, and every pair says so
    load = [1, 1, 4, 4, 2, 2, 1.5, 1.5, 3, 3]
    m = FakeMachine(load)
    r = paired_ratio(m.measure("a", 1.0), m.measure("b", 0.8), pairs=5, order="abab")
    assert r.median_ratio == pytest.approx(0.8)
    assert r.spread == pytest.approx(0.0) and r.reliable
    assert r.n_pairs == 5 and r.ratios == pytest.approx((0.8,) * 5)
    assert r.a_median == pytest.approx(2.0) and r.b_median == pytest.approx(1.6)


def test_median_of_paired_ratios_not_ratio_of_medians():
    a = [1.0, 2.0, 10.0]
    b = [3.0, 1.0, 8.0]  # ratios 3.0, 0.5, 0.8
    r = paired_result(a, b)
    assert r.median_ratio == pytest.approx(0.8)
    assert r.b_median / r.a_median == pytest.approx(1.5)  # what the ratio of medians would say
    assert (r.ratio_min, r.ratio_max) == pytest.approx((0.5, 3.0))
    assert (r.ratio_q1, r.ratio_q3) == pytest.approx((0.65, 1.9))  # linear interpolation


def test_a_load_burst_makes_the_result_unreliable():
    # b is 10% faster; a burst (3x) hits single runs, a's in two pairs and b's in two others
    steady = [1.0] * 14
    m = FakeMachine(steady)
    quiet = paired_ratio(m.measure("a", 1.0), m.measure("b", 0.9), pairs=7, order="abab")
    assert quiet.reliable and quiet.median_ratio == pytest.approx(0.9)
    assert quiet.warning("b over a") is None
    burst = list(steady)
    for call in (0, 4, 7, 11):  # a in pairs 0 and 2, b in pairs 3 and 5
        burst[call] = 3.0
    m = FakeMachine(burst)
    r = paired_ratio(m.measure("a", 1.0), m.measure("b", 0.9), pairs=7, order="abab")
    assert r.median_ratio == pytest.approx(0.9)  # the median holds ...
    assert r.spread > r.effect == pytest.approx(0.1)  # ... but the pairs disagree more than that
    assert not r.reliable
    line = r.warning("b over a")
    assert line.startswith("WARNING: b over a 0.900 over 7 pairs is not reliable")


def test_few_pairs_or_no_effect_are_not_reliable():
    assert not paired_result([1.0, 1.0], [0.5, 0.5]).reliable  # 2 pairs: no spread to judge
    assert "only 2 pair(s)" in paired_result([1.0, 1.0], [0.5, 0.5]).warning("x")
    assert not paired_result([1.0] * 5, [1.0] * 5).reliable  # no effect: spread 0 is not < 0
    assert paired_result([1.0] * 3, [0.5] * 3).reliable


def test_as_dict_is_json_with_the_rule():
    r = paired_result([1.0, 1.1, 0.9], [0.5, 0.6, 0.4])
    d = json.loads(json.dumps(r.as_dict()))
    assert d["n_pairs"] == 3 and d["reliable"] is True and "interquartile" in d["rule"]
    assert d["ratios"] == pytest.approx(list(r.ratios))
    assert "ratios" not in r.as_dict(values=False)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one each per pair"):
        paired_result([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        paired_result([0.0], [1.0])
    with pytest.raises(ValueError, match="rounds"):
        interleave({"a": lambda: 1.0}, 0)
    with pytest.raises(ValueError, match="order"):
        interleave({"a": lambda: 1.0}, 1, order="aabb")  # type: ignore[arg-type]


# ---- onnxruntime models timed in alternation, by session policy ------------------------------


@pytest.fixture
def counted_sessions(monkeypatch):
    """Every onnxruntime session the backend opens, as (model file name, spinning)."""
    from compress.deploy import onnx_export

    opened: list[tuple[str, bool]] = []
    real = onnx_export.onnxruntime_session

    def session(path, threads=None, provider="cpu", spinning=True):
        opened.append((path.name, spinning))
        return real(path, threads, provider, spinning=spinning)

    monkeypatch.setattr(onnx_export, "onnxruntime_session", session)
    return opened


@pytest.mark.parametrize("policy", ["fresh", "kept"])
def test_session_policies(tmp_path, counted_sessions, policy):
    from compress.deploy.onnxruntime_backend import interleaved_latency
    from compress.deploy.timing import BenchSettings
    from tests.deploy.onnx_models import tiny_onnx

    paths = {"x": tiny_onnx(tmp_path / "x.onnx"), "y": tiny_onnx(tmp_path / "y.onnx")}
    settings = BenchSettings(warmup=1, min_iters=2, min_duration_s=0, repeats=3, threads=1)
    runs = interleaved_latency(paths, [1, 2], settings, sessions=policy)
    assert list(runs) == ["1", "2"] and all(len(runs[b][m]) == 3 for b in runs for m in paths)
    assert all(v > 0 for b in runs for m in paths for v in runs[b][m])
    if policy == "fresh":  # a spinning session per timed run, in ABBA order, per batch size
        order = ["x.onnx", "y.onnx", "y.onnx", "x.onnx", "x.onnx", "y.onnx"] * 2
        assert counted_sessions == [(n, True) for n in order]
    else:  # one non-spinning session per model and batch size, kept for the rounds
        assert counted_sessions == [("x.onnx", False), ("y.onnx", False)] * 2


def test_int8_speedup_reports_paired_ratios(tmp_path):
    from compress.deploy.onnxruntime_backend import int8_speedup
    from compress.deploy.timing import BenchSettings
    from tests.deploy.onnx_models import tiny_onnx

    path = tiny_onnx(tmp_path / "m.onnx")
    settings = BenchSettings(warmup=1, min_iters=2, min_duration_s=0, repeats=3, threads=1)
    r = int8_speedup(path, path, [1], settings, sessions="kept")
    assert r["speedup"]["1"] == r["paired"]["1"]["median_ratio"] > 0
    assert r["paired"]["1"]["n_pairs"] == 3 and isinstance(r["reliable"]["1"], bool)
    assert r["fp32_p50_ms"]["1"] == r["paired"]["1"]["b_median"]
