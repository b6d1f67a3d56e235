"""Tests of mmret.evaluation.ranking: parity with torchmetrics and sklearn, hand-checked cases, ties, chunking."""

import math

import pytest
import torch
from sklearn.metrics import average_precision_score, ndcg_score
from torchmetrics.functional.retrieval import retrieval_average_precision, retrieval_precision
from torchmetrics.retrieval import (
    RetrievalHitRate,
    RetrievalMAP,
    RetrievalMRR,
    RetrievalNormalizedDCG,
    RetrievalPrecision,
)

from mmret.evaluation.ranking import (
    Relevance,
    compute_retrieval_metrics,
    embedding_scores,
    per_query_metrics,
)

# Our name -> torchmetrics class whose definition matches ours exactly (map differs; see its own tests).
TORCHMETRICS = {
    "recall": RetrievalHitRate,
    "mrr": RetrievalMRR,
    "ndcg": RetrievalNormalizedDCG,
    "precision": RetrievalPrecision,
}


def random_case(seed: int, num_queries: int = 40, num_candidates: int = 30, density: float = 0.12):
    """Continuous positive scores (no ties; torchmetrics' AP ignores targets whose score is <= 0)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_queries, num_candidates, generator=generator, dtype=torch.float64) + 0.01
    relevant = torch.rand(num_queries, num_candidates, generator=generator) < density
    relevant[:, 0] |= torch.rand(num_queries, generator=generator) < 0.3  # several relevant items per query
    return scores, relevant


def torchmetrics_value(metric_cls, scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Mean of a torchmetrics retrieval metric over queries that have a relevant item."""
    num_queries, num_candidates = scores.shape
    indexes = torch.arange(num_queries).repeat_interleave(num_candidates)  # [Q * C] query of each pair
    metric = metric_cls(top_k=k, empty_target_action="skip")
    metric.update(scores.reshape(-1), target.reshape(-1), indexes=indexes)
    return float(metric.compute())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(TORCHMETRICS))
def test_parity_with_torchmetrics(seed, name):
    scores, relevant = random_case(seed)
    relevant[5] = False  # an empty query: torchmetrics skips it, we exclude it
    ours = compute_retrieval_metrics(scores, Relevance.from_dense(relevant), ks=(1, 3, 10), chunk_size=7)
    for k in (1, 3, 10):
        expected = torchmetrics_value(TORCHMETRICS[name], scores, relevant, k)
        assert ours[f"{name}@{k}"] == pytest.approx(expected, abs=1e-6), (name, k)


@pytest.mark.parametrize("seed", [0, 1])
def test_map_relates_to_torchmetrics_per_query(seed):
    """torchmetrics divides AP@K by the relevant items found in the top K; we divide by min(|R|, K)."""
    scores, relevant = random_case(seed)
    relevance = Relevance.from_dense(relevant)
    per_query = per_query_metrics(scores, relevance, ks=(3, 10))
    for query in range(scores.shape[0]):
        num_relevant = int(relevant[query].sum())
        for k in (3, 10):
            their_ap = float(retrieval_average_precision(scores[query], relevant[query], top_k=k))
            found = float(retrieval_precision(scores[query], relevant[query], top_k=k)) * k
            expected = their_ap * found / min(num_relevant, k) if num_relevant else 0.0
            assert float(per_query.values[f"map@{k}"][query]) == pytest.approx(expected, abs=1e-6)


