"""Exact ranking metrics from a query x candidate score matrix, computed chunk by chunk over queries.

    relevance = Relevance.from_lists([[3], [0, 7], []], num_candidates=10)
    compute_retrieval_metrics(scores, relevance, ks=(1, 5, 10))     # scores: [Q, C] tensor ...
    compute_retrieval_metrics(embedding_scores(query_emb, cand_emb), relevance)   # ... or a chunk function
    -> {"recall@1": ..., "mrr@10": ..., "ndcg@5": ..., "map@10": ..., "precision@1": ...,
        "num_queries": 2, "num_queries_without_relevant": 1}

Definitions, for a query with relevant set R (gains g > 0; 1 for binary relevance) and rank r(j) of item j:

- recall@K: 1 if any relevant item is in the top K, else 0 — the hit rate of CLIP_benchmark and LAVIS
  (not the fraction of R retrieved).
- mrr@K: 1 / r of the first relevant item when r <= K, else 0.
- precision@K: |{j in R : r(j) <= K}| / K.
- ndcg@K: sum_{r(j) <= K} g_j / log2(r(j) + 1), divided by the same sum for the ideal order (linear gains,
  as sklearn's `ndcg_score` and torchmetrics).
- map@K: sum_{r(j) <= K} precision@r(j) / min(|R|, K), so a perfect ranking scores 1. torchmetrics divides
  by the number of relevant items found in the top K instead, trec_eval by |R|; with one relevant item per
  query all three agree.

Ties are broken deterministically and pessimistically: among candidates with equal scores, irrelevant ones
rank first, then relevant ones by increasing gain, then by candidate index. A constant scorer therefore
scores 0 (bar queries to which every candidate is relevant) instead of being lucky, and no metric depends on
the order `torch.topk` happens to return.

Queries without any relevant candidate are excluded from every mean and counted in
`num_queries_without_relevant`. Memory is bounded: only `chunk_size x C` scores exist at any time (when
`scores` is a function), plus O(Q x max(K) + relevant pairs) kept for the ranking. NaN scores are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

METRIC_NAMES = ("recall", "mrr", "ndcg", "map", "precision")

# A function returning the scores of queries [start, end) against every candidate: [end - start, C].
ScoreFn = Callable[[int, int], Tensor]

# Default memory budget per chunk: 2**24 float32 scores = 64 MiB.
DEFAULT_CHUNK_SCORES = 2**24


@dataclass(frozen=True)
class Relevance:
    """The relevant candidates of each query, in compressed sparse row (CSR) form.

    Query q is relevant to candidates `indices[indptr[q]:indptr[q + 1]]` (strictly increasing), with gains
    `gains[indptr[q]:indptr[q + 1]]` (all > 0; 1 for binary relevance). Build it with `from_lists`,
    `from_dense` or `from_labels` rather than by hand.

    Attributes:
        indptr: [Q + 1] int64 row offsets into `indices`.
        indices: [nnz] int64 candidate indices.
        gains: [nnz] float64 relevance grades.
        num_candidates: C, the number of candidates every query is ranked against.
    """

    indptr: Tensor
    indices: Tensor
    gains: Tensor
    num_candidates: int

    def __post_init__(self) -> None:
        indptr, indices, gains = self.indptr, self.indices, self.gains
        if indptr.dim() != 1 or indptr.numel() < 1 or int(indptr[0]) != 0:
            raise ValueError("Relevance.indptr must be 1-D and start at 0")
        if indices.shape != gains.shape or indices.dim() != 1 or int(indptr[-1]) != indices.numel():
            raise ValueError("Relevance.indices and .gains must be 1-D with indptr[-1] entries")
        if bool((indptr.diff() < 0).any()):
            raise ValueError("Relevance.indptr must be non-decreasing")
        if indices.numel():
            if int(indices.min()) < 0 or int(indices.max()) >= self.num_candidates:
                raise ValueError(f"Relevance.indices must lie in [0, {self.num_candidates})")
            if not bool((gains > 0).all()):
                raise ValueError("Relevance.gains must be > 0 (leave irrelevant candidates out)")
            # Strictly increasing (row, index) keys: sorted and duplicate-free within each row.
            keys = self.query_of_entry() * self.num_candidates + indices
            if bool((keys.diff() <= 0).any()):
                raise ValueError("Relevance.indices must be strictly increasing within each query")

    @property
    def num_queries(self) -> int:
        """Q, the number of queries (rows)."""
        return self.indptr.numel() - 1

    def num_relevant(self) -> Tensor:
        """[Q] the number of relevant candidates of each query."""
        return self.indptr.diff()

    def query_of_entry(self) -> Tensor:
        """[nnz] the query (row) each stored entry belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_queries), self.num_relevant())

    @classmethod
    def from_lists(
        cls,
        relevant: Sequence[Iterable[int]],
        num_candidates: int,
        gains: Sequence[Sequence[float]] | None = None,
    ) -> Relevance:
        """Build from one list of relevant candidate indices per query (any order).

        Args:
            relevant: for each query, the indices of its relevant candidates; an empty list is allowed.
            num_candidates: C.
            gains: optional graded relevance, parallel to `relevant`; binary (all 1) when omitted.
        """
        rows, cols, grades = [], [], []
        for query, items in enumerate(relevant):
            items = list(items)
            item_gains = [1.0] * len(items) if gains is None else [float(g) for g in gains[query]]
            if len(item_gains) != len(items):
                raise ValueError(f"query {query}: {len(items)} relevant items but {len(item_gains)} gains")
            if len(set(items)) != len(items):
                raise ValueError(f"query {query}: a relevant candidate is listed twice")
            for item, gain in sorted(zip(items, item_gains)):
                rows.append(query)
                cols.append(item)
                grades.append(gain)
        counts = torch.bincount(torch.tensor(rows, dtype=torch.long), minlength=len(relevant))
        return cls(
            indptr=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
            indices=torch.tensor(cols, dtype=torch.long),
            gains=torch.tensor(grades, dtype=torch.float64),
            num_candidates=int(num_candidates),
        )

    @classmethod
    def from_dense(cls, relevance: Tensor) -> Relevance:
        """Build from a dense [Q, C] matrix: bool (binary) or numeric gains where 0 means irrelevant."""
        if relevance.dim() != 2:
            raise ValueError(f"dense relevance must be [Q, C], got shape {tuple(relevance.shape)}")
        relevance = relevance.detach().cpu()
        if relevance.dtype != torch.bool and bool((relevance < 0).any()):
            raise ValueError("dense relevance gains must be >= 0")
        rows, cols = relevance.nonzero(as_tuple=True)  # row-major, so sorted by (row, col)
        counts = torch.bincount(rows, minlength=relevance.shape[0])
        return cls(
            indptr=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
            indices=cols,
            gains=relevance[rows, cols].to(torch.float64),
            num_candidates=relevance.shape[1],
        )

    @classmethod
    def from_labels(cls, query_labels: Tensor, candidate_labels: Tensor) -> Relevance:
        """Query q is relevant to every candidate c with `candidate_labels[c] == query_labels[q]`.

        Args:
            query_labels: [Q] integer group ids of the queries.
            candidate_labels: [C] integer group ids of the candidates.
        """
        query_labels = query_labels.detach().cpu().long().reshape(-1)
        candidate_labels = candidate_labels.detach().cpu().long().reshape(-1)
        sorted_labels, by_label = torch.sort(candidate_labels, stable=True)  # candidates grouped by label
        first = torch.searchsorted(sorted_labels, query_labels, right=False)  # [Q]
        last = torch.searchsorted(sorted_labels, query_labels, right=True)  # [Q]
        counts = last - first
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        # Position of each entry inside its query's run of candidates: [nnz]
        query = torch.repeat_interleave(torch.arange(query_labels.numel()), counts)
        offset = torch.arange(int(indptr[-1])) - indptr[query]
        # stable sort kept candidate order inside a label, so indices come out increasing per query
        indices = by_label[first[query] + offset]
        return cls(
            indptr, indices, torch.ones(indices.numel(), dtype=torch.float64), candidate_labels.numel()
        )

    def transpose(self) -> Relevance:
        """The same pairs seen from the other side: candidates become queries (e.g. image->text from text->image)."""
        query = self.query_of_entry()
        order = torch.argsort(self.indices, stable=True)  # entries are sorted by query, so ties stay sorted
        counts = torch.bincount(self.indices, minlength=self.num_candidates)
        return Relevance(
            indptr=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
            indices=query[order],
            gains=self.gains[order],
            num_candidates=self.num_queries,
        )


