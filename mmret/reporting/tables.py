"""Paper tables from results files (`mmret table`): rows x columns, mean ± std over seeds, best per column bold.

    mmret table experiments/tables/digits_loss_batch.yaml                 # markdown on stdout
    mmret table experiments/tables/digits_loss_batch.yaml --format latex --output paper/table1.tex
    mmret table runs/a/seed0/results.json runs/a/seed1/results.json runs/b/seed0/results.json

A table spec (YAML) names its rows and columns; each row is one or more results files (glob patterns, one file
per seed) written by `mmret eval`, or the points of a sweep (`sweep:`), whose run directories hold
`results.json`:

    title: Loss x batch size on digits
    label: tab:digits_loss_batch              # LaTeX label (optional)
    scale: 100                                # every number is multiplied by this (percent), default 100
    decimals: 1
    columns:
      - {name: "T->I R@1", metric: image_retrieval_recall@1}
      - {name: "+rerank R@1", metric: image_retrieval_recall@1, source: reranked_metrics}
      - {name: "acc1", metric: acc1, higher_is_better: true}
    rows:
      - {name: InfoNCE, results: "runs/sweeps/x/loss=infonce/seed*/results.json"}
      - {name: SigLIP, results: ["runs/a/results.json", "runs/b/results.json"]}
      - {name: SigLIP + rerank, results: "runs/b/results.json", source: reranked_metrics}
    # or, instead of rows: `sweep: experiments/sweeps/x.yaml` (one row per grid point, seeds averaged)

A row's `source` replaces the columns' for that row: the same results files can be shown once as the first
stage (`metrics`) and once reranked (`reranked_metrics`), as rows of one table.

A row averages runs that differ by seed alone. Each results file has an identity (`IDENTITY_KEYS`):
- `path`: the file's path without its `seed<N>` directories,
- `data`: the evaluated shard set (`data` of the results JSON),
- `task`: `retrieval`, `zeroshot`, ... (`task`),
- `model`: the model and how it was evaluated (`config`: checkpoint hyperparameters, reranker, split, templates,
  fusion; and `top_k`), with seed values and `seed<N>` parts of paths ignored, and the evaluation's batch size,
  device and workers left out.
A spec row whose files differ in `data`, `task` or `model` is refused (one line naming both files) unless the
row names what it averages over: `average_over: [data]` (any of data, task, model).

Relative paths are resolved against the working directory. Given results files on the command line instead of a
spec, the rows are grouped by every identity key: files share a row only when they differ by seed alone (a
digits zero-shot result and a shapes retrieval result never do, even in one folder). `--group-by KEY...` names
the grouping instead (e.g. `--group-by model`: one row per model, averaged over data sets and tasks). The
columns are `--metrics` (default: recall@1/5 in both directions and acc1, each when some file has it; a row
without a default metric shows `–` there).

A value is the mean over a row's files; with two or more files it is shown as mean ± sample standard deviation.
The best mean of each column (after rounding to the shown decimals; ties all win) is bold. A missing file or
metric is an error that names the row, the file and the metric.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmret.errors import UsageError

FORMATS = ("markdown", "latex")
DEFAULT_METRICS = (
    "image_retrieval_recall@1",
    "image_retrieval_recall@5",
    "text_retrieval_recall@1",
    "text_retrieval_recall@5",
)
SOURCES = ("metrics", "reranked_metrics")
# What a results file is a result of; a row averages files that agree on all of them unless told otherwise.
IDENTITY_KEYS = ("path", "data", "task", "model")
_MIXABLE = ("data", "task", "model")
_SEED_PART = re.compile(r"seed[-_=]?\d+")
# Evaluation options that do not change what was measured (left out of the `model` identity).
_EVAL_RUNTIME = ("batch_size", "device", "num_workers", "reranker")
MISSING = "–"


@dataclass
class Column:
    """One column: a metric of the results JSON (under `source`), shown as `name`."""

    name: str
    metric: str
    source: str = "metrics"
    higher_is_better: bool = True
    optional: bool = False  # a row none of whose files has the metric shows MISSING (default columns)


@dataclass
class Row:
    """One row: the results files of its seeds, and the results section to read (None: each column's).

    `average_over`: identity keys (`data`, `task`, `model`) in which the row's files may differ; they must
    agree on the others.
    """

    name: str
    files: list[Path]
    source: str | None = None
    average_over: frozenset[str] = frozenset()


@dataclass
class TableSpec:
    """A whole table: what to read, and how to show it."""

    rows: list[Row]
    columns: list[Column]
    title: str | None = None
    label: str | None = None
    scale: float = 100.0
    decimals: int = 1


@dataclass
class Cell:
    """The aggregated value of one row and column over seeds (already scaled); count 0: no value (MISSING)."""

    mean: float
    std: float | None
    count: int
    bold: bool = field(default=False)


# ---------------------------------------------------------------------------------------------------------- specs


def load_table_spec(path: Path) -> TableSpec:
    """Reads a table spec YAML (see the module docstring); relative globs are taken from the working directory."""
    if not path.is_file():
        raise UsageError(f"table spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"table spec {path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(raw, dict):
        raise UsageError(f"table spec {path} must be a mapping with `columns` and `rows` (or `sweep`)")
    unknown = set(raw) - {"title", "label", "scale", "decimals", "columns", "rows", "sweep"}
    if unknown:
        raise UsageError(f"table spec {path}: unknown keys {sorted(unknown)}")
    columns = [_column(entry, path, i) for i, entry in enumerate(raw.get("columns") or [])]
    if not columns:
        raise UsageError(f"table spec {path} has no `columns`")
    if ("rows" in raw) == ("sweep" in raw):
        raise UsageError(f"table spec {path} needs exactly one of `rows` or `sweep`")
    if "sweep" in raw:
        rows = rows_from_sweep(Path(raw["sweep"]))
    else:
        rows = [_row(entry, path, i) for i, entry in enumerate(raw["rows"] or [])]
    if not rows:
        raise UsageError(f"table spec {path} has no rows")
    return TableSpec(
        rows=rows,
        columns=columns,
        title=raw.get("title"),
        label=raw.get("label"),
        scale=float(raw.get("scale", 100.0)),
        decimals=int(raw.get("decimals", 1)),
    )


def _column(entry, path: Path, index: int) -> Column:
    if isinstance(entry, str):
        entry = {"metric": entry}
    if not isinstance(entry, dict) or "metric" not in entry:
        raise UsageError(f"table spec {path}: column {index + 1} needs a `metric`")
    source = entry.get("source", "metrics")
    if source not in SOURCES:
        raise UsageError(
            f"table spec {path}: column {index + 1} has source {source!r}; expected one of {SOURCES}"
        )
    return Column(
        name=str(entry.get("name", entry["metric"])),
        metric=str(entry["metric"]),
        source=source,
        higher_is_better=bool(entry.get("higher_is_better", True)),
    )


def _row(entry, path: Path, index: int) -> Row:
    if not isinstance(entry, dict) or "results" not in entry:
        raise UsageError(f"table spec {path}: row {index + 1} needs `results` (a glob or a list of them)")
    name = str(entry.get("name", f"row {index + 1}"))
    source = entry.get("source")
    if source is not None and source not in SOURCES:
        raise UsageError(f"table spec {path}: row {name!r} has source {source!r}; expected one of {SOURCES}")
    average_over = entry.get("average_over") or []
    if isinstance(average_over, str):
        average_over = [average_over]
    if not isinstance(average_over, list) or set(average_over) - set(_MIXABLE):
        raise UsageError(
            f"table spec {path}: row {name!r} has average_over {entry['average_over']!r}; "
            f"expected a list of {', '.join(_MIXABLE)}"
        )
    patterns = entry["results"] if isinstance(entry["results"], list) else [entry["results"]]
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern)))
        if not matches:
            raise UsageError(f"table spec {path}: row {name!r}: no results file matches {pattern}")
        files.extend(Path(m) for m in matches)
    return Row(name=name, files=files, source=source, average_over=frozenset(average_over))


def rows_from_sweep(sweep_path: Path) -> list[Row]:
    """One row per grid point of a sweep, its seeds' `RUN_DIR/results.json` averaged."""
    from mmret.reporting.sweeps import load_sweep

    sweep = load_sweep(sweep_path)
    rows: dict[str, list[Path]] = {}
    for point in sweep.points():
        results = point.run_dir / "results.json"
        if not results.is_file():
            raise UsageError(
                f"sweep {sweep.name}: point {point.label} has no results yet ({results} is missing)"
            )
        rows.setdefault(point.label_without_seed or sweep.name, []).append(results)
    return [Row(name=name, files=files) for name, files in rows.items()]


def spec_from_files(
    files: list[Path], metrics: list[str] | None, group_by: list[str] | None = None
) -> TableSpec:
    """A spec for results files given directly: one row per distinct identity (`IDENTITY_KEYS`), so files
    share a row only when they differ by seed alone; `group_by` (a subset of IDENTITY_KEYS) groups by those
    keys only, averaging over the others."""
    keys = list(IDENTITY_KEYS) if group_by is None else list(dict.fromkeys(group_by))
    unknown = [key for key in keys if key not in IDENTITY_KEYS]
    if unknown or not keys:
        raise UsageError(
            f"--group-by {' '.join(unknown or keys) or '(nothing)'}: expected some of {', '.join(IDENTITY_KEYS)}"
        )
    for file in files:
        if not file.is_file():
            raise UsageError(f"results file {file} does not exist")
    identities = {
        file: result_identity(file, _read_results(file), len({f.name for f in files}) > 1) for file in files
    }
    rows: dict[str, list[Path]] = {}
    for file in files:
        rows.setdefault(_canonical([identities[file][key] for key in keys]), []).append(file)
    groups = list(rows.values())
    names = _row_names([identities[group[0]] for group in groups], keys)
    average_over = frozenset(_MIXABLE) - set(keys)
    table_rows = [Row(name=n, files=g, average_over=average_over) for n, g in zip(names, groups)]
    if metrics:
        columns = [_column_from_name(m) for m in metrics]
    else:
        present = set().union(*(_read_results(f).get("metrics", {}) for f in files))
        columns = [
            Column(name=_short_metric(m), metric=m, optional=True)
            for m in (*DEFAULT_METRICS, "acc1")
            if m in present
        ]
        if not columns:
            raise UsageError(
                f"none of the default columns ({', '.join((*DEFAULT_METRICS, 'acc1'))}) is in these results "
                "files; name the columns with --metrics"
            )
    return TableSpec(rows=table_rows, columns=columns)


def result_identity(path: Path, results: dict, with_file_name: bool = True) -> dict[str, object]:
    """What a results file is a result of (`IDENTITY_KEYS`, see the module docstring), seeds left out.

    `with_file_name`: the `path` identity keeps the file's stem (False: its folder alone, when every file
    has the same name, e.g. `results.json`)."""
    parts = [p for p in path.parent.parts if not _SEED_PART.fullmatch(p)]
    if with_file_name or not parts:
        parts.append(path.stem)
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    evaluation = config.get("eval") if isinstance(config.get("eval"), dict) else {}
    model = {
        **{k: v for k, v in config.items() if k != "eval"},
        "eval": {k: v for k, v in evaluation.items() if k not in _EVAL_RUNTIME},
        "top_k": results.get("top_k"),
    }
    data = results.get("data")
    return {
        "path": str(Path(*parts)),
        "data": os.path.normpath(data) if isinstance(data, str) and data else data,
        "task": results.get("task"),
        "model": _without_seeds(model),
    }


def _without_seeds(value):
    """`value` with keys naming a seed dropped and `seed<N>` in strings replaced by `seed*`."""
    if isinstance(value, dict):
        return {str(k): _without_seeds(v) for k, v in value.items() if "seed" not in str(k).lower()}
    if isinstance(value, list | tuple):
        return [_without_seeds(v) for v in value]
    if isinstance(value, str):
        return _SEED_PART.sub("seed*", value)
    return value


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _leaves(value, prefix: str = "") -> dict[str, str]:
    """A nested identity as {dotted key: canonical value}."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: _canonical(value)}


def _differences(a, b) -> list[str]:
    """The dotted keys in which two identities differ."""
    left, right = _leaves(a), _leaves(b)
    return [key for key in dict.fromkeys([*left, *right]) if left.get(key) != right.get(key)]


def _row_names(identities: list[dict], keys: list[str]) -> list[str]:
    """Row names: the path (without the prefix every row shares) when grouped by it, else the grouped data set
    and task; then, among rows whose names would be equal, what tells them apart
    (`run [data/shapes/test, retrieval, loss=siglip]`)."""
    if "path" in keys:
        bases = _short_names([i["path"] for i in identities])
    else:  # the grouped data set and task, e.g. `data/digits/test, zeroshot`
        bases = [", ".join(str(i[k]) for k in keys if k in ("data", "task")) for i in identities]
    labels: list[list[str]] = [[] for _ in identities]
    for base in set(bases):
        members = [j for j, b in enumerate(bases) if b == base]
        if len(members) < 2:
            continue
        for key in (k for k in keys if k != "path"):
            leaves = [_leaves(identities[j][key]) for j in members]
            varying = [
                leaf
                for leaf in dict.fromkeys(x for one in leaves for x in one)
                if len({one.get(leaf) for one in leaves}) > 1
            ]
            for j, one in zip(members, leaves):
                for leaf in varying[:3]:
                    value = json.loads(one.get(leaf, "null"))
                    value = value if isinstance(value, str) else _canonical(value)
                    labels[j].append(
                        value if key in ("data", "task") else f"{leaf.rsplit('.', 1)[-1]}={value}"
                    )
    names = [
        f"{base} [{', '.join(label)}]" if base and label else base or ", ".join(label) or "all runs"
        for base, label in zip(bases, labels)
    ]
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[j] = f"{name} #{seen[name]}"
    return names


def _column_from_name(name: str) -> Column:
    source, _, metric = (
        name.rpartition(".") if name.startswith("reranked_metrics.") else ("metrics", "", name)
    )
    label = _short_metric(metric) + (" (reranked)" if source == "reranked_metrics" else "")
    return Column(name=label, metric=metric, source=source)


def _short_metric(metric: str) -> str:
    """`image_retrieval_recall@1` -> `T→I R@1` (text queries retrieve images), as in most retrieval papers."""
    short = metric.replace("image_retrieval_", "T→I ").replace("text_retrieval_", "I→T ")
    return short.replace("recall@", "R@").replace("mrr@", "MRR@").replace("ndcg@", "NDCG@")


def _short_names(paths: list[str]) -> list[str]:
    """Row names without the directory prefix that every row shares."""
    if len(paths) < 2:
        return [Path(p).name or p for p in paths]
    split = [Path(p).parts for p in paths]
    common = 0
    while all(len(s) > common + 1 for s in split) and len({s[common] for s in split}) == 1:
        common += 1
    return [str(Path(*s[common:])) for s in split]


# ------------------------------------------------------------------------------------------------------ aggregate


def _read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"results file {path} cannot be read as JSON: {err}") from err
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise UsageError(f"results file {path} has no `metrics` mapping; is it written by `mmret eval`?")
    return results


def check_rows(spec: TableSpec, cache: dict[Path, dict] | None = None) -> None:
    """Every row averages runs that differ by seed alone, or only in what its `average_over` names.

    Raises:
        UsageError: a row mixes data sets, tasks or models (naming the row, two files and what differs).
    """
    cache = {} if cache is None else cache
    for row in spec.rows:
        if len(row.files) < 2:
            continue
        first = row.files[0]
        reference = result_identity(first, cache.setdefault(first, _read_results(first)))
        for file in row.files[1:]:
            identity = result_identity(file, cache.setdefault(file, _read_results(file)))
            for key in _MIXABLE:
                if key in row.average_over or identity[key] == reference[key]:
                    continue
                if key == "model":
                    what = "models (" + ", ".join(_differences(reference[key], identity[key])[:3]) + ")"
                else:
                    what = (
                        f"{'data sets' if key == 'data' else 'tasks'} ({reference[key]} and {identity[key]})"
                    )
                raise UsageError(
                    f"row {row.name!r} mixes {what}: {first} and {file}; a row averages runs that differ by "
                    f"seed alone: give them separate rows, or name the grouping (`average_over: [{key}]` in a "
                    f"table spec, `--group-by` for results files)"
                )


def table_cells(spec: TableSpec) -> list[list[Cell]]:
    """Mean and std over each row's files, scaled, with the best of each column marked bold."""
    cache: dict[Path, dict] = {}
    check_rows(spec, cache)
    cells: list[list[Cell]] = []
    for row in spec.rows:
        line = []
        for column in spec.columns:
            values = []
            source = row.source or column.source
            missing = []
            for file in row.files:
                metrics = cache.setdefault(file, _read_results(file)).get(source) or {}
                if column.metric not in metrics:
                    missing.append((file, metrics))
                    continue
                try:
                    value = float(metrics[column.metric])
                except (TypeError, ValueError):
                    raise UsageError(
                        f"row {row.name!r}: {file} has {source}[{column.metric!r}] = "
                        f"{metrics[column.metric]!r}; expected a number"
                    ) from None
                values.append(value * spec.scale)
            if missing and (values or not column.optional):
                file, metrics = missing[0]
                raise UsageError(
                    f"row {row.name!r}: {file} has no {source}[{column.metric!r}] "
                    f"(it has: {', '.join(sorted(metrics)[:12]) or 'nothing'})"
                )
            if not values:
                line.append(Cell(mean=math.nan, std=None, count=0))
                continue
            std = statistics.stdev(values) if len(values) > 1 else None
            line.append(Cell(mean=statistics.fmean(values), std=std, count=len(values)))
        cells.append(line)
    for j, column in enumerate(spec.columns):
        shown = [round(line[j].mean, spec.decimals) for line in cells if math.isfinite(line[j].mean)]
        if not shown:
            continue
        best = max(shown) if column.higher_is_better else min(shown)
        for line in cells:
            line[j].bold = line[j].count > 0 and round(line[j].mean, spec.decimals) == best
    return cells


# --------------------------------------------------------------------------------------------------------- render


def render(spec: TableSpec, fmt: str) -> str:
    """The table as markdown or LaTeX text (ending in a newline)."""
    cells = table_cells(spec)
    if fmt == "markdown":
        return _markdown(spec, cells)
    if fmt == "latex":
        return _latex(spec, cells)
    raise UsageError(f"unknown table format {fmt!r}; expected one of {FORMATS}")


def _seed_note(spec: TableSpec, cells: list[list[Cell]]) -> str:
    counts = sorted({cell.count for line in cells for cell in line if cell.count})
    if counts in ([], [1]):
        return ""
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    runs = "runs" if any(row.average_over and len(row.files) > 1 for row in spec.rows) else "seeds"
    return f"mean ± std over {seeds} {runs}"


def _number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _markdown(spec: TableSpec, cells: list[list[Cell]]) -> str:
    def text(cell: Cell) -> str:
        if not cell.count:
            return MISSING
        value = _number(cell.mean, spec.decimals)
        if cell.std is not None:
            value += f" ± {_number(cell.std, spec.decimals)}"
        return f"**{value}**" if cell.bold else value

    header = ["", *[c.name for c in spec.columns]]
    lines = []
    if spec.title:
        lines += [f"**{spec.title}**", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| --- |" + " ---: |" * len(spec.columns))
    for row, line in zip(spec.rows, cells):
        lines.append("| " + " | ".join([row.name.replace("|", "\\|"), *map(text, line)]) + " |")
    note = _seed_note(spec, cells)
    if note:
        lines += ["", f"_{note}; best per column in bold._"]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "→": r"$\rightarrow$",
    "±": r"$\pm$",
}


def latex_escape(text: str) -> str:
    """Escapes LaTeX's special characters (and writes → and ± as math)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex(spec: TableSpec, cells: list[list[Cell]]) -> str:
    def text(cell: Cell) -> str:
        if not cell.count:
            return "--"
        value = _number(cell.mean, spec.decimals)
        if cell.std is not None:
            value += rf" $\pm$ {_number(cell.std, spec.decimals)}"
        return rf"\textbf{{{value}}}" if cell.bold else value

    lines = [r"\begin{table}[t]", r"\centering"]
    caption = " ".join(
        x for x in (spec.title, _seed_note(spec, cells) and f"({_seed_note(spec, cells)}; best in bold)") if x
    )
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if spec.label:
        lines.append(rf"\label{{{spec.label}}}")
    lines.append(r"\begin{tabular}{l" + "r" * len(spec.columns) + "}")
    lines.append(r"\toprule")
    lines.append(" & ".join(["", *[latex_escape(c.name) for c in spec.columns]]) + r" \\")
    lines.append(r"\midrule")
    for row, line in zip(spec.rows, cells):
        lines.append(" & ".join([latex_escape(row.name), *map(text, line)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
