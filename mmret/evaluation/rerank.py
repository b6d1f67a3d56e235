"""Retrieve-then-rerank evaluation: the dual encoder's top-K per query, rescored by a cross-encoder.

    mmret eval --model dual.ckpt --reranker reranker.ckpt --top-k 20 --data data/shapes --output r.json

    scorer = PairScorer.from_data(reranker, data, eval_set, device)     # tower outputs cached once
    reranked, ceiling = two_stage_metrics(eval_set, scorer, top_k=20)
    -> {"image_retrieval_recall@1": ..., "unseen/image_retrieval_ndcg@10": ...},
       {"image_retrieval_recall@20": ..., "unseen/image_retrieval_recall@20": ...}

    lists = rerank_lists(eval_set, scorer, top_k=20)      # the same, keeping the reranked lists ...
    reranked, ceiling = two_stage_summary(eval_set, lists, top_k=20)
    lists["image_retrieval"].ranked([0, 1])               # ... for pictures: indices, scores, first-stage positions
    reranked_recall_curves(eval_set, lists)               # Recall@K, K = 1 .. 20, both directions

Both directions are reranked: caption queries over their top-K images (`image_retrieval_*`) and image queries
over their top-K captions (`text_retrieval_*`). Candidates outside a query's list rank after the listed ones
(`candidate_score_fn`), so the reranked metrics use the definitions of the first stage, and no reranker can
beat the first stage's recall@K over the same lists: that number is reported beside them as the ceiling.
`fusion_weight` w > 0 mixes the first-stage score in: (1 − w)·z(reranker) + w·z(first stage), each
standardised over the query's list (the two scores live on different scales).

The reranker's tower outputs are computed once per image and once per caption (`PairScorer`), so rescoring
costs only the fusion layers for each of the Q × K pairs; they are held in memory ([N, P, W] patch tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmret.evaluation.metrics import IMAGE_RETRIEVAL, TEXT_RETRIEVAL, _direction_summary
from mmret.evaluation.ranking import per_query_metrics
from mmret.evaluation.retrieval import (
    DEFAULT_KS,
    EmbeddedEvalSet,
    TopKCandidates,
    candidate_score_fn,
    top_k_candidates,
)
from mmret.progress import Progress

# (text query indices [n], image indices [n]) -> relevance scores [n] of those n pairs.
PairScoreFn = Callable[[Tensor, Tensor], Tensor]


def rerank_candidates(
    candidates: TopKCandidates,
    score_pairs: PairScoreFn,
    pair_batch_size: int = 512,
    progress: str | None = None,
) -> Tensor:
    """New scores [Q, K] of every listed candidate: `score_pairs(query_index, candidate_index)` in batches."""
    queries = torch.arange(candidates.indices.shape[0]).repeat_interleave(candidates.indices.shape[1])
    flat = candidates.indices.flatten().cpu()  # [Q*K]
    scores = []
    starts = range(0, flat.numel(), pair_batch_size)
    with Progress(progress or "reranking", total=flat.numel(), unit="pairs", enabled=bool(progress)) as bar:
        for start in starts:
            end = start + pair_batch_size
            scores.append(score_pairs(queries[start:end], flat[start:end]).float().cpu())
            bar.update(min(end, flat.numel()) - start)
    if not scores:
        return torch.zeros(candidates.indices.shape)
    return torch.cat(scores).view(candidates.indices.shape)


def fuse_scores(first_stage: Tensor, reranker: Tensor, weight: float) -> Tensor:
    """(1 − weight)·z(reranker) + weight·z(first_stage), z standardising each query's list [Q, K]."""
    if weight == 0:
        return reranker

    def standardise(scores: Tensor) -> Tensor:
        return (scores - scores.mean(dim=1, keepdim=True)) / scores.std(dim=1, keepdim=True).clamp(min=1e-6)

    return (1 - weight) * standardise(reranker.float()) + weight * standardise(first_stage.float())