@dataclass
class PerQueryMetrics:
    """Metric values of every query, so that any subset of queries can be summarised without re-scoring.

    Attributes:
        values: metric key ("recall@1", "ndcg@10", ...) -> [Q] float64 value per query (0 where invalid).
        valid: [Q] bool, True for queries with at least one relevant candidate.
    """

    values: dict[str, Tensor]
    valid: Tensor

    def summarize(self, queries: Tensor | None = None) -> dict[str, float | int]:
        """Mean of each metric over the valid queries, plus counts.

        Args:
            queries: optional subset of queries, as a [Q] bool mask or a tensor of query indices.

        Returns:
            Every metric key -> mean (0.0 when no valid query is selected), `num_queries` (valid queries
            averaged over) and `num_queries_without_relevant` (selected queries that were excluded).
        """
        selected = torch.ones_like(self.valid)
        if queries is not None:
            queries = torch.as_tensor(queries).cpu()
            if queries.dtype == torch.bool:
                if queries.shape != self.valid.shape:
                    raise ValueError(
                        f"query mask has shape {tuple(queries.shape)}, expected {tuple(self.valid.shape)}"
                    )
                selected = queries
            else:
                selected = torch.zeros_like(self.valid)
                selected[queries.long()] = True
        used = selected & self.valid
        count = int(used.sum())
        summary: dict[str, float | int] = {
            key: float(value[used].sum()) / count if count else 0.0 for key, value in self.values.items()
        }
        summary["num_queries"] = count
        summary["num_queries_without_relevant"] = int((selected & ~self.valid).sum())
        return summary


