"""Compositional evaluation (SugarCrepe-style): does the model prefer the true caption to one with the same
words in another composition, and its own image to a twin drawn from the same words?

    mmret eval --task compositional --model CKPT --data data/shapes [--reranker CKPT] --output comp.json
    mmret eval --task compositional --model CKPT --benchmark swap_att.json --image-root val2017 --output s.json

    pairs = build_pairs(records, CaptionPerturber.for_dataset(info), seed=0)     # records: ImageRecord
    metrics, counts = compositional_metrics(pairs, embedding_scorer(text_emb, image_emb))

Two kinds of pairs, each correct when the true match scores strictly higher (a tie counts as wrong):
- text pairs: for every image and each of its distinct captions, one hard-negative caption per perturbation
  type that applies (`mmret.data.perturb.CaptionPerturber.one_per_type`, seeded: the same pairs every run;
  never the caption nor another caption of the image): score(image, caption) > score(image, negative).
  Reported per type, `compositional_text_acc/<type>`, and as their macro mean `compositional_text_acc`.
- twin images: for each caption of an image with a `swap_group` (the shapes data's val/test), every other
  image of the group that the caption does not describe: score(caption, image) > score(caption, twin).
  Reported overall, `compositional_image_acc`, and per `swap_variant` of the twin.
Images marked `"part": "seen" | "unseen"` add the same names with a `/seen` or `/unseen` suffix. Counts of
pairs (`compositional_text_n/<type>`, `compositional_image_n`, ...) go to the results' "counts", as every count
does (its "metrics" hold values in [0, 1]).

Scores come from the dual encoder (cosine of its embeddings: the images embedded once by `embed_data`, the
negative captions by its text tower in batches) and, with a reranker, from the cross-encoder over the same
pairs (`mmret.evaluation.rerank.PairScorer`): then the same names again under "reranked_metrics".

Released benchmarks are read by `mmret.evaluation.compositional_benchmarks` and scored the same way. The
results JSON is written last (atomically), a bar chart of the accuracies (`<stem>_compositional.png`) before it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmret.data.perturb import CaptionPerturber, normalize
from mmret.errors import UsageError
from mmret.io import write_json_atomic

TEXT = "compositional_text"
IMAGE = "compositional_image"
PARTS = ("seen", "unseen")
DEFAULT_SEED = 0
TWIN_VARIANT = "twin"  # the variant name of a twin whose metadata has no `swap_variant`

# (text indices [n], image indices [n]) -> scores [n] of those n (text, image) pairs (as in rerank.py).
PairScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ImageRecord:
    """One image of the evaluated set: its id, captions (all positives) and shard metadata."""

    image_id: int
    captions: Sequence[str]
    metadata: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class TextPair:
    """Image `image` should score caption `positive` above caption `negative` (rows of the tables)."""

    image: int
    positive: int
    negative: int
    type: str
    part: str | None = None


@dataclass(frozen=True)
class ImagePair:
    """Caption `text` should score image `positive` above its twin image `negative`."""

    text: int
    positive: int
    negative: int
    variant: str
    part: str | None = None


@dataclass
class CompositionalPairs:
    """Pairs as indices into a table of caption strings and a table of images (eval-set order)."""

    texts: list[str]
    num_images: int
    text_pairs: list[TextPair]
    image_pairs: list[ImagePair] = field(default_factory=list)


class _TextTable:
    """Caption strings -> rows, first come first served."""

    def __init__(self, texts: Sequence[str] = ()) -> None:
        self.texts: list[str] = []
        self.row: dict[str, int] = {}
        for text in texts:
            self.add(text)

    def add(self, text: str) -> int:
        if text not in self.row:
            self.row[text] = len(self.texts)
            self.texts.append(text)
        return self.row[text]


def distinct_captions(captions: Sequence[str]) -> list[str]:
    """The captions without repeats (compared as `mmret.data.perturb` compares them), first one kept."""
    seen, out = set(), []
    for caption in captions:
        if normalize(caption) not in seen:
            seen.add(normalize(caption))
            out.append(caption)
    return out


def _part(metadata: Mapping) -> str | None:
    part = metadata.get("part") if isinstance(metadata, Mapping) else None
    return part if part in PARTS else None


def build_pairs(
    records: Sequence[ImageRecord],
    perturber: CaptionPerturber,
    seed: int = DEFAULT_SEED,
    texts: Sequence[str] = (),
) -> CompositionalPairs:
    """The text pairs and twin-image pairs of a set of images (see the module docstring).

    Args:
        records: the images, in the order of the image table (row i = records[i]).
        perturber: makes the negative captions (one per applicable type).
        seed: the perturbation seed (with the caption, it fixes every negative).
        texts: strings to put first in the text table (e.g. captions that are embedded already).
    """
    table = _TextTable(texts)
    text_pairs: list[TextPair] = []
    captions_of = [distinct_captions(record.captions) for record in records]
    for row, (record, captions) in enumerate(zip(records, captions_of)):
        part = _part(record.metadata)
        for caption in captions:
            positive = table.add(caption)
            for negative in perturber.one_per_type(caption, captions, seed):
                text_pairs.append(TextPair(row, positive, table.add(negative.text), negative.type, part))
    groups: dict[object, list[int]] = defaultdict(list)
    for row, record in enumerate(records):
        group = record.metadata.get("swap_group") if isinstance(record.metadata, Mapping) else None
        if group is not None:
            groups[group].append(row)
    image_pairs: list[ImagePair] = []
    for members in groups.values():
        for row in members:
            part = _part(records[row].metadata)
            for caption in captions_of[row]:
                for twin in members:
                    if twin == row or normalize(caption) in {normalize(c) for c in captions_of[twin]}:
                        continue  # the caption describes that image too: not a negative
                    variant = str(records[twin].metadata.get("swap_variant") or TWIN_VARIANT)
                    image_pairs.append(ImagePair(table.row[caption], row, twin, variant, part))
    return CompositionalPairs(table.texts, len(records), text_pairs, image_pairs)


# ---- scoring and metrics ---------------------------------------------------------------------------------------
def embedding_scorer(text_emb: Tensor, image_emb: Tensor) -> PairScoreFn:
    """Cosine similarity of rows of L2-normalised text embeddings [T, D] and image embeddings [N, D]."""

    def score(text_index: Tensor, image_index: Tensor) -> Tensor:
        text = text_emb[text_index.to(text_emb.device)].float()
        image = image_emb[image_index.to(image_emb.device)].float()
        return (text * image).sum(-1)  # [n]

    return score


def score_unique_pairs(
    pairs: Sequence[tuple[int, int]], score_pairs: PairScoreFn, batch_size: int = 512
) -> dict[tuple[int, int], float]:
    """Score each distinct (text, image) pair once, `batch_size` pairs per call."""
    unique = sorted(set(pairs))
    scores: dict[tuple[int, int], float] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        texts = torch.tensor([t for t, _ in chunk], dtype=torch.long)
        images = torch.tensor([i for _, i in chunk], dtype=torch.long)
        with torch.no_grad():
            values = score_pairs(texts, images).float().cpu().tolist()
        scores.update(zip(chunk, values))
    return scores


def pair_outcomes(
    pairs: CompositionalPairs, score_pairs: PairScoreFn, batch_size: int = 512
) -> tuple[list[bool], list[bool]]:
    """Whether each text pair and each image pair is correct (true match strictly higher; NaN is wrong)."""
    needed = [(p.positive, p.image) for p in pairs.text_pairs] + [
        (p.negative, p.image) for p in pairs.text_pairs
    ]
    needed += [(p.text, p.positive) for p in pairs.image_pairs] + [
        (p.text, p.negative) for p in pairs.image_pairs
    ]
    score = score_unique_pairs(needed, score_pairs, batch_size)
    text_ok = [score[(p.positive, p.image)] > score[(p.negative, p.image)] for p in pairs.text_pairs]
    image_ok = [score[(p.text, p.positive)] > score[(p.text, p.negative)] for p in pairs.image_pairs]
    return text_ok, image_ok


def _accuracies(outcomes: Sequence[bool], groups: Sequence[str], parts: Sequence[str | None]):
    """{(group or None, part or None): (correct, n)} over all pairs, per group, per part and both."""
    tally: dict[tuple[str | None, str | None], list[int]] = defaultdict(lambda: [0, 0])
    for ok, group, part in zip(outcomes, groups, parts):
        for key in [(None, None), (group, None)] + ([(None, part), (group, part)] if part else []):
            tally[key][0] += int(ok)
            tally[key][1] += 1
    return tally


def _name(prefix: str, kind: str, group: str | None, part: str | None) -> str:
    return "/".join([f"{prefix}_{kind}", *([group] if group else []), *([part] if part else [])])


def compositional_metrics(
    pairs: CompositionalPairs, score_pairs: PairScoreFn, batch_size: int = 512
) -> tuple[dict[str, float], dict[str, int]]:
    """Accuracies (values in [0, 1]) and pair counts of every type / twin variant, overall and per part.

    Returns:
        metrics: `compositional_text_acc` (macro mean over types), `compositional_text_acc/<type>`,
            `compositional_image_acc` (over all twin pairs), `compositional_image_acc/<variant>`, and each with
            a `/seen` and `/unseen` suffix when images are marked so. Absent when there is no pair of a kind.
        counts: the same names with `_n` for `_acc` (text pairs also overall: `compositional_text_n`).
    """
    text_ok, image_ok = pair_outcomes(pairs, score_pairs, batch_size)
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    text = _accuracies(text_ok, [p.type for p in pairs.text_pairs], [p.part for p in pairs.text_pairs])
    for part in (None, *PARTS):
        per_type = {g: c for (g, p), c in text.items() if g is not None and p == part}
        if not per_type:
            continue
        for group, (correct, n) in sorted(per_type.items()):
            metrics[_name(TEXT, "acc", group, part)] = correct / n
            counts[_name(TEXT, "n", group, part)] = n
        # macro: every type weighs the same, however many captions it applies to
        metrics[_name(TEXT, "acc", None, part)] = sum(c / n for c, n in per_type.values()) / len(per_type)
        counts[_name(TEXT, "n", None, part)] = text[(None, part)][1]
    image = _accuracies(image_ok, [p.variant for p in pairs.image_pairs], [p.part for p in pairs.image_pairs])
    for (group, part), (correct, n) in sorted(
        image.items(), key=lambda item: (item[0][1] or "", item[0][0] or "")
    ):
        metrics[_name(IMAGE, "acc", group, part)] = correct / n
        counts[_name(IMAGE, "n", group, part)] = n
    return metrics, counts


# ---- a shard set ---------------------------------------------------------------------------------------------
class RecordingData:
    """A data module whose test loader also keeps each image's captions and metadata by sample id, so the one
    embedding pass (`embed_data`) also yields what the pairs are built from. Everything else is the module's."""

    def __init__(self, data) -> None:
        self._data = data
        self.records: dict[int, ImageRecord] = {}

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def test_dataloader(self) -> Iterator[dict]:
        for batch in self._data.test_dataloader():
            for sample_id, captions, metadata in zip(
                batch["sample_id"].tolist(), batch["captions"], batch["metadata"]
            ):
                self.records.setdefault(
                    int(sample_id), ImageRecord(int(sample_id), list(captions), dict(metadata or {}))
                )
            yield batch


