"""Hard negatives inside a training batch: for each query, candidates of the (gathered) batch drawn by similarity.

    indices, valid = sample_hard_negatives(text_emb @ image_emb.T, text_ids, image_ids, num_negatives=4)

The reranker's training signal (ALBEF / BLIP): each positive pair gets negatives the towers find similar, never a
candidate with the query's sample id. Pure tensor code; the caller gathers the candidates across ranks.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def sample_hard_negatives(
    similarity: Tensor,
    query_ids: Tensor,
    candidate_ids: Tensor,
    num_negatives: int,
    mode: Literal["similarity", "hardest", "uniform"] = "similarity",
    temperature: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick hard negative candidates per query, never one with the query's id.

    Args:
        similarity: [Q, N] query-candidate similarity (e.g. cosine of dual-encoder embeddings).
        query_ids: [Q] sample id of each query.
        candidate_ids: [N] sample id of each candidate.
        num_negatives: K, negatives per query.
        mode: "similarity": drawn without replacement with probability ∝ softmax(similarity / temperature);
            "hardest": the K most similar; "uniform": uniformly at random.
        temperature: softmax temperature of "similarity" sampling.
        generator: random generator of the draws.

    Returns:
        indices [Q, K'] into the candidates and a bool [Q, K'] validity mask (False: padding, for a query
        with fewer than K allowed candidates); K' = min(K, N).
    """
    allowed = query_ids[:, None] != candidate_ids[None, :]  # [Q, N]
    count = min(num_negatives, similarity.shape[1])
    if count <= 0:
        empty = similarity.new_zeros(similarity.shape[0], 0)
        return empty.long(), empty.bool()
    similarity = similarity.detach().float()
    if mode == "hardest":
        keys = similarity.masked_fill(~allowed, float("-inf"))
    elif mode in ("similarity", "uniform"):
        # Gumbel top-k == sampling without replacement ∝ exp(logits); -inf keeps same-id pairs out for good.
        logits = similarity / temperature if mode == "similarity" else torch.zeros_like(similarity)
        uniform = torch.rand(similarity.shape, generator=generator, device="cpu").to(similarity.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        keys = (logits + gumbel).masked_fill(~allowed, float("-inf"))
    else:
        raise ValueError(f"mode must be 'similarity', 'hardest' or 'uniform', got {mode!r}")
    top = keys.topk(count, dim=1)  # [Q, K']
    valid = torch.isfinite(top.values) & allowed.gather(1, top.indices)
    return top.indices, valid