def embedding_scores(query_emb: Tensor, candidate_emb: Tensor) -> ScoreFn:
    """A chunk function computing dot-product scores `query_emb[start:end] @ candidate_emb.T` on demand.

    Args:
        query_emb: [Q, D] query embeddings (normalise them first for cosine similarity).
        candidate_emb: [C, D] candidate embeddings.
    """
    if query_emb.dim() != 2 or candidate_emb.dim() != 2 or query_emb.shape[1] != candidate_emb.shape[1]:
        raise ValueError(
            f"embeddings must be [Q, D] and [C, D], got {tuple(query_emb.shape)} and {tuple(candidate_emb.shape)}"
        )
    candidate_t = candidate_emb.t()  # [D, C]

    def score_chunk(start: int, end: int) -> Tensor:
        return query_emb[start:end] @ candidate_t  # [end - start, C]

    return score_chunk


def compute_retrieval_metrics(
    scores: Tensor | ScoreFn,
    relevance: Relevance,
    ks: Sequence[int] = (1, 5, 10),
    metrics: Sequence[str] = METRIC_NAMES,
    chunk_size: int | None = None,
) -> dict[str, float | int]:
    """Mean ranking metrics over the queries that have a relevant candidate; see the module docstring.

    Args:
        scores: a [Q, C] score tensor (higher = more similar), or a function (start, end) -> [end-start, C].
        relevance: the relevant candidates of each query (Q queries, C candidates).
        ks: cut-offs; every metric in `metrics` is reported at every K as "name@K".
        metrics: any of "recall", "mrr", "ndcg", "map", "precision".
        chunk_size: queries scored at once; default keeps a chunk at about 2**24 scores.
    """
    return per_query_metrics(scores, relevance, ks, metrics, chunk_size).summarize()


