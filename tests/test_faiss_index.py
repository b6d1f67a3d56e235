"""The optional FAISS first stage: exact flat search equals the dense top-K, metrics from its top-K lists equal
the full-ranking metrics up to K, IVF finds most true neighbours, and a missing faiss is one clear error.

    .venv/bin/pytest tests/test_faiss_index.py -q
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from mmret.errors import UsageError
from mmret.evaluation.ranking import Relevance, compute_retrieval_metrics, embedding_scores
from mmret.evaluation.retrieval import candidate_score_fn, top_k_candidates


def structured(num_images=300, per_image=3, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image_emb = F.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
    owner = torch.arange(num_images).repeat_interleave(per_image)
    text_emb = F.normalize(image_emb[owner] + 0.9 * torch.randn(len(owner), dim, generator=generator), dim=-1)
    return image_emb, text_emb, owner


def test_flat_faiss_equals_dense_top_k():
    image_emb, text_emb, _ = structured()
    dense = top_k_candidates(text_emb, image_emb, k=20)
    flat = top_k_candidates(text_emb, image_emb, k=20, index="faiss")
    assert torch.equal(flat.indices, dense.indices)
    torch.testing.assert_close(flat.scores, dense.scores, atol=1e-5, rtol=0)


def test_metrics_from_faiss_lists_equal_full_ranking_up_to_k():
    image_emb, text_emb, owner = structured()
    relevance = Relevance.from_lists([[int(i)] for i in owner], num_candidates=image_emb.shape[0])
    full = compute_retrieval_metrics(embedding_scores(text_emb, image_emb), relevance, ks=(1, 5, 10))
    candidates = top_k_candidates(text_emb, image_emb, k=10, index="faiss")
    listed = compute_retrieval_metrics(candidate_score_fn(candidates), relevance, ks=(1, 5, 10))
    assert full["recall@1"] < 0.9  # a problem where the ranking matters
    for key in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
        assert listed[key] == pytest.approx(full[key], abs=1e-6), key


def test_ivf_finds_most_true_neighbours():
    image_emb, text_emb, _ = structured(num_images=2000, per_image=1)
    exact = top_k_candidates(text_emb, image_emb, k=10)
    approx = top_k_candidates(text_emb, image_emb, k=10, index="faiss-ivf")
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(exact.indices, approx.indices)]
    assert sum(overlap) / len(overlap) > 0.8


def test_missing_faiss_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    image_emb, text_emb, _ = structured(num_images=10, per_image=1)
    with pytest.raises(UsageError, match="pip install faiss-cpu"):
        top_k_candidates(text_emb, image_emb, k=5, index="faiss")
