"""Preemption without SLURM: SIGUSR1 at a chosen step -> last.ckpt at that batch boundary, exit code 3 -> the
same command resumes -> the same losses, validations and weights as a run that was never interrupted.

tests/test_slurm.py does the same through slurm/train.sbatch and a real requeue, with the signal wherever it
lands; here the step is fixed, so the run also covers a validation that falls right after the checkpointed
batch (it is logged before the process leaves, and the resumed run does not repeat it).

    .venv/bin/pytest tests/test_preemption.py -q
"""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from mmret.cli import main
from mmret.training.callbacks import PREEMPTED_EXIT_CODE
from mmret.training.run_dir import RUN_DIR_ENV
from tests.fit_args import fit_argv

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6  # of one optimizer step each
SIGNAL_AT_STEP = 4  # the end of epoch 3, after which validation is due (every 2 epochs)


class SignalAtStep(Callback):
    """Sends this process SIGUSR1 at the end of one training step of a fresh run (what SLURM's warning does
    through slurm/train.sbatch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            os.kill(os.getpid(), signal.SIGUSR1)


def preemption_argv(run_dir: Path, data_root: Path, signal_at: int | None = None) -> list[str]:
    extra = []
    if signal_at is not None:
        callback = {"class_path": f"{__name__}.SignalAtStep", "init_args": {"step": signal_at}}
        extra = ["--trainer.callbacks+", json.dumps(callback)]
    return fit_argv(
        REPO / "experiments" / "digits_clip.yaml",
        run_dir,
        model_args={"warmup_steps": 2},
        data_root=data_root,
        samples_per_epoch=16,
        num_workers=1,
        max_epochs=EPOCHS,
        limit_val_batches=2,
        log_every_n_steps=1,
        trainer_args={"check_val_every_n_epoch": 2, "enable_model_summary": False},
        extra=extra,
    )


def logged(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """train/loss by step and val R@5 by epoch (each logged once), from metrics.csv."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert steps == sorted(set(steps)), steps
    losses = {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}
    key = "val/image_retrieval_recall@5"
    epochs = [int(row["epoch"]) for row in rows if row.get(key)]
    assert epochs == sorted(set(epochs)), epochs
    return losses, {int(row["epoch"]): float(row[key]) for row in rows if row.get(key)}


@pytest.mark.slow
def test_preempted_run_resumes_at_its_step_and_ends_like_an_uninterrupted_one(
    tmp_path, digits_root, monkeypatch
):
    monkeypatch.setenv(RUN_DIR_ENV, "unset")
    monkeypatch.delenv(RUN_DIR_ENV)  # `mmret fit` sets it for its DDP ranks; restored after the test
    monkeypatch.chdir(tmp_path)
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    assert main(preemption_argv(straight, digits_root.parent)) == 0

    with pytest.raises(SystemExit) as leaving:
        main(preemption_argv(preempted, digits_root.parent, signal_at=SIGNAL_AT_STEP))
    assert leaving.value.code == PREEMPTED_EXIT_CODE
    checkpoint = torch.load(preempted / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == SIGNAL_AT_STEP
    losses_before, validations_before = logged(preempted)
    assert sorted(losses_before) == list(range(SIGNAL_AT_STEP))  # the last step before leaving is kept
    assert sorted(validations_before) == [1, 3]  # and the validation due after it

    assert main(preemption_argv(preempted, digits_root.parent)) == 0  # the same command resumes
    losses, validations = logged(preempted)
    straight_losses, straight_validations = logged(straight)
    assert sorted(losses) == list(range(EPOCHS))
    assert losses == pytest.approx(straight_losses, abs=1e-6)
    assert validations == pytest.approx(straight_validations, abs=1e-6)
    assert sorted(validations) == [1, 3, 5]
    final, straight_final = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        for d in (preempted, straight)
    )
    assert final["global_step"] == straight_final["global_step"] == EPOCHS  # last.ckpt is saved at the end
    for name, tensor in straight_final["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
