"""Tests of experiments/benchmarks/gpu_step.py: its log parsing, FLOP and peak look-ups, and a CPU smoke run of
both trainers (ours under Lightning, open_clip_train in a subprocess) end to end.

    .venv/bin/pytest tests/test_gpu_step.py -q
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "gpu_step.py"


@pytest.fixture(scope="module")
def gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_open_clip_log_lines_give_step_seconds(gpu_step):
    # The line format of open_clip_train.train.train_one_epoch (one line per step with --log-every-n-steps 1).
    lines = [
        "2026-01-01,00:00:00 | INFO | Start epoch 0",
        "2026-01-01,00:00:01 | INFO | Train Epoch: 0 [  256/25600 (1%)] Data (t): 0.001 Batch (t): 0.125, "
        "2048.00/s, 2048.00/s/gpu LR: 0.000025 Logit Scale: 14.286 Contrastive_loss: 5.5452 (5.5452) "
        "Loss: 5.5452 (5.5452)",
        "2026-01-01,00:00:01 | INFO | Train Epoch: 0 [  512/25600 (2%)] Data (t): 0.000 Batch (t): 0.000, "
        "1.28000e+06/s, 1.28000e+06/s/gpu LR: 0.000050 Logit Scale: 14.286 Loss: 5.5 (5.5)",
    ]
    assert gpu_step.parse_open_clip_steps(lines, batch_size=256) == pytest.approx([0.125, 0.0002])


def test_peak_flops_by_card_name(gpu_step):
    assert gpu_step.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert gpu_step.peak_tflops_for("NVIDIA H200") == 989.0
    assert gpu_step.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_step.peak_tflops_for("Some Future GPU") is None


def test_analytic_flops_of_vit_b_32(gpu_step):
    # ViT-B/32 image tower ~4.4 GMACs and text tower ~2.9 GMACs per sample forward: ~14.7 GFLOP; x3 for fwd+bwd.
    per_sample = gpu_step.analytic_step_flops("ViT-B-32", 256) / 256
    assert 40e9 < per_sample < 48e9
    assert gpu_step.analytic_step_flops("RN50", 256) is None  # not a ViT CLIP


def test_summary_statistics(gpu_step):
    summary = gpu_step.summarise([0.1, 0.2, 0.3, 0.4, 1.0], batch_size=10)
    assert summary["step_time_median_s"] == 0.3
    assert summary["step_time_p90_s"] == 1.0
    assert summary["samples_per_s"] == pytest.approx(10 / 0.4)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cpu_smoke_runs_both_trainers_and_writes_json(tmp_path):
    output = tmp_path / "gpu_step.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["config"]["model"] == "test-vit-micro"
    assert results["flops_per_step"]["counted"] > 0
    for name in ("ours", "open_clip_train"):
        trainer = results["trainers"][name]
        assert trainer["timed_steps"] == 3, trainer
        assert all(seconds > 0 for seconds in trainer["step_seconds"])
        assert trainer["samples_per_s"] > 0
    assert results["ratio_ours_over_open_clip"]["step_time_mean"] > 0
    assert "| ours |" in run.stdout and "| open_clip_train |" in run.stdout


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_short_gpu_run_reports_card_memory_and_mfu(tmp_path):
    output = tmp_path / "gpu_step.json"
    command = [sys.executable, str(SCRIPT), "--model", "test-vit-tiny", "--batch-size", "64"]
    command += ["--steps", "5", "--warmup-steps", "3", "--output", str(output)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=290)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["flops_per_step"]["counted_includes_attention"]
    for name in ("ours", "open_clip_train"):
        trainer = results["trainers"][name]
        assert trainer["timed_steps"] == 5 and trainer["peak_memory_bytes"] > 0
        assert (trainer["mfu"] is None) == (results["peak_tflops"] is None)
