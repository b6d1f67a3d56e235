"""Every shipped experiment YAML: its header says how to run it and what to expect, and its smoke form
(model swapped for a tiny `test-*` config, a few steps on real digits shards, CPU) trains and validates.

    .venv/bin/pytest tests/test_experiments.py -q
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from mmret.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def test_there_are_experiments():
    names = {path.stem for path in EXPERIMENTS}
    assert {"digits_clip", "digits_siglip", "shapes_dual", "clip_vitb32_finetune"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_header_states_command_runtime_and_result(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert header and f"mmret fit -c experiments/{path.name}" in header[0]
    text = " ".join(header)
    assert "Expected" in text, "the header must state the expected runtime and result"
    config = yaml.safe_load(path.read_text())
    assert config["model"]["class_path"].startswith("mmret.")
    assert config["data"]["class_path"].startswith("mmret.")


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_smoke_form_trains_and_validates(path, tmp_path, digits_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code = main(
        [
            "fit",
            "-c",
            str(path),
            "--model.init_args.model",
            "test-vit-micro",
            "--model.init_args.pretrained",
            "null",
            "--data.init_args.dataset",
            "null",
            "--data.init_args.train",
            str(digits_root / "train"),
            "--data.init_args.val",
            str(digits_root / "val"),
            "--data.init_args.samples_per_epoch",
            "64",
            "--data.init_args.batch_size",
            "16",
            "--data.init_args.num_workers",
            "0",
            "--trainer.max_epochs",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.strategy",
            "auto",
            "--trainer.precision",
            "32-true",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--run_dir",
            str(run_dir),
        ]
    )
    assert code == 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run_info.json").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("train/loss") for row in rows)
    assert any(row.get("val/image_retrieval_recall@1") for row in rows)
