"""The run directory of `mmret fit`: where it is, what it holds, how a run resumes, what the Trainer gets.

    run_dir = choose_run_dir(explicit, config_files)    # --run_dir, else $MMRET_RUN_DIR, else runs/<config>/<time>
    resume_from = prepare_run_dir(run_dir)               # removes cut-short writes; RUN_DIR/checkpoints/last.ckpt
    callbacks, plugins, loggers = run_components(run_dir, ...)

A run lives in one directory holding the resolved `config.yaml`, `run_info.json` (git commit, SLURM job id,
command line), `checkpoints/` (`last.ckpt` always, plus every N steps), `metrics.csv` (appended to on resume),
and the W&B files when W&B logging is on. Calling `fit` again with the same directory resumes from its
`last.ckpt` (which is what a requeued SLURM job does).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.environments import SLURMEnvironment

from mmret.io import TEMPORARY_GLOB
from mmret.training.callbacks import PreemptionCheckpoint, ResumedTrainLoader, RunCheckpoint
from mmret.training.checkpoint_io import AtomicCheckpointIO
from mmret.training.provenance import RunInfo

RUN_DIR_ENV = "MMRET_RUN_DIR"


def choose_run_dir(explicit: str | None, config_files: list | None) -> str:
    """`explicit`, else $MMRET_RUN_DIR (set for the DDP ranks Lightning re-launches), else
    runs/<name of the last config file>/<timestamp>."""
    if explicit:
        return str(explicit)
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    name = Path(str(config_files[-1])).stem if config_files else "run"
    return str(Path("runs") / name / time.strftime("%Y%m%d-%H%M%S"))


def prepare_run_dir(run_dir: str | Path) -> Path | None:
    """Remove checkpoint writes a kill cut short (local rank 0 only); return RUN_DIR/checkpoints/last.ckpt
    when it exists (what `fit` resumes from)."""
    checkpoints = Path(run_dir) / "checkpoints"
    if checkpoints.is_dir() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for orphan in checkpoints.glob(TEMPORARY_GLOB):
            orphan.unlink(missing_ok=True)
    last = checkpoints / "last.ckpt"
    return last if last.is_file() else None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it instead."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                header = handle.readline().strip()
            self.metrics_keys = sorted(header.split(",")) if header else []


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a restart in the same directory (preemption, resume)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def run_components(
    run_dir: str, fit: bool, checkpoint_every_n_steps: int, plugins: list, logger_setting
) -> tuple[list, list, list | None]:
    """What every run's Trainer gets besides the user's settings: callbacks, plugins and (when the user set no
    logger of their own) the loggers.

    Returns:
        (callbacks, plugins, loggers); loggers is None when `logger_setting` is the user's own.
    """
    callbacks = [RunInfo(run_dir)]
    if fit:
        callbacks.append(RunCheckpoint(
            dirpath=os.path.join(run_dir, "checkpoints"),
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=checkpoint_every_n_steps,
            save_on_train_epoch_end=True,
            save_last=True,
            save_top_k=1,
        ))  # fmt: skip
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(PreemptionCheckpoint(run_dir))
        callbacks.append(ResumedTrainLoader())
    plugins = plugins if isinstance(plugins, list) else [plugins]
    if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
        plugins = [*plugins, AtomicCheckpointIO()]
    if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
        # Ranks and master address from the allocation; SIGUSR1 is PreemptionCheckpoint's, not Lightning's.
        plugins = [*plugins, SLURMEnvironment(auto_requeue=False)]
    loggers = None
    if logger_setting in (None, True):
        loggers = [ResumableCSVLogger(save_dir=run_dir, name="", version="")]
    return callbacks, plugins, loggers
