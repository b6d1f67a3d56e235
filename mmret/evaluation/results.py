"""The evaluation of a trained dual encoder on a shard set (what `mmret eval` runs): exact retrieval metrics, zero-shot accuracy,
and pictures of what it retrieves.

    eval_data = open_eval_data(resolve_data_path("data/digits", "test"), task="auto", batch_size=128)
    results = evaluate(DualEncoder.from_checkpoint(CKPT), eval_data, EvalOptions(model=CKPT, output=OUT))

From the command line: `mmret eval --model CKPT --data data/digits --output results/digits.json`.

`--data` is a shard directory, or a dataset root holding train/val/test (then `--split`, default test, picks
one). Every image is embedded once and every unique caption string once; the metrics are those of
`mmret.evaluation.retrieval` (the same code as validation), named as in CLIP_benchmark. `--protocol` picks the
text queries: `mmret` (default; unique captions, pessimistic ties) or `clip_benchmark` (one query per caption
occurrence, recall@K as CLIP_benchmark's zero-shot retrieval computes it; no reranking there). `--task auto` (the
default) adds zero-shot accuracy when the data's dataset.json has `class_names` and the images have labels, and
then reports the task as "zeroshot"; `--task zeroshot` requires them; `--task retrieval` skips them.

Writes, replacing files of the same names (a rerun overwrites its results; each file is written to a temporary
name and renamed, so none is ever half-written):

    results.json           {"task", "protocol", "model", "data", "num_images", "num_texts", "dim", "metrics",
                            "counts", "top_k": null, "skipped", "config": {"model": <checkpoint
                            hyperparameters>, "eval": <these arguments>}}   (the Results contract, README
                            "Results"; a file without "protocol" was written before it existed: `mmret`).
                            "dim": the embedding width measured (`--dim D`, also in config.eval, cuts
                            every embedding to its first D coordinates, re-normalised); a Matryoshka
                            checkpoint without --dim adds "matryoshka_dims" and `dim<d>/<metric>` for
                            every smaller trained dim (`mmret.evaluation.matryoshka`)
    results_examples.png   a few text queries (the first ones in caption-hash order: fixed for a data set) and
                           their top-ranked images, correct ones framed in green and wrong ones in red; with a
                           reranker, two labelled rows per query: the first stage's top images and the reranked
                           ones. Correct means relevant (an image the caption was written for); in a zero-shot
                           evaluation it means of the query's class (the label its relevant images share),
                           whatever the image's own captions say. Under `--protocol clip_benchmark` the
                           queries are the first caption occurrences in data order, relevant to their own image
    results_recall.png     Recall@K for K = 1..50 in both directions; with a reranker also the reranked lists'
                           curves, for K up to the rerank depth (past it nothing is reordered)

The JSON is written last, so its presence means the run completed. With `--reranker CKPT --top-k K` (a
cross-encoder) each query's first-stage top-K is rescored (`mmret.evaluation.rerank`), optionally fused with the
first-stage score (`--fusion W`); the JSON then also holds "reranked_metrics", "top_k": K and
"first_stage_ceiling" (the first stage's recall@K: what no reranker of those lists can exceed). With
`--wandb-summary` the command also makes them the summary of the checkpoint's W&B run (`mmret.training.wandb_tracking`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmret.errors import UsageError
from mmret.evaluation.matryoshka import trained_dims, truncate_eval_set
from mmret.evaluation.shard_set import check_has_captions, embed_data, read_images
from mmret.io import write_json_atomic
from mmret.losses import truncate_embeddings

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
    protocol: str = "mmret"
    pretrained: str | None = None  # with `model` a model name: its pretrained tag or weights file
    dim: int | None = None  # `--dim`: the module embeds into this prefix (`mmret.evaluation.matryoshka`)


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
    eval_set, keys = embed_data(
        module, data, device, options.batch_size, f"embedding {data_path}", protocol=options.protocol
    )
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
    # a Matryoshka checkpoint evaluated at its full width: every smaller trained dim too, as dim<d>/<metric>
    dims = trained_dims(module) if options.dim is None else []
    metrics.update(matryoshka_metrics(module, eval_set, dims, eval_data if task == "zeroshot" else None))
    reranked, ceiling, top_k, lists = rerank(reranker, options, data, eval_set, device)
    results = results_document(
        task, options, data_path, eval_set, metrics, skipped, device,
        eval_data.templates if task == "zeroshot" else None, reranked_metrics=reranked, top_k=top_k,
    )  # fmt: skip
    if dims:
        results["matryoshka_dims"] = [int(eval_set.image_emb.shape[1]), *dims]
    if reranked is not None:
        results["first_stage_ceiling"] = ceiling
        results["config"]["reranker"] = checkpoint_hyperparameters(options.reranker)
        results["config"]["eval"].update(reranker=str(options.reranker), top_k=top_k, fusion=options.fusion)
    output = Path(options.output)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    ranker = f"{options.model} + reranker {options.reranker}" if lists is not None else str(options.model)
    pictures = write_pictures(
        eval_set, eval_data.sources, keys, stem, options, title=f"{ranker} on {data_path}", reranked=lists,
        class_names=eval_data.class_names if task == "zeroshot" else None,
    )  # fmt: skip
    results["pictures"] = [str(path) for path in pictures]
    write_json_atomic(output, results)  # last: a results file means a complete run
    return results


def matryoshka_metrics(module, eval_set, dims: list[int], zeroshot: EvalData | None) -> dict:
    """The metrics of `eval_set` cut to each of `dims` (`truncate_eval_set`; the zero-shot classifier from the
    cut prompt embeddings when `zeroshot` gives the class names), named `dim<d>/<metric>`; counts left out (they
    are the full width's)."""
    from mmret.evaluation.metrics import build_zeroshot_classifier
    from mmret.evaluation.retrieval import evaluation_metrics

    prompt_emb: dict[tuple[str, ...], torch.Tensor] = {}  # prompts embedded once, cut to every dim

    def encode_prompts(texts: list[str]) -> torch.Tensor:
        if tuple(texts) not in prompt_emb:
            prompt_emb[tuple(texts)] = module.encode_texts(texts)
        return prompt_emb[tuple(texts)]

    metrics = {}
    for dim in dims:
        classifier = None
        if zeroshot is not None:
            with torch.no_grad():
                classifier = build_zeroshot_classifier(
                    lambda texts, dim=dim: truncate_embeddings(encode_prompts(texts), dim),
                    zeroshot.class_names,
                    zeroshot.templates,
                )
        prefix = evaluation_metrics(truncate_eval_set(eval_set, dim), classifier=classifier)
        metrics.update({f"dim{dim}/{name}": value for name, value in prefix.items() if not is_count(name)})
    return metrics


def rerank(reranker, options: EvalOptions, data, eval_set, device: torch.device):
    """With a reranker: (reranked metrics, first-stage recall@K ceiling, K, the reranked lists of both
    directions); else (None, None, None, None)."""
    if reranker is None:
        return None, None, None, None
    from mmret.evaluation.rerank import PairScorer, rerank_lists, two_stage_summary

    scorer = PairScorer.from_data(reranker, data, eval_set, device, options.batch_size)
    top_k = min(options.top_k, eval_set.num_images)
    lists = rerank_lists(
        eval_set, scorer, top_k, fusion_weight=options.fusion, pair_batch_size=4 * options.batch_size,
        progress=True,
    )  # fmt: skip
    reranked, ceiling = two_stage_summary(eval_set, lists, top_k)
    return reranked, ceiling, top_k, lists


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
        "protocol": options.protocol,
        "model": str(options.model),
        "data": str(data_path),
        "num_images": eval_set.num_images,
        "num_texts": eval_set.num_texts,
        "dim": int(eval_set.image_emb.shape[1]),
        "metrics": {key: float(value) for key, value in metrics.items() if not is_count(key)},
        "counts": {key: int(value) for key, value in metrics.items() if is_count(key)},
        "top_k": top_k,
        "skipped": skipped,
        "config": {
            "model": checkpoint_hyperparameters(options.model, options.pretrained),
            "eval": {
                "task": options.task,
                "protocol": options.protocol,
                "split": options.split,
                "batch_size": options.batch_size,
                "device": str(device),
                "num_workers": options.num_workers,
                "templates": templates,
            },
        },
    }
    if options.dim is not None:  # only then: a results file without it was evaluated at the full width
        results["config"]["eval"]["dim"] = options.dim
    if reranked_metrics is not None:
        results["reranked_metrics"] = {k: float(v) for k, v in reranked_metrics.items() if not is_count(k)}
    return results


