"""Benchmark: `mmret fit` vs open_clip's own trainer (open_clip_train) on the built-in digits, CPU, same budget.

    .venv/bin/python experiments/benchmarks/vs_open_clip.py                  # 3 seeds x 20 epochs, ~22 min
    .venv/bin/python experiments/benchmarks/vs_open_clip.py --quick          # 1 seed x 2 epochs, 256 images, ~40 s
    .venv/bin/python experiments/benchmarks/vs_open_clip.py --output results.json --workdir /tmp/vs_open_clip

Both trainers train the tiny `test-vit-tiny` CLIP (image 64 px, patch 8, width 128, 4 layers; text width 128,
2 layers, context 16; embed 128; registered with open_clip when `mmret.models` is imported) from scratch on the
same digits train images, with the recipe of experiments/digits_clip.yaml: its batch size, AdamW lr, betas, eps
and weight decay, its warmup steps and cosine decay to 0, its number of epochs, fp32, one DataLoader worker.
For each seed, ours runs first and open_clip_train second, each in its own subprocess:

- ours: `python -m mmret.cli fit -c experiments/digits_clip.yaml` with the seed (`seed_everything` and the data
  seed), the train shards, no validation loop and no mid-epoch checkpoints (open_clip_train has neither), and a
  step-timing callback (`StepTimer`, from this file);
- open_clip_train: `open_clip_train.main` (run by this file with a private first argument, after importing
  `mmret.models`) on a CSV of the same images: the JPEG bytes of the shards written out unchanged, one row per
  image, `--seed`, `--workers 1`, `--log-every-n-steps 1`, `--device cpu`, `--precision fp32`.

Same number of steps: one epoch is `len(train) // batch_size` batches in both (open_clip's CSV loader drops the
last partial batch; our data module's epoch is `samples_per_epoch // batch_size` with samples_per_epoch = the
train size). Captions: each digit has 2-4 captions. Ours draws one at random per image each time the image is
drawn; a CSV row holds one caption, so open_clip_train gets one caption per image, drawn once with the seed —
the same caption distribution per class, less variety per image. Differences that belong to the trainers and
stay: ours applies no weight decay to embeddings (open_clip decays every 2-D weight), masks same-image pairs in
the loss, and takes its initial temperature from the recipe (`init_logit_scale`); open_clip_train starts at its
model default 1/0.07 and has no option for it.

Throughput (samples/s): training loop only. Per epoch, the time from the end of its first step to the end of its
last, over the steps in between — open_clip_train from its per-step "Batch (t)" log lines (batch_size /
samples-per-second, i.e. the time since the previous step ended), ours from `StepTimer`'s timestamps at each
step end; start-up, each epoch's first step (DataLoader worker start), checkpoints and evaluation are left out.
Summed over epochs and seeds per trainer; the ratio is ours / open_clip_train (>= 1.0: ours is not slower).

Accuracy: zero-shot top-1 on the digits TEST split (300 images), computed for both final checkpoints by our
evaluation code, the one `mmret eval` uses (eval transform, prompt ensemble over dataset.json's templates, the
same classifier code for both); open_clip's checkpoint is loaded into our `DualEncoder` through
`open_clip.load_checkpoint`.

Threads: both trainers run with `--threads` torch threads (default 1, as OMP_NUM_THREADS). On 2 cores one
thread plus the one loader worker fill the machine; torch's default of one thread per core oversubscribes it,
and with anything else running its threads wait on each other: measured 15 instead of 145 samples/s for both
trainers on a shared 2-core machine. `--threads 0` keeps torch's default.

Prints progress lines, then a markdown table (trainer, seed, samples/s, zero-shot top-1, wall time) and the
ratio line; `--output` also gets a JSON. Timings are wall-clock on shared machines: run nothing else meanwhile.

Expected (2 shared CPU cores, 1 thread each; experiments/benchmarks/results/vs_open_clip_cpu.json): ~140 vs
~130 samples/s, ratio ~1.1 (each seed's pair 1.0-1.16 as the machine's load moves); zero-shot top-1 0.98-0.99
for ours and 0.96-0.98 for open_clip_train; ours leaves chance loss after 20-40 steps, open_clip_train after
70-130. Both repeat their loss curves exactly for a given seed.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import yaml
from lightning.pytorch import Callback

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARK_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "digits_clip.yaml"
OPEN_CLIP_CHILD = "--open-clip-child"  # private first argument: run open_clip_train in this process
FULL = {"seeds": [0, 1, 2], "epochs": None, "train_subset": None}  # epochs None: the recipe's max_epochs
QUICK = {"seeds": [0], "epochs": 2, "train_subset": 256}
TRAINERS = ("mmret", "open_clip_train")


# ---- the recipe, read once so both trainers get the same numbers ------------------------------------------
def read_recipe(config_path: Path) -> dict:
    """Batch size, optimizer, schedule and epochs of an experiment YAML (DualEncoder defaults where unset)."""
    from mmret.training import DualEncoder

    config = yaml.safe_load(config_path.read_text())
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(DualEncoder.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    model_args = {**defaults, **(config.get("model", {}).get("init_args") or {})}
    data_args = config.get("data", {}).get("init_args") or {}
    trainer = config.get("trainer") or {}
    if model_args.get("loss") != "infonce" or model_args.get("min_lr_ratio", 0.0) != 0.0:
        raise SystemExit(
            f"{config_path}: the comparison needs loss infonce and min_lr_ratio 0 (open_clip's cosine)"
        )
    if trainer.get("precision") not in ("32-true", "32", 32):
        raise SystemExit(f"{config_path}: the comparison is fp32; expected trainer.precision 32-true")
    return {
        "model": model_args["model"],
        "batch_size": int(data_args.get("batch_size", 64)),
        "lr": float(model_args["lr"]),
        "betas": [float(beta) for beta in model_args["betas"]],
        "eps": float(model_args["eps"]),
        "weight_decay": float(model_args["weight_decay"]),
        "warmup_steps": int(model_args["warmup_steps"]),
        "init_logit_scale": model_args.get("init_logit_scale"),
        "epochs": int(trainer.get("max_epochs", 20)),
    }


# ---- data: the digits shards, an optional subset, and the same images as a CSV for open_clip_train --------
def prepare_data(workdir: Path, train_subset: int | None) -> tuple[Path, Path]:
    """Build digits under WORKDIR/data/digits; returns (train shard dir, test shard dir)."""
    from mmret.data.builtin import build_dataset

    root = build_dataset("digits", workdir / "data" / "digits", progress=False)
    train_dir = root / "train"
    if train_subset:
        train_dir = write_subset(train_dir, workdir / "train_subset", train_subset)
    return train_dir, root / "test"


def _samples(shard_dir: Path):
    """(shard path, key, {extension: bytes}) of every sample of a shard directory, in order."""
    from mmret.data.samples import SkipCounter, iter_shard
    from mmret.data.shard_sets import resolve_sources

    (source,) = resolve_sources([str(shard_dir)], role="train")
    for shard, size in zip(source.shards, source.shard_sizes):
        for raw in iter_shard(shard, SkipCounter(), expected=size):
            files = {key: value for key, value in raw.items() if not key.startswith("__")}
            yield shard, raw["__key__"], files


def write_subset(train_dir: Path, output: Path, count: int) -> Path:
    """The first `count` train samples as one shard (the files copied byte for byte) plus its dataset.json."""
    output.mkdir(parents=True, exist_ok=True)
    written = 0
    with tarfile.open(output / "00000.tar", "w") as archive:
        for _, key, files in _samples(train_dir):
            if written == count:
                break
            for extension, data in sorted(files.items()):
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
            written += 1
    info = json.loads((train_dir / "dataset.json").read_text())
    info.update(num_samples=written, shards=["00000.tar"], shard_sizes=[written])
    info.pop("num_captions", None)
    (output / "dataset.json").write_text(json.dumps(info, indent=2))
    return output


def write_open_clip_csv(train_dir: Path, output_dir: Path, seed: int) -> tuple[Path, int]:
    """Images of the train shards as JPEG files (bytes unchanged) and a CSV `filepath,title`, one row per
    image with one of its captions drawn with `seed`. Returns (csv path, rows)."""
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for shard, key, files in _samples(train_dir):
        path = image_dir / f"{Path(shard).stem}_{key}.jpg"
        if not path.exists():
            path.write_bytes(files["jpg"])
        captions = [line.strip() for line in files["txt"].decode("utf-8").splitlines() if line.strip()]
        rows.append((str(path), captions[int(rng.integers(len(captions)))]))
    csv_path = output_dir / f"train_seed{seed}.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return csv_path, len(rows)


# ---- ours -------------------------------------------------------------------------------------------------
class StepTimer(Callback):
    """Records `time.perf_counter()` at the end of every training step and writes them, per epoch, as JSON.

    Args:
        output: The JSON file, rewritten after each epoch: {"batch_size": B, "epochs": [[t0, t1, ...], ...]}.
    """

    def __init__(self, output: str) -> None:
        self.output = Path(output)
        self.epochs: list[list[float]] = []
        self.batch_size = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.epochs[-1].append(time.perf_counter())
        self.batch_size = int(batch["image"].shape[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.output.write_text(json.dumps({"batch_size": self.batch_size, "epochs": self.epochs}))


def steady_throughput(epochs: list[list[float]], batch_size: int) -> tuple[int, float]:
    """(samples, seconds) from per-epoch step-end timestamps: each epoch's steps after its first."""
    samples = sum(batch_size * (len(ends) - 1) for ends in epochs if len(ends) > 1)
    seconds = sum(ends[-1] - ends[0] for ends in epochs if len(ends) > 1)
    return samples, seconds


