"""`mmret fit / validate / test`: LightningCLI over mmret's LightningModules and data modules.

    mmret fit -c experiments/digits_clip.yaml
    mmret fit -c experiments/digits_clip.yaml --trainer.max_epochs 3 --run_dir runs/quick
    mmret fit --help

Every run lives in one directory (`--run_dir`, default `runs/<experiment>/<timestamp>`) holding the resolved
`config.yaml`, `run_info.json` (git commit, SLURM job id, command line), `checkpoints/` (`last.ckpt` always, plus
every `--checkpoint_every_n_steps`), `metrics.csv`, and the W&B files when W&B logging is on. Calling `fit` again
with the same `--run_dir` resumes from its `last.ckpt` (which is what a requeued SLURM job does).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.environments import SLURMEnvironment

import mmret

RUN_DIR_ENV = "MMRET_RUN_DIR"
# `mmret fit` exits with this code after checkpointing on SIGUSR1; slurm/train.sbatch then requeues the job.
PREEMPTED_EXIT_CODE = 3


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the mmret checkout (with `-dirty` when it has uncommitted changes), or None outside git."""
    where = str(path or Path(mmret.__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
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
        info["starts"].append({
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
        })
        info["git_commit"] = info["starts"][-1]["git_commit"]
        info["slurm_job_id"] = info["starts"][-1]["slurm_job_id"]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own directory, fsyncs, then renames it into place.

    A run killed at any moment (SIGKILL, preemption, node failure) leaves either the previous checkpoint or the new
    one, never a truncated file. (Lightning's default stages local files through the system temp directory, and
    a move across file systems is a copy that can be cut short.)
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transactional upload
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


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


class PreemptionCheckpoint(Callback):
    """On SIGUSR1 (SLURM's warning before the time limit or preemption): save last.ckpt at the next batch
    boundary on every rank, then exit with `PREEMPTED_EXIT_CODE` so the batch script requeues the job.

    Lightning's own SLURM handler saves an `hpc_ckpt` from inside the signal handler, possibly half-way through
    an optimizer step; waiting for the batch to end keeps the resumed run identical to an uninterrupted one.
    The ranks agree (any rank signalled -> all stop) through the strategy's boolean reduction.

    The checkpoint is written at the end of the batch; the process leaves at the start of the next batch or at
    the epoch's end, after Lightning has handed that batch's metrics to the loggers (metrics.csv and W&B keep
    the last step) and after a validation due right after that batch: a resumed run never repeats it (Lightning
    fast-forwards past a validation that follows the checkpointed batch), so this is the only chance to record
    it. The checkpoint is on disk before that validation starts; SLURM's warning (`--signal=B:USR1@90` in
    slurm/train.sbatch) should leave time for one batch and one validation.
    """

    def __init__(self, run_dir: str, signum: int = signal.SIGUSR1) -> None:
        self.last = Path(run_dir) / "checkpoints" / "last.ckpt"
        self.signum = signum
        self.requested = False
        self.saved_at_step: int | None = None
        self._previous = None

    def _request(self, signum, frame) -> None:
        self.requested = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._previous = signal.signal(self.signum, self._request)

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.saved_at_step is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        trainer.save_checkpoint(self.last)
        self.saved_at_step = trainer.global_step
        if trainer.is_global_zero:
            print(f"mmret: preempted at step {trainer.global_step}; saved {self.last}", file=sys.stderr, flush=True)

    def _leave(self, trainer: Trainer) -> None:
        if self.saved_at_step is None:
            return
        for logger in trainer.loggers:
            logger.finalize("preempted")
        trainer.strategy.barrier("mmret-preempted")
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        self._leave(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (every N steps) that also keeps `last.ckpt` current at the end of every
    training epoch and when training ends.

    ModelCheckpoint saves either every N steps or every N epochs, and at the end of training only when it has
    saved nothing yet; so last.ckpt could lag up to N steps behind the finished run, and a restart of that run
    (a requeued job, a resubmitted sweep) would redo those steps instead of finding it done.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ResumedTrainLoader(Callback):
    """Rebuilds a resumed run's train loader once Lightning has restored where training was.

    A module that asks for `trainer.estimated_stepping_batches` in `configure_optimizers` (DualEncoder's LR
    schedule does) makes Lightning build the train loader and start iterating it during strategy setup, before
    the checkpoint's loop state is restored: that loader streams epoch 0 from its first batch and never receives
    the saved position (`{"epoch", "batches_seen"}`), so the resumed epoch would replay the samples of epoch 0.
    At `on_train_start` the loop state is in place; building the loader again there lets Lightning hand it the
    saved position, and it streams the right epoch (see mmret.data.loaders.TrainLoader).
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if trainer.ckpt_path is None or fit_loop._combined_loader is None:
            return
        if fit_loop._data_fetcher is not None:
            fit_loop._data_fetcher.teardown()  # stops the workers of the stale iterator
        fit_loop._combined_loader = None
        fit_loop.setup_data()


class MMRetCLI(LightningCLI):
    """LightningCLI with mmret's run directory, checkpointing and resume conventions."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Directory of this run (config, checkpoints, metrics, W&B). Default: "
                                 "runs/<config name>/<timestamp>. An existing run directory is resumed.")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=200,
                            help="Save last.ckpt every N optimizer steps (and always at the end of each epoch).")
        parser.add_argument("--resume", type=bool, default=True,
                            help="Resume fit from RUN_DIR/checkpoints/last.ckpt when it exists.")
        parser.add_argument("--wandb_project", type=str | None, default=None,
                            help="Log to this W&B project as well (offline unless logged in; WANDB_MODE wins). "
                                 "The run id is kept in RUN_DIR/wandb_run.json, so a resumed run continues it.")
        parser.add_argument("--wandb_group", type=str | None, default=None, help="W&B group (a sweep's name).")
        parser.add_argument("--wandb_tags", type=list[str], default=[], help="W&B tags (a sweep point's values).")
        parser.add_argument("--wandb_name", type=str | None, default=None,
                            help="W&B display name (default: the run directory's name).")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        run_dir = cfg.get("run_dir") or os.environ.get(RUN_DIR_ENV) or self._default_run_dir(cfg)
        cfg.run_dir = str(run_dir)
        # Lightning's DDP launcher re-executes this command for the other local ranks: they must agree on it.
        os.environ[RUN_DIR_ENV] = cfg.run_dir
        cfg.trainer.default_root_dir = cfg.run_dir
        checkpoints = Path(cfg.run_dir) / "checkpoints"
        if checkpoints.is_dir() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            for orphan in checkpoints.glob(".*.tmp"):  # a write cut short by a kill
                orphan.unlink(missing_ok=True)
        last = checkpoints / "last.ckpt"
        if self.subcommand == "fit" and cfg.get("resume", True) and cfg.get("ckpt_path") is None and last.is_file():
            cfg.ckpt_path = str(last)
            print(f"mmret: resuming from {last}", file=sys.stderr)

    @staticmethod
    def _default_run_dir(cfg) -> Path:
        configs = cfg.get("config") or []
        name = Path(str(configs[-1])).stem if configs else "run"
        return Path("runs") / name / time.strftime("%Y%m%d-%H%M%S")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config[self.subcommand]
        run_dir = cfg.run_dir
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        callbacks.append(RunInfo(run_dir))
        if self.subcommand == "fit":
            callbacks.append(RunCheckpoint(
                dirpath=os.path.join(run_dir, "checkpoints"),
                filename="step{step:07d}",
                auto_insert_metric_name=False,
                every_n_train_steps=cfg.checkpoint_every_n_steps,
                save_on_train_epoch_end=True,
                save_last=True,
                save_top_k=1,
            ))
            callbacks.append(LearningRateMonitor(logging_interval="step"))
            callbacks.append(PreemptionCheckpoint(run_dir))
            callbacks.append(ResumedTrainLoader())
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
            plugins = [*plugins, AtomicCheckpointIO()]
        if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
            # Ranks and master address from the allocation; SIGUSR1 is PreemptionCheckpoint's, not Lightning's.
            plugins = [*plugins, SLURMEnvironment(auto_requeue=False)]
        trainer_config["plugins"] = plugins
        if trainer_config.get("logger") in (None, True):
            loggers = [ResumableCSVLogger(save_dir=run_dir, name="", version="")]
            if cfg.get("wandb_project"):
                from mmret.tracking import DatasetInfoToWandb, ValidationExamplesToWandb, build_wandb_logger

                loggers.append(build_wandb_logger(
                    run_dir, cfg.wandb_project, _plain_config(cfg), name=cfg.get("wandb_name"),
                    group=cfg.get("wandb_group"), tags=cfg.get("wandb_tags")))
                callbacks.append(DatasetInfoToWandb())
                callbacks.append(ValidationExamplesToWandb())
            trainer_config["logger"] = loggers
        return self._instantiate_trainer(trainer_config, callbacks)


def _plain_config(cfg) -> dict:
    """The resolved LightningCLI config as plain JSON types (for the W&B run config)."""
    return json.loads(json.dumps(cfg.as_dict(), default=str))


def run_lightning_cli(argv: list[str]) -> int:
    """Run `fit|validate|test` with the given argv (without the program name); returns the exit code."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # The CLI exports the run dir for the DDP ranks it launches; undo that afterwards, so a later run in this
    # process (tests, notebooks, the demo) does not silently reuse this run's directory.
    previous = os.environ.get(RUN_DIR_ENV)
    try:
        MMRetCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    return 0
