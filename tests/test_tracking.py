"""W&B tracking: an offline run read back with wandb's protobuf records; a resumed run keeps its W&B run id;
validation retrieval examples are a W&B table with images; `mmret eval --wandb-summary` sets the run summary.

.venv/bin/pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmret.cli import main
from mmret.data.samples import SkipCounter, decode_sample, iter_shard
from mmret.evaluation.retrieval import caption_hash
from mmret.training.wandb_tracking import logged_table, read_offline_run, run_id_for, wandb_mode
from tests.fit_args import fit_argv

REPO = Path(__file__).resolve().parents[1]


def fit_command(run_dir: Path, data_root: Path, epochs: int) -> list[str]:
    argv = fit_argv(
        REPO / "experiments" / "digits_clip.yaml",
        run_dir,
        data_root=data_root,
        batch_size=32,
        samples_per_epoch=64,
        max_epochs=epochs,
        limit_val_batches=1,
        log_every_n_steps=1,
        accelerator=None,  # the config's own (auto)
        extra=[
            "--wandb_project",
            "mmret-test",
            "--wandb_group",
            "sweep-x",
            "--wandb_tags",
            "[lr=0.001, seed=0]",
        ],
    )
    return [sys.executable, "-m", "mmret.cli", *argv]


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
    env["WANDB_DATA_DIR"] = str(tmp_path / "wandb_data")  # W&B stages a table's files here until a sync
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

    first, resumed = (read_offline_run(path, timeout=60) for path in offline)
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

    # Validation retrieval examples: a W&B table with images. Validation saw the first batch of 32 val samples.
    val_shard = iter_shard(digits_root / "val" / "00000.tar", SkipCounter())
    captions_of = {sample["sample_id"]: sample["captions"] for sample in map(decode_sample, val_shard)}
    captions_of = dict(list(captions_of.items())[:32])
    logged = [row for run in (first, resumed) for row in run.history if "val/examples/artifact_path" in row]
    assert [row["trainer/global_step"] for row in logged] == [2, 4]  # one table per validation
    columns, rows = logged_table(resumed, logged[-1], "val/examples")
    assert columns == [
        "step", "query", "top1_correct", "correct_in_top_k", "top1", "top2", "top3", "top4", "top5", "top_ids",
        "correct",
    ]  # fmt: skip
    # The queries: the first 8 of the validated captions in caption-hash order (fixed for a data set).
    all_captions = {caption for captions in captions_of.values() for caption in captions}
    assert [row[1] for row in rows] == sorted(all_captions, key=caption_hash)[:8]
    for step, query, top1_correct, found, *images, top_ids, correct in rows:
        ids = [int(image_id) for image_id in top_ids.split()]
        relevant = [query in captions_of[image_id] for image_id in ids]  # written for that image?
        assert step == 4 and len(ids) == 5
        marks = "".join("✓" if is_relevant else "✗" for is_relevant in relevant)
        assert (top1_correct, found, correct) == (relevant[0], sum(relevant), marks)
        scores = [float(image["caption"].split()[1]) for image in images]
        assert scores == sorted(scores, reverse=True)
        for rank, (image, is_relevant) in enumerate(zip(images, relevant)):
            assert image["caption"].startswith(f"#{rank + 1} ")
            assert image["caption"].endswith("✓") == is_relevant
            assert (image["width"], image["height"]) == (64, 64)  # the shard's image, not a placeholder
            with Image.open(image["local_path"]) as png:
                assert png.size == (64, 64)

    # `mmret eval --wandb-summary`: the results JSON becomes the summary of the same W&B run.
    results_path = tmp_path / "results.json"
    argv = ["eval", "--model", str(run_dir / "checkpoints" / "last.ckpt"), "--data", str(digits_root)]
    argv += ["--num-workers", "0", "--output", str(results_path), "--wandb-summary"]
    assert main(argv) == 0
    results = json.loads(results_path.read_text())
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 3
    summary = read_offline_run(offline[-1], timeout=60)
    assert summary.run_id == run_id
    assert {key: summary.summary[f"test/{key}"] for key in results["metrics"]} == results["metrics"]
    assert summary.summary["results"]["num_images"] == results["num_images"] == 300  # digits test split


def test_wandb_summary_needs_a_tracked_run(tmp_path, digits_root, capsys):
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not read: the run is checked first")
    argv = ["eval", "--model", str(checkpoint), "--data", str(digits_root), "--wandb-summary"]
    assert main([*argv, "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "has no wandb_run.json" in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