def run_ours(args, recipe: dict, seed: int, train_dir: Path, data_root: Path, workdir: Path) -> dict:
    """`mmret fit` of the recipe in a subprocess; returns its checkpoint, step count, timed samples/seconds."""
    run_dir = workdir / f"mmret_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    timer_path = workdir / f"mmret_seed{seed}_steps.json"
    timer = {"class_path": "vs_open_clip.StepTimer", "init_args": {"output": str(timer_path)}}
    command = [
        sys.executable, "-m", "mmret.cli", "fit", "-c", str(args.config),
        "--seed_everything", str(seed),
        "--data.init_args.seed", str(seed),
        "--data.init_args.data_root", str(data_root),
        "--data.init_args.train", str(train_dir),
        "--data.init_args.num_workers", "1",
        "--trainer.max_epochs", str(recipe["epochs"]),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", json.dumps([timer]),
        "--checkpoint_every_n_steps", "0",
        "--run_dir", str(run_dir),
    ]  # fmt: skip
    wall = run_child(command, workdir / f"mmret_seed{seed}.log", args.timeout, args.threads)
    timing = json.loads(timer_path.read_text())
    samples, seconds = steady_throughput(timing["epochs"], timing["batch_size"])
    return {
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "samples": samples,
        "seconds": seconds,
        "steps": sum(len(ends) for ends in timing["epochs"]),
        "wall_s": wall,
        "losses": train_losses(run_dir / "metrics.csv"),
    }


