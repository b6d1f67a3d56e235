"""Benchmark: Matryoshka embeddings vs models trained at one width alone, on digits and shapes.

    python experiments/benchmarks/matryoshka.py digits --runs runs/matryoshka      # 28 min on 2 shared CPU cores
    python experiments/benchmarks/matryoshka.py shapes --runs runs/matryoshka      # 53 min there
    python experiments/benchmarks/matryoshka.py digits --runs runs/matryoshka --skip-train   # table again

Per data set it trains, one after another (each `mmret fit` in its own process, OMP_NUM_THREADS=1 unless set):
- `matryoshka`: experiments/<set>_matryoshka.yaml (InfoNCE summed over nested prefixes of the embedding);
- `dim<D>` for each dim D: the plain recipe (experiments/digits_clip.yaml, shapes_dual.yaml) with
  `--model.init_args.embed_dim D`, i.e. both towers projecting to D coordinates, trained at that width alone
  (at the full width 128 it is the plain recipe itself).
Then it evaluates on the test split with `mmret eval`: the Matryoshka model once without --dim (its results
hold every trained dim as `dim<d>/<metric>`) and once per dim with `--dim D` (checked to give the same number:
the two paths must agree), each single-width model at its own width, and the plain full-width model truncated
with `--dim D` (what cutting an embedding trained without Matryoshka costs). Runs live in RUNS/<set>/<name>
(data in RUNS/data, built on first use); a finished fit is not repeated (its `fit_seconds.json` marks it).
It prints the set's table (README "Matryoshka embeddings" shows both sets in one) and writes it, with every
number, as RUNS/<set>/matryoshka_table.json (and, with --save, experiments/benchmarks/results/matryoshka_<set>.json).

Metrics: digits zero-shot acc1 (the data's classes; also T→I R@1 of its 70 class captions), shapes
image_retrieval_recall@1 (text -> image, `--task retrieval` as experiments/shapes_dual.yaml's header evaluates
it). "kept" is the Matryoshka model's metric at D over its metric at the full width (sentence-transformers
reports 99.7 % kept at 512 of 2048 dims, 92.4 % at 64).

Measured 2026-12-08 (seed 0, one run each, 2 CPU cores shared with other jobs; `--runs /work/runs/mrl`), in %,
Matryoshka / kept / trained at the dim alone / plain 128-d model cut to the dim:
    digits acc1    128: 95.0 / 100.0 / 98.3 / 98.3   64: 95.0 / 100.0 / 99.0 / 98.3   32: 94.3 / 99.3 / 97.7 / 98.3
                    16: 95.0 / 100.0 / 94.0 / 98.0    8: 95.3 / 100.4 / 91.7 / 97.0
    shapes R@1     128: 41.8 / 100.0 / 46.1 / 46.1   32: 41.3 / 98.9 / 48.7 / 43.6     8: 41.7 / 99.8 / 44.2 / 20.3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "benchmarks" / "results"
SETS = {
    "digits": {
        "plain": "experiments/digits_clip.yaml",
        "matryoshka": "experiments/digits_matryoshka.yaml",
        "metrics": ["acc1", "image_retrieval_recall@1"],
        "eval_args": [],
    },
    "shapes": {
        "plain": "experiments/shapes_dual.yaml",
        "matryoshka": "experiments/shapes_matryoshka.yaml",
        "metrics": ["image_retrieval_recall@1"],
        "eval_args": ["--task", "retrieval"],
    },
}


def trained_dims(config: Path) -> list[int]:
    """The `model.init_args.matryoshka_dims` of a recipe (the full width first)."""
    import yaml

    return [int(d) for d in yaml.safe_load(config.read_text())["model"]["init_args"]["matryoshka_dims"]]


def mmret(args: list[str], cwd: Path) -> None:
    """Run `python -m mmret ARGS` in `cwd`; a failure stops the benchmark with its exit code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the cores are shared: one thread per process is fastest there
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    print("+ mmret " + " ".join(args), flush=True)
    code = subprocess.call([sys.executable, "-m", "mmret", *args], cwd=cwd, env=env)
    if code != 0:
        sys.exit(f"mmret {args[0]} failed with exit code {code}")


def fit(run_dir: Path, config: str, extra: list[str], root: Path) -> float:
    """Train one model (unless its run finished before); returns the fit's wall time in seconds."""
    marker = run_dir / "fit_seconds.json"
    if marker.is_file():
        return float(json.loads(marker.read_text())["seconds"])
    start = time.monotonic()
    mmret(["fit", "-c", str(REPO / config), *extra, "--run_dir", str(run_dir)], root)
    seconds = time.monotonic() - start
    marker.write_text(json.dumps({"seconds": seconds, "config": config, "extra": extra}) + "\n")
    return seconds


