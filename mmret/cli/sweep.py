"""`mmret sweep SWEEP.yaml [--dry-run]`: a grid x seeds over one experiment, as one SLURM job array.

    mmret sweep experiments/sweeps/digits_loss_batch.yaml --dry-run    # print the sbatch command and the points
    mmret sweep experiments/sweeps/digits_loss_batch.yaml              # write the run directories, submit

The sweep file and what each point runs are `mmret.reporting.sweeps`; a shipped sweep is found by its
`experiments/sweeps/...` path from any directory. Before anything is printed, written or submitted, every
point's `mmret fit` arguments are parsed by the parser `mmret fit` itself builds (`mmret.training.lightning_cli.MMRetCLI`,
parsed only: nothing is instantiated, no run directory made); a failed submission removes what it wrote.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import warnings
from functools import cache

from mmret.errors import UsageError
from mmret.reporting.sweeps import Sweep, load_sweep, written_point_files


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="a sweep file, e.g. experiments/sweeps/digits_loss_batch.yaml")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check every point against the experiment's config (as `mmret fit` parses it), print the "
        "sbatch command and the points; write and submit nothing",
    )


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    check_sweep(sweep, args.sweep)
    points = sweep.points()
    command = sweep.sbatch_command()
    print(f"# sweep {sweep.name}: {len(points)} points, at most {sweep.max_parallel} at a time")
    for index, point in enumerate(points):
        print(f"[{index}] {point.label}  ->  {point.run_dir}")
        print(f"    mmret fit {shlex.join(point.args)}")
    print(shlex.join(command))
    if args.dry_run:
        return 0
    sys.stdout.flush()
    with written_point_files(sweep):  # removed again when the submission raises
        try:
            submitted = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError as err:
            raise UsageError(
                "sbatch was not found; submit from a SLURM login node (or use --dry-run)"
            ) from err
        if submitted.returncode != 0:
            last = (submitted.stderr.strip().splitlines() or [f"exit code {submitted.returncode}"])[-1]
            raise UsageError(f"sbatch failed (nothing was submitted; the point files are removed): {last}")
    print(submitted.stdout.strip())
    sys.stdout.flush()
    return 0


def check_sweep(sweep: Sweep, where) -> None:
    """Parse what every point would run with `mmret fit`'s own parser (no instantiation, nothing written).

    Raises:
        UsageError: one line naming the sweep file, the grid key and value (or the overrides, the seed, the
            point) the experiment's config refuses, and the parser's reason.
    """
    from jsonargparse import ArgumentError

    parse = _fit_parse()
    for what, fit_args in sweep.checks():
        try:
            with warnings.catch_warnings():  # LightningCLI warns when argv is given while sys.argv has args
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                parse(["fit", *fit_args])
        except (UsageError, ArgumentError, SystemExit, ValueError, TypeError) as err:
            raise UsageError(
                f"sweep file {where}: {what} is refused by the config of {sweep.experiment} "
                f"(`mmret fit` would say: {_one_line(err)})"
            ) from None


class _ParserBuilt(Exception):
    def __init__(self, cli) -> None:
        super().__init__("parser built")
        self.cli = cli


@cache
def _fit_parse():
    """A function that parses `fit ...` arguments exactly as `mmret fit` does (MMRetCLI as `mmret.cli.fit` sets
    it up, its own `parse_arguments` included), without seeding, instantiating or making a run directory.
    Errors raise (UsageError or jsonargparse.ArgumentError) instead of exiting. Built once per process."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from mmret.training.lightning_cli import MMRetCLI

    class _ParseOnly(MMRetCLI):
        def parse_arguments(self, parser, args) -> None:
            raise _ParserBuilt(self)  # stop LightningCLI.__init__ right after setting the parser up

    try:
        _ParseOnly(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"exit_on_error": False},
            args=["fit"],
        )
    except _ParserBuilt as built:
        cli = built.cli
    else:  # pragma: no cover
        raise RuntimeError("MMRetCLI did not reach parse_arguments")
    return lambda argv: MMRetCLI.parse_arguments(cli, cli.parser, argv)


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
    "- Problem with given class_path",
)


def _one_line(err: BaseException) -> str:
    """The parser's reason on one line (jsonargparse's explanation without its Union boilerplate)."""
    if isinstance(err, UsageError):  # already one line (MMRetCLI words config errors itself)
        return str(err)
    lines = [line.strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    return " ".join(kept or lines)[:400]
