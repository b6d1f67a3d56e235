"""`mmret fit --trainer.strategy fsdp2` on 2 gloo ranks (CPU), as a user runs it (issue #19): the DualEncoder
shards itself, follows DDP's loss curve and validation metrics with gradient clipping on, writes sharded
checkpoint folders that a rerun resumes from (the curve continues) and that `mmret export` turns into an
open_clip model, and refuses a sharded checkpoint with a shard cut short.

    .venv/bin/pytest tests/test_fsdp2_fit.py -m ddp
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmret.errors import UsageError
from mmret.training.callbacks import PREEMPTED_EXIT_CODE
from tests.fit_args import CROSS_ENCODER, DUAL_ENCODER, fit_argv

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

TOL = {"rtol": 0, "atol": 1e-5}
VAL_KEYS = ("val/acc1", "val/image_retrieval_recall@1", "val/text_retrieval_recall@5", "val/num_images")


def _fit(digits_root: Path, run_dir: Path, strategy: str, signal_at: int | None = None) -> None:
    """4 steps of 32 (16 per rank) on digits, validated after steps 2 and 4; `signal_at`: preempted (SIGUSR1, as
    SLURM warns) after that step."""
    extra = ["--checkpoint_every_n_steps", "2", "--seed_everything", "0"]
    if signal_at is not None:
        callback = {"class_path": "tests.test_preemption.SignalAtStep", "init_args": {"step": signal_at}}
        extra += ["--trainer.callbacks+", json.dumps(callback)]
    argv = fit_argv(
        module=DUAL_ENCODER,
        model_args={"warmup_steps": 2, "lr": 2e-3},
        train=digits_root / "train",
        val=digits_root / "val",
        batch_size=16,
        samples_per_epoch=64,  # 2 steps an epoch: the preempted run stops at an epoch's end
        max_steps=4,
        limit_val_batches=3,
        log_every_n_steps=1,
        devices=2,
        strategy=strategy,
        trainer_args={"gradient_clip_val": 0.5},
        run_dir=run_dir,
        extra=extra,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mmret", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    expected = 0 if signal_at is None else PREEMPTED_EXIT_CODE
    assert done.returncode == expected, done.stderr[-3000:]


def _curves(run_dir: Path) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """(train/loss by step, the VAL_KEYS by step) from the run's metrics.csv."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    val = {int(r["step"]): {k: float(r[k]) for k in VAL_KEYS} for r in rows if r.get("val/acc1")}
    return losses, val


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp2_fit")
    runs = {"fsdp2": root / "fsdp2", "ddp": root / "ddp", "resumed": root / "resumed"}
    _fit(digits_root, runs["fsdp2"], "fsdp2")
    _fit(digits_root, runs["ddp"], "ddp")
    _fit(digits_root, runs["resumed"], "fsdp2", signal_at=2)  # preempted after step 2: a sharded last.ckpt
    _fit(digits_root, runs["resumed"], "fsdp2")  # the same command again resumes from it
    return runs


def test_fsdp2_fit_follows_ddp_with_gradient_clipping_and_validation(runs):
    fsdp_loss, fsdp_val = _curves(runs["fsdp2"])
    ddp_loss, ddp_val = _curves(runs["ddp"])
    assert sorted(fsdp_loss) == sorted(ddp_loss) == [0, 1, 2, 3]
    assert abs(fsdp_loss[0] - fsdp_loss[3]) > 1e-3, "the loss did not move: the comparison would be vacuous"
    torch.testing.assert_close(
        torch.tensor(list(fsdp_loss.values())), torch.tensor(list(ddp_loss.values())), **TOL
    )
    assert sorted(fsdp_val) == sorted(ddp_val) == [1, 3]
    for step in fsdp_val:
        for key in VAL_KEYS:
            assert fsdp_val[step][key] == pytest.approx(ddp_val[step][key], abs=1e-6), (step, key)


def test_checkpoints_are_sharded_folders_written_whole(runs):
    checkpoints = runs["fsdp2"] / "checkpoints"
    last = checkpoints / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file() and (last / ".metadata").is_file()
    assert len(list(last.glob("*.distcp"))) == 2  # one file of shards per rank
    assert not list(checkpoints.glob(".*")), "a temporary checkpoint folder was left behind"


