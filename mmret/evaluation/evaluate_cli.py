"""Evaluate a trained dual encoder on a shard set (`mmret eval`): exact retrieval metrics, zero-shot accuracy,
and pictures of what it retrieves.

    mmret eval --model runs/digits_clip/last.ckpt --data data/digits --output results/digits.json
    mmret eval --model CKPT --data data/shapes/test --task retrieval --device cuda --batch-size 256 --output r.json

`--data` is a shard directory, or a dataset root holding train/val/test (then `--split`, default test, picks
one). Every image is embedded once and every unique caption string once; the metrics are those of
`mmret.evaluation.retrieval` (the same code as validation), named as in CLIP_benchmark. `--task auto` (the
default) adds zero-shot accuracy when the data's dataset.json has `class_names` and the images have labels, and
then reports the task as "zeroshot"; `--task zeroshot` requires them; `--task retrieval` skips them.

Writes, replacing files of the same names (a rerun overwrites its results; each file is written to a temporary
name and renamed, so none is ever half-written):

    results.json           {"task", "model", "data", "num_images", "num_texts", "metrics", "counts",
                            "top_k": null, "skipped", "config": {"model": <checkpoint hyperparameters>,
                            "eval": <these arguments>}}   (the Results contract of DESIGN.md)
    results_examples.png   a few text queries (the first ones in caption-hash order: fixed for a data set) and
                           their top-ranked images, relevant ones framed in green
    results_recall.png     Recall@K for K = 1..50 in both directions

The JSON is written last, so its presence means the run completed. With `--reranker CKPT --top-k K` (a
cross-encoder) each query's first-stage top-K is rescored (`mmret.evaluation.rerank`), optionally fused with the
first-stage score (`--fusion W`); the JSON then also holds "reranked_metrics", "top_k": K and
"first_stage_ceiling" (the first stage's recall@K: what no reranker of those lists can exceed). With
`--wandb-summary` the results also become the summary of the checkpoint's W&B run (`mmret.tracking`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mmret.errors import UsageError

TASKS = ("auto", "retrieval", "zeroshot")
SPLITS = ("train", "val", "test")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TEMPLATES = ["a photo of a {}."]
RECALL_CURVE_MAX_K = 50


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a dual-encoder .ckpt written by `mmret fit`")
    parser.add_argument(
        "--data",
        required=True,
        help="a shard directory, or a dataset root holding train/val/test (see --split)",
    )
    parser.add_argument(
        "--output", required=True, help="results JSON to write (replaced if it exists); PNGs go beside it"
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="retrieval: image<->text metrics; zeroshot: also classification accuracy (needs class_names in "
        "dataset.json); auto: zeroshot when the data has classes (default)",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="split of a dataset root (default: test)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images (and captions) per forward pass")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when available")
    parser.add_argument("--num-workers", type=int, default=1, help="data loader worker processes")
    parser.add_argument("--num-examples", type=int, default=6, help="text queries shown in the examples PNG")
    parser.add_argument("--examples-top-k", type=int, default=8, help="images shown per example query")
    parser.add_argument(
        "--reranker",
        default=None,
        help="a cross-encoder .ckpt (`mmret fit` with mmret.modules.CrossEncoder): rescore each "
        "query's top-K and add reranked_metrics and the first-stage recall@K ceiling",
    )
    parser.add_argument("--top-k", type=int, default=20, help="candidates per query the reranker rescores")
    parser.add_argument(
        "--wandb-summary",
        action="store_true",
        help="also set the results as the summary of the W&B run of the checkpoint's run directory "
        "(RUN_DIR/wandb_run.json, written by `mmret fit --wandb_project P`); offline unless logged in",
    )
    parser.add_argument(
        "--fusion",
        type=float,
        default=0.0,
        help="weight in [0, 1] of the first-stage score fused with the reranker's (default 0)",
    )


def run(args: argparse.Namespace) -> int:
    output = check_output_path(args.output)
    check_numbers(args)
    data_path = resolve_data_path(args.data, args.split)
    device = resolve_device(args.device)
    if getattr(args, "wandb_summary", False):
        from mmret.tracking import check_results_summary_target

        check_results_summary_target(args.model)  # before any work: a run without W&B is a usage error

    from mmret.checkpoints import load_dual_encoder
    from mmret.data.datamodule import RetrievalDataModule
    from mmret.evaluation.retrieval import evaluation_metrics
    from mmret.evaluation.scoring import build_zeroshot_classifier

    # Whatever the split, the chosen shard directory is served as the data module's exact-once test loader.
    data = RetrievalDataModule(
        test=str(data_path), eval_batch_size=args.batch_size, num_workers=args.num_workers
    )
    sources = data.sources("test")  # UsageError for a directory without shards
    info = data.dataset_info("test") or {}
    class_names = info.get("class_names") or None
    templates = info.get("templates") or DEFAULT_TEMPLATES
    if args.task == "zeroshot" and not class_names:
        raise UsageError(
            f"--task zeroshot: data {data_path} has no class_names in its dataset.json; expected a labelled "
            "data set, or use --task retrieval"
        )
    check_has_captions(sources, data_path)

    module = load_dual_encoder(args.model, device)  # UsageError for anything but a dual-encoder checkpoint
    eval_set, keys = embed_data(module, data, device, args.batch_size, f"embedding {data_path}")
    skipped = data.skipped_counts("test")
    if eval_set.num_images == 0:
        raise UsageError(
            f"data {data_path}: no usable sample (skipped: {skipped or 'none'}); expected images with captions"
        )
    task = choose_task(args.task, class_names, eval_set.labels, data_path)
    classifier = None
    if task == "zeroshot":
        with torch.no_grad():
            classifier = build_zeroshot_classifier(module.encode_texts, class_names, templates)
    metrics = evaluation_metrics(eval_set, classifier=classifier)
    reranked, ceiling, top_k = rerank(args, data, eval_set, device)
    results = results_document(
        task, args, data_path, eval_set, metrics, skipped, device, templates if task == "zeroshot" else None,
        reranked_metrics=reranked, top_k=top_k,
    )  # fmt: skip
    if reranked is not None:
        results["first_stage_ceiling"] = ceiling
        results["config"]["reranker"] = checkpoint_hyperparameters(args.reranker)
        results["config"]["eval"].update(reranker=str(args.reranker), top_k=top_k, fusion=args.fusion)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    pictures = write_pictures(eval_set, sources, keys, stem, args, title=f"{args.model} on {data_path}")
    results["pictures"] = [str(path) for path in pictures]
    write_json_atomic(output, results)  # last: a results file means a complete run
    if getattr(args, "wandb_summary", False):
        from mmret.tracking import log_results_summary, run_dir_of_checkpoint

        run_id = log_results_summary(run_dir_of_checkpoint(args.model), results)
        print(f"set the results as the summary of W&B run {run_id}")

    shown = [key for key in ("image_retrieval_recall@1", "text_retrieval_recall@1", "acc1") if key in metrics]
    summary = ", ".join(f"{key}={metrics[key]:.4f}" for key in shown)
    if reranked is not None:
        summary += (
            f"; reranked top-{top_k}: image_retrieval_recall@1={reranked['image_retrieval_recall@1']:.4f}"
            f" (ceiling {ceiling[f'image_retrieval_recall@{top_k}']:.4f})"
        )
    print(f"{task}: {eval_set.num_images} images, {eval_set.num_texts} texts: {summary}")
    print(f"wrote {output}, {', '.join(str(path) for path in pictures)}")
    return 0


def rerank(args: argparse.Namespace, data, eval_set, device: torch.device):
    """With `--reranker`: (reranked metrics, first-stage recall@K ceiling, K); else (None, None, None)."""
    if getattr(args, "reranker", None) is None:
        return None, None, None
    from mmret.checkpoints import load_cross_encoder
    from mmret.evaluation.rerank import PairScorer, two_stage_metrics

    reranker = load_cross_encoder(args.reranker, device)  # UsageError for anything but a reranker checkpoint
    scorer = PairScorer.from_data(reranker, data, eval_set, device, args.batch_size)
    top_k = min(args.top_k, eval_set.num_images)
    reranked, ceiling = two_stage_metrics(
        eval_set, scorer, top_k, fusion_weight=args.fusion, pair_batch_size=4 * args.batch_size, progress=True
    )
    return reranked, ceiling, top_k


def embed_data(module, data, device: torch.device, batch_size: int, description: str):
    """Embed the data module's test set with `module` (eval transform, its tokenizer), with a progress bar.

    Returns:
        The `EmbeddedEvalSet`, and sample id -> shard key of every image (to find example images again).
    """
    from mmret.evaluation.retrieval import EvalSetEmbedder
    from mmret.models import create_transforms

    data.set_preprocess(
        None, module.tokenizer, eval_image_transform=create_transforms(module.model, train=False)
    )
    embedder = EvalSetEmbedder(
        module.encode_image, module.encode_texts, device=device, text_batch_size=batch_size
    )
    known = sum(source.num_samples or 0 for source in data.sources("test"))
    keys: dict[int, str] = {}
    batches = tqdm(
        data.test_dataloader(),
        total=math.ceil(known / batch_size) or None,
        desc=description,
        unit="batch",
        file=sys.stderr,
        disable=None,  # a bar on terminals only: logs and captured stderr stay clean
        leave=False,
        dynamic_ncols=True,
    )
    for batch in batches:
        batch["image"] = batch["image"].to(device)
        embedder.add_batch(batch)
        keys.update(zip(batch["sample_id"].tolist(), batch["key"]))
    return embedder.finish(), keys


def choose_task(requested: str, class_names: list[str] | None, labels: torch.Tensor, data_path: Path) -> str:
    """The task to report: "zeroshot" when asked for (the data must allow it) or when `auto` finds class
    names and labels, else "retrieval"."""
    labelled = labels >= 0
    if requested == "zeroshot" and not bool(labelled.any()):
        raise UsageError(
            f"--task zeroshot: no image in {data_path} has a label (KEY.cls or a 'label' in KEY.json); "
            "use --task retrieval"
        )
    if class_names and bool(labelled.any()) and int(labels.max()) >= len(class_names):
        raise UsageError(
            f"data {data_path}: label {int(labels.max())} has no class name (dataset.json lists "
            f"{len(class_names)}); expected labels in [0, {len(class_names)})"
        )
    if requested == "zeroshot" or (requested == "auto" and class_names and bool(labelled.any())):
        return "zeroshot"
    return "retrieval"


def results_document(
    task: str,
    args: argparse.Namespace,
    data_path: Path,
    eval_set,
    metrics: dict,
    skipped: dict,
    device: torch.device,
    templates: list[str] | None,
    reranked_metrics: dict | None = None,
    top_k: int | None = None,
) -> dict:
    """The results JSON of DESIGN.md's Results contract (metrics in [0, 1]; counts apart)."""
    results = {
        "task": task,
        "model": str(args.model),
        "data": str(data_path),
        "num_images": eval_set.num_images,
        "num_texts": eval_set.num_texts,
        "metrics": {key: float(value) for key, value in metrics.items() if not is_count(key)},
        "counts": {key: int(value) for key, value in metrics.items() if is_count(key)},
        "top_k": top_k,
        "skipped": skipped,
        "config": {
            "model": checkpoint_hyperparameters(args.model),
            "eval": {
                "task": args.task,
                "split": args.split,
                "batch_size": args.batch_size,
                "device": str(device),
                "num_workers": args.num_workers,
                "templates": templates,
            },
        },
    }
    if reranked_metrics is not None:
        results["reranked_metrics"] = {k: float(v) for k, v in reranked_metrics.items() if not is_count(k)}
    return results


