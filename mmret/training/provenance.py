"""Where a run came from: the git commit, the SLURM job, the host and the command, in RUN_DIR/run_info.json.

Trainer(callbacks=[RunInfo(run_dir)])      # `mmret fit` adds it to every run
git_commit()                               # "<sha>" or "<sha>-dirty", None outside a checkout
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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
