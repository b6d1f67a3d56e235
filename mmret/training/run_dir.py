"""The run directory of `mmret fit`: where it is, what it holds, who owns it, how a run resumes, what the
Trainer gets.

    run_dir = choose_run_dir(explicit, config_files)    # --run_dir, else $MMRET_RUN_DIR, else runs/<config>/<time>
    claim = RunDirClaim(run_dir)                          # the lock; UsageError while another fit holds it
    resume_from = prepare_run_dir(run_dir)               # removes cut-short writes; the newest intact checkpoint
    callbacks, plugins, loggers = run_components(run_dir, ...)
    claim.release(succeeded)                             # unlock; a refused fit removes the directory it made

A run lives in one directory holding the resolved `config.yaml`, `run_info.json` (git commit, SLURM job id,
command line), `checkpoints/` (`last.ckpt` always, plus every N steps), `metrics.csv` (appended to on resume),
and the W&B files when W&B logging is on. Calling `fit` again with the same directory resumes from its newest
intact checkpoint (which is what a requeued SLURM job does).

One fit at a time: the launching process (global rank 0; not the DDP ranks it or srun starts) holds an exclusive
`flock` on `RUN_DIR/fit.lock` for the life of the fit. The kernel drops it when the process dies, however it
dies, so a lock left by a dead process never blocks; a second fit on a held directory is refused with the
holder's host, PID and start time (written into the lock file). A requeued SLURM job is a new process after the
old one is gone, so it takes the lock over; when the lock file names the same SLURM job id (the previous attempt
of this job, e.g. on another node whose lock a network file system has not released yet), the new attempt waits
up to $MMRET_LOCK_WAIT seconds (default 120) for it. A file system without `flock` support (some Lustre mounts)
gives a one-line warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.environments import SLURMEnvironment

from mmret import distributed
from mmret.errors import UsageError
from mmret.io import TEMPORARY_GLOB, describe_os_error, remedy
from mmret.training.callbacks import (
    LogIntervalWithinEpoch,
    PreemptionCheckpoint,
    ResumedTrainLoader,
    RunCheckpoint,
)
from mmret.training.checkpoint_io import SHARDED_METADATA, AtomicCheckpointIO
from mmret.training.provenance import RunInfo

RUN_DIR_ENV = "MMRET_RUN_DIR"
LOCK_NAME = "fit.lock"
LOCK_WAIT_ENV = "MMRET_LOCK_WAIT"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def choose_run_dir(explicit: str | None, config_files: list | None) -> str:
    """`explicit`, else $MMRET_RUN_DIR (set for the DDP ranks Lightning re-launches), else
    runs/<name of the last config file>/<timestamp>."""
    if explicit:
        return str(explicit)
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    name = Path(str(config_files[-1])).stem if config_files else "run"
    return str(Path("runs") / name / time.strftime("%Y%m%d-%H%M%S"))


def is_launching_process() -> bool:
    """True in the process a user (or an sbatch script) started as global rank 0; False in the DDP ranks that
    Lightning's launcher re-executes (LOCAL_RANK / NODE_RANK > 0) and in srun/torchrun tasks of rank > 0."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) != 0:
            return False
    return True


class RunDirClaim:
    """The exclusive lock of one run directory for the life of a fit (see the module docstring).

    Creates the directory if needed (remembering that it did), takes the lock or raises `UsageError` naming the
    holder. A directory (or its checkpoints/) on a read-only file system or without write permission is refused
    here, before training, instead of at the first checkpoint. `release(succeeded=False)` after a fit refused before training started removes the directory again
    when this claim made it, so bad input leaves nothing behind.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.created = not self.run_dir.exists()
        self.training_started = False
        self._handle = None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _check_writable(self.run_dir, self.run_dir / "checkpoints")
            self._handle = open(self.run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held until release()
        except OSError as err:
            self._remove_if_created()
            verb = "create" if self.created else "write"
            where = f" ({err.filename})" if err.filename and Path(err.filename) != self.run_dir else ""
            raise UsageError(
                f"cannot {verb} run directory {self.run_dir}{where}: {describe_os_error(err)}; "
                f"{remedy(err, '--run_dir')}"
            ) from None
        try:
            self._lock()
        except BaseException:
            self._handle.close()
            self._handle = None
            raise

    def _lock(self) -> None:
        deadline = None
        while True:
            try:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                if deadline is None:
                    job = os.environ.get("SLURM_JOB_ID")
                    same_job = bool(job) and holder.get("slurm_job_id") == job
                    wait = float(os.environ.get(LOCK_WAIT_ENV, "120")) if same_job else 0.0
                    deadline = time.monotonic() + wait
                if time.monotonic() >= deadline:
                    raise UsageError(
                        f"run directory {self.run_dir} is in use by another `mmret fit` ({_describe(holder)}); "
                        "wait for it to finish, stop it, or choose another --run_dir"
                    ) from None
                time.sleep(1.0)
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    print(
                        f"mmret: warning: the file system of {self.run_dir} does not support flock "
                        f"({err.strerror}); this run directory is not locked against a second fit",
                        file=sys.stderr,
                    )
                    return
                raise
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps(holder) + "\n")
        self._handle.flush()

    def _holder(self) -> dict:
        """What the holder wrote into the lock file (it may not have written yet: retried briefly)."""
        for _ in range(10):
            try:
                text = (self.run_dir / LOCK_NAME).read_text()
                if text.strip():
                    return json.loads(text)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return {}

    def release(self, succeeded: bool) -> None:
        """Drop the lock; after a fit that failed before training started, remove the directory if we made it."""
        if self._handle is not None:
            if not succeeded and self.created and not self.training_started:
                self._remove_if_created()
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None

    def _remove_if_created(self) -> None:
        if self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _check_writable(*folders: Path) -> None:
    """Refuse, before training starts, a run directory (or its checkpoints/) the fit could not write into: a
    read-only file system or missing permissions would otherwise stop the run at its first checkpoint.

    Raises:
        OSError: EROFS or EACCES, naming the folder.
    """
    for folder in folders:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
            number = errno.EROFS if read_only else errno.EACCES
            raise OSError(number, os.strerror(number), str(folder))


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown: it has not written fit.lock yet"
    parts = [
        f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}",
        f"since {holder.get('since', '?')}",
    ]
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']}")
    return ", ".join(parts)


_STEP_CHECKPOINT = re.compile(r"step\d+(-v\d+)?\.ckpt")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The `global_step` of a complete, loadable checkpoint file; None when it is truncated or unreadable.

    The zip container is checked first (central directory and every member's CRC), then the file is loaded on
    the CPU the way Lightning will load it, so a resume never starts from a file that fails half-way."""
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint (strategy fsdp2): every shard whole, then its meta.pt
        if not distributed.sharded_files_intact(path):
            return None
        path = path / SHARDED_METADATA
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                return None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # a truncated or foreign file raises many types
        return None
    if not isinstance(checkpoint, dict) or ("state_dict" not in checkpoint and path.name != SHARDED_METADATA):
        return None
    return int(checkpoint.get("global_step", 0))