@torch.no_grad()
def score_eval_set(
    encode_texts: Callable[[list[str]], Tensor],
    eval_set,
    records: Sequence[ImageRecord],
    perturber: CaptionPerturber,
    device: torch.device,
    batch_size: int,
    seed: int = DEFAULT_SEED,
) -> tuple[CompositionalPairs, dict[str, float], dict[str, int]]:
    """The pairs of an embedded eval set and the dual encoder's accuracies on them (what `mmret eval` and the
    DualEncoder's validation compute).

    Args:
        encode_texts: caption strings -> [B, D] L2-normalised embeddings (the dual encoder's text tower).
        eval_set: a `mmret.evaluation.retrieval.EmbeddedEvalSet` with its caption strings; its caption
            embeddings are reused, only the perturbed captions are embedded here.
        records: the images of `eval_set`, in its order (`eval_set.image_ids`).
    """
    known = list(eval_set.captions or [])
    pairs = build_pairs(records, perturber, seed, texts=known)
    text_emb = embed_texts(encode_texts, pairs.texts[len(known) :], device, batch_size)
    if known:  # the eval set's own captions are embedded already
        embedded = eval_set.text_emb[: len(known)].float().to(device)
        text_emb = torch.cat([embedded, text_emb]) if len(text_emb) else embedded
    image_emb = eval_set.image_emb.float().to(device)
    metrics, counts = compositional_metrics(pairs, embedding_scorer(text_emb, image_emb))
    return pairs, metrics, counts


