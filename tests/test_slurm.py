"""Against a real local SLURM (tests/slurm_cluster.py): slurm/train.sbatch runs a 2-task DDP (gloo) job, a
preempted job requeues itself and resumes where it stopped, and `mmret sweep` runs a grid as a job array whose
results `mmret table` turns into a table.

.venv/bin/pytest tests/test_slurm.py -q -m slurm
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mmret.cli import main
from mmret.training.wandb_tracking import logged_table, read_offline_run
from tests.fit_args import fit_options
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train.sbatch"
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def job_env(**extra: str) -> dict[str, str]:
    """What a job needs from the submitting shell: the mmret executable of this venv, one thread per task."""
    return {
        "MMRET": str(Path(sys.executable).parent / "mmret"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def submit(cluster, workdir: Path, name: str, *args: str, sbatch: tuple[str, ...] = (), env=None) -> str:
    """sbatch slurm/train.sbatch ARGS with its output in WORKDIR/NAME.out; returns the job id."""
    submitted = cluster.run(
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        "--cpus-per-task=1",
        f"--chdir={workdir}",
        f"--output={workdir}/{name}.out",
        "--export=ALL",
        *sbatch,
        str(SCRIPT),
        *args,
        env=job_env(**(env or {})),
    )
    return submitted.stdout.strip().split(";")[0]


def job_log(workdir: Path, name: str) -> str:
    path = workdir / f"{name}.out"
    return path.read_text() if path.exists() else ""


def tiny_overrides(data_root: Path) -> list[str]:
    return fit_options(
        init_args=True,
        data_root=data_root,
        samples_per_epoch=64,
        max_epochs=1,
        limit_val_batches=1,
        strategy="ddp",
    )


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """Offline W&B, its staged table files kept in the test's directory."""
    return {"WANDB_MODE": "offline", "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}


def test_two_task_ddp_job_writes_checkpoint(slurm_cluster, digits_root, tmp_path):  # noqa: F811
    """2 ranks over gloo: one checkpoint, and rank 0's W&B examples table covers the captions of both ranks."""
    cluster = slurm_cluster
    job_id = submit(
        cluster,
        tmp_path,
        "ddp",
        str(REPO / "experiments" / "digits_clip.yaml"),
        *tiny_overrides(digits_root.parent),
        "--wandb_project",
        "mmret-test",
        sbatch=("--ntasks-per-node=2",),
        env={"MMRET_RUN_DIR": str(tmp_path / "run"), **wandb_env(tmp_path)},
    )
    state = cluster.wait_for(job_id, FINISHED, timeout=300)
    assert state == "COMPLETED", job_log(tmp_path, "ddp")[-4000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2  # 64 samples / (16 per rank x 2 ranks)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["slurm_job_id"] == job_id and info["starts"][-1]["world_size"] == 2
    assert os.path.getsize(tmp_path / "run" / "metrics.csv") > 0
    (offline,) = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))  # one W&B run, from rank 0
    run = read_offline_run(offline, timeout=60)  # W&B may still be writing
    (row,) = [row for row in run.history if "val/examples/artifact_path" in row]
    _, rows = logged_table(run, row, "val/examples")
    assert len(rows) == 8 and all(row[1] for row in rows)  # every query has its caption text


# ------------------------------------------------------------------------------------------------- preemption

EPOCHS = 20  # of one optimizer step each


def preemption_overrides(data_root: Path) -> list[str]:
    """digits_clip with the micro towers, one batch of 16 per epoch, validation every 5 epochs."""
    return fit_options(
        init_args=True,
        model_args={"warmup_steps": 4},
        data_root=data_root,
        samples_per_epoch=16,
        num_workers=1,
        max_epochs=EPOCHS,
        limit_val_batches=2,
        log_every_n_steps=1,
        trainer_args={"check_val_every_n_epoch": 5},
    )


