"""The evaluation of a trained dual encoder on a shard set (what `mmret eval` runs): exact retrieval metrics, zero-shot accuracy,
and pictures of what it retrieves.

    eval_data = open_eval_data(resolve_data_path("data/digits", "test"), task="auto", batch_size=128)
    results = evaluate(DualEncoder.from_checkpoint(CKPT), eval_data, EvalOptions(model=CKPT, output=OUT))

From the command line: `mmret eval --model CKPT --data data/digits --output results/digits.json`.

`--data` is a shard directory, or a dataset root holding train/val/test (then `--split`, default test, picks
one). Every image is embedded once and every unique caption string once; the metrics are those of
`mmret.evaluation.retrieval` (the same code as validation), named as in CLIP_benchmark. `--task auto` (the
default) adds zero-shot accuracy when the data's dataset.json has `class_names` and the images have labels, and
then reports the task as "zeroshot"; `--task zeroshot` requires them; `--task retrieval` skips them.

Writes, replacing files of the same names (a rerun overwrites its results; each file is written to a temporary
name and renamed, so none is ever half-written):

    results.json           {"task", "model", "data", "num_images", "num_texts", "metrics", "counts",
                            "top_k": null, "skipped", "config": {"model": <checkpoint hyperparameters>,
                            "eval": <these arguments>}}   (the Results contract, README "Results")
    results_examples.png   a few text queries (the first ones in caption-hash order: fixed for a data set) and
                           their top-ranked images, relevant ones framed in green
    results_recall.png     Recall@K for K = 1..50 in both directions

The JSON is written last, so its presence means the run completed. With `--reranker CKPT --top-k K` (a
cross-encoder) each query's first-stage top-K is rescored (`mmret.evaluation.rerank`), optionally fused with the
first-stage score (`--fusion W`); the JSON then also holds "reranked_metrics", "top_k": K and
"first_stage_ceiling" (the first stage's recall@K: what no reranker of those lists can exceed). With
`--wandb-summary` the command also makes them the summary of the checkpoint's W&B run (`mmret.training.wandb_tracking`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmret.errors import UsageError
from mmret.evaluation.shard_set import check_has_captions, embed_data, read_images
from mmret.io import write_json_atomic

TASKS = ("auto", "retrieval", "zeroshot", "compositional")
DEFAULT_TEMPLATES = ["a photo of a {}."]
RECALL_CURVE_MAX_K = 50


@dataclass
class EvalOptions:
    """What to evaluate and how (the options of `mmret eval`, recorded in the results' `config.eval`)."""

    model: str
    output: str
    task: str = "auto"
    split: str = "test"
    batch_size: int = 128
    device: str = "cpu"
    num_workers: int = 1
    num_examples: int = 6
    examples_top_k: int = 8
    reranker: str | None = None
    top_k: int = 20
    fusion: float = 0.0


@dataclass
class EvalData:
    """A checked shard set served as a data module's exact-once test loader."""

    path: Path
    data: object  # RetrievalDataModule
    sources: list = field(default_factory=list)
    class_names: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))


def open_eval_data(data_path: Path, task: str, batch_size: int, num_workers: int = 1) -> EvalData:
    """The shard directory as a data module, refused when it cannot serve `task` (no shards, no captions,
    `zeroshot` without class names)."""
    from mmret.data.datamodule import RetrievalDataModule

    # Whatever the split, the chosen shard directory is served as the data module's exact-once test loader.
    data = RetrievalDataModule(test=str(data_path), eval_batch_size=batch_size, num_workers=num_workers)
    sources = data.sources("test")  # UsageError for a directory without shards
    info = data.dataset_info("test") or {}
    class_names = info.get("class_names") or None
    templates = info.get("templates") or DEFAULT_TEMPLATES
    if task == "zeroshot" and not class_names:
        raise UsageError(
            f"--task zeroshot: data {data_path} has no class_names in its dataset.json; expected a labelled "
            "data set, or use --task retrieval"
        )
    check_has_captions(sources, data_path)
    return EvalData(data_path, data, sources, class_names, list(templates))