def test_map_equals_torchmetrics_with_one_relevant_item():
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(50, 20, generator=generator, dtype=torch.float64) + 0.01
    relevant = torch.zeros(50, 20, dtype=torch.bool)
    relevant[torch.arange(50), torch.randint(0, 20, (50,), generator=generator)] = True
    ours = compute_retrieval_metrics(scores, Relevance.from_dense(relevant), ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert ours[f"map@{k}"] == pytest.approx(
            torchmetrics_value(RetrievalMAP, scores, relevant, k), abs=1e-6
        )


def test_map_without_cutoff_equals_sklearn_average_precision():
    scores, relevant = random_case(4, num_queries=20, num_candidates=25)
    relevant[:, 1] = True  # every query has a relevant item
    ours = compute_retrieval_metrics(scores, Relevance.from_dense(relevant), ks=(25,), metrics=("map",))
    expected = sum(average_precision_score(relevant[q].numpy(), scores[q].numpy()) for q in range(20)) / 20
    assert ours["map@25"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_graded_ndcg_matches_sklearn_and_torchmetrics(k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.rand(30, 12, generator=generator, dtype=torch.float64)
    gains = torch.randint(0, 4, (30, 12), generator=generator).to(torch.float64)  # grades 0 (irrelevant) .. 3
    gains[:, 2] += 1  # every query has something relevant (sklearn would count an all-zero query as 0)
    ours = compute_retrieval_metrics(scores, Relevance.from_dense(gains), ks=(k,), metrics=("ndcg",))
    assert ours[f"ndcg@{k}"] == pytest.approx(ndcg_score(gains.numpy(), scores.numpy(), k=k), abs=1e-9)
    assert ours[f"ndcg@{k}"] == pytest.approx(
        torchmetrics_value(RetrievalNormalizedDCG, scores, gains, k), abs=1e-6
    )


def test_hand_checked_binary_case():
    # Ranking by score: candidates 0, 1, 2, 3, 4, 5; the relevant ones (1 and 3) sit at ranks 2 and 4.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    result = compute_retrieval_metrics(scores, Relevance.from_lists([[3, 1]], 6), ks=(1, 3, 5))
    expected = {
        "recall@1": 0.0,
        "recall@3": 1.0,
        "recall@5": 1.0,
        "mrr@1": 0.0,
        "mrr@3": 1 / 2,
        "mrr@5": 1 / 2,
        "precision@1": 0.0,
        "precision@3": 1 / 3,
        "precision@5": 2 / 5,
        "ndcg@1": 0.0,
        "ndcg@3": (1 / math.log2(3)) / (1 + 1 / math.log2(3)),
        "ndcg@5": (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)),
        "map@1": 0.0,
        "map@3": (1 / 2) / 2,
        "map@5": (1 / 2 + 2 / 4) / 2,
        "num_queries": 1,
        "num_queries_without_relevant": 0,
    }
    assert result == pytest.approx(expected)


def test_hand_checked_graded_case():
    # Ranks: candidate 2 (gain 1) first, candidate 0 (gain 3) third; ideal order puts gain 3 first.
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.7]])
    relevance = Relevance.from_lists([[0, 2]], 4, gains=[[3.0, 1.0]])
    result = compute_retrieval_metrics(scores, relevance, ks=(2, 4), metrics=("ndcg",))
    ideal = 3 + 1 / math.log2(3)
    assert result["ndcg@2"] == pytest.approx(1.0 / ideal)
    assert result["ndcg@4"] == pytest.approx((1.0 + 3 / math.log2(4)) / ideal)


def test_constant_scorer_scores_zero():
    scores = torch.zeros(4, 8)
    relevance = Relevance.from_lists([[0], [3, 7], [1, 2, 4], [0, 1, 2, 3, 4, 5, 6, 7]], 8)
    result = compute_retrieval_metrics(scores, relevance, ks=(1, 5))
    # Only the query for which everything is relevant gets credit; the others rank their items last.
    for name in ("recall", "mrr", "ndcg", "map", "precision"):
        for k in (1, 5):
            per_query = per_query_metrics(scores, relevance, ks=(k,)).values[f"{name}@{k}"]
            assert per_query[:3].tolist() == [0.0, 0.0, 0.0], (name, k)
    assert result["recall@1"] == pytest.approx(1 / 4)


