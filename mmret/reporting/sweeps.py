"""Expand a sweep (a base experiment x a grid x seeds) into one SLURM job array and submit it (`mmret sweep`).

    mmret sweep experiments/sweeps/digits_loss_batch.yaml --dry-run    # print the sbatch command and the points
    mmret sweep experiments/sweeps/digits_loss_batch.yaml              # write the run directories, submit

A sweep file:

    name: digits_loss_batch                      # W&B group and directory name
    experiment: experiments/digits_clip.yaml     # the base LightningCLI config
    overrides: {trainer.max_epochs: 5}           # the same for every point (optional)
    grid:                                        # every combination is a point
      model.init_args.loss: [infonce, siglip]
      data.init_args.batch_size: [32, 128]
    seeds: [0, 1]                                # each point once per seed (seed_everything)
    seed_key: [seed_everything, data.init_args.seed]   # optional: the config key(s) a seed sets
    max_parallel: 4                              # the array's `%` limit
    runs_root: runs/sweeps                       # run dirs: RUNS_ROOT/NAME/<loss=infonce,batch_size=32>/seed0
    wandb_project: mmret                         # optional: one W&B run per point, grouped by NAME
    eval: {data: data/digits, split: test}       # optional: `mmret eval` each point into RUN_DIR/results.json
    sbatch: [--time=02:00:00, --gpus-per-node=1] # optional: extra sbatch options (resources, partition)

Each point gets its run directory up front with `sweep_args` (the `mmret fit` arguments, NUL-separated);
`RUNS_ROOT/NAME/run_dirs.txt` lists the directories in array-index order, which is all slurm/train.sbatch
needs to find its point (`--sweep RUN_DIRS`). A point is tagged in W&B with its varied values (`loss=infonce`).
Submitting the same sweep again submits it again: finished points are no-ops (their `last.ckpt` is at the end),
interrupted ones resume.

Before anything is written (and in a dry run), `mmret sweep` parses what the points would run with the parser
of `mmret fit` (`Sweep.checks()`: the experiment with the overrides and each seed, each grid value on its own,
then every point), so a key the experiment does not have or a value of the wrong type is refused in one line
instead of failing in every array task. `written_point_files` undoes its writes when the submission fails.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmret.errors import UsageError
from mmret.io import atomic_file, write_text_atomic
from mmret.resources import resolve_shipped, shipped_path

SBATCH_SCRIPT = "slurm/train.sbatch"  # a shipped file (mmret.resources)
_KEYS = {
    "name",
    "experiment",
    "overrides",
    "grid",
    "seeds",
    "seed_key",
    "max_parallel",
    "runs_root",
    "wandb_project",
    "eval",
    "sbatch",
}


@dataclass
class Point:
    """One run of the sweep: its varied values, seed and run directory."""

    values: dict[str, object]
    seed: int | None
    run_dir: Path
    args: list[str]

    @property
    def label_without_seed(self) -> str:
        """`loss=infonce,batch_size=32`: the last component of each varied key and its value."""
        return ",".join(f"{key.rsplit('.', 1)[-1]}={_text(value)}" for key, value in self.values.items())

    @property
    def label(self) -> str:
        seed = f"seed{self.seed}" if self.seed is not None else ""
        return ",".join(x for x in (self.label_without_seed, seed) if x)

    @property
    def tags(self) -> list[str]:
        return [f"{key.rsplit('.', 1)[-1]}={_text(value)}" for key, value in self.values.items()] + (
            [f"seed={self.seed}"] if self.seed is not None else []
        )


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    experiment: Path
    grid: dict[str, list]
    overrides: dict[str, object] = field(default_factory=dict)
    seeds: list[int | None] = field(default_factory=lambda: [None])
    seed_key: str | list[str] = "seed_everything"
    max_parallel: int = 4
    runs_root: Path = Path("runs/sweeps")
    wandb_project: str | None = None
    eval: dict | None = None
    sbatch: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.runs_root / self.name

    def points(self) -> list[Point]:
        """Every grid combination x seed, in a fixed order (the array index)."""
        keys = list(self.grid)
        points = []
        for combo in itertools.product(*(self.grid[key] for key in keys)):
            values = dict(zip(keys, combo))
            for seed in self.seeds:
                run_dir = self.directory / (
                    ",".join(f"{k.rsplit('.', 1)[-1]}={_text(v)}" for k, v in values.items()) or "base"
                )
                run_dir = run_dir / f"seed{seed}" if seed is not None else run_dir
                point = Point(values=values, seed=seed, run_dir=run_dir, args=[])
                point.args = self._fit_args(point)
                points.append(point)
        return points

    def checks(self) -> Iterator[tuple[str, list[str]]]:
        """(what, `mmret fit` arguments) to parse before anything is written, most specific culprit first:
        the experiment with the overrides (and each seed), each grid value alone, then every point."""
        directory = self.directory / "base"
        for seed in self.seeds:
            what = "the experiment with `overrides`" + (f" and seed {seed}" if seed is not None else "")
            yield what, self._fit_args(Point(values={}, seed=seed, run_dir=directory, args=[]))
        for key, values in self.grid.items():
            for value in values:
                point = Point(values={key: value}, seed=self.seeds[0], run_dir=directory, args=[])
                yield f"grid key {key} = {_text(value)}", self._fit_args(point)
        for point in self.points():
            yield f"point {point.label}", point.args

    def _fit_args(self, point: Point) -> list[str]:
        args = ["-c", str(self.experiment)]
        for key, value in {**self.overrides, **point.values}.items():
            args += [f"--{key}", _text(value)]
        if point.seed is not None:
            for key in [self.seed_key] if isinstance(self.seed_key, str) else self.seed_key:
                args += [f"--{key}", str(point.seed)]
        args += ["--run_dir", str(point.run_dir)]
        if self.wandb_project:
            args += [
                "--wandb_project",
                self.wandb_project,
                "--wandb_group",
                self.name,
                "--wandb_name",
                f"{self.name}/{point.label}",
                "--wandb_tags",
                _text(point.tags),
            ]
        return args

    def sbatch_command(self, script: Path | None = None) -> list[str]:
        script = script or shipped_path(SBATCH_SCRIPT)
        count = len(self.points())
        command = [
            "sbatch",
            f"--array=0-{count - 1}%{self.max_parallel}",
            f"--job-name={self.name}",
            f"--output={self.directory}/slurm-%A_%a.out",
        ]
        if self.eval:
            export = (
                f"ALL,MMRET_EVAL_DATA={self.eval['data']},MMRET_EVAL_SPLIT={self.eval.get('split', 'test')}"
            )
            command.append(f"--export={export}")
        return [*command, *self.sbatch, str(script), "--sweep", str(self.directory / "run_dirs.txt")]


def _text(value) -> str:
    """A value as LightningCLI reads it on the command line (lists and mappings as YAML flow)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def load_sweep(path: Path) -> Sweep:
    """Reads and checks a sweep file (see the module docstring)."""
    path = resolve_shipped(path)
    if not path.is_file():
        raise UsageError(f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"sweep file {path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(raw, dict):
        raise UsageError(f"sweep file {path} must be a mapping with `name`, `experiment` and `grid`")
    unknown = set(raw) - _KEYS
    if unknown:
        raise UsageError(
            f"sweep file {path}: unknown keys {sorted(unknown)}; expected some of {sorted(_KEYS)}"
        )
    for key in ("name", "experiment", "grid"):
        if key not in raw:
            raise UsageError(f"sweep file {path} needs `{key}`")
    grid = raw["grid"]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UsageError(f"sweep file {path}: `grid` must map each config key to a non-empty list of values")
    experiment = resolve_shipped(raw["experiment"])
    if not experiment.is_file():
        raise UsageError(f"sweep file {path}: experiment {experiment} does not exist")
    seeds = raw.get("seeds", [None])
    if not isinstance(seeds, list) or not seeds:
        raise UsageError(f"sweep file {path}: `seeds` must be a non-empty list of integers")
    seed_key = raw.get("seed_key", "seed_everything")
    if not (
        isinstance(seed_key, str)
        or (isinstance(seed_key, list) and seed_key and all(isinstance(k, str) for k in seed_key))
    ):
        raise UsageError(f"sweep file {path}: `seed_key` must be a config key or a non-empty list of them")
    max_parallel = int(raw.get("max_parallel", 4))
    if max_parallel < 1:
        raise UsageError(f"sweep file {path}: `max_parallel` must be at least 1, got {max_parallel}")
    if raw.get("eval") is not None and "data" not in raw["eval"]:
        raise UsageError(f"sweep file {path}: `eval` needs `data` (a dataset root or shard directory)")
    return Sweep(
        name=str(raw["name"]),
        experiment=experiment,
        grid=grid,
        overrides=raw.get("overrides") or {},
        seeds=seeds,
        seed_key=seed_key,
        max_parallel=max_parallel,
        runs_root=Path(raw.get("runs_root", "runs/sweeps")),
        wandb_project=raw.get("wandb_project"),
        eval=raw.get("eval"),
        sbatch=[str(x) for x in raw.get("sbatch") or []],
    )


def write_point_files(sweep: Sweep) -> Path:
    """Creates each point's run directory with its `sweep_args`, and the array-ordered `run_dirs.txt`."""
    points = sweep.points()
    for point in points:
        point.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(point.run_dir / "sweep_args", binary=True) as handle:
            handle.write(b"".join(arg.encode() + b"\0" for arg in point.args))
    return write_text_atomic(
        sweep.directory / "run_dirs.txt", "".join(f"{point.run_dir}\n" for point in points)
    )


@contextmanager
def written_point_files(sweep: Sweep) -> Iterator[Path]:
    """`write_point_files`, undone when the block raises (a submission that failed): files it created are
    removed, files it replaced get their old contents back, folders it created are removed when empty."""
    paths = [point.run_dir / "sweep_args" for point in sweep.points()] + [sweep.directory / "run_dirs.txt"]
    previous = {path: path.read_bytes() if path.is_file() else None for path in paths}
    new_dirs: list[Path] = []
    for directory in dict.fromkeys(path.parent for path in paths):
        while not directory.exists() and directory not in new_dirs:
            new_dirs.append(directory)
            directory = directory.parent
    try:
        yield write_point_files(sweep)
    except BaseException:
        for path, content in previous.items():
            if content is None:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.read_bytes() != content:
                with atomic_file(path, binary=True) as handle:
                    handle.write(content)
        for directory in sorted(new_dirs, key=lambda d: len(d.parts), reverse=True):  # deepest first
            with suppress(OSError):  # not empty: something else wrote there meanwhile
                os.rmdir(directory)
        raise
