"""Where a run came from: the git commit, the SLURM job, the host and the command, in RUN_DIR/run_info.json.

Trainer(callbacks=[RunInfo(run_dir)])      # `mmret fit` adds it to every run
git_commit()                               # "<sha>" or "<sha>-dirty", None outside a checkout
run_record("RUN/checkpoints/last.ckpt")    # what a checkpoint and its run directory say (model cards)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

import mmret
from mmret.io import write_json_atomic


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the mmret checkout (with `-dirty` when it has uncommitted changes), or None outside git."""
    where = str(path or Path(mmret.__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


class RunInfo(Callback):
    """Writes `run_info.json` (commit, SLURM job, host, command, world size) into the run directory on rank 0.

    Each (re)start of the run appends an entry to "starts", so a preempted and requeued job shows its history.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        path = self.run_dir / "run_info.json"
        info = json.loads(path.read_text()) if path.exists() else {"starts": []}
        info.update(run_dir=str(self.run_dir.resolve()), mmret_version=mmret.__version__)
        info["starts"].append(
            {
                "stage": stage,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "git_commit": git_commit(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
                "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                "host": socket.gethostname(),
                "world_size": trainer.world_size,
                "argv": sys.argv,
            }
        )
        info["git_commit"] = info["starts"][-1]["git_commit"]
        info["slurm_job_id"] = info["starts"][-1]["slurm_job_id"]
        write_json_atomic(path, info)


def run_record(checkpoint: str | os.PathLike) -> dict:
    """What a checkpoint and the run directory around it (RUN/checkpoints/X.ckpt) say about its training.

    Returns:
        {"hyper_parameters": the model's, "data_hyper_parameters": the data module's (Lightning's bookkeeping
        keys such as `_class_path` left out), "run_config": the text of RUN/config.yaml or None, "git_commit":
        the commit in RUN/run_info.json or None, "datasets": names of the training data (the built-in
        `dataset`, else the `name` in each training folder's dataset.json)}. An unreadable checkpoint gives
        empty hyperparameters (the loader reports it).
    """
    path = Path(checkpoint)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip checkpoint (no mmap), unreadable: the commands' loaders say what is wrong
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    record = {
        "hyper_parameters": _public(saved.get("hyper_parameters")),
        "data_hyper_parameters": _public(saved.get("datamodule_hyper_parameters")),
        "run_config": None,
        "git_commit": None,
    }
    record["datasets"] = _dataset_names(record["data_hyper_parameters"])
    run_dir = path.resolve().parent.parent if path.parent.name == "checkpoints" else None
    if run_dir is not None:
        config = run_dir / "config.yaml"
        if config.is_file():
            record["run_config"] = config.read_text(encoding="utf-8", errors="replace")
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no run_info.json: commit unknown
            record["git_commit"] = json.loads((run_dir / "run_info.json").read_text()).get("git_commit")
    return record


def _public(hparams) -> dict:
    return {k: v for k, v in dict(hparams or {}).items() if not str(k).startswith("_")}


def _dataset_names(data_hparams: dict) -> list[str]:
    if data_hparams.get("dataset"):
        return [str(data_hparams["dataset"])]
    train = data_hparams.get("train")
    folders = train if isinstance(train, (list, tuple)) else [train] if train else []
    names = []
    for folder in folders:
        try:
            name = json.loads((Path(str(folder)) / "dataset.json").read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        if name and name not in names:
            names.append(str(name))
    return names