def per_query_metrics(
    scores: Tensor | ScoreFn,
    relevance: Relevance,
    ks: Sequence[int] = (1, 5, 10),
    metrics: Sequence[str] = METRIC_NAMES,
    chunk_size: int | None = None,
) -> PerQueryMetrics:
    """Like `compute_retrieval_metrics`, but keeps the value of every query (for subsets, paired tests)."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    unknown = set(metrics) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRIC_NAMES}")
    num_queries, num_candidates = relevance.num_queries, relevance.num_candidates
    if isinstance(scores, Tensor) and tuple(scores.shape) != (num_queries, num_candidates):
        raise ValueError(
            f"scores have shape {tuple(scores.shape)}, relevance expects ({num_queries}, {num_candidates})"
        )
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_SCORES // max(num_candidates, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    if relevance.indices.numel() == 0:  # nothing is relevant anywhere: every query is excluded
        zeros = torch.zeros(num_queries, dtype=torch.float64)
        return PerQueryMetrics({f"{name}@{k}": zeros.clone() for name in metrics for k in ks}, zeros.bool())
    rows = relevance.query_of_entry()  # [nnz]
    top_values, entry_scores, threshold_ties = _scan_chunks(scores, relevance, rows, max(ks), chunk_size)
    ranks, order, positions = _pessimistic_ranks(
        rows, relevance.gains, entry_scores, top_values, threshold_ties
    )
    values = _metric_values(rows, relevance.gains, ranks, order, positions, num_queries, ks, metrics)
    return PerQueryMetrics(values=values, valid=relevance.num_relevant() > 0)


def _scan_chunks(
    scores: Tensor | ScoreFn, relevance: Relevance, rows: Tensor, max_k: int, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The one pass over the scores: everything the ranking needs, in O(Q x K + nnz) memory.

    Only a few large operations run per chunk (score, top-k, gather); all per-entry bookkeeping happens
    once afterwards, which keeps the cost per chunk low even on a busy machine.

    Returns:
        top_values: [Q, min(max_k, C)] float64, the largest scores of each query (unsorted).
        entry_scores: [nnz] float64, the score of each relevant entry.
        threshold_ties: [Q] int64, for queries with a relevant entry scoring exactly the smallest top value,
            the number of candidates with that score (ties may continue beyond the top values); else 0.
    """
    num_queries, num_candidates = relevance.num_queries, relevance.num_candidates
    top_k = min(max_k, num_candidates)
    # float64 holds every float32/16 score exactly, so comparisons between stored values stay exact.
    top_values = torch.full((num_queries, top_k), -math.inf, dtype=torch.float64)
    entry_scores = torch.empty(relevance.indices.numel(), dtype=torch.float64)
    threshold_ties = torch.zeros(num_queries, dtype=torch.long)
    for start in range(0, num_queries, chunk_size):
        end = min(start + chunk_size, num_queries)
        lo, hi = int(relevance.indptr[start]), int(relevance.indptr[end])
        if lo == hi:
            continue  # no relevant item in these queries: they are excluded, nothing to score
        chunk = scores[start:end] if isinstance(scores, Tensor) else scores(start, end)  # [B, C]
        if tuple(chunk.shape) != (end - start, num_candidates):
            raise ValueError(
                f"score function returned shape {tuple(chunk.shape)} for queries [{start}, {end}), "
                f"expected ({end - start}, {num_candidates})"
            )
        chunk = chunk.detach()
        local_rows = (rows[lo:hi] - start).to(chunk.device)  # [n]
        top = chunk.topk(top_k, dim=1, sorted=False).values  # [B, top_k]; NaN counts as largest
        scored = chunk[local_rows, relevance.indices[lo:hi].to(chunk.device)]  # [n]
        threshold = top.min(dim=1).values  # [B]
        at_threshold = scored == threshold[local_rows]
        if bool(at_threshold.any()):
            tied = local_rows[at_threshold].unique()
            threshold_ties[start + tied.cpu()] = (chunk[tied] == threshold[tied, None]).sum(dim=1).cpu()
        top_values[start:end] = top.double().cpu()
        entry_scores[lo:hi] = scored.double().cpu()
    if bool(top_values.isnan().any()) or bool(entry_scores.isnan().any()):
        raise ValueError("scores contain NaN")
    return top_values, entry_scores, threshold_ties


def _segment_positions(new_segment: Tensor) -> tuple[Tensor, Tensor]:
    """For entries split into consecutive segments, each entry's 0-based position and its segment's size.

    Args:
        new_segment: [n] bool, True where an entry starts a new segment (True at 0).
    """
    segment = new_segment.long().cumsum(0) - 1  # [n]
    starts = new_segment.nonzero().squeeze(1)  # [S]
    sizes = torch.bincount(segment, minlength=starts.numel())  # [S]
    position = torch.arange(new_segment.numel()) - starts[segment]
    return position, sizes[segment]


def _starts(keys: Tensor) -> Tensor:
    """[n] bool, True where `keys` (sorted into runs) differs from the previous entry."""
    new = torch.ones_like(keys, dtype=torch.bool)
    new[1:] = keys[1:] != keys[:-1]
    return new


