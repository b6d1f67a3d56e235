"""`MMRetCLI`: LightningCLI with mmret's run directory, checkpointing, resume and one-line config errors.

`mmret fit|validate|test` (`mmret.cli.fit`) runs it; `mmret sweep` builds the same parser to check a sweep's
points before anything is submitted. What a run directory holds, how it is locked and resumed:
`mmret.training.run_dir`; the callbacks every run gets: `mmret.training.callbacks`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
from argparse import ArgumentError, RawDescriptionHelpFormatter

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mmret.errors import UsageError
from mmret.training.run_dir import (
    RUN_DIR_ENV,
    RunDirClaim,
    choose_run_dir,
    is_launching_process,
    prepare_run_dir,
    run_components,
)

# The top of `mmret fit --help`: its ~500 lines list every option of the trainer, model and data module; these
# are the few that a run usually sets.
FIT_USAGE = "%(prog)s -c CONFIG [--print_config] [--run_dir DIR] [--KEY VALUE ...]"
FIT_DESCRIPTION = """\
Train a model: LightningCLI over mmret's LightningModules and data modules. Every option can also be set in
the YAML config (dotted keys are its nesting); the ones that usually matter:

  -c, --config FILE                 the experiment, e.g. experiments/digits_clip.yaml (repeatable: later wins)
  --run_dir DIR                     config, checkpoints, metrics and W&B files of the run (default
                                    runs/<config name>/<timestamp>); an existing run directory is resumed
  --data.init_args.train SHARDS     training shards: a folder, .tar files, a glob or a brace pattern
  --data.init_args.val SHARDS       validation shards (same forms); or --data.init_args.dataset digits|shapes
  --data.init_args.batch_size N     batch size per GPU / process
  --model.init_args.model NAME      the towers (an open_clip model or a test-* config); likewise
                                    --model.init_args.lr, .pretrained, .loss (infonce|siglip), ...
  --trainer.max_epochs N            epochs to train (or --trainer.max_steps N)
  --print_config                    print the resolved config and exit: check it before a long run
  --model.help CLASS                every init argument of a model: mmret.training.DualEncoder, CrossEncoder
  --data.help CLASS                 the same for mmret.data.datamodule.RetrievalDataModule

Examples:
  mmret fit -c experiments/digits_clip.yaml --trainer.max_epochs 3 --run_dir runs/quick
  mmret fit -c experiments/clip_vitb32_finetune.yaml --data.init_args.train /data/coco/train --print_config
"""


class _DescriptionAsWritten(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help format, with the description's lines kept as written."""


class MMRetCLI(LightningCLI):
    """LightningCLI with mmret's run directory, checkpointing and resume conventions.

    `claims` (a list) receives the RunDirClaim of a fit, for the caller to release whatever happens."""

    def __init__(self, *args, claims: list | None = None, **kwargs) -> None:
        self.claims = claims if claims is not None else []
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        fit_kwargs = dict(parser_kwargs.get("fit", {}))
        fit_kwargs.setdefault("usage", FIT_USAGE)
        fit_kwargs.setdefault("description", FIT_DESCRIPTION)
        parser_kwargs["fit"] = fit_kwargs
        # jsonargparse gives subcommand parsers the main parser's formatter
        parser_kwargs.setdefault("formatter_class", _DescriptionAsWritten)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            names = {
                option
                for sub in [parser, *getattr(self, "_subcommand_parsers", {}).values()]
                for action in sub._actions
                for option in action.option_strings
            }
            raise UsageError(config_error(str(err), sorted(names))) from None

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
        if self.subcommand != "fit":
            return
        owner = is_launching_process()  # global rank 0; the ranks it launches find the directory locked
        if owner:
            self.claims.append(RunDirClaim(cfg.run_dir))  # UsageError while another fit holds it
        resume = bool(cfg.get("resume", True)) and cfg.get("ckpt_path") is None
        last = prepare_run_dir(cfg.run_dir, owner=owner, resume=resume)
        if last is not None:
            cfg.ckpt_path = str(last)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config[self.subcommand]
        run_dir = cfg.run_dir
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        extra_callbacks, trainer_config["plugins"], loggers = run_components(
            run_dir, self.subcommand == "fit", cfg.checkpoint_every_n_steps,
            trainer_config.get("plugins") or [], trainer_config.get("logger"),
            claim=self.claims[-1] if self.claims else None,
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


def _type_name(text: str) -> str:
    return "null" if text == "NoneType" else text.rsplit(".", 1)[-1]


def _init_args(class_path: str) -> list[str]:
    """The init argument names of `class_path` (for "did you mean"); empty when it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except Exception:  # not importable: the message says so already
        return []


def _did_you_mean(name: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def config_error(message: str, option_names: list[str]) -> str:
    """jsonargparse's error report (usage, union subtypes, given values: 30-80 lines) as one line naming the
    key, what was expected and, for a misspelt option, the nearest valid names."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = " ".join(lines)
    unrecognized = re.match(r"unrecognized arguments: (.*)", text)
    if unrecognized:
        options = [t.split("=")[0] for t in unrecognized.group(1).split() if t.startswith("-")]
        parts = [f"unknown option {o}{_did_you_mean(o, option_names)}" for o in options]
        return "; ".join(parts or [lines[0]]) + "; `mmret fit --help` lists every option"
    not_accepted = re.search(r"does not accept option '([^']+)'", text)
    if not_accepted:
        name = not_accepted.group(1)
        hint = _did_you_mean(name, [o.lstrip("-") for o in option_names])
        return f"{name}: no such option{hint}; `mmret fit --help` lists every option"
    keys = re.findall(r'(?:Parser key|Key) "([^"]+)"', text)
    key = keys[0] if keys else "config"
    class_path = re.search(r"Problem with given class_path '([^']+)'", text)
    if class_path:
        unknown = re.search(r"Option '([^']+)' is not accepted", text)
        if unknown:
            name = unknown.group(1)
            hint = _did_you_mean(name, _init_args(class_path.group(1)), prefix=f"{key}.")
            return f"{key}.{name}: {class_path.group(1)} has no option {name!r}{hint}"
        if len(keys) > 1:
            key = f"{key}.{keys[1]}"
        else:
            index = next(i for i, line in enumerate(lines) if "Problem with given class_path" in line)
            reason = lines[index + 1] if index + 1 < len(lines) else "cannot be used"
            return f"{key}: {class_path.group(1)}: {reason}"
    missing = re.search(r"File does not exist: (\S+)", text)
    if missing:
        return f"{key}: file does not exist: {missing.group(1)}"
    # A nested key's own expectation comes first; the rest belong to the enclosing union (e.g. "or null").
    expected = [_type_name(t) for t in re.findall(r"Expected a <class '([^']+)'>", text)]
    got = next((line.split("value:", 1)[1].strip() for line in lines if line.startswith("Got value:")), None)
    got_inline = re.search(r"Got value: (.*)", text)
    if class_path and got_inline:
        expected, got = expected[:1], got_inline.group(1).split(" - ")[0].strip()
    elif got is None:
        got = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    if expected:
        given = f", got {got!r}" if got is not None else ""
        return f"{key}: expected {' or '.join(dict.fromkeys(expected))}{given}"
    return " ".join(lines[:4])  # e.g. a YAML syntax error and where it is: one line too