@torch.no_grad()
def embed_texts(
    encode_texts: Callable[[list[str]], Tensor], texts: Sequence[str], device: torch.device, batch_size: int
) -> Tensor:
    """[T, D] float embeddings of caption strings by `encode_texts`, `batch_size` at a time."""
    chunks = [
        encode_texts(list(texts[start : start + batch_size])).float().to(device)
        for start in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)


def evaluate_compositional(module, eval_data, options, reranker=None, seed: int = DEFAULT_SEED) -> dict:
    """Score the text and twin-image pairs of a shard set with `module` (and `reranker`), draw the bar chart
    beside `options.output` and write the results JSON there, last.

    Args:
        module: a dual encoder (`encode_image`, `encode_texts`, `tokenizer`, `model`).
        eval_data: `mmret.evaluation.results.open_eval_data(...)`.
        options: `mmret.evaluation.results.EvalOptions`.
        reranker: a cross-encoder (`mmret.training.CrossEncoder`), or None.
        seed: the perturbation seed.

    Returns:
        The results document (also written to `options.output`).
    """
    from mmret.evaluation.shard_set import embed_data

    device = torch.device(options.device)
    data = RecordingData(eval_data.data)
    eval_set, _ = embed_data(module, data, device, options.batch_size, f"embedding {eval_data.path}")
    skipped = data.skipped_counts("test")
    if eval_set.num_images == 0:
        raise UsageError(
            f"data {eval_data.path}: no usable sample (skipped: {skipped or 'none'}); expected images with captions"
        )
    records = [data.records[image_id] for image_id in eval_set.image_ids.tolist()]
    perturber = CaptionPerturber.for_dataset(data.dataset_info("test"))
    pairs, metrics, counts = score_eval_set(
        module.encode_texts, eval_set, records, perturber, device, options.batch_size, seed
    )
    reranked = None
    if reranker is not None:
        from mmret.evaluation.rerank import PairScorer

        table = dataclasses.replace(
            eval_set,
            text_emb=torch.zeros(len(pairs.texts), 0),
            text_relevant=[set() for _ in pairs.texts],
            text_unseen=torch.zeros(len(pairs.texts), dtype=torch.bool),
            captions=pairs.texts,
        )  # the eval set's images against the table of every caption of the pairs
        scorer = PairScorer.from_data(reranker, data, table, device, options.batch_size)
        reranked, _ = compositional_metrics(pairs, scorer, 4 * options.batch_size)
    sizes = {"num_images": eval_set.num_images, "num_texts": eval_set.num_texts}
    results = compositional_document(options, str(eval_data.path), sizes, metrics, counts, reranked, seed)
    results["skipped"] = skipped
    return write_results(results, options, f"{options.model} on {eval_data.path}")


