"""Kill a `mmret fit` run with SIGKILL mid-epoch, resume it from last.ckpt, and compare with an uninterrupted run.

.venv/bin/pytest tests/test_resume.py -q
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from mmret.training.dual_encoder import warmup_cosine
from tests.fit_args import DUAL_ENCODER, fit_argv

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8  # 256 samples per epoch / batch 32
EPOCHS = 2
LR, WARMUP = 1e-3, 4


def fit_command(run_dir: Path, data_root: Path) -> list[str]:
    argv = fit_argv(
        REPO / "experiments" / "digits_clip.yaml",
        run_dir,
        model_args={"lr": LR, "warmup_steps": WARMUP},
        data_root=data_root,
        batch_size=32,
        samples_per_epoch=256,
        max_epochs=EPOCHS,
        log_every_n_steps=1,
        accelerator=None,  # the config's own (auto)
        extra=["--checkpoint_every_n_steps", "2"],
    )
    return [sys.executable, "-m", "mmret.cli", *argv]


def checkpoint_steps(run_dir: Path) -> list[int]:
    names = os.listdir(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
    return [int(m.group(1)) for n in names if (m := re.fullmatch(r"step(\d+)\.ckpt", n))]


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def final_val(run_dir: Path) -> dict[str, float]:
    rows = [r for r in metrics_rows(run_dir) if r.get("val/image_retrieval_recall@1")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


@pytest.mark.slow
def test_sigkill_then_resume_continues_step_lr_and_loss(tmp_path, digits_root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        fit_command(interrupted, digits_root.parent),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any(step >= 12 for step in checkpoint_steps(interrupted)):  # mid-way through epoch 2
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()

    # Nothing half-written: every .ckpt is complete and loadable (a write cut short leaves only a hidden
    # `.NAME.*.tmp`, which the next start removes).
    files = sorted(f for f in os.listdir(interrupted / "checkpoints") if f.endswith(".ckpt"))
    assert "last.ckpt" in files, files
    # The resume starts from the newest checkpoint of the run (last.ckpt or a step checkpoint written after it).
    steps = [
        torch.load(interrupted / "checkpoints" / name, weights_only=False)["global_step"] for name in files
    ]
    killed_at = max(steps)
    assert STEPS_PER_EPOCH < killed_at < EPOCHS * STEPS_PER_EPOCH

    resumed = subprocess.run(
        fit_command(interrupted, digits_root.parent),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert not [f for f in os.listdir(interrupted / "checkpoints") if f.endswith(".tmp")]
    final = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == EPOCHS * STEPS_PER_EPOCH

    # The learning rate after the resume point follows the same schedule, step for step.
    rows = metrics_rows(interrupted)
    lr_by_step = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")}
    total = EPOCHS * STEPS_PER_EPOCH
    for step in range(killed_at, total):
        assert lr_by_step[step] == pytest.approx(LR * warmup_cosine(step, WARMUP, total, 0.0), rel=1e-6), step

    # The loss continues from where it was, not from chance level (ln(32) ≈ 3.47 for a batch of 32).
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    first_loss = losses[min(losses)]
    after = [loss for step, loss in losses.items() if step >= killed_at]
    assert after and max(after) < first_loss

    # An uninterrupted run ends at the same quality (different shuffle after the resume point: within noise).
    straight = tmp_path / "straight"
    done = subprocess.run(
        fit_command(straight, digits_root.parent),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = final_val(interrupted), final_val(straight)
    for key in ("val/image_retrieval_recall@5", "val/acc1"):
        assert abs(ours[key] - theirs[key]) < 0.15, (key, ours[key], theirs[key])


def test_an_in_process_fit_leaves_no_run_dir_behind(tmp_path, digits_root, monkeypatch):
    """`mmret fit` exports its run dir for DDP ranks while it runs; a second `mmret fit` in the same process
    (tests, notebooks, the demo) must not silently write into the first one's directory."""
    from mmret.cli import main
    from mmret.training.run_dir import RUN_DIR_ENV

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    common = dict(module=DUAL_ENCODER, train=digits_root / "val", samples_per_epoch=8, batch_size=8,
                  max_epochs=1, limit_val_batches=0)  # fmt: skip
    assert main(fit_argv(run_dir=tmp_path / "first", **common)) == 0
    assert RUN_DIR_ENV not in os.environ
    assert main(fit_argv(**common)) == 0  # no --run_dir: a fresh default directory, not "first"
    assert len(list((tmp_path / "first" / "checkpoints").glob("*.ckpt"))) >= 1
    assert [p.name for p in (tmp_path / "runs").iterdir()] != []


class RecordIds(Callback):
    """Appends each training batch's first sample ids (and the loader's count) to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        loader = trainer.fit_loop._combined_loader.flattened[0]
        record = {
            "step": trainer.global_step,
            "ids": batch["sample_id"][:8].tolist(),
            "seen": loader.batches_seen,
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


@pytest.mark.slow
def test_a_mid_epoch_resume_streams_the_rest_of_the_epoch_not_its_start(tmp_path, digits_root, monkeypatch):
    """Preempted after step 2 of a long epoch (one pass over the train shards), the rerun draws fresh batches 3..6
    of that epoch; it used to rebuild its loader without the saved position and replay the epoch's first batches
    (the same sample ids)."""
    from mmret.cli import main
    from mmret.training.callbacks import PREEMPTED_EXIT_CODE
    from mmret.training.run_dir import RUN_DIR_ENV

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "ids.jsonl"

    def argv(signal_at: int | None) -> list[str]:
        callbacks = [{"class_path": f"{__name__}.RecordIds", "init_args": {"path": str(log)}}]
        if signal_at is not None:
            callbacks.append(
                {"class_path": "tests.test_preemption.SignalAtStep", "init_args": {"step": signal_at}}
            )
        extra = [item for c in callbacks for item in ("--trainer.callbacks+", json.dumps(c))]
        return fit_argv(module=DUAL_ENCODER, train=digits_root / "train", batch_size=16, num_workers=1,
                        max_steps=6, limit_val_batches=0, run_dir=tmp_path / "run", extra=extra)  # fmt: skip

    with pytest.raises(SystemExit) as leaving:
        main(argv(signal_at=2))
    assert leaving.value.code == PREEMPTED_EXIT_CODE
    assert main(argv(signal_at=None)) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    before = [r for r in records[:3]]  # steps 0, 1 and the batch drawn when the signal came
    after = records[3:]
    assert [r["step"] for r in after] == [2, 3, 4, 5], "6 steps, each once"
    assert [r["seen"] for r in after] == [3, 4, 5, 6], "the loader counts on from the saved position"
    seen_ids = {i for r in before[:2] for i in r["ids"]}
    assert not seen_ids & {i for r in after for i in r["ids"][:1]}, (
        "a resumed step replayed the epoch's start"
    )
    assert after[0]["ids"] != before[0]["ids"]
