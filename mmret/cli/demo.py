"""Run the whole pipeline on the built-in offline data and print one results table: `mmret demo`.

    mmret demo                          # writes demo_output/ (expected time: experiments/demo/pipeline.yaml)
    mmret demo --output DIR --quick     # tiny models, a few steps (the tests' and notebooks' form)

Eight stages, each the same code as its `mmret` command (run in this process, with the arguments printed so you
can run it yourself): build `digits` and `shapes` (`mmret datasets`), train a dual encoder on digits
(`mmret fit -c experiments/demo/digits_dual.yaml`) and evaluate its zero-shot accuracy (`mmret eval`), train
one on shapes and evaluate retrieval with seen and unseen compositions apart, mine hard negatives with it
(`mmret mine`), train the cross-encoder reranker on its towers, and evaluate retrieve-then-rerank
(`mmret eval --reranker`). The table goes to stdout and to DIR/results.md, beside the PNGs that eval draws.

Settings live in files, not here: experiments/demo/pipeline.yaml (evaluation, mining, the `--quick` form,
expected durations) and the three LightningCLI recipes beside it. Re-running reuses what is done: a stage is
skipped when its output exists and DIR/.demo/<stage>.json records the same settings (the command, the recipe's
content, the settings of the stages it reads from); an interrupted training stage resumes from its last.ckpt.
Every output appears atomically (datasets, checkpoints, results, this module's own files). The seeds are in the
recipes and pipeline.yaml, so the same settings give the same numbers (on the same machine and thread count: the
demo leaves one core to the data loader, see `compute_threads`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmret.errors import UsageError
from mmret.io import write_text_atomic
from mmret.reporting.demo_report import demo_table, write_demo_report
from mmret.resources import resolve_shipped
from mmret.training.callbacks import format_seconds

PIPELINE = "experiments/demo/pipeline.yaml"  # a shipped file (mmret.resources)
MARKERS = ".demo"  # DIR/.demo/<stage>.json: what each finished stage ran
DATASETS = ("digits", "shapes")
INDENT = "      "


@dataclass(frozen=True)
class Stage:
    """One step of the demo: the key of its settings in pipeline.yaml, what it does, the stages it reads."""

    name: str
    title: str
    needs: tuple[str, ...] = ()


STAGES = (
    Stage("datasets", "building the digits and shapes datasets"),
    Stage("digits_dual", "training the digits dual encoder", ("datasets",)),
    Stage("digits_eval", "evaluating zero-shot classification on digits", ("digits_dual",)),
    Stage("shapes_dual", "training the shapes dual encoder", ("datasets",)),
    Stage("shapes_eval", "evaluating retrieval on shapes (seen and unseen compositions)", ("shapes_dual",)),
    Stage("mine", "mining hard negatives with the shapes dual encoder", ("shapes_dual",)),
    Stage("reranker", "training the reranker on the shapes dual encoder's towers", ("shapes_dual", "mine")),
    Stage("rerank_eval", "evaluating retrieve-then-rerank on shapes", ("shapes_dual", "reranker")),
)

# Where each stage writes, relative to DIR ({output} in commands).
RUN_DIRS = {
    "digits_dual": "runs/digits_dual",
    "shapes_dual": "runs/shapes_dual",
    "reranker": "runs/shapes_reranker",
}
RESULTS = {
    "digits_eval": "digits_zeroshot.json",
    "shapes_eval": "shapes_retrieval.json",
    "rerank_eval": "shapes_rerank.json",
}
MINED = "mined/shapes.jsonl"
# (caption, file) of the pictures results.md shows, beside the results that eval drew them for.
PICTURES = [
    (
        "shapes: the dual encoder's top images for a few captions (relevant ones framed green, others red)",
        RESULTS["shapes_eval"].replace(".json", "_examples.png"),
    ),
    ("shapes: Recall@K of the dual encoder", RESULTS["shapes_eval"].replace(".json", "_recall.png")),
    (
        "shapes: first stage vs reranked top images for the same captions",
        RESULTS["rerank_eval"].replace(".json", "_examples.png"),
    ),
    ("shapes: Recall@K, first stage and reranked", RESULTS["rerank_eval"].replace(".json", "_recall.png")),
    (
        "digits: top images for a few captions (framed green when the digit is the caption's class)",
        RESULTS["digits_eval"].replace(".json", "_examples.png"),
    ),
]


def checkpoint(stage: str) -> str:
    """`{output}/runs/.../checkpoints/last.ckpt` of a training stage."""
    return f"{{output}}/{RUN_DIRS[stage]}/checkpoints/last.ckpt"


# ---- settings -------------------------------------------------------------------------------------------------
def load_settings(path: str | Path, quick: bool) -> dict:
    """pipeline.yaml, with its `quick:` section merged over it when `quick`."""
    path = Path(path)
    try:
        settings = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UsageError(
            f"--pipeline {path}: cannot read it ({err.strerror}); expected a demo pipeline YAML"
        ) from None
    except yaml.YAMLError as err:
        raise UsageError(f"--pipeline {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise UsageError(f"--pipeline {path}: expected a mapping of stage names to settings")
    overrides = settings.pop("quick", None) or {}
    if quick:
        settings = merge(settings, overrides)
    missing = [stage.name for stage in STAGES if not isinstance(settings.get(stage.name), dict)]
    if missing:
        raise UsageError(f"--pipeline {path}: no settings for stage(s) {', '.join(missing)}")
    for stage in STAGES:
        entry = settings[stage.name]
        if not isinstance(entry.get("args", {}) or {}, dict):
            raise UsageError(f"--pipeline {path}: {stage.name}.args must be a mapping of option to value")
        if "config" in entry:
            entry["config"] = str((path.parent / entry["config"]).resolve())
            if not Path(entry["config"]).is_file():
                raise UsageError(f"--pipeline {path}: {stage.name}.config {entry['config']} does not exist")
    return settings


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, recursively for mappings."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def option_args(options: dict | None) -> list[str]:
    """{"trainer.max_steps": 3, "top-k": 5} -> ["--trainer.max_steps", "3", "--top-k", "5"] (None -> null)."""
    argv = []
    for key, value in (options or {}).items():
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        argv += [f"--{key}", text]
    return argv


# ---- the stages' commands ---------------------------------------------------------------------------------------
def stage_command(stage: Stage, settings: dict) -> list[str]:
    """The `mmret` argv of a stage (without the program name), with {output} standing for DIR."""
    entry = settings[stage.name]
    extra = option_args(entry.get("args"))
    if stage.name in RUN_DIRS:
        argv = [
            "fit",
            "-c",
            "{config}",
            "--data.init_args.data_root",
            "{output}/data",
            "--run_dir",
            f"{{output}}/{RUN_DIRS[stage.name]}",
        ]
        if stage.name == "reranker":
            argv += ["--model.init_args.dual_encoder", checkpoint("shapes_dual")]
        return argv + extra
    if stage.name == "mine":
        return [
            "mine",
            "--model",
            checkpoint("shapes_dual"),
            "--data",
            "{output}/data/shapes",
            "--output",
            f"{{output}}/{MINED}",
            *extra,
        ]
    dataset, model = {
        "digits_eval": ("digits", "digits_dual"),
        "shapes_eval": ("shapes", "shapes_dual"),
        "rerank_eval": ("shapes", "shapes_dual"),
    }[stage.name]
    argv = [
        "eval",
        "--model",
        checkpoint(model),
        "--data",
        f"{{output}}/data/{dataset}",
        "--output",
        f"{{output}}/{RESULTS[stage.name]}",
    ]
    if stage.name == "rerank_eval":
        argv += ["--reranker", checkpoint("reranker")]
    return argv + extra


def stage_outputs(stage: Stage) -> list[str]:
    """The files (relative to DIR) whose presence, with the stage's marker, means the stage is done."""
    if stage.name == "datasets":
        return [
            f"data/{name}/{split}/dataset.json" for name in DATASETS for split in ("train", "val", "test")
        ]
    if stage.name in RUN_DIRS:
        return [checkpoint(stage.name).removeprefix("{output}/")]
    if stage.name == "mine":
        return [MINED]
    return [RESULTS[stage.name]]