# ---- inputs -------------------------------------------------------------------------------------------------
def check_numbers(args: argparse.Namespace) -> None:
    for name in ("batch_size", "num_examples", "examples_top_k"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}; expected an integer >= 1")
    if getattr(args, "top_k", 1) < 1:
        raise UsageError(f"--top-k is {args.top_k}; expected an integer >= 1")
    if not 0.0 <= getattr(args, "fusion", 0.0) <= 1.0:
        raise UsageError(f"--fusion is {args.fusion}; expected a weight in [0, 1]")
    if getattr(args, "reranker", None) is not None and not Path(args.reranker).is_file():
        raise UsageError(f"--reranker {args.reranker} does not exist; expected a cross-encoder .ckpt")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers is {args.num_workers}; expected an integer >= 0")


def check_output_path(output: str) -> Path:
    """The results path, refused early when it cannot be written (existing files are replaced)."""
    path = Path(output)
    if path.is_dir():
        raise UsageError(f"--output {output} is a directory; expected the path of a results .json file")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write --output {output}: {existing} is not a writable directory")
    return path


def resolve_data_path(data: str, split: str) -> Path:
    """The shard directory to evaluate: `data` itself, or `data/split` for a dataset root."""
    path = Path(data)
    if not path.exists():
        raise UsageError(
            f"--data {data} does not exist; expected a shard directory or a dataset root holding train/val/test"
        )
    is_shard_dir = path.is_file() or (path / "dataset.json").is_file() or any(path.glob("*.tar"))
    if is_shard_dir:
        return path
    if any((path / name).is_dir() for name in SPLITS):
        if not (path / split).is_dir():
            raise UsageError(
                f"--data {data} has no {split}/ split; expected {data}/{split} (or pick --split)"
            )
        return path / split
    raise UsageError(
        f"--data {data} holds no *.tar shards and no train/val/test splits; expected a shard directory"
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(device)


def check_has_captions(sources, data_path: Path) -> None:
    """Refuse data whose samples have no caption at all (read raw, stops at the first captioned sample)."""
    from mmret.data.samples import SkipCounter, iter_shard

    counter, seen = SkipCounter(), 0
    for source in sources:
        for shard in source.shards:
            for raw in iter_shard(shard, counter):
                seen += 1
                if raw.get("txt", b"").strip():
                    return
    if seen == 0:
        raise UsageError(
            f"data {data_path}: its shards hold no readable sample; expected webdataset tar shards"
        )
    raise UsageError(
        f"data {data_path}: no captions in any of its {seen} samples; retrieval needs captions (KEY.txt, one "
        "per line, beside each image)"
    )


def checkpoint_hyperparameters(path: str) -> dict:
    """The hyperparameters saved in a checkpoint (memory-mapped: the weights are not read again)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip-format checkpoint: mmap is unavailable
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return dict(checkpoint.get("hyper_parameters", {}))


# ---- outputs ------------------------------------------------------------------------------------------------
def is_count(key: str) -> bool:
    """Counts (num_images, *_num_queries, ...) go to "counts"; "metrics" holds only values in [0, 1]."""
    name = key.rsplit("/", 1)[-1]
    return name in ("num_images", "num_texts") or "_num_queries" in name


def write_json_atomic(path: Path, content: dict) -> None:
    """Write JSON to a temporary sibling, fsync, rename over `path`."""
    from mmret.data.atomic_output import write_text_atomic

    write_text_atomic(path, json.dumps(content, indent=2, default=str) + "\n")


def write_pictures(eval_set, sources, keys: dict[int, str], stem: Path, args, title: str) -> list[Path]:
    """`<stem>_examples.png` (top images of a few text queries) and `<stem>_recall.png` (Recall@K curves)."""
    from PIL import Image

    from mmret.evaluation.plots import RetrievalExample, plot_recall_curves, plot_retrieval_examples
    from mmret.evaluation.retrieval import recall_curves, top_k_candidates

    stem.parent.mkdir(parents=True, exist_ok=True)
    queries = list(
        range(min(args.num_examples, eval_set.num_texts))
    )  # caption-hash order: fixed per data set
    top = top_k_candidates(eval_set.text_emb[queries], eval_set.image_emb, args.examples_top_k)
    image_ids = eval_set.image_ids.tolist()
    wanted = {image_ids[index] for index in top.indices.flatten().tolist()}
    images = read_images(sources, {image_id: keys[image_id] for image_id in wanted if image_id in keys})
    examples = []
    for row, query in enumerate(queries):
        ranked = [image_ids[index] for index in top.indices[row].tolist()]
        examples.append(
            RetrievalExample(
                query=eval_set.captions[query] if eval_set.captions else f"query {query}",
                images=[images.get(image_id) or Image.new("RGB", (8, 8), "white") for image_id in ranked],
                scores=top.scores[row].tolist(),
                relevant=[image_id in eval_set.text_relevant[query] for image_id in ranked],
                num_relevant=len(eval_set.text_relevant[query]),
                note="unseen" if bool(eval_set.text_unseen[query]) else "",
            )
        )
    return [
        plot_retrieval_examples(f"{stem}_examples.png", examples, title=title),
        plot_recall_curves(f"{stem}_recall.png", recall_curves(eval_set, RECALL_CURVE_MAX_K), title=title),
    ]


def read_images(sources, key_of_id: dict[int, str]):
    """The decoded images of the given sample ids, found by a second pass over the shards (only matching keys
    are decoded; stops once all are found)."""
    from mmret.data.samples import SkipCounter, SkippedSample, decode_sample, iter_shard

    wanted_keys = set(key_of_id.values())
    found = {}
    counter = SkipCounter()
    for source in sources:
        for shard in source.shards:
            for raw in iter_shard(shard, counter):
                if raw["__key__"] not in wanted_keys:
                    continue
                try:
                    sample = decode_sample(raw)
                except SkippedSample:
                    continue
                if key_of_id.get(sample["sample_id"]) == raw["__key__"]:
                    found[sample["sample_id"]] = sample["image"]
                if len(found) == len(key_of_id):
                    return found
    return found
