"""Retrieval and zero-shot metrics from embeddings, named as CLIP_benchmark names them.

    captions, relevant = build_text_queries(captions_per_image, image_ids)      # dedupe caption strings
    text_emb = encode(captions)
    retrieval_metrics(image_emb, image_ids, text_emb, relevant)
    -> {"image_retrieval_recall@1": ..., "text_retrieval_recall@5": ..., "image_retrieval_ndcg@10": ..., ...}

    classifier = build_zeroshot_classifier(encode_text, class_names, templates)  # [num_classes, D]
    zeroshot_metrics(image_emb, labels, classifier) -> {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}

`image_retrieval_*` ranks images for each text query; `text_retrieval_*` ranks texts for each image query.
Two protocols (`PROTOCOLS`) say what the text queries are and how ties rank:

- `mmret` (the default): text queries are unique caption strings: an image is relevant to every caption it
  was paired with, and a caption written for several images is one query relevant to all of them. Scores are
  cosine similarities; ranking, tie handling (pessimistic) and the metric definitions are those of
  `mmret.evaluation.ranking` (`retrieval_metrics`).
- `clip_benchmark`: CLIP_benchmark's `zeroshot_retrieval`: one text query per caption occurrence, in data
  order, relevant only to the image it came with (an image is relevant to its own occurrences only), and
  recall@K as `torch.topk` lists the top K (`clip_benchmark_recall`). Only recall@K is defined there.

        captions, text_image_ids = build_occurrence_queries(captions_per_image, image_ids)
        clip_benchmark_recall(image_emb, text_emb, text_image_index)   # index: row of each text's image

After gathering embeddings from every DDP rank, `dedupe_by_id` drops the samples that the distributed
sampler padded or duplicated, so validation under DDP is exactly the single-process result.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmret.evaluation.ranking import (
    DEFAULT_CHUNK_SCORES,
    PerQueryMetrics,
    Relevance,
    embedding_scores,
    per_query_metrics,
)

IMAGE_RETRIEVAL = "image_retrieval"  # text query -> images
TEXT_RETRIEVAL = "text_retrieval"  # image query -> texts
MMRET_PROTOCOL = "mmret"  # unique captions, relevant to every image they were paired with; pessimistic ties
CLIP_BENCHMARK_PROTOCOL = "clip_benchmark"  # one query per caption occurrence; ties as torch.topk orders them
PROTOCOLS = (MMRET_PROTOCOL, CLIP_BENCHMARK_PROTOCOL)


def build_text_queries(
    captions_per_image: Sequence[Sequence[str]], image_ids: Sequence[Hashable] | Tensor
) -> tuple[list[str], list[list[Hashable]]]:
    """Turn the captions of each image into unique text queries and the images relevant to each.

    Captions are compared as exact strings. The result plugs into `retrieval_metrics(..., text_image_ids=)`.

    Args:
        captions_per_image: for each image, its captions (all of them positives of that image).
        image_ids: [N] the id of each image, parallel to `captions_per_image`.

    Returns:
        The unique captions in order of first appearance, and for each the ids of its relevant images (in
        image order, each once).
    """
    ids = _as_id_list(image_ids)
    if len(ids) != len(captions_per_image):
        raise ValueError(f"{len(captions_per_image)} caption lists but {len(ids)} image ids")
    query_of_caption: dict[str, int] = {}
    relevant: list[list[Hashable]] = []
    for image_id, captions in zip(ids, captions_per_image):
        if isinstance(captions, str):
            raise ValueError("captions_per_image must hold a list of captions per image, got a string")
        for caption in captions:
            query = query_of_caption.setdefault(caption, len(query_of_caption))
            if query == len(relevant):
                relevant.append([])
            if not relevant[query] or relevant[query][-1] != image_id:
                relevant[query].append(image_id)
    return list(query_of_caption), relevant


def build_occurrence_queries(
    captions_per_image: Sequence[Sequence[str]], image_ids: Sequence[Hashable] | Tensor
) -> tuple[list[str], list[Hashable]]:
    """CLIP_benchmark's text queries: one per caption occurrence, each relevant to its own image only.

    A caption repeated within an image or shared by several images is a query per occurrence, as
    CLIP_benchmark's `texts_image_index` has one entry per caption of every image of the data loader.

    Args:
        captions_per_image: for each image, its captions, in data order.
        image_ids: [N] the id of each image, parallel to `captions_per_image`.

    Returns:
        The captions (image by image, each image's in its order) and the id of each caption's image.
    """
    ids = _as_id_list(image_ids)
    if len(ids) != len(captions_per_image):
        raise ValueError(f"{len(captions_per_image)} caption lists but {len(ids)} image ids")
    captions: list[str] = []
    text_image_ids: list[Hashable] = []
    for image_id, image_captions in zip(ids, captions_per_image):
        if isinstance(image_captions, str):
            raise ValueError("captions_per_image must hold a list of captions per image, got a string")
        captions += list(image_captions)
        text_image_ids += [image_id] * len(image_captions)
    return captions, text_image_ids


def clip_benchmark_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image_index: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    text_query_groups: Mapping[str, Tensor] | None = None,
    image_query_groups: Mapping[str, Tensor] | None = None,
    chunk_size: int | None = None,
) -> dict[str, float | int]:
    """Recall@K in both directions as CLIP_benchmark's `zeroshot_retrieval` computes it.

    The scores are cosine similarities of the texts (one per caption occurrence) and the images. For each
    query and each K separately, the top K candidates are those `torch.topk(scores, K)` returns (so among
    exactly tied scores, `torch.topk`'s own order decides), and the query scores 1 when a relevant candidate
    is among them: for a text, its own image; for an image, any of its own texts. Each mean is over every
    query, an image without texts counting as a miss (CLIP_benchmark's 0/0 recall is NaN, and `NaN > 0` is
    false). Text rows that are bit-identical (the same caption embedded once and repeated) are scored once,
    so their scores tie exactly, as they do in exact arithmetic. K larger than the candidate set is capped
    (CLIP_benchmark's `torch.topk` would fail there).

    Args:
        image_emb: [N, D] image embeddings, in data order (normalised here).
        text_emb: [M, D] embeddings of the texts, in data order: image by image, each image's captions in
            their order (`build_occurrence_queries`).
        text_image_index: [M] row in `image_emb` of each text's image (CLIP_benchmark's `texts_image_index`).
        ks: the K of each `*_recall@K`.
        text_query_groups: name -> subset of the M text queries ([M] bool mask or indices); adds
            `name/image_retrieval_recall@K` over that subset.
        image_query_groups: name -> subset of the N image queries; adds `name/text_retrieval_recall@K`.
        chunk_size: queries scored at once (default: about 2**24 scores per chunk).

    Returns:
        `image_retrieval_recall@K`, `text_retrieval_recall@K`, `{direction}_num_queries` (queries in the mean),
        `{direction}_num_queries_without_relevant` (those of them with nothing relevant, counted as misses),
        `num_images`, `num_texts`, and the per-direction keys prefixed by each group name.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embeddings must be [N, D] and [M, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device
    image_of_text = torch.as_tensor(_as_id_list(text_image_index), dtype=torch.long).reshape(-1)
    if image_of_text.numel() != num_texts:
        raise ValueError(f"{num_texts} text embeddings but {image_of_text.numel()} text_image_index entries")
    if num_texts and (int(image_of_text.min()) < 0 or int(image_of_text.max()) >= num_images):
        raise ValueError(f"text_image_index must lie in [0, {num_images}), the rows of image_emb")
    image_of_text = image_of_text.to(device)
    image_emb = F.normalize(image_emb.detach().float(), dim=-1)
    text_emb = F.normalize(text_emb.detach().float().to(device), dim=-1)
    # One score row per distinct text embedding: repeated captions get exactly equal scores.
    unique_text_emb, unique_of_text = torch.unique(text_emb, dim=0, return_inverse=True)  # [U, D], [M]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_SCORES // max(num_images, num_texts, 1))

    # text -> images: the top K of a text depend on its caption only, so each distinct caption is ranked once.
    text_hits = {k: torch.zeros(num_texts, dtype=torch.bool, device=device) for k in ks}
    order = torch.argsort(unique_of_text, stable=True)  # texts grouped by their distinct caption
    grouped = unique_of_text[order]
    for start in range(0, unique_text_emb.shape[0], chunk_size):
        end = min(start + chunk_size, unique_text_emb.shape[0])
        scores = unique_text_emb[start:end] @ image_emb.t()  # [b, N]
        lo, hi = torch.searchsorted(grouped, torch.tensor([start, end], device=device)).tolist()
        texts = order[lo:hi]
        for k in ks:
            top = torch.topk(scores, min(k, num_images), dim=1).indices  # [b, k]
            own = image_of_text[texts, None]  # [n, 1]
            text_hits[k][texts] = (top[unique_of_text[texts] - start] == own).any(dim=1)

    # image -> texts, in data order: score the distinct captions, then spread them over their occurrences.
    image_hits = {k: torch.zeros(num_images, dtype=torch.bool, device=device) for k in ks}
    for start in range(0, num_images, chunk_size):
        end = min(start + chunk_size, num_images)
        scores = (image_emb[start:end] @ unique_text_emb.t())[:, unique_of_text]  # [b, M]
        rows = torch.arange(start, end, device=device)[:, None]  # [b, 1]
        for k in ks if num_texts else ():
            top = torch.topk(scores, min(k, num_texts), dim=1).indices  # [b, k] text indices
            image_hits[k][start:end] = (image_of_text[top] == rows).any(dim=1)

    texts_per_image = torch.bincount(image_of_text, minlength=num_images)
    results: dict[str, float | int] = {"num_images": num_images, "num_texts": num_texts}
    directions = (
        (IMAGE_RETRIEVAL, text_hits, torch.ones(num_texts, dtype=torch.bool), text_query_groups),
        (TEXT_RETRIEVAL, image_hits, texts_per_image.cpu() > 0, image_query_groups),
    )
    for direction, hits, has_relevant, groups in directions:
        hits = {k: value.cpu() for k, value in hits.items()}
        named = [("", None), *((f"{name}/", queries) for name, queries in (groups or {}).items())]
        for prefix, queries in named:
            selected = _query_selection(queries, has_relevant.numel())
            count = int(selected.sum())
            for k in ks:
                mean = float(hits[k][selected].double().sum()) / count if count else 0.0
                results[f"{prefix}{direction}_recall@{k}"] = mean
            without_relevant = int((selected & ~has_relevant).sum())
            results[f"{prefix}{direction}_num_queries"] = count
            results[f"{prefix}{direction}_num_queries_without_relevant"] = without_relevant
    return results


def _query_selection(queries: Tensor | None, num_queries: int) -> Tensor:
    """[Q] bool mask of a query subset given as a mask or as indices (None: every query)."""
    if queries is None:
        return torch.ones(num_queries, dtype=torch.bool)
    queries = torch.as_tensor(queries).cpu()
    if queries.dtype == torch.bool:
        if queries.shape != (num_queries,):
            raise ValueError(f"query mask has shape {tuple(queries.shape)}, expected ({num_queries},)")
        return queries
    selected = torch.zeros(num_queries, dtype=torch.bool)
    selected[queries.long()] = True
    return selected


def retrieval_metrics(
    image_emb: Tensor,
    image_ids: Sequence[Hashable] | Tensor,
    text_emb: Tensor,
    text_image_ids: Sequence[Hashable | Iterable[Hashable]] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    ranking_k: int = 10,
    text_query_groups: Mapping[str, Tensor] | None = None,
    image_query_groups: Mapping[str, Tensor] | None = None,
    chunk_size: int | None = None,
) -> dict[str, float | int]:
    """Image<->text retrieval metrics in both directions, computed exactly and chunk by chunk.

    Args:
        image_emb: [N, D] image embeddings (normalised here: scores are cosine similarities).
        image_ids: [N] unique id of each image.
        text_emb: [M, D] embeddings of the text queries.
        text_image_ids: for each of the M texts, the id of its image, or a collection (set, list, tuple)
            of the ids of all its relevant images — as returned by `build_text_queries`.
        ks: cut-offs of `*_recall@K` (hit rate: 1 when any relevant item is in the top K).
        ranking_k: cut-off of `*_mrr@K`, `*_ndcg@K` and `*_map@K`.
        text_query_groups: name -> subset of the M text queries ([M] bool mask or indices); adds
            `name/image_retrieval_*` metrics over that subset (e.g. "seen" and "unseen" captions).
        image_query_groups: name -> subset of the N image queries; adds `name/text_retrieval_*`.
        chunk_size: queries scored at once (default: about 2**24 scores per chunk).

    Returns:
        `image_retrieval_recall@K`, `text_retrieval_recall@K`, `{direction}_mrr@K`, `_ndcg@K`, `_map@K`,
        `{direction}_num_queries` and `{direction}_num_queries_without_relevant` (queries left out of the
        means because nothing is relevant to them, e.g. an image without captions), `num_images`,
        `num_texts`, and the same per-direction keys prefixed by each group name.
    """
    ids = _as_id_list(image_ids)
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embeddings must be [N, D] and [M, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if len(ids) != image_emb.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} image embeddings but {len(ids)} image ids")
    index_of_image = {image_id: index for index, image_id in enumerate(ids)}
    if len(index_of_image) != len(ids):
        raise ValueError("image_ids contain duplicates; deduplicate gathered samples with dedupe_by_id first")
    texts = _as_id_list(text_image_ids)
    if len(texts) != text_emb.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} text embeddings but {len(texts)} entries in text_image_ids")

    relevant_images = []
    for text, image_of_text in enumerate(texts):
        group = image_of_text if _is_collection(image_of_text) else [image_of_text]
        try:
            relevant_images.append({index_of_image[image_id] for image_id in group})
        except KeyError as err:
            raise ValueError(
                f"text {text} refers to image id {err.args[0]!r}, which is not in image_ids"
            ) from None
    text_to_image = Relevance.from_lists(relevant_images, num_candidates=len(ids))

    # Cosine similarity in float32: half-precision embeddings would make ties (and CPU matmuls) worse.
    image_emb = F.normalize(image_emb.detach().float(), dim=-1)
    text_emb = F.normalize(text_emb.detach().float(), dim=-1)
    cutoffs = sorted(set(ks) | {ranking_k})
    directions = (
        (IMAGE_RETRIEVAL, embedding_scores(text_emb, image_emb), text_to_image, text_query_groups),
        (
            TEXT_RETRIEVAL,
            embedding_scores(image_emb, text_emb),
            text_to_image.transpose(),
            image_query_groups,
        ),
    )
    results: dict[str, float | int] = {"num_images": len(ids), "num_texts": len(texts)}
    for direction, scores, relevance, groups in directions:
        per_query = per_query_metrics(
            scores, relevance, cutoffs, ("recall", "mrr", "ndcg", "map"), chunk_size
        )
        results.update(_direction_summary(per_query, direction, ks, ranking_k, None))
        for name, queries in (groups or {}).items():
            results.update(
                _direction_summary(per_query, direction, ks, ranking_k, queries, prefix=f"{name}/")
            )
    return results


def _direction_summary(
    per_query: PerQueryMetrics,
    direction: str,
    ks: Sequence[int],
    ranking_k: int,
    queries: Tensor | None,
    prefix: str = "",
) -> dict[str, float | int]:
    """The reported subset of one direction's metrics, renamed `{prefix}{direction}_{metric}@K`."""
    summary = per_query.summarize(queries)
    wanted = [f"recall@{k}" for k in ks] + [f"{name}@{ranking_k}" for name in ("mrr", "ndcg", "map")]
    wanted += ["num_queries", "num_queries_without_relevant"]
    return {f"{prefix}{direction}_{key}": summary[key] for key in wanted}


def build_zeroshot_classifier(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    classes_per_batch: int = 16,
) -> Tensor:
    """Zero-shot classifier weights: per class, the mean of its normalised prompt embeddings, renormalised.

    This is the open_clip / CLIP_benchmark protocol (prompt ensembling in embedding space).

    Args:
        encode_text: texts -> [n, D] text embeddings (e.g. a tokenizer + `model.encode_text`, under no_grad).
        class_names: the C class names, in label order.
        templates: prompt templates, each a str with a `{}` placeholder or a function of the class name.
        classes_per_batch: classes whose prompts are encoded in one `encode_text` call.

    Returns:
        [C, D] unit-norm class embeddings.
    """
    if not class_names or not templates:
        raise ValueError("build_zeroshot_classifier needs at least one class name and one template")
    num_templates = len(templates)
    weights = []
    for first in range(0, len(class_names), classes_per_batch):
        names = class_names[first : first + classes_per_batch]
        prompts = [_fill_template(template, name) for name in names for template in templates]
        prompt_emb = encode_text(prompts)  # [len(names) * T, D]
        if prompt_emb.dim() != 2 or prompt_emb.shape[0] != len(prompts):
            raise ValueError(f"encode_text returned shape {tuple(prompt_emb.shape)} for {len(prompts)} texts")
        prompt_emb = F.normalize(prompt_emb.detach().float(), dim=-1).reshape(len(names), num_templates, -1)
        weights.append(F.normalize(prompt_emb.mean(dim=1), dim=-1))  # [len(names), D]
    return torch.cat(weights)


def zeroshot_metrics(
    image_emb: Tensor,
    labels: Tensor,
    classifier: Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Zero-shot classification accuracy: each image is a query ranking the C class embeddings.

    Ties are pessimistic as in retrieval, so an image whose true class ties with another is counted wrong.

    Args:
        image_emb: [N, D] image embeddings.
        labels: [N] true class index of each image, in [0, C).
        classifier: [C, D] class embeddings (from `build_zeroshot_classifier`).
        ks: top-K accuracies to report as `acc{K}`.
        chunk_size: images scored at once.

    Returns:
        `acc{K}` for each K and `mean_per_class_recall` (top-1 recall averaged over the classes present in
        `labels`; sklearn's balanced accuracy, as CLIP_benchmark reports it).
    """
    labels = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    num_classes = classifier.shape[0]
    if image_emb.dim() != 2 or classifier.dim() != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(
            f"image_emb must be [N, D] and classifier [C, D], got {tuple(image_emb.shape)}, {tuple(classifier.shape)}"
        )
    if labels.numel() != image_emb.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} image embeddings but {labels.numel()} labels")
    if labels.numel() == 0:
        raise ValueError("zeroshot_metrics needs at least one image")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) to match the classifier")
    relevance = Relevance.from_labels(labels, torch.arange(num_classes))
    image_emb = image_emb.detach().float()
    scores = embedding_scores(image_emb, classifier.detach().float().to(image_emb.device))
    per_query = per_query_metrics(scores, relevance, sorted(set(ks) | {1}), ("recall",), chunk_size)
    results = {f"acc{k}": float(per_query.values[f"recall@{k}"].mean()) for k in ks}
    correct = per_query.values["recall@1"]  # [N] 1.0 where the true class ranks first
    per_class_hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    per_class_count = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    present = per_class_count > 0
    results["mean_per_class_recall"] = float((per_class_hits[present] / per_class_count[present]).mean())
    return results


def dedupe_by_id(ids: Sequence[Hashable] | Tensor, *tensors: Tensor) -> tuple:
    """Keep one row per id, sorted by id: undoes the padding/duplication of samples gathered across ranks.

    For each id the first row in which it appears is kept; duplicates are expected to be copies of it.

    Args:
        ids: [N] sample ids (a 1-D integer tensor, or a sequence of sortable hashables such as str keys).
        *tensors: tensors with N rows, gathered alongside the ids (embeddings, labels, ...).

    Returns:
        (unique_ids, *deduplicated tensors), ids in increasing order and in the type they came in.
    """
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        sorted_ids, order = torch.sort(ids, stable=True)  # stable: the first occurrence leads each run
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        keep = order[first]
        unique_ids: Sequence[Hashable] | Tensor = sorted_ids[first]
    else:
        ids = list(ids)
        keep_list, seen = [], set()
        for index in sorted(range(len(ids)), key=ids.__getitem__):
            if ids[index] not in seen:
                seen.add(ids[index])
                keep_list.append(index)
        keep = torch.tensor(keep_list, dtype=torch.long)
        unique_ids = [ids[index] for index in keep_list]
    for position, tensor in enumerate(tensors):
        if tensor.shape[0] != len(ids):
            raise ValueError(f"tensor {position} has {tensor.shape[0]} rows but there are {len(ids)} ids")
    return (unique_ids, *(tensor[keep.to(tensor.device)] for tensor in tensors))


def _fill_template(template: str | Callable[[str], str], class_name: str) -> str:
    return template(class_name) if callable(template) else template.format(class_name)


def _is_collection(value: object) -> bool:
    """A set/list/tuple of ids (several relevant images), as opposed to a single id such as a str or int."""
    return isinstance(value, (set, frozenset, list, tuple, Tensor)) and not (
        isinstance(value, Tensor) and value.dim() == 0
    )


def _as_id_list(ids: Sequence | Tensor) -> list:
    """Ids as a list of hashable Python values (tensor elements become ints)."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(f"id tensors must be 1-D, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return list(ids)