def newest_intact_checkpoint(checkpoints: str | os.PathLike) -> tuple[Path | None, int | None, list[Path]]:
    """The checkpoint to resume from in a run's `checkpoints/` folder: among `last.ckpt` and the step
    checkpoints, the intact one with the highest step (`last.ckpt` on a tie).

    Returns:
        (path, step, unreadable): path and step are None when no checkpoint is intact; `unreadable` lists the
        candidates that failed the check.
    """
    folder = Path(checkpoints)
    candidates = [folder / "last.ckpt"] if (folder / "last.ckpt").exists() else []
    if folder.is_dir():
        candidates += sorted(p for p in folder.iterdir() if _STEP_CHECKPOINT.fullmatch(p.name))
    best, best_step, unreadable = None, None, []
    for candidate in candidates:
        step = checkpoint_step(candidate)
        if step is None:
            unreadable.append(candidate)
        elif best_step is None or step > best_step:
            best, best_step = candidate, step
    return best, best_step, unreadable


def prepare_run_dir(run_dir: str | Path, owner: bool = True, resume: bool = True) -> Path | None:
    """Return the newest intact checkpoint of the run (what `fit` resumes from; None when it has none or when
    not `resume`). The `owner` (the process holding the run's lock) also removes checkpoint writes a kill cut
    short and says on stderr which checkpoint it resumes from.

    Raises:
        UsageError: checkpoints exist but none of them is readable (a run never silently restarts at step 0).
    """
    checkpoints = Path(run_dir) / "checkpoints"
    if checkpoints.is_dir() and owner:
        for orphan in checkpoints.glob(TEMPORARY_GLOB):  # files, and the folders of sharded checkpoints
            if orphan.is_dir() and not orphan.is_symlink():
                shutil.rmtree(orphan, ignore_errors=True)
            else:
                orphan.unlink(missing_ok=True)
    if not resume:
        return None
    path, step, unreadable = newest_intact_checkpoint(checkpoints)
    names = ", ".join(p.name for p in unreadable)
    if path is None:
        if unreadable:
            raise UsageError(
                f"run directory {run_dir} has checkpoints but none is readable ({names} in {checkpoints}: "
                "truncated or corrupt); move them away to start from step 0, or pass --resume false"
            )
        return None
    skipped = f"; skipped unreadable {names}" if unreadable else ""
    if owner:
        print(f"mmret: resuming from {path} (step {step}){skipped}", file=sys.stderr)
    return path


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


class SaveConfigOnceValid(SaveConfigCallback):
    """LightningCLI's config.yaml writer that, for `fit`, writes at fit start instead of at setup: after the
    model, data and trainer settings have passed their checks (set-up hooks, the optimizer's step count), so a
    fit refused for bad input does not overwrite the config.yaml of the run directory it was pointed at."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "fit")


class _RunInfoOnceValid(RunInfo):
    """RunInfo whose `fit` entry is written at fit start (see SaveConfigOnceValid), not at setup."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "fit")


class _TrainingStarted(Callback):
    """Tells the run's claim that the fit got past its checks (from then on, its directory is kept)."""

    def __init__(self, claim: RunDirClaim) -> None:
        self.claim = claim

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.claim.training_started = True


def run_components(
    run_dir: str,
    fit: bool,
    checkpoint_every_n_steps: int,
    plugins: list,
    logger_setting,
    claim: RunDirClaim | None = None,
) -> tuple[list, list, list | None]:
    """What every run's Trainer gets besides the user's settings: callbacks, plugins and (when the user set no
    logger of their own) the loggers.

    Returns:
        (callbacks, plugins, loggers); loggers is None when `logger_setting` is the user's own.
    """
    callbacks = [_RunInfoOnceValid(run_dir)]
    if claim is not None:
        callbacks.append(_TrainingStarted(claim))
    if fit:
        callbacks.append(RunCheckpoint(
            dirpath=os.path.join(run_dir, "checkpoints"),
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=checkpoint_every_n_steps,
            save_on_train_epoch_end=True,
            save_last=True,
            save_top_k=1,
            enable_version_counter=False,  # always last.ckpt, also after a resume from a step checkpoint
        ))  # fmt: skip
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(PreemptionCheckpoint(run_dir))
        callbacks.append(ResumedTrainLoader())
        callbacks.append(LogIntervalWithinEpoch())
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
