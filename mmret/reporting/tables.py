"""Paper tables from results files (`mmret table`): rows x columns, mean ± std over seeds, best per data set bold.

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
- `protocol`: how the retrieval metrics were computed (`mmret` or `clip_benchmark`, the results' `protocol`; a
  file without one was written before it existed, under `mmret`).
A spec row whose files differ in `data`, `task` or `model` is refused (one line naming both files) unless the
row names what it averages over: `average_over: [data]` (any of data, task, model). Numbers of two protocols
are never averaged (a row mixing them is refused), and never stand in one column unless the rows are grouped
apart: each row of the spec names its protocol (`protocol: clip_benchmark`, checked against its files), or,
for results files given directly, the grouping keeps `protocol` (the default); rows are then named with their
protocol and bold compares rows of the same protocol only.

Relative paths are resolved against the working directory. Given results files on the command line instead of a
spec, the rows are grouped by every identity key: files share a row only when they differ by seed alone (a
digits zero-shot result and a shapes retrieval result never do, even in one folder). `--group-by KEY...` names
the grouping instead (e.g. `--group-by model`: one row per model, averaged over data sets and tasks). The
columns are `--metrics` (default: recall@1/5 in both directions and acc1, each when some file has it; a row
without a default metric shows `–` there).

A value is the mean over a row's files; with two or more files it is shown as mean ± sample standard deviation.
Bold marks the best mean of a column (after rounding to the shown decimals; ties all win) among the rows of the
same data set (the results' `data`; a row averaged over several data sets is compared with rows of the same
ones): numbers of different data sets are not comparable. A column with fewer than two values of a data set
has nothing to compare there and no bold, so neither has a one-row table. A missing file or metric is an error
that names the row, the file and the metric; a reranked column (`reranked_metrics`) shows `–` for a row whose
results files were all evaluated without a reranker (they have no `reranked_metrics`), so first-stage-only
results mix with reranked ones.
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
IDENTITY_KEYS = ("path", "data", "task", "model", "protocol")
_MIXABLE = ("data", "task", "model")
_SEED_PART = re.compile(r"seed[-_=]?\d+")
# Evaluation options that do not change what was measured (left out of the `model` identity).
_EVAL_RUNTIME = ("batch_size", "device", "num_workers", "reranker")
DEFAULT_PROTOCOL = "mmret"  # what a results file without a "protocol" was evaluated under
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
    agree on the others. `protocol`: the evaluation protocol the row declares (None: not declared); rows of
    different protocols share a table only when each declares its own.
    """

    name: str
    files: list[Path]
    source: str | None = None
    average_over: frozenset[str] = frozenset()
    protocol: str | None = None


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
    protocol = entry.get("protocol")
    if protocol is not None and not isinstance(protocol, str):
        raise UsageError(f"table spec {path}: row {name!r} has protocol {protocol!r}; expected mmret, ...")
    patterns = entry["results"] if isinstance(entry["results"], list) else [entry["results"]]
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern)))
        if not matches:
            raise UsageError(f"table spec {path}: row {name!r}: no results file matches {pattern}")
        files.extend(Path(m) for m in matches)
    return Row(name=name, files=files, source=source, average_over=frozenset(average_over), protocol=protocol)


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
    protocols = [identities[group[0]]["protocol"] if "protocol" in keys else None for group in groups]
    table_rows = [
        Row(name=n, files=g, average_over=average_over, protocol=p)
        for n, g, p in zip(names, groups, protocols)
    ]
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
        # the protocol is an identity key of its own (not one of the model's, so `average_over` never mixes it)
        "eval": {k: v for k, v in evaluation.items() if k not in (*_EVAL_RUNTIME, "protocol")},
        "top_k": results.get("top_k"),
    }
    data = results.get("data")
    return {
        "path": str(Path(*parts)),
        "data": os.path.normpath(data) if isinstance(data, str) and data else data,
        "task": results.get("task"),
        "model": _without_seeds(model),
        "protocol": results.get("protocol") or DEFAULT_PROTOCOL,
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
        for key in (k for k in keys if k not in ("path", "protocol")):  # protocols: below, on every row
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
    # rows grouped apart by protocol say which is which
    if "protocol" in keys and len({i["protocol"] for i in identities}) > 1:
        for label, identity in zip(labels, identities):
            label.append(f"{identity['protocol']} protocol")
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
    """Every row averages runs that differ by seed alone, or only in what its `average_over` names; never
    runs of two protocols, and a column holds two protocols only when every row declares its own.

    Raises:
        UsageError: a row mixes data sets, tasks, models or protocols (naming the row, two files and what
            differs), or a column would mix protocols of rows that do not say theirs.
    """
    cache = {} if cache is None else cache
    check_protocols(spec, cache)
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


def row_protocols(spec: TableSpec, cache: dict[Path, dict] | None = None) -> list[str]:
    """The evaluation protocol of each row (that of its first file; `check_protocols` makes them agree)."""
    cache = {} if cache is None else cache
    return [
        result_identity(row.files[0], cache.setdefault(row.files[0], _read_results(row.files[0])))["protocol"]
        for row in spec.rows
    ]


def check_protocols(spec: TableSpec, cache: dict[Path, dict] | None = None) -> None:
    """No row averages two protocols; no column holds two unless every row declares its protocol.

    Raises:
        UsageError: in one line, naming the row(s), the files and the protocols.
    """
    cache = {} if cache is None else cache
    first_of_protocol: dict[str, tuple[str, Path]] = {}
    for row in spec.rows:
        protocols = {
            file: result_identity(file, cache.setdefault(file, _read_results(file)))["protocol"]
            for file in row.files
        }
        first, protocol = next(iter(protocols.items()))
        other = next((file for file, p in protocols.items() if p != protocol), None)
        if other is not None:
            raise UsageError(
                f"row {row.name!r} mixes protocols ({protocol} and {protocols[other]}): {first} and {other}; "
                "numbers of two protocols are never averaged: give them separate rows"
            )
        if row.protocol is not None and row.protocol != protocol:
            raise UsageError(
                f"row {row.name!r} declares protocol {row.protocol} but {first} was evaluated under {protocol}"
            )
        first_of_protocol.setdefault(protocol, (row.name, first))
    if len(first_of_protocol) > 1 and any(row.protocol is None for row in spec.rows):
        (name_a, file_a), (name_b, file_b) = list(first_of_protocol.values())[:2]
        protocol_a, protocol_b = list(first_of_protocol)[:2]
        raise UsageError(
            f"the table's columns would mix protocols: row {name_a!r} ({file_a}) is {protocol_a}, row "
            f"{name_b!r} ({file_b}) is {protocol_b}; group them apart: a `protocol:` on every row of the spec, "
            "or keep `protocol` in --group-by"
        )


def table_cells(spec: TableSpec) -> list[list[Cell]]:
    """Mean and std over each row's files, scaled, with the best of each column per data set marked bold."""
    cache: dict[Path, dict] = {}
    check_rows(spec, cache)
    cells = [[_cell(spec, row, column, cache) for column in spec.columns] for row in spec.rows]
    for j, column in enumerate(spec.columns):
        if all(line[j].count == 0 for line in cells) and not column.optional:
            raise UsageError(
                f"column {column.name!r}: no results file has {column.source}[{column.metric!r}] (none of them "
                f"has a {column.source} section; `reranked_metrics` come from `mmret eval --reranker`)"
            )
    # numbers compare within a data set and a protocol
    groups = [f"{d} {p}" for d, p in zip(row_data_sets(spec, cache), row_protocols(spec, cache))]
    for j, column in enumerate(spec.columns):
        for group in dict.fromkeys(groups):
            members = [
                line[j]
                for line, row_group in zip(cells, groups)
                if row_group == group and line[j].count > 0 and math.isfinite(line[j].mean)
            ]
            if len(members) < 2:  # nothing to compare with: no bold
                continue
            shown = [round(cell.mean, spec.decimals) for cell in members]
            best = max(shown) if column.higher_is_better else min(shown)
            for cell, value in zip(members, shown):
                cell.bold = value == best
    return cells


def _cell(spec: TableSpec, row: Row, column: Column, cache: dict[Path, dict]) -> Cell:
    """One row's value of one column over the row's files (count 0: MISSING)."""
    source = row.source or column.source
    values, missing = [], []
    without_reranker = 0  # files evaluated without a reranker: no reranked_metrics section at all
    for file in row.files:
        results = cache.setdefault(file, _read_results(file))
        if source == "reranked_metrics" and source not in results:
            without_reranker += 1
        metrics = results.get(source) or {}
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
    if without_reranker == len(row.files):  # a first-stage-only row in a reranked column
        return Cell(mean=math.nan, std=None, count=0)
    if missing and (values or not column.optional):
        file, metrics = missing[0]
        if source == "reranked_metrics" and source not in cache[file]:
            raise UsageError(
                f"row {row.name!r}: {file} has no {source} (evaluated without --reranker) but other files of "
                "the row have; a row averages runs evaluated alike"
            )
        raise UsageError(
            f"row {row.name!r}: {file} has no {source}[{column.metric!r}] "
            f"(it has: {', '.join(sorted(metrics)[:12]) or 'nothing'})"
        )
    if not values:
        return Cell(mean=math.nan, std=None, count=0)
    std = statistics.stdev(values) if len(values) > 1 else None
    return Cell(mean=statistics.fmean(values), std=std, count=len(values))


def row_data_sets(spec: TableSpec, cache: dict[Path, dict] | None = None) -> list[str]:
    """What each row is a result on (the data sets of its files, as one key): bold compares rows with equal keys.

    Files without a `data` entry count as one unknown data set, so they are compared with each other."""
    cache = {} if cache is None else cache
    keys = []
    for row in spec.rows:
        data = {
            _canonical(result_identity(file, cache.setdefault(file, _read_results(file)))["data"])
            for file in row.files
        }
        keys.append(_canonical(sorted(data)))
    return keys


# --------------------------------------------------------------------------------------------------------- render


def render(spec: TableSpec, fmt: str) -> str:
    """The table as markdown or LaTeX text (ending in a newline)."""
    cells = table_cells(spec)
    several_data_sets = len(set(zip(row_data_sets(spec), row_protocols(spec)))) > 1  # bold's groups
    if fmt == "markdown":
        return _markdown(spec, cells, several_data_sets)
    if fmt == "latex":
        return _latex(spec, cells, several_data_sets)
    raise UsageError(f"unknown table format {fmt!r}; expected one of {FORMATS}")


def _seed_note(spec: TableSpec, cells: list[list[Cell]]) -> str:
    counts = sorted({cell.count for line in cells for cell in line if cell.count})
    if counts in ([], [1]):
        return ""
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    runs = "runs" if any(row.average_over and len(row.files) > 1 for row in spec.rows) else "seeds"
    return f"mean ± std over {seeds} {runs}"


def _notes(spec: TableSpec, cells: list[list[Cell]], several_data_sets: bool, latex: bool = False) -> str:
    """The line under a table (the caption's parenthesis in LaTeX): seeds averaged, and what bold means.

    Said when it is not the obvious (one data set, one run per row: bold = best in its column)."""
    seeds = _seed_note(spec, cells)
    bold = ""
    if any(cell.bold for line in cells for cell in line) and (seeds or several_data_sets):
        where = " per data set" if several_data_sets else ("" if latex else " per column")
        if several_data_sets and len(set(row_protocols(spec))) > 1:
            where += " and protocol"
        bold = f"best{where} in bold"
    return "; ".join(note for note in (seeds, bold) if note)


def _number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _markdown(spec: TableSpec, cells: list[list[Cell]], several_data_sets: bool = False) -> str:
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
    note = _notes(spec, cells, several_data_sets)
    if note:
        lines += ["", f"_{note}._"]
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


def _latex(spec: TableSpec, cells: list[list[Cell]], several_data_sets: bool = False) -> str:
    def text(cell: Cell) -> str:
        if not cell.count:
            return "--"
        value = _number(cell.mean, spec.decimals)
        if cell.std is not None:
            value += rf" $\pm$ {_number(cell.std, spec.decimals)}"
        return rf"\textbf{{{value}}}" if cell.bold else value

    lines = [r"\begin{table}[t]", r"\centering"]
    note = _notes(spec, cells, several_data_sets, latex=True)
    caption = " ".join(x for x in (spec.title, note and f"({note})") if x)
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
