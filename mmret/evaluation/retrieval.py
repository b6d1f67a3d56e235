"""Embed an evaluation set once, turn its captions into text queries, and score it.

This is the one evaluation path: `DualEncoder` validation (every rank, gathered) and `mmret eval` (one process)
both run it, so their numbers mean the same thing.

    embedder = EvalSetEmbedder(model.encode_image, model.encode_texts, device=model.device)
    for batch in loader:                     # eval batches: image, sample_id, label, captions, metadata
        embedder.add_batch(batch)            # images embedded now; captions collected as strings
    eval_set = embedder.finish()             # unique captions embedded; gathered over ranks, deduped by id
    classifier = build_zeroshot_classifier(model.encode_texts, class_names, templates)   # optional
    evaluation_metrics(eval_set, ks=(1, 5, 10), classifier=classifier)
    -> {"image_retrieval_recall@1": ..., "text_retrieval_ndcg@10": ..., "acc1": ..., "seen/...": ..., ...}

Every image is embedded once and every unique caption string once per rank. Under DDP each rank embeds the
images its loader gave it and the captions of those images; `finish()` gathers image embeddings, the rank-local
unique captions (by a stable hash of the string) and the (caption, image) pairs from every rank, drops the
duplicates, and orders images by id and queries by caption hash, so one process and N ranks build the same
problem. Images whose metadata says `"part": "unseen"` make their captions unseen queries; then the metrics
also come per part (`seen/image_retrieval_recall@1`, `unseen/text_retrieval_recall@1`, ...).

The protocol (`mmret.evaluation.metrics.PROTOCOLS`) decides what the text queries are: `mmret` (above: one
query per unique caption) or, with `EvalSetEmbedder(..., protocol="clip_benchmark")`, CLIP_benchmark's: images
in the order they were read, one text query per caption occurrence relevant to its own image only, each
occurrence the embedding of its caption string; `evaluation_metrics` then reports CLIP_benchmark's recall@K
(`clip_benchmark_recall`). That protocol needs the data order, so it is evaluated in one process.

Rescoring (a reranker): `top_k_candidates` gives each query's K best candidates by embedding score, and
`candidate_score_fn` turns new scores for exactly those candidates into a score function for
`mmret.evaluation.ranking.compute_retrieval_metrics` (candidates outside the list rank last), so reranked
metrics use the same definitions and ties as the first stage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmret import distributed
from mmret.evaluation.metrics import (
    CLIP_BENCHMARK_PROTOCOL,
    IMAGE_RETRIEVAL,
    MMRET_PROTOCOL,
    PROTOCOLS,
    TEXT_RETRIEVAL,
    build_occurrence_queries,
    build_text_queries,
    clip_benchmark_recall,
    dedupe_by_id,
    retrieval_metrics,
    zeroshot_metrics,
)
from mmret.evaluation.ranking import Relevance, ScoreFn
from mmret.progress import Progress

DEFAULT_KS = (1, 5, 10)
UNSEEN_PART = "unseen"


def caption_hash(caption: str) -> int:
    """A stable 63-bit id of a caption string, so identical captions on different ranks become one query."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def merge_text_queries(
    query_hash: Tensor,
    query_emb: Tensor,
    pair_hash: Tensor,
    pair_image_id: Tensor,
    pair_unseen: Tensor,
) -> tuple[Tensor, list[set[int]], Tensor]:
    """One query per unique caption hash, relevant to every image it was paired with, in hash order.

    Query rows may repeat (the same caption embedded on several ranks): the first row of a hash is kept.

    Args:
        query_hash: [R] caption hash of each embedded caption row.
        query_emb: [R, D] embedding of each row.
        pair_hash: [P] caption hash of each (caption, image) pair.
        pair_image_id: [P] image id of each pair.
        pair_unseen: [P] nonzero where the pair's image is unseen; a query is unseen when any of its images is.

    Returns:
        Query embeddings [Q, D], the relevant image ids of each query, and a [Q] bool "unseen" mask.
    """
    first_row: dict[int, int] = {}
    for row, caption in enumerate(query_hash.tolist()):
        first_row.setdefault(caption, row)
    relevant: dict[int, set[int]] = {caption: set() for caption in first_row}
    unseen: dict[int, bool] = dict.fromkeys(first_row, False)
    for caption, image_id, is_unseen in zip(pair_hash.tolist(), pair_image_id.tolist(), pair_unseen.tolist()):
        if caption not in relevant:
            raise ValueError(f"caption hash {caption} has a pair but no embedding")
        relevant[caption].add(image_id)
        unseen[caption] = unseen[caption] or bool(is_unseen)
    order = sorted(first_row)
    rows = torch.tensor([first_row[c] for c in order], dtype=torch.long, device=query_emb.device)
    unseen_mask = torch.tensor([unseen[c] for c in order], dtype=torch.bool, device=query_emb.device)
    return query_emb[rows], [relevant[c] for c in order], unseen_mask


