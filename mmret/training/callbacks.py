"""The callbacks `mmret fit` adds to every run: preemption, checkpoints that keep up, a correct resume; and
plain progress lines for logs.

    PreemptionCheckpoint(run_dir)   # SIGUSR1 / SIGINT / SIGTERM -> last.ckpt at the batch boundary, exit 3 / 130 / 143
    RunCheckpoint(dirpath=..., every_n_train_steps=N, save_last=True)
    ResumedTrainLoader()            # a resumed run streams the epoch it stopped in
    LogIntervalWithinEpoch()        # log_every_n_steps at most one epoch of batches
    ProgressLines(lines=10)         # `--trainer.callbacks+=mmret.training.callbacks.ProgressLines`
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

# `mmret fit` exits with this code after checkpointing on SIGUSR1; slurm/train.sbatch then requeues the job.
PREEMPTED_EXIT_CODE = 3
# ... and with the shell's codes after checkpointing on Ctrl-C (SIGINT) and SIGTERM (kill, scancel).
INTERRUPTED_EXIT_CODE = 130
TERMINATED_EXIT_CODE = 143
EXIT_CODES = {
    signal.SIGUSR1: PREEMPTED_EXIT_CODE,
    signal.SIGINT: INTERRUPTED_EXIT_CODE,
    signal.SIGTERM: TERMINATED_EXIT_CODE,
}
_WHY = {
    PREEMPTED_EXIT_CODE: "preempted",
    INTERRUPTED_EXIT_CODE: "interrupted",
    TERMINATED_EXIT_CODE: "terminated",
}


class PreemptionCheckpoint(Callback):
    """On SIGUSR1 (SLURM's warning before the time limit or preemption), SIGINT (Ctrl-C) or SIGTERM: save
    last.ckpt at the next batch boundary on every rank, then exit with the signal's code in `EXIT_CODES`
    (`PREEMPTED_EXIT_CODE` for SIGUSR1, so the batch script requeues the job; 130 / 143 for SIGINT / SIGTERM).
    Running `fit` again in the same directory continues exactly where it stopped. A second SIGINT or SIGTERM
    before the boundary gives up waiting (Python's KeyboardInterrupt / exit 143 at once, nothing saved).

    Lightning's own SLURM handler saves an `hpc_ckpt` from inside the signal handler, possibly half-way through
    an optimizer step; waiting for the batch to end keeps the resumed run identical to an uninterrupted one.
    The ranks agree (any rank signalled -> all stop, with the highest code) through the strategy's reductions.
    The handlers are installed at setup, before data loader workers start (the workers inherit them, so a
    Ctrl-C sent to the whole process group does not kill them mid-epoch); SIGTERM's is installed again when
    training starts, over Lightning's own (which would stop after the batch with exit code 0).

    The checkpoint is written at the end of the batch; the process leaves at the start of the next batch or at
    the epoch's end, after Lightning has handed that batch's metrics to the loggers (metrics.csv and W&B keep
    the last step) and after a validation due right after that batch: a resumed run never repeats it (Lightning
    fast-forwards past a validation that follows the checkpointed batch), so this is the only chance to record
    it. The checkpoint is on disk before that validation starts; SLURM's warning (`--signal=B:USR1@90` in
    slurm/train.sbatch) should leave time for one batch and one validation.
    """

    def __init__(self, run_dir: str, signals: tuple[int, ...] = tuple(EXIT_CODES)) -> None:
        self.last = Path(run_dir) / "checkpoints" / "last.ckpt"
        self.signals = tuple(signals)
        self.exit_code = 0  # of the signal received (the highest, when several)
        self.saved_at_step: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.exit_code != 0

    def _request(self, signum, frame) -> None:
        code = EXIT_CODES.get(signum, PREEMPTED_EXIT_CODE)
        if code == self.exit_code and signum in (signal.SIGINT, signal.SIGTERM):
            self._restore()  # asked twice: stop waiting for the batch boundary
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(code)
        self.exit_code = max(self.exit_code, code)

    def _install(self, signums) -> None:
        for signum in signums:
            previous = signal.signal(signum, self._request)
            self._previous.setdefault(signum, previous)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._install(self.signals)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install([s for s in self.signals if s == signal.SIGTERM])

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.saved_at_step is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        if trainer.world_size > 1:  # every rank leaves with the same code
            code = torch.tensor(float(self.exit_code), device=pl_module.device)
            self.exit_code = int(trainer.strategy.reduce(code, reduce_op="max").item())
        trainer.save_checkpoint(self.last)
        self.saved_at_step = trainer.global_step
        if trainer.is_global_zero:
            print(
                f"mmret: {_WHY.get(self.exit_code, 'stopped')} at step {trainer.global_step}; saved {self.last}",
                file=sys.stderr,
                flush=True,
            )

    def _leave(self, trainer: Trainer) -> None:
        if self.saved_at_step is None:
            return
        for logger in trainer.loggers:
            logger.finalize(_WHY.get(self.exit_code, "stopped"))
        trainer.strategy.barrier("mmret-preempted")
        raise SystemExit(self.exit_code)

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        self._leave(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leave(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()


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


class LogIntervalWithinEpoch(Callback):
    """Caps `log_every_n_steps` at the batches of one training epoch, so a small data set still logs its training
    curve every epoch (Lightning otherwise warns on every epoch and logs nothing until the interval is reached).
    The data module's `num_train_batches` is the epoch length; without it the setting is left alone."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if stage != "fit" or not hasattr(datamodule, "num_train_batches"):
            return
        batches = int(datamodule.num_train_batches(trainer.world_size))
        if trainer.limit_train_batches is not None and isinstance(trainer.limit_train_batches, int):
            batches = min(batches, trainer.limit_train_batches)
        if 0 < batches < trainer.log_every_n_steps:
            trainer.log_every_n_steps = batches


class ResumedTrainLoader(Callback):
    """Rebuilds a resumed run's train loader once Lightning has restored where training was.

    A module that asks for `trainer.estimated_stepping_batches` in `configure_optimizers` (DualEncoder's LR
    schedule does) makes Lightning build the train loader and start iterating it during strategy setup, before
    the checkpoint's loop state is restored: that loader streams epoch 0 from its first batch and never receives
    the saved position (`{"epoch", "batches_seen"}`), so the resumed epoch would replay the samples of epoch 0.
    At `on_train_start` the loop state is in place; the loader is built again there and given the saved position
    (kept from the checkpoint here: Lightning hands a position over only once, possibly to the loader this
    replaces, which left the rebuilt one replaying the epoch's first batches), and it streams the rest of the
    right epoch from a fresh shuffle (see mmret.data.loaders.TrainLoader).
    """

    def __init__(self) -> None:
        self._positions: list[dict] | None = None

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._positions = fit_state.get("combined_loader") or None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if trainer.ckpt_path is None or fit_loop._combined_loader is None:
            return
        if fit_loop._data_fetcher is not None:
            fit_loop._data_fetcher.teardown()  # stops the workers of the stale iterator
        fit_loop._combined_loader = None
        if self._positions:  # setup_data hands these over, then starts iterating
            fit_loop._combined_loader_states_to_load = self._positions
        fit_loop.setup_data()
        self._positions = None


class ProgressLines(Callback):
    """Prints about ten progress lines per `fit` (step, loss, time left) and each validation's headline numbers.

    Args:
        lines: Progress lines per run (besides validation).
    """

    def __init__(self, lines: int = 10) -> None:
        self.lines = lines
        self.total = 0
        self.every = 1
        self.start_time = 0.0
        self.start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.total = int(trainer.estimated_stepping_batches)
        self.every = max(1, math.ceil(self.total / self.lines))
        self.start_time, self.start_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or (step % self.every and step != self.total):
            return
        elapsed = time.monotonic() - self.start_time
        done = step - self.start_step
        left = elapsed / done * (self.total - step) if done else 0.0
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"  loss {float(loss):.3f}" if loss is not None else ""
        print(
            f"step {step:>4}/{self.total}{loss_text}  {format_seconds(elapsed)} elapsed, "
            f"~{format_seconds(left)} left",
            flush=True,
        )

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = [
            (name, key)
            for name, key in (
                ("zero-shot acc1", "val/acc1"),
                ("text->image R@1", "val/image_retrieval_recall@1"),
                ("first stage R@1", "val/first_stage/image_retrieval_recall@1"),
            )
            if key in metrics
        ]
        if shown:
            values = ", ".join(f"{name} {float(metrics[key]):.3f}" for name, key in shown)
            print(f"validation after epoch {trainer.current_epoch + 1}: {values}", flush=True)


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if seconds < 600 else f"{seconds / 60:.0f} min"
