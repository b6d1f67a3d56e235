"""`mmret fit / validate / test`: LightningCLI over mmret's LightningModules and data modules.

    mmret fit -c experiments/digits_clip.yaml
    mmret fit -c experiments/digits_clip.yaml --trainer.max_epochs 3 --run_dir runs/quick
    mmret fit --help

Every run lives in one directory (`--run_dir`, default `runs/<experiment>/<timestamp>`): see
`mmret.training.run_dir` for what it holds, how it is locked and how a run resumes; the callbacks every run
gets are in `mmret.training.callbacks`. Bad input (a config error, a `UsageError` from a model or data
constructor, a directory another fit holds) is a `UsageError`: one line, exit code 2, no run directory left.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import warnings
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule

from mmret.errors import UsageError
from mmret.io import cannot_write, destination_error
from mmret.training.lightning_cli import MMRetCLI
from mmret.training.lightning_noise import silence_lightning_noise
from mmret.training.run_dir import RUN_DIR_ENV, RunDirClaim, SaveConfigOnceValid


def run_lightning_cli(argv: list[str]) -> int:
    """Run `fit|validate|test` with the given argv (without the program name); returns the exit code.

    Raises:
        UsageError: bad input (config, constructor arguments, a run directory in use); nothing is left behind.
        SystemExit: 3 / 130 / 143 after a fit saved last.ckpt on SIGUSR1 / SIGINT / SIGTERM.
    """
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # "Seed set to N" would come before a one-line refusal; the seed is in the run's config.yaml.
    warnings.filterwarnings("ignore", message="No seed found, seed set to")
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    silence_lightning_noise()
    # The CLI exports the run dir for the DDP ranks it launches; undo that afterwards, so a later run in this
    # process (tests, notebooks, the demo) does not silently reuse this run's directory. Likewise the signal
    # handlers a fit installs.
    previous = os.environ.get(RUN_DIR_ENV)
    handlers = {
        signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    }
    claims: list[RunDirClaim] = []
    succeeded = False
    try:
        MMRetCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigOnceValid,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=argv,
            claims=claims,
        )
        succeeded = True
    except Exception as err:
        usage = _usage_error_in(err) or _unwritable_destination(err, claims)
        if usage is not None and usage is not err:  # e.g. wrapped by jsonargparse while instantiating a class
            raise usage from None
        raise
    finally:
        for claim in claims:
            claim.release(succeeded)
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    return 0


def _unwritable_destination(err: BaseException, claims: list[RunDirClaim]) -> UsageError | None:
    """A write the file system refused (full, read-only) outside mmret's own writers, which say so themselves
    (Lightning's metrics.csv and hparams.yaml, W&B files), as one line naming the file; None for other errors
    (and for "permission denied" on a file outside the run directory: that may be an input being read)."""
    run_dir = claims[-1].run_dir if claims else None
    failure = destination_error(err, run_dir)
    if failure is None or (run_dir is None and not failure.filename):
        return None
    failed = Path(os.fsdecode(failure.filename)) if failure.filename else run_dir
    inside = run_dir is not None and (failed == run_dir or run_dir.resolve() in failed.resolve().parents)
    if not inside and failure.errno == errno.EACCES:
        return None
    return cannot_write(failed, failure, "--run_dir" if inside else "location")


def _usage_error_in(err: BaseException) -> UsageError | None:
    """The UsageError that caused `err` (itself, or one it wraps), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UsageError):
            return err
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None
