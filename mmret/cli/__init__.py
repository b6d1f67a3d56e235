"""The `mmret` console script: one entry point, a subcommand per pipeline step.

`mmret fit|validate|test` go to LightningCLI (`mmret.cli.fit`); every other subcommand is one module here,
`mmret.cli.<name>`, with `configure_parser(parser)` and `run(args) -> int`: it reads the arguments and calls the
library layers below (data, models, evaluation, mining, training, reporting), which never import this package.
Modules are imported only when their command runs, so `mmret --help` stays fast. `run_command(argv)` is the
one dispatch: the console script, the tests and `mmret demo` all go through it.

    mmret shards SRC --output DIR --image-size 224
    mmret fit -c experiments/digits_clip.yaml --trainer.max_epochs 2
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mmret.errors import UsageError

LIGHTNING_COMMANDS = ("fit", "validate", "test")

# name -> (module, one-line help). The module provides configure_parser(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("mmret.cli.shards", "convert image-caption pairs into pre-resized webdataset shards"),
    "datasets": ("mmret.cli.datasets", "write a built-in offline dataset (digits, shapes) as shards"),
    "export": ("mmret.cli.export", "export a trained model (open_clip, transformers, sentence-transformers)"),
    "mine": ("mmret.cli.mine", "hard negatives per query from a trained dual encoder (for the reranker)"),
    "eval": ("mmret.cli.eval", "retrieval and zero-shot metrics of a trained model, with pictures"),
    "demo": ("mmret.cli.demo", "run the whole pipeline on the built-in offline data"),
    "sweep": ("mmret.cli.sweep", "expand a sweep (grid x seeds) into a SLURM job array and submit it"),
    "table": ("mmret.cli.table", "paper table (markdown / LaTeX) from results files, mean ± std over seeds"),
    "serve": ("mmret.cli.serve", "HTTP search service and web page over an index"),
    "index": ("mmret.cli.index", "embed a shard set with a dual encoder into a search index (LanceDB)"),
    "search": ("mmret.cli.search", "search an index with text or an image, optionally reranked"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` and `--pretrained` of the commands that embed with a dual encoder (eval, mine, index)."""
    parser.add_argument(
        "--model",
        required=True,
        help="a dual-encoder .ckpt written by `mmret fit` (a file, or a folder under strategy fsdp2), a folder "
        "written by `mmret export`, or an open_clip model name with --pretrained (the zero-shot baseline)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="with a model name: an open_clip pretrained tag (e.g. openai) or a weights file (default: none)",
    )


def add_index_dim_argument(parser: argparse.ArgumentParser) -> None:
    """`--dim` of the commands that query an index (search, serve): checked against the index's own."""
    parser.add_argument(
        "--dim",
        type=int,
        default=None,
        help="the query embedding's width; always the index's own (`mmret index --dim`), so only checked "
        "against it (default: the index's)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--quiet` of the commands that run a model over data."""
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available (default: %(default)s)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress on stderr (otherwise: a bar on a terminal; in logs, a plain line every 10 s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmret",
        description="Train, mine, evaluate and tabulate multimodal retrieval models.",
        epilog="Training: `mmret fit|validate|test -c experiments/X.yaml [--key value ...]` (LightningCLI; "
        "`mmret fit --help` lists every option).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        subparsers.add_parser(
            name, help=f"LightningCLI {name} over the model and data modules", add_help=False
        )
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text)
    return parser


def _command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mmret {name}", description=module.__doc__.split("\n\n")[0])
    module.configure_parser(parser)
    return parser, module


def run_command(argv: Sequence[str]) -> int:
    """Run one known mmret command (argv without the program name) in this process; UsageError propagates.

    Returns:
        The command's exit code.
    """
    argv = list(argv)
    if argv[0] in LIGHTNING_COMMANDS:
        from mmret.cli.fit import run_lightning_cli

        return run_lightning_cli(argv)
    parser, module = _command_parser(argv[0])
    return module.run(parser.parse_args(argv[1:]))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one mmret command. Returns the exit code (also used by tests that call it in-process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*LIGHTNING_COMMANDS, *COMMANDS):
        parser = build_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        parser.print_usage(sys.stderr)
        print(
            f"mmret: error: unknown command {argv[0]!r}; expected one of: "
            f"{', '.join([*LIGHTNING_COMMANDS, *COMMANDS])}",
            file=sys.stderr,
        )
        return 2
    return _report_errors(argv[0], lambda: run_command(argv))


def _report_errors(name: str, func) -> int:
    try:
        result = func()
    except UsageError as err:
        print(f"mmret {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmret {name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