def group_text_queries(
    text_hash: Tensor, text_emb: Tensor, text_image_id: Tensor, text_unseen: Tensor
) -> tuple[Tensor, list[set[int]], Tensor]:
    """`merge_text_queries` for rows that are each one embedded (caption, image) pair."""
    return merge_text_queries(text_hash, text_emb, text_hash, text_image_id, text_unseen)


@dataclass
class EmbeddedEvalSet:
    """An evaluation set embedded once: images sorted by id, one text query per unique caption (the `mmret`
    protocol); or, under the `clip_benchmark` protocol, images in data order and one text query per caption
    occurrence (image by image), relevant to its own image.

    Attributes:
        image_emb: [N, D] float32 L2-normalised image embeddings.
        image_ids: [N] int64 sample ids, increasing (`clip_benchmark`: in data order).
        labels: [N] int64 class labels, -1 where unlabelled.
        image_unseen: [N] bool, True for images marked `"part": "unseen"`.
        text_emb: [Q, D] float32 embeddings of the unique captions, in caption-hash order (`clip_benchmark`:
            of each caption occurrence, in data order).
        text_relevant: for each query, the ids of the images it was written for.
        text_unseen: [Q] bool, True for captions of unseen images.
        captions: the Q caption strings (gathered from every rank).
        protocol: what the queries are and how metrics rank them (`mmret.evaluation.metrics.PROTOCOLS`).
    """

    image_emb: Tensor
    image_ids: Tensor
    labels: Tensor
    image_unseen: Tensor
    text_emb: Tensor
    text_relevant: list[set[int]]
    text_unseen: Tensor
    captions: list[str] | None = None
    protocol: str = MMRET_PROTOCOL

    @property
    def num_images(self) -> int:
        return int(self.image_ids.numel())

    @property
    def num_texts(self) -> int:
        return int(self.text_emb.shape[0])

    def text_to_image_relevance(self) -> Relevance:
        """Which images (by row of `image_emb`) each text query is relevant to."""
        index_of_image = {image_id: index for index, image_id in enumerate(self.image_ids.tolist())}
        return Relevance.from_lists(
            [[index_of_image[image_id] for image_id in relevant] for relevant in self.text_relevant],
            num_candidates=self.num_images,
        )


