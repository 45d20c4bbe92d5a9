"""trtexec output parsing on real logs (tests/deploy/data/trtexec/README.md names the sources), its
version-aware command lines, and tegrastats power parsing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compress.deploy.jetson import add_energy, parse_tegrastats
from compress.deploy.timing import BenchSettings
from compress.deploy.trtexec import (
    build_flags,
    parse_summary,
    parse_times,
    parse_version,
    result_from_times,
    run_flags,
)
from compress.errors import StageFailed

DATA = Path(__file__).parent / "data"


def test_trt10_performance_summary_is_parsed():
    s = parse_summary((DATA / "trtexec" / "summary_trt10.log").read_text())
    assert s["throughput_qps"] == 130.298
    assert s["latency"] == {
        "min": 5.38672,
        "max": 13.3664,
        "mean": 7.60628,
        "median": 7.16092,
        "p90": 10.2996,
        "p95": 10.8698,
        "p99": 12.9675,
    }
    assert s["gpu_compute"]["median"] == 7.14139 and s["h2d"]["p99"] == 0.0515137
    assert s["enqueue"]["max"] == 15.0201 and s["d2h"]["min"] == 0.00390625
    assert s["host_walltime_s"] == 3.00082 and s["gpu_compute_total_s"] == 2.96536


def test_older_jetson_summary_and_version_banners():
    log = (DATA / "trtexec" / "summary_trt8_jetson.log").read_text()
    s = parse_summary(log)
    assert s["throughput_qps"] == 41087.7
    assert s["latency"]["median"] == 0.401947 and s["latency"]["p99"] == 0.420288
    assert "p90" not in s["latency"]  # TensorRT 8.4 printed the 99th percentile only
    assert parse_version(log) == "8.4.0"
    assert parse_version((DATA / "trtexec" / "banner_trt10.log").read_text()) == "10.2.0"
    assert parse_version("[TensorRT v110400]") == "11.4.0"
    with pytest.raises(StageFailed, match="no performance summary"):
        parse_summary("[I] Engine built\n&&&& FAILED TensorRT.trtexec")


def test_export_times_feed_the_shared_statistics():
    text = (DATA / "trtexec" / "export_times.json").read_text()
    times = parse_times(text)
    records = json.loads(text)
    assert len(times["latencyMs"]) == len(records) == 6
    assert times["latencyMs"][0] == 0.459041 and times["computeMs"][4] == 0.900864
    assert times["enqueueMs"][0] == pytest.approx(12.7482 - 12.6384)
    result = result_from_times([times], [{"throughput_qps": 2200.0}], 1, backend="trtexec")
    assert result["p50_ms"] == pytest.approx(np.median(times["latencyMs"]))
    assert result["max_ms"] == pytest.approx(0.900864)
    assert result["iterations"] == 6 and result["trtexec_throughput_qps"] == 2200.0
    with pytest.raises(StageFailed, match="not JSON"):
        parse_times("[{")


def test_commands_keep_one_meaning_across_tensorrt_10_and_11():
    settings = BenchSettings(warmup=500, min_iters=1000, min_duration_s=10, repeats=3)
    b10 = build_flags(10, "m.onnx", "m.engine", "fp16", "input", [1, 3, 32, 32], [1, 3, 32, 32],
                      [32, 3, 32, 32], "t.cache")  # fmt: skip
    b11 = build_flags(11, "m.onnx", "m.engine", "fp16", "input", [1, 3, 32, 32], [1, 3, 32, 32],
                      [32, 3, 32, 32], "t.cache")  # fmt: skip
    assert "--fp16" in b10 and "--fp16" not in b11  # 11 takes precision from the ONNX model
    assert "--maxShapes=input:32x3x32x32" in b11 and "--timingCacheFile=t.cache" in b11
    r10 = run_flags(10, "m.engine", "input", [1, 3, 32, 32], settings, "t.json")
    r11 = run_flags(11, "m.engine", "input", [1, 3, 32, 32], settings, "t.json")
    assert {"--useCudaGraph", "--useSpinWait", "--noDataTransfers"} <= set(r10)
    assert not {"--useCudaGraph", "--useSpinWait", "--noDataTransfers"} & set(r11)  # defaults
    assert "--includeDataTransfers" in run_flags(11, "e", "input", [1], settings, "t", True)
    assert "--iterations=1000" in r11 and "--exportTimes=t.json" in r11


def test_tegrastats_power_gives_energy_per_inference():
    power = parse_tegrastats((DATA / "tegrastats" / "xavier.log").read_text() * 3)
    assert power == {"power_rail": "VDD_IN", "power_samples": 3, "power_mean_w": 3.14}
    result = add_energy({"throughput_ips": 1000.0}, power)
    assert result["energy_per_inference_mj"] == pytest.approx(3.14)
    assert parse_tegrastats("RAM 2020/7852MB CPU [9%@345]") is None