def logged(run_dir: Path) -> tuple[dict[int, float], list[dict[str, float]]]:
    """From metrics.csv: train/loss by step (each step must appear once) and the validation rows in order."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert steps == sorted(set(steps)), f"{run_dir}: a step was logged twice or out of order: {steps}"
    losses = {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}
    validations = [
        {
            key: float(value)
            for key, value in row.items()
            if value and (key.startswith("val/") or key == "epoch")
        }
        for row in rows
        if row.get("val/image_retrieval_recall@1")
    ]
    return losses, validations


def test_preempted_job_requeues_resumes_and_ends_like_an_uninterrupted_run(
    slurm_cluster,  # noqa: F811
    digits_root,
    tmp_path,
):
    """SIGUSR1 to the batch shell -> checkpoint at a batch boundary -> `scontrol requeue` -> (released) resume
    from last.ckpt in the same run directory and W&B run -> the same losses, validation metrics and final
    weights as a job of the same config that was never interrupted; then the job's `mmret eval`.

    Why the comparison can be exact: a resumed run continues the interrupted epoch with a *fresh* shuffle of
    its remaining batches (mmret.data.streams: no sample stream is replayed), so after a mid-epoch preemption
    the rest of that epoch legitimately differs from an uninterrupted run. From the next epoch on, the data is
    a pure function of (seed, epoch, rank, worker) again; with DataLoader workers (num_workers >= 1) that
    includes the random crops, which each worker seeds from its stream. So a preemption at an epoch boundary
    must reproduce the uninterrupted run bit for bit. This run has one optimizer step per epoch, so wherever
    the signal lands the checkpoint falls on an epoch boundary, and any difference is a resume bug
    (optimizer, scheduler, step counters, data position, logging), not data order. (It found one: Lightning
    had started the train loader before restoring the loop state, so the resumed epoch replayed epoch 0;
    mmret.training.callbacks.ResumedTrainLoader rebuilds it.)
    """
    cluster = slurm_cluster
    args = [str(REPO / "experiments" / "digits_clip.yaml"), *preemption_overrides(digits_root.parent)]
    straight_dir, preempted_dir = tmp_path / "straight", tmp_path / "preempted"
    straight = submit(cluster, tmp_path, "straight", *args, env={"MMRET_RUN_DIR": str(straight_dir)})
    preempted = submit(
        cluster,
        tmp_path,
        "preempted",
        *args,
        "--wandb_project",
        "mmret-test",
        env={"MMRET_RUN_DIR": str(preempted_dir), "MMRET_EVAL_DATA": str(digits_root), **wandb_env(tmp_path)},
    )

    # Once the job has trained (last.ckpt is saved at every epoch end), SLURM's warning: USR1 to the batch shell.
    last = preempted_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while (
        not last.is_file()
        and time.time() < deadline
        and cluster.job_state(preempted) in ("PENDING", "RUNNING")
    ):
        time.sleep(0.2)
    assert last.is_file(), job_log(tmp_path, "preempted")[-4000:]
    cluster.run("scancel", "--batch", "--signal=USR1", preempted)

    # It checkpoints and requeues itself; a requeued job waits for a begin time in the future: release it.
    seen = []
    deadline = time.time() + 120
    while time.time() < deadline:
        state = (cluster.job_state(preempted), cluster.job_field(preempted, "Reason"))
        restarts = int(cluster.job_field(preempted, "Restarts") or 0)
        seen += [state] if not seen or seen[-1] != state else []
        if restarts >= 1 and state[0] not in ("RUNNING", "REQUEUED", "COMPLETING"):
            break
        time.sleep(0.2)
    assert seen[-1] == ("PENDING", "BeginTime"), (seen, job_log(tmp_path, "preempted")[-4000:])
    cluster.run("scontrol", "update", f"JobId={preempted}", "StartTime=now")
    saved = re.search(r"mmret: preempted at step (\d+);", job_log(tmp_path, "preempted"))
    assert saved, job_log(tmp_path, "preempted")[-4000:]
    checkpointed = int(saved.group(1))
    assert 0 < checkpointed < EPOCHS, checkpointed

    for name, job in (("straight", straight), ("preempted", preempted)):
        state = cluster.wait_for(job, FINISHED, timeout=240)
        assert state == "COMPLETED", job_log(tmp_path, name)[-4000:]

    log = job_log(tmp_path, "preempted")  # appended across the restart (--open-mode=append)
    assert "USR1 received" in log and f"requeueing job {preempted}" in log, log[-4000:]
    assert f"job {preempted} restart 1" in log and f"resuming from {last}" in log
    starts = json.loads((preempted_dir / "run_info.json").read_text())["starts"]
    assert [(s["slurm_job_id"], s["slurm_restart_count"]) for s in starts] == [
        (preempted, None),
        (preempted, "1"),
    ]

    # The second start trained steps checkpointed .. EPOCHS-1, in the same W&B run as the first; the job's
    # `mmret eval` of the finished run set its results as that run's summary.
    run_id = json.loads((preempted_dir / "wandb_run.json").read_text())["id"]
    offline = sorted((preempted_dir / "wandb").glob("offline-run-*"))
    first, second, evaluation = (read_offline_run(path, timeout=60) for path in offline)
    assert first.run_id == second.run_id == evaluation.run_id == run_id
    results = json.loads((preempted_dir / "results.json").read_text())
    assert {key: evaluation.summary[f"test/{key}"] for key in results["metrics"]} == results["metrics"]
    trained = [
        [int(row["trainer/global_step"]) for row in run.history if "train/loss" in row]
        for run in (first, second)
    ]
    assert trained == [list(range(checkpointed)), list(range(checkpointed, EPOCHS))]

    # Same numbers as the run that was never interrupted: every step's loss, every validation, the weights.
    losses, validations = logged(preempted_dir)
    straight_losses, straight_validations = logged(straight_dir)
    assert sorted(losses) == sorted(straight_losses) == list(range(EPOCHS))
    assert losses == pytest.approx(straight_losses, abs=1e-6)
    assert len(validations) == len(straight_validations) == EPOCHS // 5
    for ours, theirs in zip(validations, straight_validations):
        assert ours == pytest.approx(theirs, abs=1e-6)
    final, straight_final = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        for d in (preempted_dir, straight_dir)
    )
    assert final["global_step"] == straight_final["global_step"] == EPOCHS
    for name, tensor in straight_final["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- sweep -> table

SWEEP = """\
name: tiny
experiment: {repo}/experiments/digits_clip.yaml
overrides:
  model.init_args.model: test-vit-micro
  data.init_args.data_root: {data_root}
  data.init_args.batch_size: 16
  data.init_args.samples_per_epoch: 64
  data.init_args.num_workers: 0
  trainer.max_epochs: 1
  trainer.limit_val_batches: 1
  trainer.accelerator: cpu
  trainer.enable_progress_bar: false