def train_losses(metrics_csv: Path) -> list[float]:
    """The logged `train/loss` values of a run's metrics.csv, in step order."""
    if not metrics_csv.is_file():
        return []
    with open(metrics_csv) as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


# ---- open_clip_train --------------------------------------------------------------------------------------
STEP_LINE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<seen>\d+)/\d+ \(\d+%\)\].*?"
    r"Batch \(t\): [0-9.]+, (?P<samples_per_s>[0-9.eE+-]+)/s.*?Loss: (?P<loss>[0-9.eE+-]+)"
)


def parse_open_clip_log(lines: list[str], batch_size: int) -> dict:
    """Steps, steady throughput and losses from open_clip_train's log (`--log-every-n-steps 1`).

    Each step line carries the time since the previous step ended as batch_size / samples-per-second; the
    first step of every epoch (which waits for the DataLoader worker to start) is left out of the throughput.
    """
    steps = samples = 0
    seconds = 0.0
    losses = []
    for line in lines:
        match = STEP_LINE.search(line)
        if not match:
            continue
        steps += 1
        losses.append(float(match["loss"]))
        if int(match["seen"]) > batch_size:  # not the epoch's first step
            samples += batch_size
            seconds += batch_size / float(match["samples_per_s"])
    return {"steps": steps, "samples": samples, "seconds": seconds, "losses": losses}


def open_clip_argv(recipe: dict, csv_path: Path, logs: Path, name: str, seed: int, epochs: int) -> list[str]:
    """open_clip_train.main arguments for the recipe."""
    options = {
        "--model": recipe["model"],
        "--dataset-type": "csv",
        "--train-data": str(csv_path),
        "--csv-img-key": "filepath",
        "--csv-caption-key": "title",
        "--csv-separator": ",",
        "--batch-size": str(recipe["batch_size"]),
        "--epochs": str(epochs),
        "--lr": str(recipe["lr"]),
        "--beta1": str(recipe["betas"][0]),
        "--beta2": str(recipe["betas"][1]),
        "--eps": str(recipe["eps"]),
        "--wd": str(recipe["weight_decay"]),
        "--warmup": str(recipe["warmup_steps"]),
        "--lr-scheduler": "cosine",
        "--precision": "fp32",
        "--workers": "1",
        "--device": "cpu",
        "--seed": str(seed),
        "--save-frequency": "0",  # still saves the last epoch's checkpoint
        "--zeroshot-frequency": "0",
        "--log-every-n-steps": "1",
        "--report-to": "",
        "--logs": str(logs),
        "--name": name,
    }
    return [item for option in options.items() for item in option]


