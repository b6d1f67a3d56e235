"""`mmret table RESULTS... [--format markdown|latex]`: a paper table from results files, mean ± std over seeds.

    mmret table runs/sweeps/digits_loss_batch/*/seed*/results.json --metrics image_retrieval_recall@1 acc1
    mmret table experiments/tables/digits_loss_batch.yaml --format latex --output table.tex
    mmret table runs/*/seed*/results.json --group-by model     # one row per model, over data sets and tasks

Table specs, averaging and rendering are `mmret.reporting.tables`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmret.errors import UsageError
from mmret.reporting.tables import FORMATS, IDENTITY_KEYS, load_table_spec, render, spec_from_files


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="SPEC_OR_RESULTS",
        help="one table spec (experiments/tables/NAME.yaml), or results JSON files: one row per run, "
        "averaging only runs that differ by seed alone (same path but for seed<N> directories, same data, "
        "task and model config)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="markdown", help="output format (default: %(default)s)"
    )
    parser.add_argument("--output", help="write the table to this file (atomically) (default: stdout)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        help="columns when results files are given directly (metric names of the results JSON; prefix "
        "`reranked_metrics.` for the reranked numbers; default: the recall@1/5/10 of both directions and acc1 "
        "that the files hold)",
    )
    parser.add_argument(
        "--group-by",
        nargs="+",
        metavar="KEY",
        help="for results files given directly: form rows by these keys only and average over the others "
        f"(some of {', '.join(IDENTITY_KEYS)}; default all of them: path without seed<N> directories, "
        "`data`, `task`, and `model` = the model config and evaluation settings). E.g. `--group-by model` "
        "averages each model over data sets and tasks; without it, results of different data sets or tasks "
        "never share a row",
    )
    parser.add_argument(
        "--scale", type=float, help="multiply every number by this (default: 100, or the spec's)"
    )
    parser.add_argument("--decimals", type=int, help="decimals shown (default: 1, or the spec's)")


def run(args: argparse.Namespace) -> int:
    inputs = [Path(p) for p in args.inputs]
    if len(inputs) == 1 and inputs[0].suffix in (".yaml", ".yml"):
        if args.metrics:
            raise UsageError(
                "--metrics is for results files given directly; a table spec names its own columns"
            )
        if args.group_by:
            raise UsageError(
                "--group-by is for results files given directly; in a table spec a row names its files "
                "(and `average_over: [data, task, model]` what it may mix)"
            )
        spec = load_table_spec(inputs[0])
    else:
        spec = spec_from_files(inputs, args.metrics, args.group_by)
    if args.scale is not None:
        spec.scale = args.scale
    if args.decimals is not None:
        if args.decimals < 0:
            raise UsageError(f"--decimals must be 0 or more, got {args.decimals}")
        spec.decimals = args.decimals
    if args.output:
        from mmret.io import check_output_file

        check_output_file(args.output, expected="a table file")
    text = render(spec, args.format)
    if args.output:
        from mmret.io import write_text_atomic

        output = write_text_atomic(args.output, text)
        print(f"mmret table: wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