class EvalSetEmbedder:
    """Accumulates eval batches (images embedded as they come) and builds the `EmbeddedEvalSet` at the end.

    Call `finish()` on every rank, also on a rank that saw no batch: it gathers.

    Args:
        encode_image: images [B, 3, H, W] (on the batch's device) -> [B, D] image embeddings.
        encode_texts: list of caption strings -> [n, D] text embeddings.
        device: where the gathered tensors live (the process group's device: cuda for NCCL, cpu for gloo).
        text_batch_size: captions embedded per `encode_texts` call.
        progress: description under which `finish()` reports the captions it embeds (`mmret.progress`);
            None (validation inside a fit) reports nothing.
        protocol: `mmret` (unique captions as queries) or `clip_benchmark` (one query per caption occurrence,
            in the order the batches came; one process only).
    """

    def __init__(
        self,
        encode_image: Callable[[Tensor], Tensor],
        encode_texts: Callable[[list[str]], Tensor],
        device: torch.device | str = "cpu",
        text_batch_size: int = 256,
        progress: str | None = None,
        protocol: str = MMRET_PROTOCOL,
    ) -> None:
        if text_batch_size < 1:
            raise ValueError(f"text_batch_size must be >= 1, got {text_batch_size}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
        self.protocol = protocol
        self.encode_image = encode_image
        self.encode_texts = encode_texts
        self.device = torch.device(device)
        self.text_batch_size = text_batch_size
        self.progress = progress
        self._image_emb: list[Tensor] = []
        self._image_ids: list[int] = []
        self._labels: list[int] = []
        self._image_unseen: list[bool] = []
        self._captions: list[list[str]] = []

    @torch.no_grad()
    def add_batch(self, batch: Mapping) -> None:
        """Embed a batch's images and keep its captions, ids, labels and parts."""
        self._image_emb.append(self.encode_image(batch["image"]).float().to(self.device))  # [B, D]
        self._image_ids += [int(i) for i in batch["sample_id"].tolist()]
        self._labels += [int(label) for label in batch["label"].tolist()]
        for captions, metadata in zip(batch["captions"], batch["metadata"]):
            part = metadata.get("part") if isinstance(metadata, Mapping) else None
            self._image_unseen.append(part == UNSEEN_PART)
            self._captions.append(list(captions))

    @torch.no_grad()
    def finish(self) -> EmbeddedEvalSet:
        """Embed the unique captions, gather everything from every rank, dedupe and order it."""
        if self.protocol == CLIP_BENCHMARK_PROTOCOL:
            return self._finish_clip_benchmark()
        unique_captions, relevant = build_text_queries(self._captions, self._image_ids)
        query_emb = self._embed_texts(unique_captions)  # [q, D]
        unseen_of_image = dict(zip(self._image_ids, self._image_unseen))
        hashes = [caption_hash(caption) for caption in unique_captions]
        pairs = [(h, image_id) for h, images in zip(hashes, relevant) for image_id in images]
        image_emb = torch.cat(self._image_emb) if self._image_emb else None
        dim = self._embedding_dim(image_emb, query_emb)

        def long(values: Sequence) -> Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=self.device)

        gather = distributed.all_gather_variable
        image_emb = gather(image_emb if image_emb is not None else torch.zeros(0, dim, device=self.device))
        image_ids = gather(long(self._image_ids))
        labels = gather(long(self._labels))
        image_unseen = gather(long(self._image_unseen))
        query_emb = gather(query_emb if query_emb is not None else torch.zeros(0, dim, device=self.device))
        query_hash = gather(long(hashes))
        pair_hash = gather(long(h for h, _ in pairs))
        pair_image_id = gather(long(image_id for _, image_id in pairs))
        pair_unseen = gather(long(unseen_of_image[image_id] for _, image_id in pairs))

        image_ids, image_emb, labels, image_unseen = dedupe_by_id(image_ids, image_emb, labels, image_unseen)
        text_emb, text_relevant, text_unseen = merge_text_queries(
            query_hash, query_emb, pair_hash, pair_image_id, pair_unseen
        )
        caption_of_hash = {}
        for rank_captions in distributed.all_gather_objects(unique_captions):  # strings, a few per query
            caption_of_hash.update((caption_hash(caption), caption) for caption in rank_captions)
        order = sorted(set(query_hash.tolist()))
        captions = [caption_of_hash[h] for h in order] if all(h in caption_of_hash for h in order) else None
        return EmbeddedEvalSet(
            image_emb=image_emb,
            image_ids=image_ids,
            labels=labels,
            image_unseen=image_unseen.bool(),
            text_emb=text_emb,
            text_relevant=text_relevant,
            text_unseen=text_unseen,
            captions=captions,
        )

    def _finish_clip_benchmark(self) -> EmbeddedEvalSet:
        """CLIP_benchmark's queries: images in the order they came, one text per caption occurrence."""
        if distributed.get_world_size() > 1:
            raise ValueError("the clip_benchmark protocol follows the data order; evaluate it in one process")
        first_row: dict[int, int] = {}  # an image read twice (the same shard given twice) counts once
        for row, image_id in enumerate(self._image_ids):
            first_row.setdefault(image_id, row)
        rows = list(first_row.values())
        image_ids = list(first_row)
        captions, text_image_ids = build_occurrence_queries([self._captions[row] for row in rows], image_ids)
        unique_captions = list(dict.fromkeys(captions))  # each caption string embedded once
        query_emb = self._embed_texts(unique_captions)  # [q, D]
        image_emb = torch.cat(self._image_emb) if self._image_emb else torch.zeros(0, 0, device=self.device)
        if query_emb is None:
            query_emb = torch.zeros(0, image_emb.shape[1], device=self.device)
        index_of_caption = {caption: index for index, caption in enumerate(unique_captions)}
        occurrence_rows = [index_of_caption[caption] for caption in captions]
        unseen_of_image = dict(zip(self._image_ids, self._image_unseen))

        def tensor(values: list, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        return EmbeddedEvalSet(
            image_emb=image_emb[tensor(rows)],
            image_ids=tensor(image_ids),
            labels=tensor([self._labels[row] for row in rows]),
            image_unseen=tensor([self._image_unseen[row] for row in rows], torch.bool),
            text_emb=query_emb[tensor(occurrence_rows)],  # [M, D]: repeated captions share one embedding
            text_relevant=[{image_id} for image_id in text_image_ids],
            text_unseen=tensor([unseen_of_image[image_id] for image_id in text_image_ids], torch.bool),
            captions=captions,
            protocol=CLIP_BENCHMARK_PROTOCOL,
        )

    def _embed_texts(self, captions: list[str]) -> Tensor | None:
        if not captions:
            return None
        chunks = []
        with Progress(
            self.progress or "", len(captions), "captions", enabled=self.progress is not None
        ) as done:
            for start in range(0, len(captions), self.text_batch_size):
                batch = captions[start : start + self.text_batch_size]
                chunks.append(self.encode_texts(batch).float().to(self.device))
                done.update(len(batch))
        return torch.cat(chunks)  # [q, D]

    def _embedding_dim(self, image_emb: Tensor | None, query_emb: Tensor | None) -> int:
        """D, agreed over ranks: a rank without samples still has to gather [0, D] blocks."""
        local = image_emb if image_emb is not None else query_emb
        dim = torch.tensor([0 if local is None else local.shape[1]], dtype=torch.long, device=self.device)
        return int(distributed.all_gather_variable(dim).max())


def evaluation_metrics(
    eval_set: EmbeddedEvalSet,
    ks: Sequence[int] = DEFAULT_KS,
    ranking_k: int = 10,
    classifier: Tensor | None = None,
) -> dict[str, float | int]:
    """Retrieval metrics in both directions (per seen/unseen part when marked) and zero-shot accuracy.

    Args:
        eval_set: the embedded set.
        ks: cut-offs of `*_recall@K`.
        ranking_k: cut-off of `*_mrr@K`, `*_ndcg@K`, `*_map@K`.
        classifier: [C, D] zero-shot class embeddings (`build_zeroshot_classifier`); with it, `acc1`, `acc5`
            and `mean_per_class_recall` over the labelled images are added.

    Returns:
        The names of `mmret.evaluation.metrics.retrieval_metrics` (values and counts), `seen/...` and
        `unseen/...` variants when some image is unseen, and the zero-shot names. Under the `clip_benchmark`
        protocol the retrieval names are those of `clip_benchmark_recall` (recall@K and counts only).
    """
    text_groups = image_groups = None
    if bool(eval_set.text_unseen.any()):
        text_groups = {"seen": ~eval_set.text_unseen, "unseen": eval_set.text_unseen}
    if bool(eval_set.image_unseen.any()):
        image_groups = {"seen": ~eval_set.image_unseen, "unseen": eval_set.image_unseen}
    if eval_set.protocol == CLIP_BENCHMARK_PROTOCOL:
        metrics = clip_benchmark_recall(
            eval_set.image_emb,
            eval_set.text_emb,
            text_image_index(eval_set),
            ks=tuple(ks),
            text_query_groups=text_groups,
            image_query_groups=image_groups,
        )
    else:
        metrics = retrieval_metrics(
            eval_set.image_emb,
            eval_set.image_ids,
            eval_set.text_emb,
            eval_set.text_relevant,
            ks=tuple(ks),
            ranking_k=ranking_k,
            text_query_groups=text_groups,
            image_query_groups=image_groups,
        )
    labelled = eval_set.labels >= 0
    if classifier is not None and bool(labelled.any()):
        metrics.update(zeroshot_metrics(eval_set.image_emb[labelled], eval_set.labels[labelled], classifier))
    return metrics


def text_image_index(eval_set: EmbeddedEvalSet) -> Tensor:
    """[Q] row in `eval_set.image_emb` of each text query's one image (the `clip_benchmark` protocol's queries)."""
    index_of_image = {image_id: index for index, image_id in enumerate(eval_set.image_ids.tolist())}
    if any(len(relevant) != 1 for relevant in eval_set.text_relevant):
        raise ValueError("text_image_index needs one image per text query (the clip_benchmark protocol)")
    return torch.tensor(
        [index_of_image[next(iter(relevant))] for relevant in eval_set.text_relevant], dtype=torch.long
    )


def recall_curves(eval_set: EmbeddedEvalSet, max_k: int = 50) -> dict[str, list[float]]:
    """Recall@K for K = 1 .. min(max_k, corpus size) in both directions, by the set's protocol.

    Returns:
        `image_retrieval` (text query -> images; K up to the number of images) and `text_retrieval` (image
        query -> texts; K up to the number of texts) -> [recall@1, recall@2, ...].
    """
    corpus = {IMAGE_RETRIEVAL: eval_set.num_images, TEXT_RETRIEVAL: eval_set.num_texts}
    top = min(max_k, max(corpus.values()))
    if eval_set.protocol == CLIP_BENCHMARK_PROTOCOL:
        metrics = clip_benchmark_recall(
            eval_set.image_emb, eval_set.text_emb, text_image_index(eval_set), ks=tuple(range(1, top + 1))
        )
    else:
        metrics = retrieval_metrics(
            eval_set.image_emb, eval_set.image_ids, eval_set.text_emb, eval_set.text_relevant,
            ks=tuple(range(1, top + 1)),
        )  # fmt: skip
    return {
        direction: [float(metrics[f"{direction}_recall@{k}"]) for k in range(1, min(top, size) + 1)]
        for direction, size in corpus.items()
    }


@dataclass
class TopKCandidates:
    """The K best candidates of each query: what a second stage (a reranker) rescores.

    Attributes:
        indices: [Q, K] candidate indices, best first.
        scores: [Q, K] their first-stage scores.
        num_candidates: C, the size of the full candidate set.
    """

    indices: Tensor
    scores: Tensor
    num_candidates: int


def top_k_candidates(
    query_emb: Tensor, candidate_emb: Tensor, k: int, chunk_size: int = 4096, index: str = "dense"
) -> TopKCandidates:
    """Each query's `k` highest-scoring candidates by cosine similarity, chunk by chunk over queries.

    Args:
        query_emb: [Q, D] query embeddings.
        candidate_emb: [C, D] candidate embeddings.
        k: candidates kept per query (at most C).
        chunk_size: queries scored at once.
        index: "dense" (exact, chunked matmul), "faiss" (exact FAISS flat index) or "faiss-ivf" (approximate
            FAISS inverted-file index for corpora of millions; needs `pip install faiss-cpu`).
    """
    if index in ("faiss", "faiss-ivf"):
        from mmret.evaluation.faiss_index import faiss_top_k

        top_indices, top_scores = faiss_top_k(
            query_emb, candidate_emb, k, kind="ivf" if index == "faiss-ivf" else "flat"
        )
        return TopKCandidates(top_indices, top_scores, num_candidates=int(candidate_emb.shape[0]))
    if index != "dense":
        raise ValueError(f"unknown index {index!r}; expected 'dense', 'faiss' or 'faiss-ivf'")
    query_emb = F.normalize(query_emb.float(), dim=-1)
    candidate_t = F.normalize(candidate_emb.float(), dim=-1).t()  # [D, C]
    k = min(k, candidate_emb.shape[0])
    indices, scores = [], []
    for start in range(0, query_emb.shape[0], chunk_size):
        top = (query_emb[start : start + chunk_size] @ candidate_t).topk(k, dim=1)  # [b, k]
        indices.append(top.indices)
        scores.append(top.values)
    empty = query_emb.new_zeros(0, k)
    return TopKCandidates(
        indices=torch.cat(indices) if indices else empty.long(),
        scores=torch.cat(scores) if scores else empty,
        num_candidates=int(candidate_emb.shape[0]),
    )


def candidate_score_fn(candidates: TopKCandidates, scores: Tensor | None = None) -> ScoreFn:
    """A score function over all C candidates that ranks only the listed ones, by `scores` (e.g. a reranker's).

    Candidates outside a query's list get -inf and so rank after every listed one (ties there are pessimistic),
    which makes Recall@K / MRR@K / NDCG@K for K <= the list length exact for the two-stage system.

    Args:
        candidates: the first-stage lists.
        scores: [Q, K] new scores of `candidates.indices`; None keeps the first-stage scores.
    """
    new_scores = candidates.scores if scores is None else scores
    if tuple(new_scores.shape) != tuple(candidates.indices.shape):
        raise ValueError(
            f"scores have shape {tuple(new_scores.shape)}, expected {tuple(candidates.indices.shape)}"
        )

    def score_chunk(start: int, end: int) -> Tensor:
        chunk = torch.full(
            (end - start, candidates.num_candidates), -math.inf, dtype=torch.float32, device=new_scores.device
        )
        return chunk.scatter_(
            1, candidates.indices[start:end], new_scores[start:end].float()
        )  # [end-start, C]

    return score_chunk