def checkpoint_hyperparameters(path: str, pretrained: str | None = None) -> dict:
    """The hyperparameters saved in a checkpoint (memory-mapped: the weights are not read again); for a folder
    written by `mmret export` or a model name with `pretrained` (`DualEncoder.load`'s other forms), what names
    the model: the folder and the architecture it was exported from, or the name and its weights."""
    folder = Path(path)
    if folder.is_dir():
        config = folder / "open_clip_config.json"
        source = None
        if config.is_file():
            with contextlib.suppress(ValueError, OSError, AttributeError):
                source = json.loads(config.read_text()).get("mmret", {}).get("source")
        return {"model": str(folder.resolve()), "exported_from": source}
    if not folder.is_file():
        return {"model": str(path), "pretrained": pretrained}
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
    eval_set,
    sources,
    keys: dict[int, str],
    stem: Path,
    options: EvalOptions,
    title: str,
    reranked: dict | None = None,
    class_names: list[str] | None = None,
) -> list[Path]:
    """`<stem>_examples.png` (top images of a few text queries) and `<stem>_recall.png` (Recall@K curves).

    Args:
        eval_set: the embedded set (`EmbeddedEvalSet`).
        sources, keys: where its images are (shard sources; sample id -> key), read back for the examples.
        stem: the path of both pictures without `_examples.png` / `_recall.png`.
        options: `num_examples` queries with their `examples_top_k` images are shown.
        title: the pictures' title.
        reranked: the reranked lists of both directions (`mmret.evaluation.rerank.rerank_lists`): both
            pictures then show the first stage and the reranked lists side by side.
        class_names: given for a zero-shot evaluation: images are framed correct by label
            (`retrieval_examples`).
    """
    from mmret.evaluation.plots import CAPTION_WRITTEN_FOR, plot_recall_curves, plot_retrieval_examples
    from mmret.evaluation.retrieval import recall_curves

    stem.parent.mkdir(parents=True, exist_ok=True)

    def load_images(image_ids: set[int]) -> dict:
        return read_images(sources, {image_id: keys[image_id] for image_id in image_ids if image_id in keys})

    examples = retrieval_examples(
        eval_set, load_images, options.num_examples, options.examples_top_k, reranked, class_names
    )
    correct_means = CAPTION_WRITTEN_FOR
    if class_names is not None:
        correct_means = "an image of the query's class (by label), whatever its captions"
    reranked_curves = depth = None
    if reranked is not None:
        from mmret.evaluation.rerank import reranked_recall_curves

        reranked_curves = reranked_recall_curves(eval_set, reranked)
        depth = max((lists.depth for lists in reranked.values()), default=0)
    curves = recall_curves(eval_set, RECALL_CURVE_MAX_K)
    return [
        plot_retrieval_examples(f"{stem}_examples.png", examples, title=title, correct_means=correct_means),
        plot_recall_curves(
            f"{stem}_recall.png", curves, title=title, reranked_curves=reranked_curves, rerank_depth=depth
        ),  # fmt: skip
    ]