@dataclass
class RerankedLists:
    """One direction's first-stage lists and the reranker's scores of them (what the pictures draw).

    Attributes:
        direction: `image_retrieval` (text queries, image candidates) or `text_retrieval` (the reverse).
        candidates: each query's first-stage top-K (indices [Q, K] best first, cosine scores [Q, K]).
        scores: [Q, K] the reranker's scores of those candidates (fused with the first stage's when asked).
    """

    direction: str
    candidates: TopKCandidates
    scores: Tensor

    @property
    def depth(self) -> int:
        """K: candidates per query that the reranker reorders."""
        return int(self.candidates.indices.shape[1])

    def ranked(self, queries: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The reranked lists of `queries` (default all), best first.

        Returns:
            Candidate indices [q, K], their reranker scores [q, K], and each one's first-stage position [q, K]
            (0-based); equal reranker scores keep the first-stage order.
        """
        rows = slice(None) if queries is None else torch.as_tensor(list(queries), dtype=torch.long)
        scores, indices = self.scores[rows], self.candidates.indices[rows]
        positions = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [q, K]
        return indices.gather(1, positions), scores.gather(1, positions), positions


def rerank_lists(
    eval_set: EmbeddedEvalSet,
    score_pairs: PairScoreFn,
    top_k: int,
    fusion_weight: float = 0.0,
    pair_batch_size: int = 512,
    progress: bool = False,
) -> dict[str, RerankedLists]:
    """Both directions' first-stage top-`top_k` lists, rescored by `score_pairs` (see `two_stage_metrics`).

    Returns:
        `image_retrieval` and `text_retrieval` -> their `RerankedLists` (on the CPU).
    """
    directions = (
        (IMAGE_RETRIEVAL, eval_set.text_emb, eval_set.image_emb, score_pairs),
        (
            TEXT_RETRIEVAL,
            eval_set.image_emb,
            eval_set.text_emb,
            lambda images, texts: score_pairs(texts, images),
        ),
    )
    lists: dict[str, RerankedLists] = {}
    for direction, query_emb, candidate_emb, pair_fn in directions:
        candidates = top_k_candidates(query_emb, candidate_emb, top_k)
        candidates = TopKCandidates(
            candidates.indices.cpu(), candidates.scores.cpu(), candidates.num_candidates
        )
        new_scores = rerank_candidates(
            candidates, pair_fn, pair_batch_size, progress=f"reranking {direction}" if progress else None
        )
        lists[direction] = RerankedLists(
            direction, candidates, fuse_scores(candidates.scores, new_scores, fusion_weight)
        )
    return lists


def two_stage_metrics(
    eval_set: EmbeddedEvalSet,
    score_pairs: PairScoreFn,
    top_k: int,
    ks: Sequence[int] = DEFAULT_KS,
    ranking_k: int = 10,
    fusion_weight: float = 0.0,
    pair_batch_size: int = 512,
    progress: bool = False,
) -> tuple[dict[str, float | int], dict[str, float]]:
    """Metrics of retrieve-then-rerank, and the first stage's recall@top_k (their ceiling).

    Args:
        eval_set: the set embedded by the first stage (its embeddings choose the candidates).
        score_pairs: (text query indices [n], image indices [n]) -> [n] reranker scores; used for both
            directions (an image query's candidates are text queries).
        top_k: candidates per query that the reranker rescores.
        ks: cut-offs of `*_recall@K`.
        ranking_k: cut-off of MRR / NDCG / MAP.
        fusion_weight: weight of the first-stage score in the fused score (0: reranker only).
        pair_batch_size: pairs scored per call.
        progress: progress bars on stderr.

    Returns:
        (reranked metrics named like `evaluation_metrics`, with seen/unseen variants when marked;
         `{direction}_recall@{top_k}` of the first stage, with the same variants).
    """
    lists = rerank_lists(eval_set, score_pairs, top_k, fusion_weight, pair_batch_size, progress)
    return two_stage_summary(eval_set, lists, top_k, ks, ranking_k)


def two_stage_summary(
    eval_set: EmbeddedEvalSet,
    lists: dict[str, RerankedLists],
    top_k: int,
    ks: Sequence[int] = DEFAULT_KS,
    ranking_k: int = 10,
) -> tuple[dict[str, float | int], dict[str, float]]:
    """`two_stage_metrics` of lists already rescored (`rerank_lists`): (reranked metrics, ceiling)."""
    text_to_image = eval_set.text_to_image_relevance()
    text_groups = image_groups = None
    if bool(eval_set.text_unseen.any()):
        text_groups = {"seen": ~eval_set.text_unseen, "unseen": eval_set.text_unseen}
    if bool(eval_set.image_unseen.any()):
        image_groups = {"seen": ~eval_set.image_unseen, "unseen": eval_set.image_unseen}
    directions = (
        (IMAGE_RETRIEVAL, text_to_image, text_groups),
        (TEXT_RETRIEVAL, text_to_image.transpose(), image_groups),
    )
    cutoffs = sorted(set(ks) | {ranking_k})
    reranked: dict[str, float | int] = {"num_images": eval_set.num_images, "num_texts": eval_set.num_texts}
    ceiling: dict[str, float] = {}
    for direction, relevance, groups in directions:
        candidates, new_scores = lists[direction].candidates, lists[direction].scores
        per_query = per_query_metrics(candidate_score_fn(candidates, new_scores), relevance, cutoffs,
                                      ("recall", "mrr", "ndcg", "map"))  # fmt: skip
        first_stage = per_query_metrics(candidate_score_fn(candidates), relevance, [top_k], ("recall",))
        for prefix, queries in [("", None), *((f"{name}/", mask) for name, mask in (groups or {}).items())]:
            reranked.update(_direction_summary(per_query, direction, ks, ranking_k, queries, prefix=prefix))
            ceiling[f"{prefix}{direction}_recall@{top_k}"] = float(
                first_stage.summarize(queries)[f"recall@{top_k}"]
            )
    return reranked, ceiling


def reranked_recall_curves(
    eval_set: EmbeddedEvalSet, lists: dict[str, RerankedLists]
) -> dict[str, list[float]]:
    """Recall@K of the reranked lists for K = 1 .. the rerank depth, in each direction (as `recall_curves`).

    Beyond the depth nothing is reordered: a system that returns the rest of the first-stage ranking after the
    reranked lists has the first stage's recall@K there (equal to it at K = depth already).
    """
    text_to_image = eval_set.text_to_image_relevance()
    relevance = {IMAGE_RETRIEVAL: text_to_image, TEXT_RETRIEVAL: text_to_image.transpose()}
    curves: dict[str, list[float]] = {}
    for direction, reranked in lists.items():
        depth = reranked.depth
        if depth == 0:
            curves[direction] = []
            continue
        per_query = per_query_metrics(
            candidate_score_fn(reranked.candidates, reranked.scores), relevance[direction],
            range(1, depth + 1), ("recall",),
        )  # fmt: skip
        summary = per_query.summarize()
        curves[direction] = [float(summary[f"recall@{k}"]) for k in range(1, depth + 1)]
    return curves


class PairScorer:
    """Scores (text query, image) pairs of an eval set with a `CrossEncoder`, from cached tower outputs.

    Args:
        reranker: a `mmret.training.CrossEncoder` in eval mode.
        text_states: [Q, L, Wt] token states of the Q text queries.
        text_mask: [Q, L] bool real-token mask.
        patches: [N, P, Wv] patch tokens of the N images (eval-set order).
        text_emb, image_emb: [Q, D] / [N, D] pooled embeddings of the reranker's own towers (for its
            first-stage residual; None when it has none).
    """

    def __init__(
        self, reranker, text_states: Tensor, text_mask: Tensor, patches: Tensor,
        text_emb: Tensor | None = None, image_emb: Tensor | None = None,
    ) -> None:  # fmt: skip
        self.reranker = reranker
        self.text_states, self.text_mask, self.patches = text_states, text_mask, patches
        self.text_emb, self.image_emb = text_emb, image_emb

    @torch.no_grad()
    def __call__(self, text_index: Tensor, image_index: Tensor) -> Tensor:
        device = self.text_states.device
        text_index, image_index = text_index.to(device), image_index.to(device)
        text_emb = None if self.text_emb is None else self.text_emb.to(device)[text_index]
        image_emb = None if self.image_emb is None else self.image_emb.to(device)
        return self.reranker.score_tokens(
            self.text_states[text_index],
            self.text_mask[text_index],
            self.patches,
            image_index,
            text_emb,
            image_emb,
        )  # [n]

    @classmethod
    @torch.no_grad()
    def from_data(
        cls, reranker, data, eval_set: EmbeddedEvalSet, device: torch.device, batch_size: int = 128
    ):
        """Run the reranker's towers once over the data module's test images and the eval set's captions."""
        from mmret.models import create_transforms

        if eval_set.captions is None:
            raise ValueError(
                "reranking needs the caption strings of the eval set (single-process evaluation)"
            )
        data.set_preprocess(None, reranker.tokenizer,
                            eval_image_transform=create_transforms(reranker.model, train=False))  # fmt: skip
        patches_of_id: dict[int, tuple[Tensor, Tensor]] = {}
        with Progress("reranker image tokens", unit="images") as bar:
            for batch in data.test_dataloader():
                pooled, patches = reranker.encode_images(batch["image"].to(device))  # [B, D], [B, P, Wv]
                patches_of_id.update(zip(batch["sample_id"].tolist(), zip(pooled, patches)))
                bar.update(len(batch["sample_id"]))
        ids = eval_set.image_ids.tolist()
        image_emb = torch.stack([patches_of_id[i][0] for i in ids])  # [N, D]
        patches = torch.stack([patches_of_id[i][1] for i in ids])  # [N, P, Wv]
        return cls.for_images(reranker, eval_set, patches, image_emb, batch_size)

    @classmethod
    @torch.no_grad()
    def for_images(
        cls, reranker, eval_set: EmbeddedEvalSet, patches: Tensor, image_emb: Tensor, batch_size: int = 128
    ):
        """A scorer of the eval set's captions (run through the reranker's text tower here) against images
        whose patch tokens [N, P, Wv] and pooled embeddings [N, D] (eval-set order) are already computed."""
        text_embs, states, masks = [], [], []
        for start in range(0, eval_set.num_texts, batch_size):
            text_emb, state, mask = reranker.encode_texts(eval_set.captions[start : start + batch_size])
            text_embs.append(text_emb)
            states.append(state)
            masks.append(mask)
        return cls(reranker, torch.cat(states), torch.cat(masks), patches, torch.cat(text_embs), image_emb)