def run_open_clip(args, recipe: dict, seed: int, train_dir: Path, workdir: Path) -> dict:
    """open_clip_train on the same images in a subprocess; returns what `run_ours` returns, from its log."""
    csv_path, rows = write_open_clip_csv(train_dir, workdir / "open_clip_data", seed)
    logs, name = workdir / "open_clip_logs", f"seed{seed}"
    shutil.rmtree(logs / name, ignore_errors=True)
    argv = open_clip_argv(recipe, csv_path, logs, name, seed, recipe["epochs"])
    command = [sys.executable, str(Path(__file__).resolve()), OPEN_CLIP_CHILD, *argv]
    wall = run_child(command, workdir / f"open_clip_seed{seed}.log", args.timeout, args.threads)
    parsed = parse_open_clip_log((logs / name / "out.log").read_text().splitlines(), recipe["batch_size"])
    expected = recipe["epochs"] * (rows // recipe["batch_size"])
    if parsed["steps"] != expected:
        raise RuntimeError(
            f"open_clip_train logged {parsed['steps']} steps, expected {expected} ({logs / name})"
        )
    checkpoint = logs / name / "checkpoints" / f"epoch_{recipe['epochs']}.pt"
    return {"checkpoint": str(checkpoint), "wall_s": wall, **parsed}


class _Column(list):
    def tolist(self) -> list:
        return list(self)


def csv_only_pandas() -> types.ModuleType:
    """A stand-in `pandas` with the one call open_clip_train's CsvDataset makes: `read_csv(path, sep)[key].tolist()`
    (pandas is not an mmret dependency; the real one is used when installed)."""

    def read_csv(path, sep: str = ",") -> dict[str, _Column]:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter=sep))
        return {key: _Column(row[key] for row in rows) for key in (rows[0] if rows else {})}

    module = types.ModuleType("pandas")
    module.read_csv = read_csv
    return module


def open_clip_child(argv: list[str]) -> int:
    """Run open_clip_train.main(argv) with mmret's test-* model configs registered with open_clip."""
    import mmret.models  # noqa: F401  (registers test-vit-tiny & co. with open_clip)

    try:
        import pandas  # noqa: F401
    except ImportError:
        sys.modules["pandas"] = csv_only_pandas()
    from open_clip_train.main import main as open_clip_main

    return 1 if open_clip_main(argv) == -1 else 0


# ---- shared -----------------------------------------------------------------------------------------------
def run_child(command: list[str], log_path: Path, timeout: float | None, threads: int | None) -> float:
    """Run a trainer subprocess (stdout+stderr to LOG_PATH); returns its wall time; raises on failure."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(BENCHMARK_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        ),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        result = subprocess.run(
            command, cwd=log_path.parent, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout
        )
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(
            f"{' '.join(command[:6])} ... exited with {result.returncode}; log {log_path}:\n{tail}"
        )
    return time.perf_counter() - start


def zeroshot_top1(module, test_dir: Path) -> float:
    """Zero-shot top-1 of a DualEncoder on a labelled shard directory, as `mmret eval` computes it."""
    import torch

    from mmret.data.datamodule import RetrievalDataModule
    from mmret.evaluation.metrics import build_zeroshot_classifier
    from mmret.evaluation.retrieval import evaluation_metrics
    from mmret.evaluation.shard_set import embed_data

    data = RetrievalDataModule(test=str(test_dir), eval_batch_size=100, num_workers=0)
    info = data.dataset_info("test")
    module = module.eval()
    eval_set, _ = embed_data(module, data, torch.device("cpu"), 100, f"embedding {test_dir}")
    with torch.no_grad():
        classifier = build_zeroshot_classifier(module.encode_texts, info["class_names"], info["templates"])
    return float(evaluation_metrics(eval_set, classifier=classifier)["acc1"])


def load_trained(trainer: str, checkpoint: str, model_name: str):
    """A DualEncoder holding the final weights of either trainer's checkpoint."""
    from mmret.training import DualEncoder

    if trainer == "mmret":
        return DualEncoder.from_checkpoint(checkpoint)
    # open_clip.load_checkpoint (via create_model's `pretrained`) reads its {"state_dict": ...} file strictly.
    return DualEncoder(model=model_name, pretrained=checkpoint)


