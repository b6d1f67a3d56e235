"""W&B tracking: an offline run read back with wandb's protobuf records; a resumed run keeps its W&B run id.

.venv/bin/pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmret.tracking import read_offline_run, run_id_for, wandb_mode

REPO = Path(__file__).resolve().parents[1]


def fit_command(run_dir: Path, data_root: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmret.cli",
        "fit",
        "-c",
        str(REPO / "experiments" / "digits_clip.yaml"),
        "--model.init_args.model",
        "test-vit-micro",
        "--data.init_args.data_root",
        str(data_root),
        "--data.init_args.batch_size",
        "32",
        "--data.init_args.samples_per_epoch",
        "64",
        "--data.init_args.num_workers",
        "0",
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--run_dir",
        str(run_dir),
        "--wandb_project",
        "mmret-test",
        "--wandb_group",
        "sweep-x",
        "--wandb_tags",
        "[lr=0.001, seed=0]",
    ]


def test_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_run_id_is_created_once_and_only_on_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert run_id_for(tmp_path / "a") is None and not (tmp_path / "a").exists()
    monkeypatch.setenv("SLURM_PROCID", "0")
    first = run_id_for(tmp_path / "a")
    assert first and run_id_for(tmp_path / "a") == first
    assert json.loads((tmp_path / "a" / "wandb_run.json").read_text()) == {"id": first}


@pytest.mark.slow
def test_offline_run_logs_config_metrics_and_resume_keeps_the_id(tmp_path, digits_root):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "SLURM_JOB_ID": "4242"}
    for key in ("SLURM_NTASKS", "SLURM_PROCID", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    run_dir = tmp_path / "run"
    for epochs in (1, 2):  # the second call resumes from last.ckpt
        done = subprocess.run(
            fit_command(run_dir, digits_root.parent, epochs),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(path.name.endswith(run_id) for path in offline)

    first, resumed = (read_offline_run(path) for path in offline)
    assert first.run_id == resumed.run_id == run_id
    assert (first.project, first.group, first.tags) == ("mmret-test", "sweep-x", ["lr=0.001", "seed=0"])
    config = first.config
    assert config["experiment"]["model"]["init_args"]["model"] == "test-vit-micro"
    assert config["lr"] == 0.0005  # the model's hyperparameters, logged by Lightning
    assert config["mmret"]["slurm_job_id"] == "4242"
    assert config["mmret"]["git_commit"]
    assert len(config["dataset_info"]["class_names"]) == 10
    losses = [row["train/loss"] for row in first.history + resumed.history if "train/loss" in row]
    steps = [row["trainer/global_step"] for row in resumed.history if "train/loss" in row]
    assert len(losses) == 4 and min(steps) >= 2  # 2 steps per epoch; the resumed run starts at step 2
    assert any("val/image_retrieval_recall@1" in row for row in resumed.history)