def _pessimistic_ranks(
    rows: Tensor, gains: Tensor, entry_scores: Tensor, top_values: Tensor, threshold_ties: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact 1-based pessimistic ranks of the relevant entries that rank within the top values.

    Args:
        rows, gains, entry_scores: [nnz] relevant entries, sorted by (row, candidate index).
        top_values, threshold_ties: from `_scan_chunks`.

    Returns:
        ranks: [nnz] rank of each entry in ranking order (see `order`); entries scoring below the top
            values get top_k + 1, which is beyond every cut-off asked for.
        order: [nnz] permutation sorting the entries by (row, rank).
        positions: [nnz] 1-based index of each entry (in `order`) among its query's relevant items, i.e.
            how many relevant items rank at or above it.
    """
    top_k = top_values.shape[1]
    # Order entries as the pessimistic ranking places them: by query, score descending, gain ascending,
    # candidate index ascending. Entries arrive sorted by (row, index), so stable sorts from the least to
    # the most significant key produce that order.
    order = torch.argsort(gains, stable=True)
    order = order[torch.argsort(entry_scores[order], descending=True, stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows, entry_scores = rows[order], entry_scores[order]

    threshold = top_values.min(dim=1).values[rows]  # [nnz] the top_k-th largest score of each entry's query
    entry_top = top_values[rows]  # [nnz, top_k]
    # Candidates scoring >= s: every candidate above the threshold is among the top values, so for
    # s > threshold counting there is exact; at s == threshold the ties may continue past the top values,
    # so the full count from the scan replaces the part at the threshold.
    num_at_least = (entry_top >= entry_scores[:, None]).sum(dim=1)  # [nnz]
    above_threshold = (entry_top > threshold[:, None]).sum(dim=1)
    num_at_least = torch.where(
        entry_scores == threshold, above_threshold + threshold_ties[rows], num_at_least
    )

    # Pessimistic rank: every candidate scoring >= s, minus the tied relevant items placed after this one.
    new_row = _starts(rows)
    tie_position, tie_size = _segment_positions(new_row | _starts(entry_scores))
    ranks = num_at_least - (tie_size - tie_position) + 1
    ranks = torch.where(entry_scores >= threshold, ranks, torch.full_like(ranks, top_k + 1))
    row_position, _ = _segment_positions(new_row)
    return ranks, order, row_position + 1


def _ideal_dcg(rows: Tensor, gains: Tensor, num_queries: int, ks: Sequence[int]) -> dict[int, Tensor]:
    """[Q] DCG@K of the ideal ranking (gains sorted descending) of each query, for every K."""
    order = torch.argsort(gains, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    rows, gains = rows[order], gains[order]
    position, _ = _segment_positions(_starts(rows))
    discounted = gains / torch.log2(position.to(gains.dtype) + 2)  # ideal rank = position + 1
    zeros = torch.zeros_like(discounted)
    return {
        k: torch.zeros(num_queries, dtype=torch.float64).index_add_(
            0, rows, torch.where(position < k, discounted, zeros)
        )
        for k in ks
    }


def _metric_values(
    rows: Tensor,
    gains: Tensor,
    ranks: Tensor,
    order: Tensor,
    positions: Tensor,
    num_queries: int,
    ks: Sequence[int],
    metrics: Sequence[str],
) -> dict[str, Tensor]:
    """Per-query metric values ([Q] float64 each) from the ranks; 0 for queries without relevant items."""
    ideal = _ideal_dcg(rows, gains, num_queries, ks) if "ndcg" in metrics else {}
    num_relevant = torch.bincount(rows, minlength=num_queries).to(torch.float64)  # [Q]
    rows, gains = rows[order], gains[order]
    ranks_f = ranks.to(torch.float64)
    best_rank = torch.full((num_queries,), math.inf, dtype=torch.float64)
    best_rank.scatter_reduce_(0, rows, ranks_f, reduce="amin")

    def per_query_sum(entry_values: Tensor, within: Tensor) -> Tensor:
        kept = torch.where(within, entry_values, torch.zeros_like(entry_values))
        return torch.zeros(num_queries, dtype=torch.float64).index_add_(0, rows, kept)

    out: dict[str, Tensor] = {}
    for k in ks:
        within = ranks <= k  # [nnz]
        hit = best_rank <= k  # [Q]
        if "recall" in metrics:
            out[f"recall@{k}"] = hit.to(torch.float64)
        if "mrr" in metrics:
            out[f"mrr@{k}"] = torch.where(hit, 1.0 / best_rank, torch.zeros_like(best_rank))
        if "precision" in metrics:
            out[f"precision@{k}"] = per_query_sum(torch.ones_like(ranks_f), within) / k
        if "ndcg" in metrics:
            dcg = per_query_sum(gains / torch.log2(ranks_f + 1), within)
            # ideal DCG is 0 only for queries without relevant items, which are excluded anyway
            out[f"ndcg@{k}"] = torch.where(
                ideal[k] > 0, dcg / ideal[k].clamp_min(1e-300), torch.zeros_like(dcg)
            )
        if "map" in metrics:
            precision_at_hit = positions.to(torch.float64) / ranks_f
            out[f"map@{k}"] = per_query_sum(precision_at_hit, within) / num_relevant.clamp(max=k).clamp_min(1)
    return out
