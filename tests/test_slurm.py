"""Against a real local SLURM (tests/slurm_cluster.py): slurm/train.sbatch runs a 2-task DDP (gloo) job.

.venv/bin/pytest tests/test_slurm.py -q -m slurm
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train.sbatch"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def tiny_overrides(data_root: Path) -> list[str]:
    return [
        "--model.init_args.model",
        "test-vit-micro",
        "--data.init_args.data_root",
        str(data_root),
        "--data.init_args.batch_size",
        "16",
        "--data.init_args.samples_per_epoch",
        "64",
        "--data.init_args.num_workers",
        "0",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.strategy",
        "ddp",
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_two_task_ddp_job_writes_checkpoint(slurm_cluster, digits_root, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    env = {
        "MMRET": str(Path(sys.executable).parent / "mmret"),
        "PYTHONPATH": str(REPO),
        "MMRET_RUN_DIR": str(tmp_path / "run"),
        "OMP_NUM_THREADS": "1",
    }
    submitted = cluster.run(
        "sbatch",
        "--parsable",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/job.out",
        "--export=ALL",
        str(SCRIPT),
        str(REPO / "experiments" / "digits_clip.yaml"),
        *tiny_overrides(digits_root.parent),
        env=env,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    state = cluster.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", log[-4000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2  # 64 samples / (16 per rank x 2 ranks)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["slurm_job_id"] == job_id and info["starts"][-1]["world_size"] == 2
    assert os.path.getsize(tmp_path / "run" / "metrics.csv") > 0