def test_ties_rank_relevant_items_below_irrelevant_ones():
    # Candidate 0 (relevant) ties with candidate 1 (irrelevant) at the top: rank 2, despite the lower index.
    result = compute_retrieval_metrics(
        torch.tensor([[1.0, 1.0, 0.5]]), Relevance.from_lists([[0]], 3), ks=(1, 3)
    )
    assert result["recall@1"] == 0.0
    assert result["mrr@3"] == pytest.approx(1 / 2)
    # Ties running past the top-K threshold: ranks are exact, not just "outside".
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.5]])
    result = compute_retrieval_metrics(scores, Relevance.from_lists([[1]], 5), ks=(2, 5))
    assert (result["recall@2"], result["mrr@5"]) == (0.0, pytest.approx(1 / 5))
    # Tied graded items: the lower gain goes first (the worse order for DCG).
    relevance = Relevance.from_lists([[0, 1]], 3, gains=[[2.0, 1.0]])
    result = compute_retrieval_metrics(torch.tensor([[0.3, 0.3, 0.3]]), relevance, ks=(3,), metrics=("ndcg",))
    worst = (1 / math.log2(3) + 2 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert result["ndcg@3"] == pytest.approx(worst)


@pytest.mark.parametrize("name", sorted(TORCHMETRICS) + ["map"])
def test_ties_match_torchmetrics_on_pessimistically_resolved_scores(name):
    """With heavy ties, our result equals torchmetrics' once each relevant item is nudged below its ties."""
    generator = torch.Generator().manual_seed(7)
    scores = torch.randint(1, 5, (30, 12), generator=generator).to(torch.float64)  # only 4 distinct values
    relevant = torch.rand(30, 12, generator=generator) < 0.25
    relevant[:, 3] = True  # at least one relevant item each, so map has no empty-query ambiguity
    resolved = scores - 0.5 * relevant  # ties among equally relevant items do not change any metric
    ours = compute_retrieval_metrics(scores, Relevance.from_dense(relevant), ks=(1, 4, 8))
    metric_cls = TORCHMETRICS.get(name, RetrievalMAP)
    for k in (1, 4, 8):
        if name == "map":
            # Compare per query through the torchmetrics/min(|R|, K) relation, as in the untied test.
            per_query = per_query_metrics(scores, Relevance.from_dense(relevant), ks=(k,)).values[f"map@{k}"]
            for query in range(30):
                found = float(retrieval_precision(resolved[query], relevant[query], top_k=k)) * k
                their_ap = float(retrieval_average_precision(resolved[query], relevant[query], top_k=k))
                expected = their_ap * found / min(int(relevant[query].sum()), k)
                assert float(per_query[query]) == pytest.approx(expected, abs=1e-6)
        else:
            expected = torchmetrics_value(metric_cls, resolved, relevant, k)
            assert ours[f"{name}@{k}"] == pytest.approx(expected, abs=1e-6), (name, k)


def test_queries_without_relevant_items_are_excluded_and_counted():
    scores, relevant = random_case(5, num_queries=12)
    relevant[[2, 7]] = False
    keep = [q for q in range(12) if q not in (2, 7)]
    full = compute_retrieval_metrics(scores, Relevance.from_dense(relevant))
    reduced = compute_retrieval_metrics(scores[keep], Relevance.from_dense(relevant[keep]))
    assert full["num_queries"] == 10 and full["num_queries_without_relevant"] == 2
    assert reduced["num_queries_without_relevant"] == 0
    assert {k: v for k, v in full.items() if not k.startswith("num_")} == pytest.approx(
        {k: v for k, v in reduced.items() if not k.startswith("num_")}
    )
    nothing = compute_retrieval_metrics(torch.rand(3, 4), Relevance.from_lists([[], [], []], 4), ks=(1,))
    assert nothing["recall@1"] == 0.0 and nothing["num_queries_without_relevant"] == 3
    assert all(not math.isnan(v) for v in nothing.values())


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_chunked_equals_unchunked(chunk_size):
    scores, relevant = random_case(6, num_queries=37)
    scores[4, :6] = scores[4, 0]  # some ties, so the threshold path runs too
    relevance = Relevance.from_dense(relevant)
    whole = per_query_metrics(scores, relevance, chunk_size=scores.shape[0])
    chunked = per_query_metrics(scores, relevance, chunk_size=chunk_size)
    assert all(torch.equal(whole.values[key], chunked.values[key]) for key in whole.values)


def test_score_function_bounds_chunks_and_matches_dense_scores():
    generator = torch.Generator().manual_seed(8)
    query_emb = torch.randn(23, 6, generator=generator, dtype=torch.float64)
    candidate_emb = torch.randn(17, 6, generator=generator, dtype=torch.float64)
    relevance = Relevance.from_labels(torch.arange(23) % 5, torch.arange(17) % 5)
    requested = []

    def score_fn(start, end):
        requested.append(end - start)
        return embedding_scores(query_emb, candidate_emb)(start, end)

    lazy = compute_retrieval_metrics(score_fn, relevance, chunk_size=4)
    dense = compute_retrieval_metrics(query_emb @ candidate_emb.T, relevance)
    assert max(requested) == 4 and sum(requested) == 23
    assert lazy == pytest.approx(dense)


def test_relevance_constructors_agree():
    query_labels = torch.tensor([0, 2, 1, 5, 2])
    candidate_labels = torch.tensor([2, 0, 2, 1, 3, 0])
    from_labels = Relevance.from_labels(query_labels, candidate_labels)
    dense = query_labels[:, None] == candidate_labels[None, :]  # [Q, C]
    from_lists = Relevance.from_lists([[1, 5], [0, 2], [3], [], [2, 0]], 6)
    for relevance in (from_labels, from_lists):
        assert torch.equal(relevance.indptr, Relevance.from_dense(dense).indptr)
        assert torch.equal(relevance.indices, Relevance.from_dense(dense).indices)
    transposed = from_labels.transpose()
    assert torch.equal(transposed.indices, Relevance.from_dense(dense.T).indices)
    assert transposed.num_queries == 6 and transposed.num_candidates == 5


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="listed twice"):
        Relevance.from_lists([[1, 1]], 3)
    with pytest.raises(ValueError, match="lie in"):
        Relevance.from_lists([[3]], 3)
    with pytest.raises(ValueError, match="shape"):
        compute_retrieval_metrics(torch.rand(2, 4), Relevance.from_lists([[0], [1]], 3))
    with pytest.raises(ValueError, match="NaN"):
        compute_retrieval_metrics(torch.tensor([[0.1, float("nan")]]), Relevance.from_lists([[0]], 2))
    with pytest.raises(ValueError, match="returned shape"):
        compute_retrieval_metrics(lambda start, end: torch.rand(1, 2), Relevance.from_lists([[0], [1]], 2))
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_retrieval_metrics(torch.rand(1, 2), Relevance.from_lists([[0]], 2), metrics=("auc",))