def stage_product(stage: Stage) -> str:
    """What a stage made, relative to DIR, as shown when it is reused."""
    if stage.name == "datasets":
        return "data"
    return RUN_DIRS.get(stage.name) or stage_outputs(stage)[0]


def fill(argv: list[str], output: str, config: str | None) -> list[str]:
    return [part.replace("{output}", output).replace("{config}", config or "") for part in argv]


def fingerprint(stage: Stage, settings: dict, upstream: dict[str, str]) -> str:
    """A hash of everything a stage's result depends on: its command, its recipe's text, its inputs' hashes."""
    entry = settings[stage.name]
    content = {
        "command": stage_command(stage, settings) if stage.name != "datasets" else None,
        "datasets": {key: entry.get(key) for key in ("seed", "image_size")}
        if stage.name == "datasets"
        else None,
        "recipe": Path(entry["config"]).read_text() if entry.get("config") else None,
        "upstream": [upstream[name] for name in stage.needs],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# ---- running a stage ----------------------------------------------------------------------------------------------
def run_command(argv: list[str]) -> None:
    """Run one `mmret` command in this process through the console script's own dispatch; UsageError
    propagates, and an argument LightningCLI rejected (it has printed why) becomes one."""
    from mmret.cli import LIGHTNING_COMMANDS
    from mmret.cli import run_command as run_mmret

    fit = argv[0] in LIGHTNING_COMMANDS
    try:
        run_mmret([*argv, *QUIET_FIT_ARGS] if fit else argv)
    except SystemExit as exit_:  # jsonargparse rejected an argument (its message is above)
        if exit_.code:
            raise UsageError(f"`mmret {argv[0]}` rejected its arguments (see above)") from None


# Display only (not part of the printed command): progress lines instead of bars, no model summary.
QUIET_FIT_ARGS = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.callbacks+=mmret.training.callbacks.ProgressLines",
]


