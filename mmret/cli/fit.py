"""`mmret fit / validate / test`: LightningCLI over mmret's LightningModules and data modules.

    mmret fit -c experiments/digits_clip.yaml
    mmret fit -c experiments/digits_clip.yaml --trainer.max_epochs 3 --run_dir runs/quick
    mmret fit --help

Every run lives in one directory (`--run_dir`, default `runs/<experiment>/<timestamp>`): see
`mmret.training.run_dir` for what it holds and how a run resumes; the callbacks every run gets are in
`mmret.training.callbacks`.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mmret.training.run_dir import RUN_DIR_ENV, choose_run_dir, prepare_run_dir, run_components


class MMRetCLI(LightningCLI):
    """LightningCLI with mmret's run directory, checkpointing and resume conventions."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Directory of this run (config, checkpoints, metrics, W&B). Default: "
            "runs/<config name>/<timestamp>. An existing run directory is resumed.",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=200,
            help="Save last.ckpt every N optimizer steps (and always at the end of each epoch).",
        )
        parser.add_argument(
            "--resume",
            type=bool,
            default=True,
            help="Resume fit from RUN_DIR/checkpoints/last.ckpt when it exists.",
        )
        parser.add_argument(
            "--wandb_project",
            type=str | None,
            default=None,
            help="Log to this W&B project as well (offline unless logged in; WANDB_MODE wins). "
            "The run id is kept in RUN_DIR/wandb_run.json, so a resumed run continues it.",
        )
        parser.add_argument(
            "--wandb_group", type=str | None, default=None, help="W&B group (a sweep's name)."
        )
        parser.add_argument(
            "--wandb_tags", type=list[str], default=[], help="W&B tags (a sweep point's values)."
        )
        parser.add_argument(
            "--wandb_name",
            type=str | None,
            default=None,
            help="W&B display name (default: the run directory's name).",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        cfg.run_dir = choose_run_dir(cfg.get("run_dir"), cfg.get("config"))
        # Lightning's DDP launcher re-executes this command for the other local ranks: they must agree on it.
        os.environ[RUN_DIR_ENV] = cfg.run_dir
        cfg.trainer.default_root_dir = cfg.run_dir
        last = prepare_run_dir(cfg.run_dir)
        if self.subcommand == "fit" and cfg.get("resume", True) and cfg.get("ckpt_path") is None and last:
            cfg.ckpt_path = str(last)
            print(f"mmret: resuming from {last}", file=sys.stderr)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config[self.subcommand]
        run_dir = cfg.run_dir
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        extra_callbacks, trainer_config["plugins"], loggers = run_components(
            run_dir, self.subcommand == "fit", cfg.checkpoint_every_n_steps,
            trainer_config.get("plugins") or [], trainer_config.get("logger"),
        )  # fmt: skip
        callbacks += extra_callbacks
        if loggers is not None:
            if cfg.get("wandb_project"):
                from mmret.training.wandb_tracking import (
                    DatasetInfoToWandb,
                    ValidationExamplesToWandb,
                    build_wandb_logger,
                )

                loggers.append(
                    build_wandb_logger(
                        run_dir,
                        cfg.wandb_project,
                        _plain_config(cfg),
                        name=cfg.get("wandb_name"),
                        group=cfg.get("wandb_group"),
                        tags=cfg.get("wandb_tags"),
                    )
                )
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