def test_cutoff_beyond_number_of_candidates():
    result = compute_retrieval_metrics(
        torch.tensor([[0.2, 0.1, 0.3]]), Relevance.from_lists([[1]], 3), ks=(10,)
    )
    assert result["recall@10"] == 1.0
    assert result["mrr@10"] == pytest.approx(1 / 3)
    assert result["precision@10"] == pytest.approx(1 / 10)


@pytest.mark.gpu
def test_cuda_scores_give_exactly_the_cpu_result():
    scores, relevant = random_case(9, num_queries=300, num_candidates=200)
    scores[::7, :20] = 0.5  # ties, some of them at the top-K threshold
    relevance = Relevance.from_dense(relevant)
    on_cpu = per_query_metrics(scores, relevance, ks=(1, 5, 10), chunk_size=64)
    on_gpu = per_query_metrics(scores.cuda(), relevance, ks=(1, 5, 10), chunk_size=64)
    assert all(torch.equal(on_cpu.values[key], on_gpu.values[key]) for key in on_cpu.values)


def test_no_candidates_or_no_relevant_pairs_at_all():
    for relevance in (Relevance.from_lists([[], []], 0), Relevance.from_lists([[], []], 3)):
        scores = torch.zeros(2, relevance.num_candidates)
        result = compute_retrieval_metrics(scores, relevance, ks=(1,))
        assert result["recall@1"] == 0.0 and result["num_queries_without_relevant"] == 2
