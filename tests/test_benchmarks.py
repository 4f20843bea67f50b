"""Benchmarks that must keep working: their quick modes run here. The numbers of a measurement
are not checked, the scripts are; the alarm's limits, computed exactly or simulated from a
seed, are checked for what they must satisfy."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), *args],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU to measure")
def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0() -> None:
    result = _run()
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout


def test_gpu_benchmark_runs_end_to_end_on_the_cpu() -> None:
    result = _run("--device", "cpu", "--model", "resnet18", "--size", "32", "--per-class", "24",
                  "--batch-size", "8", "--epochs", "2", "--infer-batch", "4", "--infer-steps", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("training, steady state", "inference, onnxruntime CPUExecutionProvider",
                 "inference, torch cpu"):
        assert line in result.stdout, result.stdout


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CRYSTALSCOPE_KERAS_PYTHON": ""})


def test_versus_original_without_tensorflow_prints_our_side_and_why() -> None:
    result = _script("versus_original.py", "--smoke", "--rounds", "1", "--steps", "1",
                     "--predict-images", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "original (TF/Keras): not measured: no --keras-python" in result.stdout
    for line in ("crystalscope georgia", "crystalscope fast", "onnx int8", "openvino int8",
                 "torch"):
        assert line in result.stdout, result.stdout


def test_trunk_cache_benchmark_compares_both_runs() -> None:
    result = _script("trunk_cache.py", "--model", "resnet18", "--size", "32", "--per-class",
                     "24", "--epochs", "2", "--trainable", "0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cache off" in result.stdout and "cache auto" in result.stdout
    assert "faster" in result.stdout


def test_active_labelling_benchmark_reports_the_share_of_labels() -> None:
    result = _script("active.py", "--seeds", "1", "--pool", "20", "--validation", "20",
                     "--batch", "10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "random order with all 40 labels" in result.stdout
    assert "labels the active order needs" in result.stdout


def test_inference_benchmark_times_every_runtime() -> None:
    result = _script("infer.py", "--model", "resnet18", "--size", "32", "--images", "8",
                     "--int8", "--stream", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8",
                 "torch eager fp32"):
        assert line in result.stdout, result.stdout


def test_realism_benchmark_scores_the_real_crops_with_and_without_averaging() -> None:
    real = Path(__file__).parent / "data" / "opencrystal"
    result = _script("realism.py", "--real", str(real), "--seeds", "1", "--per-class", "24",
                     "--epochs", "1", "--size", "32", "--statistics", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("test-time averaging dihedral", "accuracy on 14 real crops",
                 "flagged unknown:", "the same network on single views:", "PG (5308).png",
                 "image statistics, real vs synthetic"):
        assert line in result.stdout, result.stdout


def _table(text: str) -> dict[tuple[str, str], list[float]]:
    """(rho, drift) -> the delays of a markdown table the alarm benchmarks print."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| 0") and len(cells) == 5:
            rows[cells[0], cells[1]] = [math.inf if c == "never" else float(c)
                                        for c in cells[2:]]
    return rows


def test_alarm_limits_grow_with_drift_and_shrink_with_the_step() -> None:
    result = _script("alarm_limits.py")
    assert result.returncode == 0, result.stderr[-2000:]
    bounds = _table(result.stdout)
    assert len(bounds) == 9, result.stdout
    for rho in ("0.0", "0.01", "0.05"):
        rows = [bounds[rho, drift] for drift in ("+-0%", "+-50%", "+-100%")]
        for row in rows:  # a larger step is quicker to see
            assert row[0] > row[1] > row[2]
        for calmer, wilder in itertools.pairwise(rows):  # drift hides the step
            assert all(a < b for a, b in zip(calmer, wilder, strict=True))
        assert math.isinf(rows[2][0])  # 2x from the median is the +-100% drift's own top
    for drift in ("+-0%", "+-50%", "+-100%"):  # correlated crops carry less evidence
        assert bounds["0.0", drift][1] < bounds["0.01", drift][1] < bounds["0.05", drift][1]


def test_the_tracking_oracle_keeps_the_run_length_it_was_set_for() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import alarm_limits
    finally:
        sys.path.remove(str(BENCHMARKS))
    from crystalscope.synth.counts import CountStream

    stream = CountStream(rate=0.04, rho=0.01, drift=0.5, crops=400)
    result = alarm_limits.tracking_oracle(stream, np.random.default_rng(3), streams=200,
                                          windows=2000, trials=100, arl0=500)
    assert 250 < result["arl0"] < 1000  # measured on clean streams the threshold never saw
    delays = result["delays"]
    assert delays[5] <= delays[3] <= delays[2]
    assert delays[5] < 10