def build_datasets(output: Path, entry: dict) -> None:
    from mmret.data.builtin import build_dataset

    for name in DATASETS:
        root = build_dataset(
            name,
            output / "data" / name,
            seed=entry.get("seed", 0),
            image_size=entry.get("image_size", 64),
        )
        print(
            f"{name}: {', '.join(f'{s} {_num_samples(root / s)}' for s in ('train', 'val', 'test'))} samples "
            f"in {root}"
        )


def _num_samples(split_dir: Path) -> int:
    return json.loads((split_dir / "dataset.json").read_text()).get("num_samples", 0)


class _Indented(io.TextIOBase):
    """A text stream that indents every line written to it (a stage's output under its stage line)."""

    def __init__(self, stream, prefix: str) -> None:
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start and piece.strip():
                self.stream.write(self.prefix)
            self.stream.write(piece)
            self.at_line_start = piece.endswith(("\n", "\r"))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def stage_output() -> Iterator[None]:
    """Indent what a stage prints, and keep Lightning's info logs and warnings out of the demo's output."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_Indented(sys.stdout, INDENT)):
            warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
            warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers).*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def expected(seconds) -> str:
    if not seconds:
        return ""
    return f" (~{seconds:.0f} s)" if seconds < 90 else f" (~{seconds / 60:.1f} min)".replace(".0 min", " min")


def display(argv: list[str]) -> str:
    """A command as a user would type it (paths under the working directory made relative)."""
    cwd = Path.cwd()
    parts = []
    for part in argv:
        if os.path.isabs(part) and Path(part).is_relative_to(cwd):
            part = str(Path(part).relative_to(cwd))
        parts.append(part if part and " " not in part else repr(part))
    return "mmret " + " ".join(parts)


def read_marker(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---- command line ---------------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret demo`."""
    parser.add_argument(
        "--output",
        default="demo_output",
        metavar="DIR",
        help="folder for the demo's data, runs and results; a second run reuses what it holds "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny models and a few steps (~30 s): checks the pipeline, numbers are meaningless",
    )
    parser.add_argument(
        "--pipeline",
        default=str(PIPELINE),
        metavar="YAML",
        help="the demo's settings (default: %(default)s)",
    )


def check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; expected a folder for the demo's outputs")
    if (
        output.is_dir()
        and any(output.iterdir())
        and not ((output / MARKERS).is_dir() or (output / "data").is_dir())
    ):
        raise UsageError(
            f"--output {output} is a non-empty folder that holds no demo output; choose another "
            "--output (or empty it)"
        )
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: cannot write into {existing}")