def evaluate(run_dir: Path, name: str, set_name: str, root: Path, dim: int | None = None) -> dict:
    """`mmret eval` of a run's last checkpoint on the test split (at `--dim` when given); the results."""
    output = run_dir / f"{name}.json"
    if not output.is_file():
        extra = [] if dim is None else ["--dim", str(dim)]
        mmret(
            ["eval", "--model", str(run_dir / "checkpoints" / "last.ckpt"), "--data", f"data/{set_name}",
             "--output", str(output), "--quiet", *SETS[set_name]["eval_args"], *extra],
            root,
        )  # fmt: skip
    return json.loads(output.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("set", choices=sorted(SETS), help="the built-in data set")
    parser.add_argument("--runs", default="runs/matryoshka", help="where the runs go (default: %(default)s)")
    parser.add_argument("--skip-train", action="store_true", help="only evaluate finished runs")
    parser.add_argument("--train-only", action="store_true", help="train, evaluate nothing")
    parser.add_argument(
        "--save", action="store_true", help="also write experiments/benchmarks/results/matryoshka_SET.json"
    )
    args = parser.parse_args(argv)
    spec = SETS[args.set]
    root = Path(args.runs).resolve()
    root.mkdir(parents=True, exist_ok=True)
    dims = trained_dims(REPO / spec["matryoshka"])
    full = dims[0]
    runs = {"matryoshka": (spec["matryoshka"], [])}
    for dim in dims:
        runs[f"dim{dim}"] = (spec["plain"], [] if dim == full else ["--model.init_args.embed_dim", str(dim)])
    seconds = {}
    for name, (config, extra) in runs.items():
        run_dir = root / args.set / name
        if args.skip_train:
            seconds[name] = float(json.loads((run_dir / "fit_seconds.json").read_text())["seconds"])
        else:
            seconds[name] = fit(run_dir, config, extra, root)
    if args.train_only:
        return 0

    matryoshka_dir = root / args.set / "matryoshka"
    every_dim = evaluate(matryoshka_dir, "results", args.set, root)["metrics"]
    rows = []
    for dim in dims:
        alone = evaluate(root / args.set / f"dim{dim}", "results", args.set, root)["metrics"]
        one_dim = evaluate(matryoshka_dir, f"results_dim{dim}", args.set, root, dim)["metrics"]
        plain_dir = root / args.set / f"dim{full}"
        truncated = evaluate(plain_dir, f"results_dim{dim}", args.set, root, dim)["metrics"]
        row = {"dim": dim}
        for metric in spec["metrics"]:
            matryoshka = every_dim[metric if dim == full else f"dim{dim}/{metric}"]
            if abs(one_dim[metric] - matryoshka) > 1e-6:  # `--dim D` and the per-dim report: one computation
                sys.exit(
                    f"dim {dim}: mmret eval --dim gives {metric} {one_dim[metric]}, the report {matryoshka}"
                )
            row[metric] = {
                "matryoshka": matryoshka,
                "kept": matryoshka / every_dim[metric],
                "trained_alone": alone[metric],
                "plain_truncated": truncated[metric],
            }
        rows.append(row)
    table = {
        "set": args.set,
        "metrics": spec["metrics"],
        "split": "test",
        "dims": dims,
        "rows": rows,
        "fit_seconds": seconds,
        "runs": str(root / args.set),
    }
    (root / args.set / "matryoshka_table.json").write_text(json.dumps(table, indent=2) + "\n")
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"matryoshka_{args.set}.json").write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table))
    return 0


def markdown(table: dict) -> str:
    """The README table: one row per dim; per metric (in percent) the Matryoshka model, the share of its
    full-width number it keeps, the model trained at that dim alone, the plain full-width model truncated."""
    short = {"acc1": "acc1", "image_retrieval_recall@1": "T→I R@1"}
    header, rule = [f"{table['set']}: dim"], ["---:"]
    for metric in table["metrics"]:
        name = short.get(metric, metric)
        header += [f"Matryoshka {name}", "kept", f"dim alone {name}", f"plain truncated {name}"]
        rule += ["---:"] * 4
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for row in table["rows"]:
        cells = [str(row["dim"])]
        for metric in table["metrics"]:
            numbers = row[metric]
            cells += [f"{100 * numbers['matryoshka']:.1f}", f"{100 * numbers['kept']:.1f} %",
                      f"{100 * numbers['trained_alone']:.1f}", f"{100 * numbers['plain_truncated']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    minutes = ", ".join(f"{name} {value / 60:.1f}" for name, value in table["fit_seconds"].items())
    return "\n".join(lines) + f"\n\nfit minutes: {minutes}"


if __name__ == "__main__":
    sys.exit(main())