def evaluate(module, eval_data: EvalData, options: EvalOptions, reranker=None) -> dict:
    """Embed the shard set with `module`, compute the metrics (and, with a `reranker`, retrieve-then-rerank
    metrics), draw the pictures beside `options.output` and write the results JSON there, last.

    Returns:
        The results document (also written to `options.output`).
    """
    from mmret.evaluation.metrics import build_zeroshot_classifier
    from mmret.evaluation.retrieval import evaluation_metrics

    device = torch.device(options.device)
    data, data_path = eval_data.data, eval_data.path
    eval_set, keys = embed_data(module, data, device, options.batch_size, f"embedding {data_path}")
    skipped = data.skipped_counts("test")
    if eval_set.num_images == 0:
        raise UsageError(
            f"data {data_path}: no usable sample (skipped: {skipped or 'none'}); expected images with captions"
        )
    task = choose_task(options.task, eval_data.class_names, eval_set.labels, data_path)
    classifier = None
    if task == "zeroshot":
        with torch.no_grad():
            classifier = build_zeroshot_classifier(
                module.encode_texts, eval_data.class_names, eval_data.templates
            )
    metrics = evaluation_metrics(eval_set, classifier=classifier)
    reranked, ceiling, top_k = rerank(reranker, options, data, eval_set, device)
    results = results_document(
        task, options, data_path, eval_set, metrics, skipped, device,
        eval_data.templates if task == "zeroshot" else None, reranked_metrics=reranked, top_k=top_k,
    )  # fmt: skip
    if reranked is not None:
        results["first_stage_ceiling"] = ceiling
        results["config"]["reranker"] = checkpoint_hyperparameters(options.reranker)
        results["config"]["eval"].update(reranker=str(options.reranker), top_k=top_k, fusion=options.fusion)
    output = Path(options.output)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    title = f"{options.model} on {data_path}"
    pictures = write_pictures(eval_set, eval_data.sources, keys, stem, options, title=title)
    results["pictures"] = [str(path) for path in pictures]
    write_json_atomic(output, results)  # last: a results file means a complete run
    return results


def rerank(reranker, options: EvalOptions, data, eval_set, device: torch.device):
    """With a reranker: (reranked metrics, first-stage recall@K ceiling, K); else (None, None, None)."""
    if reranker is None:
        return None, None, None
    from mmret.evaluation.rerank import PairScorer, two_stage_metrics

    scorer = PairScorer.from_data(reranker, data, eval_set, device, options.batch_size)
    top_k = min(options.top_k, eval_set.num_images)
    reranked, ceiling = two_stage_metrics(
        eval_set, scorer, top_k, fusion_weight=options.fusion, pair_batch_size=4 * options.batch_size,
        progress=True,
    )  # fmt: skip
    return reranked, ceiling, top_k


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
    options: EvalOptions,
    data_path: Path,
    eval_set,
    metrics: dict,
    skipped: dict,
    device: torch.device,
    templates: list[str] | None,
    reranked_metrics: dict | None = None,
    top_k: int | None = None,
) -> dict:
    """The results JSON (the contract in README "Results"; metrics in [0, 1], counts apart)."""
    results = {
        "task": task,
        "model": str(options.model),
        "data": str(data_path),
        "num_images": eval_set.num_images,
        "num_texts": eval_set.num_texts,
        "metrics": {key: float(value) for key, value in metrics.items() if not is_count(key)},
        "counts": {key: int(value) for key, value in metrics.items() if is_count(key)},
        "top_k": top_k,
        "skipped": skipped,
        "config": {
            "model": checkpoint_hyperparameters(options.model),
            "eval": {
                "task": options.task,
                "split": options.split,
                "batch_size": options.batch_size,
                "device": str(device),
                "num_workers": options.num_workers,
                "templates": templates,
            },
        },
    }
    if reranked_metrics is not None:
        results["reranked_metrics"] = {k: float(v) for k, v in reranked_metrics.items() if not is_count(k)}
    return results


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


def write_pictures(
    eval_set, sources, keys: dict[int, str], stem: Path, options: EvalOptions, title: str
) -> list[Path]:
    """`<stem>_examples.png` (top images of a few text queries) and `<stem>_recall.png` (Recall@K curves)."""
    from PIL import Image

    from mmret.evaluation.plots import RetrievalExample, plot_recall_curves, plot_retrieval_examples
    from mmret.evaluation.retrieval import recall_curves, top_k_candidates

    stem.parent.mkdir(parents=True, exist_ok=True)
    queries = list(
        range(min(options.num_examples, eval_set.num_texts))
    )  # caption-hash order: fixed per data set
    top = top_k_candidates(eval_set.text_emb[queries], eval_set.image_emb, options.examples_top_k)
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