def retrieval_examples(
    eval_set,
    load_images,
    num_examples: int,
    top_k: int,
    reranked: dict | None = None,
    class_names: list[str] | None = None,
) -> list:
    """The first `num_examples` text queries (caption-hash order: fixed for a data set) with their top images.

    Args:
        eval_set: the embedded set (`EmbeddedEvalSet`).
        load_images: image ids -> {image id: PIL image}; an id it leaves out is drawn as a blank square.
        num_examples: queries shown.
        top_k: images per ranking.
        reranked: the reranked lists (`rerank_lists`): each query then has a "first stage" ranking and a
            "reranked" one (its top `top_k` of the reranked list; past the rerank depth, the first stage's
            next images, noted "not reranked").
        class_names: given for a zero-shot evaluation: a query's class is the label that all its relevant
            images share, and an image is correct when it has that label (the task is classification: another
            image of the class is right even though the query caption was not written for it); a query whose
            images have no single label is framed by caption relevance.

    Returns:
        `mmret.evaluation.plots.RetrievalExample`s, in query order.
    """
    from PIL import Image

    from mmret.evaluation.metrics import IMAGE_RETRIEVAL
    from mmret.evaluation.plots import FIRST_STAGE, RERANKED, RankedImages, RetrievalExample
    from mmret.evaluation.retrieval import top_k_candidates

    queries = list(range(min(num_examples, eval_set.num_texts)))
    image_ids = eval_set.image_ids.tolist()
    labels = eval_set.labels.tolist()
    first = top_k_candidates(eval_set.text_emb[queries], eval_set.image_emb, top_k)
    # per query: [(label, candidate indices, scores, notes)], first stage first
    rankings: list[list[tuple[str, list[int], list[float], list[str]]]] = []
    for row in range(len(queries)):
        first_indices, first_scores = first.indices[row].tolist(), first.scores[row].tolist()
        rankings.append([(FIRST_STAGE, first_indices, first_scores, [])])
    if reranked is not None and queries:
        indices, scores, positions = reranked[IMAGE_RETRIEVAL].ranked(queries)
        for row, query_rankings in enumerate(rankings):
            ranked = indices[row, :top_k].tolist()
            notes = [
                f"was #{p + 1}" if p != rank else "" for rank, p in enumerate(positions[row, :top_k].tolist())
            ]
            new_scores = scores[row, :top_k].tolist()
            _, first_indices, first_scores, _ = query_rankings[0]
            for index, score in zip(first_indices, first_scores):  # past the rerank depth: the first stage's
                if len(ranked) >= top_k:
                    break
                if index not in ranked:
                    ranked.append(index)
                    new_scores.append(score)
                    notes.append("not reranked")
            query_rankings.append((RERANKED, ranked, new_scores, notes))
    wanted = {image_ids[index] for query_rankings in rankings for _, ranked, _, _ in query_rankings
              for index in ranked}  # fmt: skip
    images = load_images(wanted) if wanted else {}
    blank = Image.new("RGB", (8, 8), "white")
    examples = []
    for query, query_rankings in zip(queries, rankings):
        relevant_ids = eval_set.text_relevant[query]
        query_class = _query_class(relevant_ids, image_ids, labels) if class_names is not None else None
        if query_class is None:
            is_correct = [image_id in relevant_ids for image_id in image_ids]
            note = ""
        else:
            is_correct = [label == query_class for label in labels]
            name = class_names[query_class] if query_class < len(class_names) else str(query_class)
            note = f"class {name}"
        if bool(eval_set.text_unseen[query]):
            note = ", ".join(part for part in ("unseen", note) if part)
        examples.append(
            RetrievalExample(
                query=eval_set.captions[query] if eval_set.captions else f"query {query}",
                rankings=[
                    RankedImages(
                        images=[images.get(image_ids[index]) or blank for index in ranked],
                        scores=scores,
                        correct=[is_correct[index] for index in ranked],
                        label=label,
                        notes=notes,
                    )
                    for label, ranked, scores, notes in query_rankings
                ],
                num_correct=sum(is_correct),
                note=note,
            )
        )
    return examples


def _query_class(relevant_ids: set[int], image_ids: list[int], labels: list[int]) -> int | None:
    """The label that every image relevant to a query has (None when they have none or several)."""
    label_of_id = dict(zip(image_ids, labels))
    found = {label_of_id.get(image_id, -1) for image_id in relevant_ids}
    return found.pop() if len(found) == 1 and min(found) >= 0 else None
