"""Build `mmret fit` command lines in tests: one place for the smoke options (tiny model, CPU, a few steps).

    from tests.fit_args import fit_argv, fit_options

    main(fit_argv(REPO / "experiments" / "digits_clip.yaml", run_dir, data_root=root, max_epochs=1))
    main(fit_argv(module=DUAL_ENCODER, train=root / "train", samples_per_epoch=32, max_epochs=1, run_dir=run_dir))
    subprocess.run([sys.executable, "-m", "mmret.cli", *fit_argv(...)])
    [*header_command, *fit_options(init_args=True, ...)]   # overrides after an existing command

An option whose value is None is left out (the config's own value, or LightningCLI's default, stays); pass the
string "null" to set a value to None. Values are written as LightningCLI reads them (`True` -> "true", paths as
str). With a config file (`-c`) the model and data options are `--model.init_args.KEY`, with a class path
(`module=`) they are `--model.KEY`, as a user would type each. Later options win over earlier ones, so `extra`
(appended last) can override anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

DUAL_ENCODER = "mmret.training.DualEncoder"
CROSS_ENCODER = "mmret.training.CrossEncoder"
RETRIEVAL_DATA = "mmret.data.datamodule.RetrievalDataModule"

Value = str | int | float | bool | os.PathLike | None


def _text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _pairs(prefix: str, options: Mapping[str, Value]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        if value is not None:
            argv += [f"--{prefix}{key}", _text(value)]
    return argv


def fit_options(
    *,
    init_args: bool,
    model: str | None = "test-vit-micro",
    pretrained: str | None = None,
    model_args: Mapping[str, Value] | None = None,
    dataset: str | None = None,
    data_root: Value = None,
    train: Value = None,
    val: Value = None,
    samples_per_epoch: int | None = None,
    batch_size: int | None = 16,
    num_workers: int | None = 0,
    data_args: Mapping[str, Value] | None = None,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    limit_val_batches: Value = None,
    log_every_n_steps: int | None = None,
    accelerator: str | None = "cpu",
    devices: Value = None,
    strategy: str | None = None,
    precision: str | None = None,
    trainer_args: Mapping[str, Value] | None = None,
    progress_bar: bool | None = False,
    run_dir: Value = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """The `mmret fit` options (no subcommand, no config): model, data, trainer, `--run_dir`, then `extra`.

    Args:
        init_args: True after `-c CONFIG` (`--model.init_args.KEY`), False after `--model CLASS` (`--model.KEY`).
        model, pretrained, model_args: `model.model`, `model.pretrained` and further model init args, in order.
        dataset ... data_args: data module init args (`data_args` for the rest, in order).
        max_epochs ... trainer_args: Trainer arguments (`trainer_args` for the rest, in order).
        progress_bar: `--trainer.enable_progress_bar` (False: off, the tests' default).
        run_dir: `--run_dir`.
        extra: appended as given (e.g. `--checkpoint_every_n_steps 2`, W&B options, `--trainer.callbacks+ ...`).
    """
    sub = "init_args." if init_args else ""
    return [
        *_pairs(f"model.{sub}", {"model": model, "pretrained": pretrained, **(model_args or {})}),
        *_pairs(
            f"data.{sub}",
            {
                "dataset": dataset,
                "data_root": data_root,
                "train": train,
                "val": val,
                **(data_args or {}),
                "samples_per_epoch": samples_per_epoch,
                "batch_size": batch_size,
                "num_workers": num_workers,
            },
        ),
        *_pairs(
            "trainer.",
            {
                "max_epochs": max_epochs,
                "max_steps": max_steps,
                "limit_val_batches": limit_val_batches,
                "log_every_n_steps": log_every_n_steps,
                "accelerator": accelerator,
                "devices": devices,
                "strategy": strategy,
                "precision": precision,
                **(trainer_args or {}),
                "enable_progress_bar": progress_bar,
            },
        ),
        *_pairs("", {"run_dir": run_dir}),
        *extra,
    ]


def fit_argv(
    config: Value = None,
    run_dir: Value = None,
    *,
    module: str | None = None,
    data_module: str = RETRIEVAL_DATA,
    **options,
) -> list[str]:
    """`mmret fit` argv without the program name: `["fit", "-c", CONFIG, ...]`, or `["fit", "--model", MODULE,
    "--data", DATA_MODULE, ...]` when `module` (a LightningModule class path) is given instead of a config;
    then `fit_options(**options)` with `run_dir`."""
    if (config is None) == (module is None):
        raise ValueError("give a config file or a module class path, not both")
    head = ["-c", _text(config)] if config is not None else ["--model", module, "--data", data_module]
    return ["fit", *head, *fit_options(init_args=config is not None, run_dir=run_dir, **options)]
