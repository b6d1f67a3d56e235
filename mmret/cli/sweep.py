"""`mmret sweep SWEEP.yaml [--dry-run]`: a grid x seeds over one experiment, as one SLURM job array.

    mmret sweep experiments/sweeps/digits_loss_batch.yaml --dry-run    # print the sbatch command and the points
    mmret sweep experiments/sweeps/digits_loss_batch.yaml              # write the run directories, submit

The sweep file and what each point runs are `mmret.reporting.sweeps`; a shipped sweep is found by its
`experiments/sweeps/...` path from any directory.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from mmret.errors import UsageError
from mmret.reporting.sweeps import load_sweep, write_point_files


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="a sweep file, e.g. experiments/sweeps/digits_loss_batch.yaml")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch command and the points; write and submit nothing",
    )


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    points = sweep.points()
    command = sweep.sbatch_command()
    print(f"# sweep {sweep.name}: {len(points)} points, at most {sweep.max_parallel} at a time")
    for index, point in enumerate(points):
        print(f"[{index}] {point.label}  ->  {point.run_dir}")
        print(f"    mmret fit {shlex.join(point.args)}")
    print(shlex.join(command))
    if args.dry_run:
        return 0
    write_point_files(sweep)
    try:
        submitted = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise UsageError("sbatch was not found; submit from a SLURM login node (or use --dry-run)") from err
    if submitted.returncode != 0:
        raise UsageError(f"sbatch failed: {submitted.stderr.strip().splitlines()[-1:]}")
    print(submitted.stdout.strip())
    sys.stdout.flush()
    return 0
