"""Tests of experiments/benchmarks/vs_open_clip.py: log parsing, throughput accounting, the CSV it gives
open_clip_train, the recipe it reads, and (slow tier) its --quick form end to end: both trainers on CPU.

    .venv/bin/pytest tests/test_vs_open_clip.py -q              # the slow smoke too: -m slow
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "benchmarks" / "vs_open_clip.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_open_clip", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_open_clip_log_gives_steps_throughput_and_losses(bench):
    # The line format of open_clip_train.train.train_one_epoch with --log-every-n-steps 1.
    def line(epoch, seen, rate, loss):
        return (
            f"2026-01-01,00:00:00 | INFO | Train Epoch: {epoch} [{seen:>4}/1297 (5%)] Data (t): 0.010 "
            f"Batch (t): 0.500, {rate}/s, {rate}/s/gpu LR: 0.000500 Logit Scale: 14.286 "
            f"Contrastive_loss: {loss} ({loss}) Loss: {loss} ({loss})"
        )

    lines = [
        "2026-01-01,00:00:00 | INFO | Start epoch 0",
        line(0, 64, "12.8000", "4.3"),  # first step of the epoch: waits for the worker, not timed
        line(0, 128, "128.000", "4.2"),
        line(0, 192, "64.0000", "4.1"),
        line(1, 64, "1.00000", "4.0"),
        line(1, 128, "1.28000e+02", "3.9"),
    ]
    parsed = bench.parse_open_clip_log(lines, batch_size=64)
    assert parsed["steps"] == 5
    assert parsed["losses"] == [4.3, 4.2, 4.1, 4.0, 3.9]
    assert parsed["samples"] == 3 * 64
    assert parsed["seconds"] == pytest.approx(0.5 + 1.0 + 0.5)


def test_steady_throughput_leaves_out_each_epochs_first_step(bench):
    epochs = [[10.0, 11.0, 12.0, 13.0], [100.0, 100.5], [200.0]]
    assert bench.steady_throughput(epochs, batch_size=8) == (8 * 4, 3.0 + 0.5)


def test_open_clip_csv_holds_each_image_once_with_one_of_its_captions(bench, digits_root, tmp_path):
    subset = bench.write_subset(digits_root / "train", tmp_path / "subset", 20)
    info = json.loads((subset / "dataset.json").read_text())
    assert info["num_samples"] == 20 and info["class_names"][7] == "seven"
    csv_path, rows = bench.write_open_clip_csv(subset, tmp_path / "csv", seed=3)
    assert rows == 20
    with open(csv_path, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len({row["filepath"] for row in table}) == 20
    originals = {
        key: (files["jpg"], files["txt"].decode().splitlines()) for _, key, files in bench._samples(subset)
    }
    for row in table:
        jpg, captions = originals[Path(row["filepath"]).stem.split("_", 1)[1]]
        assert Path(row["filepath"]).read_bytes() == jpg  # the shard's JPEG bytes, not re-encoded
        assert row["title"] in captions
    # The stand-in pandas reads it as open_clip_train's CsvDataset does.
    frame = bench.csv_only_pandas().read_csv(str(csv_path), sep=",")
    assert frame["filepath"].tolist() == [row["filepath"] for row in table]


def test_recipe_is_read_from_the_digits_experiment(bench):
    recipe = bench.read_recipe(REPO / "experiments" / "digits_clip.yaml")
    assert recipe["model"] == "test-vit-tiny" and recipe["batch_size"] == 64
    assert recipe["epochs"] <= 20
    assert recipe["betas"] == [0.9, 0.98] and recipe["eps"] == 1e-6  # open_clip_train's ViT defaults too


def test_open_clip_arguments_follow_the_recipe(bench, tmp_path):
    recipe = {"model": "test-vit-tiny", "batch_size": 64, "lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6,
              "weight_decay": 0.2, "warmup_steps": 20, "init_logit_scale": 3.5, "epochs": 20}  # fmt: skip
    argv = bench.open_clip_argv(recipe, tmp_path / "train.csv", tmp_path / "logs", "seed1", seed=1, epochs=20)
    options = dict(zip(argv[::2], argv[1::2]))
    assert options["--batch-size"] == "64" and options["--epochs"] == "20" and options["--seed"] == "1"
    assert options["--lr"] == "0.0005" and options["--warmup"] == "20" and options["--wd"] == "0.2"
    assert options["--workers"] == "1" and options["--precision"] == "fp32" and options["--device"] == "cpu"


@pytest.mark.slow
def test_quick_form_runs_both_trainers(bench, tmp_path, capsys):
    output = tmp_path / "results.json"
    assert bench.main(["--quick", "--workdir", str(tmp_path / "work"), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "| trainer | seed | samples/s |" in printed and "ratio" in printed
    results = json.loads(output.read_text())
    assert [(run["trainer"], run["seed"]) for run in results["runs"]] == [
        ("mmret", 0),
        ("open_clip_train", 0),
    ]
    for run in results["runs"]:
        assert run["steps"] == 2 * (256 // 64)  # same steps for both: 2 epochs of 4 batches
        assert run["samples"] == 2 * 3 * 64 and run["seconds"] > 0  # each epoch's first step left out
        assert 0.0 <= run["acc1"] <= 1.0
    assert results["runs"][1]["losses"]  # open_clip_train logs every step; ours every 10 (none in 8 steps)
    assert results["summary"]["ratio"] > 0