grid:
  model.init_args.loss: [infonce, siglip]
seeds: [0, 1]
max_parallel: 4
runs_root: runs
eval: {{data: {data_root}/digits, split: test}}
sbatch: [--cpus-per-task=1]
"""

TABLE = """\
title: Tiny sweep
sweep: tiny_sweep.yaml
columns:
  - {name: "T→I R@1", metric: image_retrieval_recall@1}
  - {name: "I→T R@5", metric: text_retrieval_recall@5}
  - {name: acc1, metric: acc1}
"""


def test_sweep_runs_as_a_job_array_and_table_reads_its_results(
    slurm_cluster,  # noqa: F811
    digits_root,
    tmp_path,
    monkeypatch,
    capsys,
):
    """`mmret sweep` (no --dry-run) submits 2 losses x 2 seeds as one 4-task array; each task trains its point
    and evaluates it into RUN_DIR/results.json; `mmret table` averages the seeds of each loss."""
    monkeypatch.chdir(tmp_path)
    for key, value in {**job_env(), "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "tiny_sweep.yaml").write_text(SWEEP.format(repo=REPO, data_root=digits_root.parent))
    (tmp_path / "tiny_table.yaml").write_text(TABLE)

    assert main(["sweep", "tiny_sweep.yaml"]) == 0
    submitted = re.search(r"Submitted batch job (\d+)", capsys.readouterr().out)
    assert submitted, "mmret sweep did not print sbatch's job id"
    job_id = submitted.group(1)
    deadline = time.time() + 300
    while time.time() < deadline:
        states = slurm_cluster.array_states(job_id)
        if len(states) == 4 and all(state in FINISHED for state in states):
            break
        time.sleep(1)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((tmp_path / "runs" / "tiny").glob("slurm-*.out")))
    assert slurm_cluster.array_states(job_id) == ["COMPLETED"] * 4, logs

    # Each array task ran its own point: its loss and seed, its array index, its results.
    points = [(loss, seed) for loss in ("infonce", "siglip") for seed in (0, 1)]
    results = {}
    for index, (loss, seed) in enumerate(points):
        run_dir = tmp_path / "runs" / "tiny" / f"loss={loss}" / f"seed{seed}"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (config["model"]["init_args"]["loss"], config["seed_everything"]) == (loss, seed)
        info = json.loads((run_dir / "run_info.json").read_text())
        start = info["starts"][-1]
        assert (start["slurm_array_job_id"], start["slurm_array_task_id"]) == (job_id, str(index))
        results[(loss, seed)] = json.loads((run_dir / "results.json").read_text())
        assert results[(loss, seed)]["config"]["model"]["loss"] == loss
        assert results[(loss, seed)]["model"] == str(
            Path("runs/tiny") / f"loss={loss}" / f"seed{seed}" / "checkpoints" / "last.ckpt"
        )

    # The table's numbers are the results files' (x100, one decimal): mean ± sample std over the two seeds.
    def expected(loss: str, metric: str) -> str:
        values = [results[(loss, seed)]["metrics"][metric] * 100 for seed in (0, 1)]
        return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"

    metrics = ("image_retrieval_recall@1", "text_retrieval_recall@5", "acc1")
    assert main(["table", "tiny_table.yaml"]) == 0
    markdown = capsys.readouterr().out
    rows = {
        cells[0]: [cell.strip("*") for cell in cells[1:]]
        for line in markdown.splitlines()
        if line.startswith("| loss=")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert rows == {f"loss={loss}": [expected(loss, m) for m in metrics] for loss in ("infonce", "siglip")}

    assert main(["table", "tiny_table.yaml", "--format", "latex", "--output", "tiny.tex"]) == 0
    latex = (tmp_path / "tiny.tex").read_text()
    for loss in ("infonce", "siglip"):
        line = next(line for line in latex.splitlines() if line.startswith(f"loss={loss} &"))
        cells = [
            re.sub(r"\\textbf\{(.*)\}", r"\1", c.strip()) for c in line.removesuffix(r" \\").split("&")[1:]
        ]
        assert cells == [expected(loss, m).replace("±", r"$\pm$") for m in metrics]