def run(args: argparse.Namespace) -> int:
    """Run `mmret demo` with parsed arguments."""
    output = Path(args.output)
    check_output_dir(output)
    settings = load_settings(resolve_shipped(args.pipeline), args.quick)
    with compute_threads():
        return run_stages(output, settings, args.quick)


@contextlib.contextmanager
def compute_threads() -> Iterator[None]:
    """Leave one core to the data loader's worker: PyTorch's intra-op threads default to every core, and on a
    small machine the loader then competes with them (the demo's timings in experiments/demo/pipeline.yaml
    were measured this way). An OMP_NUM_THREADS that the user set wins."""
    import torch

    previous = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores - 1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_stages(output: Path, settings: dict, quick: bool) -> int:
    """Run (or reuse) every stage into `output`, then write and print the table."""
    started = time.monotonic()
    fingerprints: dict[str, str] = {}
    commands: list[str] = []
    reused = 0
    print(
        f"mmret demo{' --quick' if quick else ''}: {len(STAGES)} stages into {output}/ "
        "(finished stages of an earlier run are reused)",
        flush=True,
    )
    for number, stage in enumerate(STAGES, 1):
        entry = settings[stage.name]
        fingerprints[stage.name] = fingerprint(stage, settings, fingerprints)
        config = entry.get("config")
        argv = fill(stage_command(stage, settings), str(output), config) if stage.name != "datasets" else None
        if argv is None:
            commands += [
                f"mmret datasets {name} --output {output}/data/{name} --seed {entry.get('seed', 0)} "
                f"--image-size {entry.get('image_size', 64)}"
                for name in DATASETS
            ]
        else:
            commands.append(display(argv))
        marker = output / MARKERS / f"{stage.name}.json"
        done = read_marker(marker).get("fingerprint") == fingerprints[stage.name] and all(
            (output / path).is_file() for path in stage_outputs(stage)
        )
        head = f"[{number}/{len(STAGES)}] {stage.title}"
        if done:
            print(f"{head}: done before, reusing {output / stage_product(stage)}", flush=True)
            reused += 1
            continue
        print(f"{head}{expected(entry.get('seconds'))}", flush=True)
        for command in commands[-1:] if argv is not None else commands[-len(DATASETS) :]:
            print(f"{INDENT}{command}", flush=True)
        stage_started = time.monotonic()
        prepare(output, stage, fingerprints[stage.name])
        try:
            with stage_output():
                if argv is None:
                    build_datasets(output, entry)
                else:
                    run_command(argv)
        except UsageError as err:
            raise UsageError(f"stage {number}/{len(STAGES)} ({stage.title}): {err}") from None
        seconds = time.monotonic() - stage_started
        write_text_atomic(
            marker,
            json.dumps(
                {
                    "fingerprint": fingerprints[stage.name],
                    "seconds": round(seconds, 1),
                    "command": commands[-1],
                },
                indent=2,
            )
            + "\n",
        )
        print(f"{INDENT}done in {format_seconds(seconds)}", flush=True)

    table = demo_table(*(json.loads((output / RESULTS[name]).read_text()) for name in RESULTS))
    path = write_demo_report(output, table, commands, quick, PICTURES)
    print()
    print(table)
    print(
        f"wrote {path} (with the pictures beside it); {len(STAGES) - reused} stages run, {reused} reused, "
        f"{format_seconds(time.monotonic() - started)} in all"
    )
    return 0


def prepare(output: Path, stage: Stage, stage_fingerprint: str) -> None:
    """Before a training stage runs: a run directory left by other settings is removed (else `fit` would
    resume it); one left by an interrupted run of the same settings is kept, and `fit` resumes it."""
    if stage.name not in RUN_DIRS:
        return
    started = output / MARKERS / f"{stage.name}.started"
    run_dir = output / RUN_DIRS[stage.name]
    if run_dir.exists() and read_marker(started).get("fingerprint") != stage_fingerprint:
        shutil.rmtree(run_dir)
    write_text_atomic(started, json.dumps({"fingerprint": stage_fingerprint}) + "\n")