# ---- results --------------------------------------------------------------------------------------------------
def compositional_document(
    options,
    data: str | list[str],
    sizes: Mapping[str, int],
    metrics: Mapping[str, float],
    counts: Mapping[str, int],
    reranked: Mapping[str, float] | None,
    seed: int | None,
    extra_eval: Mapping | None = None,
) -> dict:
    """The results JSON of the compositional task (the Results contract; see the module docstring)."""
    from mmret.evaluation.results import checkpoint_hyperparameters

    results = {
        "task": "compositional",
        "model": str(options.model),
        "data": data,
        "num_images": int(sizes["num_images"]),
        "num_texts": int(sizes["num_texts"]),
        "metrics": {key: float(value) for key, value in metrics.items()},
        "counts": {key: int(value) for key, value in counts.items()},
        "top_k": None,
        "config": {
            "model": checkpoint_hyperparameters(options.model, options.pretrained),
            "eval": {
                "task": "compositional",
                "split": options.split,
                "batch_size": options.batch_size,
                "device": str(options.device),
                "num_workers": options.num_workers,
                "perturbation_seed": seed,
                **(extra_eval or {}),
            },
        },
    }
    if reranked is not None:
        results["reranked_metrics"] = {key: float(value) for key, value in reranked.items()}
        results["config"]["reranker"] = checkpoint_hyperparameters(options.reranker)
        results["config"]["eval"]["reranker"] = str(options.reranker)
    if getattr(options, "dim", None) is not None:  # `--dim`: the module embedded into this prefix
        results["config"]["eval"]["dim"] = options.dim
    return results


def write_results(results: dict, options, title: str) -> dict:
    """Draw `<stem>_compositional.png`, then write the results JSON (last: its presence means a complete run)."""
    output = Path(options.output)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    picture = plot_accuracies(
        f"{stem}_compositional.png", results["metrics"], results.get("reranked_metrics"), title=title
    )
    results["pictures"] = [str(picture)]
    write_json_atomic(output, results)
    return results


def plot_accuracies(
    path: str | Path,
    metrics: Mapping[str, float],
    reranked: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Bars of the accuracy per perturbation type and twin variant (dual encoder, and reranked beside it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt

    from mmret.evaluation.plots import _save as save_figure

    names = [
        key
        for key in metrics
        if key.count("/") == 1
        and key.split("/")[0] in (f"{TEXT}_acc", f"{IMAGE}_acc")
        and key.split("/")[1] not in PARTS
    ]
    names += [key for key in (f"{TEXT}_acc", f"{IMAGE}_acc") if key in metrics]
    labels = [key.replace(f"{TEXT}_acc/", "").replace(f"{IMAGE}_acc/", "twin: ") for key in names]
    overall = {f"{TEXT}_acc": "text (macro)", f"{IMAGE}_acc": "twin images (all)"}
    labels = [overall.get(label, label) for label in labels]
    series = [("dual encoder", metrics)] + ([("reranked", reranked)] if reranked else [])
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.75 * len(names) + 2), 4.4))
    for offset, (label, values) in enumerate(series):
        heights = [values.get(name, math.nan) for name in names]
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, heights, width=width, label=label)
        ax.bar_label(bars, labels=[f"{h:.2f}" if h == h else "" for h in heights], fontsize=7, padding=1)
    ax.axhline(0.5, color="#888888", linewidth=1, linestyle="--", label="chance (0.5)")
    ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy (true match scored higher)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
