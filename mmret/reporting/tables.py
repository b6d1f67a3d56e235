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

Relative paths are resolved against the working directory. Given results files on the command line instead of a
spec, files whose paths differ only in a `seed<N>` directory form one row; the columns are `--metrics` (default:
recall@1/5 in both directions, and acc1 when every file has it).

A value is the mean over a row's files; with two or more files it is shown as mean ± sample standard deviation.
The best mean of each column (after rounding to the shown decimals; ties all win) is bold. A missing file or
metric is an error that names the row, the file and the metric.
"""

from __future__ import annotations

import glob
import json
import math
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
_SEED_PART = re.compile(r"seed[-_=]?\d+")


@dataclass
class Column:
    """One column: a metric of the results JSON (under `source`), shown as `name`."""

    name: str
    metric: str
    source: str = "metrics"
    higher_is_better: bool = True


@dataclass
class Row:
    """One row: the results files of its seeds, and the results section to read (None: each column's)."""

    name: str
    files: list[Path]
    source: str | None = None


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
    """The aggregated value of one row and column over seeds (already scaled)."""

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
    patterns = entry["results"] if isinstance(entry["results"], list) else [entry["results"]]
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern)))
        if not matches:
            raise UsageError(f"table spec {path}: row {name!r}: no results file matches {pattern}")
        files.extend(Path(m) for m in matches)
    return Row(name=name, files=files, source=source)


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


def spec_from_files(files: list[Path], metrics: list[str] | None) -> TableSpec:
    """A spec for results files given directly: files that differ only in a `seed<N>` directory share a row."""
    rows: dict[str, list[Path]] = {}
    for file in files:
        if not file.is_file():
            raise UsageError(f"results file {file} does not exist")
        parts = [p for p in file.parent.parts if not _SEED_PART.fullmatch(p)]
        rows.setdefault(str(Path(*parts)) if parts else file.stem, []).append(file)
    names = _short_names(list(rows))
    if metrics:
        columns = [_column_from_name(m) for m in metrics]
    else:
        columns = [Column(name=_short_metric(m), metric=m) for m in DEFAULT_METRICS]
        if all("acc1" in _read_results(f).get("metrics", {}) for f in files):
            columns.append(Column(name="acc1", metric="acc1"))
    return TableSpec(rows=[Row(name=n, files=f) for n, f in zip(names, rows.values())], columns=columns)


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


def table_cells(spec: TableSpec) -> list[list[Cell]]:
    """Mean and std over each row's files, scaled, with the best of each column marked bold."""
    cache: dict[Path, dict] = {}
    cells: list[list[Cell]] = []
    for row in spec.rows:
        line = []
        for column in spec.columns:
            values = []
            source = row.source or column.source
            for file in row.files:
                results = cache.setdefault(file, _read_results(file))
                metrics = results.get(source) or {}
                if column.metric not in metrics:
                    raise UsageError(
                        f"row {row.name!r}: {file} has no {source}[{column.metric!r}] "
                        f"(it has: {', '.join(sorted(metrics)[:12]) or 'nothing'})"
                    )
                values.append(float(metrics[column.metric]) * spec.scale)
            std = statistics.stdev(values) if len(values) > 1 else None
            line.append(Cell(mean=statistics.fmean(values), std=std, count=len(values)))
        cells.append(line)
    for j, column in enumerate(spec.columns):
        shown = [round(line[j].mean, spec.decimals) for line in cells if math.isfinite(line[j].mean)]
        if not shown:
            continue
        best = max(shown) if column.higher_is_better else min(shown)
        for line in cells:
            line[j].bold = round(line[j].mean, spec.decimals) == best
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


def _seed_note(cells: list[list[Cell]]) -> str:
    counts = sorted({cell.count for line in cells for cell in line})
    if counts == [1]:
        return ""
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"mean ± std over {seeds} seeds"


def _number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _markdown(spec: TableSpec, cells: list[list[Cell]]) -> str:
    def text(cell: Cell) -> str:
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
    note = _seed_note(cells)
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
        value = _number(cell.mean, spec.decimals)
        if cell.std is not None:
            value += rf" $\pm$ {_number(cell.std, spec.decimals)}"
        return rf"\textbf{{{value}}}" if cell.bold else value

    lines = [r"\begin{table}[t]", r"\centering"]
    caption = " ".join(
        x for x in (spec.title, _seed_note(cells) and f"({_seed_note(cells)}; best in bold)") if x
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