def machine() -> dict:
    """CPU model, core count and the versions that matter, for the record."""
    import importlib.metadata
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    versions = {name: importlib.metadata.version(name) for name in ("torch", "lightning", "open_clip_torch")}
    return {"cpu": cpu, "cores": os.cpu_count(), **versions}


def format_table(runs: list[dict]) -> str:
    """The markdown table of all runs, in the order they ran."""
    lines = [
        "| trainer | seed | samples/s | zero-shot top-1 (test) | wall (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        rate = run["samples"] / run["seconds"] if run["seconds"] else float("nan")
        lines.append(
            f"| {run['trainer']} | {run['seed']} | {rate:.1f} | {run['acc1']:.3f} | {run['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def summarise(runs: list[dict]) -> dict:
    """Per trainer: samples/s over all its timed steps and the accuracies; and the ratio ours / theirs."""
    summary = {}
    for trainer in TRAINERS:
        mine = [run for run in runs if run["trainer"] == trainer]
        seconds = sum(run["seconds"] for run in mine)
        summary[trainer] = {
            "samples_per_s": sum(run["samples"] for run in mine) / seconds if seconds else None,
            "acc1": [run["acc1"] for run in mine],
        }
    ours, theirs = summary["mmret"]["samples_per_s"], summary["open_clip_train"]["samples_per_s"]
    summary["ratio"] = ours / theirs if ours and theirs else None
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed x 2 epochs on the first 256 train images"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument(
        "--epochs", type=int, help="epochs per run (default: the recipe's max_epochs; --quick: 2)"
    )
    parser.add_argument("--train-subset", type=int, help="train on the first N train images only")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the recipe (an experiment YAML)")
    parser.add_argument(
        "--workdir", type=Path, help="keep data, runs and logs here (default: a temporary dir)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of both trainers (OMP_NUM_THREADS); 0: torch's default, one per core",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per training run")
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with the private first argument, open_clip_train itself); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == OPEN_CLIP_CHILD:
        return open_clip_child(argv[1:])
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # for the evaluations in this process
    recipe = read_recipe(args.config)
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vs_open_clip-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        train_dir, test_dir = prepare_data(workdir, args.train_subset)
        print(
            f"recipe {args.config.name}: {json.dumps(recipe)}; train {train_dir}; work dir {workdir}",
            flush=True,
        )
        runs = []
        for seed in args.seeds:
            for trainer in TRAINERS:  # alternating: ours, theirs, ours, theirs, ...
                if trainer == "mmret":
                    run = run_ours(args, recipe, seed, train_dir, workdir / "data", workdir)
                else:
                    run = run_open_clip(args, recipe, seed, train_dir, workdir)
                run.update(trainer=trainer, seed=seed)
                if trainer != TRAINERS[0] and run["steps"] != runs[-1]["steps"]:
                    raise RuntimeError(f"seed {seed}: {run['steps']} steps vs {runs[-1]['steps']} for mmret")
                run["acc1"] = zeroshot_top1(
                    load_trained(trainer, run["checkpoint"], recipe["model"]), test_dir
                )
                rate = run["samples"] / run["seconds"] if run["seconds"] else float("nan")
                print(
                    f"{trainer} seed {seed}: {run['steps']} steps, {rate:.1f} samples/s, "
                    f"zero-shot top-1 {run['acc1']:.3f}, {run['wall_s']:.0f} s",
                    flush=True,
                )
                runs.append(run)
        summary = summarise(runs)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - start
    ours, theirs = summary["mmret"], summary["open_clip_train"]
    print()
    print(format_table(runs))
    print()
    print(
        f"samples/s: mmret {ours['samples_per_s']:.1f}, open_clip_train {theirs['samples_per_s']:.1f}, "
        f"ratio {summary['ratio']:.2f} (goal >= 1.0); zero-shot top-1 >= 0.90: mmret "
        f"{sum(a >= 0.9 for a in ours['acc1'])}/{len(ours['acc1'])}, open_clip_train "
        f"{sum(a >= 0.9 for a in theirs['acc1'])}/{len(theirs['acc1'])}; total {total:.0f} s"
    )
    if args.output:
        for run in runs:
            run.pop("checkpoint", None)
        document = {
            "recipe": recipe,
            "config": str(args.config),
            "seeds": args.seeds,
            "epochs": recipe["epochs"],
            "train_subset": args.train_subset,
            "threads": args.threads,
            "machine": machine(),
            "runs": runs,
            "summary": summary,
            "total_s": total,
        }
        args.output.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