def test_resume_from_a_sharded_checkpoint_continues_the_curve(runs):
    full_loss, full_val = _curves(runs["fsdp2"])
    resumed_loss, resumed_val = _curves(runs["resumed"])
    assert sorted(resumed_loss) == [0, 1, 2, 3], "each step once: the rerun resumed at step 2"
    torch.testing.assert_close(
        torch.tensor(list(resumed_loss.values())), torch.tensor(list(full_loss.values())), **TOL
    )
    for key in VAL_KEYS:
        assert resumed_val[3][key] == pytest.approx(full_val[3][key], abs=1e-6), key


def test_export_of_a_sharded_checkpoint_loads_in_open_clip(runs, tmp_path, digits_root):
    import open_clip

    from mmret.cli import main
    from mmret.training import DualEncoder

    last = runs["fsdp2"] / "checkpoints" / "last.ckpt"
    assert main(["export", str(last), "--output", str(tmp_path / "export")]) == 0
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'export'}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")
    trained = DualEncoder.from_checkpoint(last)
    ddp = DualEncoder.from_checkpoint(runs["ddp"] / "checkpoints" / "last.ckpt")
    images = torch.rand(4, 3, 32, 32)
    text = tokenizer(["digit 1", "digit 7", "a 3", "zero"])
    with torch.no_grad():
        exported = reloaded.encode_image(images, normalize=True), reloaded.encode_text(text, normalize=True)
        ours = trained.encode_image(images), trained.encode_text(text)
        replicated = ddp.encode_image(images), ddp.encode_text(text)
    for a, b, c in zip(exported, ours, replicated):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-4)  # the same weights DDP trained
    # and `mmret eval` takes the folder as a --model
    out = tmp_path / "results.json"
    assert (
        main(["eval", "--model", str(last), "--data", str(digits_root / "test"), "--output", str(out)]) == 0
    )
    assert out.is_file()


def test_a_sharded_checkpoint_cut_short_is_skipped_and_refused(runs, tmp_path):
    from mmret.training.checkpoint_io import read_checkpoint
    from mmret.training.run_dir import checkpoint_step, newest_intact_checkpoint

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(runs["fsdp2"] / "checkpoints", checkpoints)
    assert checkpoint_step(checkpoints / "last.ckpt") == 4
    shard = sorted((checkpoints / "last.ckpt").glob("*.distcp"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert checkpoint_step(checkpoints / "last.ckpt") is None
    path, step, unreadable = newest_intact_checkpoint(checkpoints)
    assert (path.name, step, [p.name for p in unreadable]) == ("step0000004.ckpt", 4, ["last.ckpt"])
    with pytest.raises(UsageError, match="incomplete sharded checkpoint"):
        read_checkpoint(checkpoints / "last.ckpt", "dual_encoder")


def test_reranker_fit_under_fsdp2_checkpoints_and_exports(tmp_path, digits_root):
    """`mmret fit --model mmret.training.CrossEncoder --trainer.strategy fsdp2`: a sharded checkpoint folder whose
    export (reranker_config.json + safetensors) scores pairs as the checkpoint does."""
    from mmret.cli import main
    from mmret.training import CrossEncoder

    run_dir = tmp_path / "reranker"
    argv = fit_argv(
        module=CROSS_ENCODER,
        model_args={
            "fusion_width": 32,
            "fusion_layers": 1,
            "fusion_heads": 2,
            "num_negatives": 3,
            "warmup_steps": 1,
            "val_top_k": 4,
        },  # fmt: skip
        train=digits_root / "train",
        val=digits_root / "val",
        batch_size=8,
        max_steps=2,
        limit_val_batches=2,
        devices=2,
        strategy="fsdp2",
        trainer_args={"gradient_clip_val": 1.0, "val_check_interval": 2},  # validated (gathered) after step 2
        run_dir=run_dir,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mmret", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(run_dir / "metrics.csv", newline="") as handle:
        validated = [row for row in csv.DictReader(handle) if row.get("val/image_retrieval_recall@1")]
    assert len(validated) == 1 and validated[0].get("val/first_stage/image_retrieval_recall@1")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert main(["export", str(last), "--output", str(tmp_path / "export")]) == 0
    exported, trained = CrossEncoder.load(tmp_path / "export"), CrossEncoder.load(last)
    images = torch.rand(3, 3, 32, 32)
    captions = ["digit 1", "a 7", "zero"]
    with torch.no_grad():
        torch.testing.assert_close(exported.score(captions, images), trained.score(captions, images), **TOL)
