"""Optional FAISS first stage: top-K candidates per query without a dense [Q, C] score matrix in memory.

    pip install "mmret[faiss]"      # faiss-cpu
    candidates = top_k_candidates(text_emb, image_emb, k=100, index="faiss")          # exact (flat) index
    candidates = top_k_candidates(text_emb, image_emb, k=100, index="faiss-ivf")      # approximate, for huge C

`index="faiss"` is an exact inner-product search (IndexFlatIP) on normalised embeddings, so its lists equal the
dense top-K (up to ties); "faiss-ivf" clusters the corpus (IVF, `nprobe` lists searched) and trades exactness
for speed on corpora of millions. Metrics from top-K lists are exact for every cut-off up to K (see
`mmret.evaluation.retrieval.candidate_score_fn`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmret.errors import UsageError


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UsageError(
            "the FAISS index needs the faiss package, which is not installed; run `pip install faiss-cpu` "
            "(or `pip install mmret[faiss]`), or use the dense index"
        ) from None
    return faiss


def faiss_top_k(
    query_emb: Tensor, candidate_emb: Tensor, k: int, kind: str = "flat", nprobe: int = 16
) -> tuple[Tensor, Tensor]:
    """Indices [Q, k] and cosine scores [Q, k] of each query's best candidates, best first.

    Args:
        query_emb: [Q, D] query embeddings (normalised here).
        candidate_emb: [C, D] candidate embeddings (normalised here).
        k: candidates per query (at most C).
        kind: "flat" (exact) or "ivf" (inverted lists over ~sqrt(C) clusters; approximate).
        nprobe: IVF lists searched per query.
    """
    faiss = _faiss()
    queries = F.normalize(query_emb.detach().float(), dim=-1).cpu().numpy()
    corpus = F.normalize(candidate_emb.detach().float(), dim=-1).cpu().numpy()
    dim = corpus.shape[1]
    k = min(k, corpus.shape[0])
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = max(1, int(math.sqrt(corpus.shape[0])))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(corpus)
        index.nprobe = min(nprobe, nlist)
    else:
        raise UsageError(f"unknown FAISS index kind {kind!r}; expected 'flat' or 'ivf'")
    index.add(np.ascontiguousarray(corpus))
    scores, indices = index.search(np.ascontiguousarray(queries), k)  # [Q, k] each
    # IVF can return fewer than k hits (-1): those slots get the lowest possible score and candidate 0.
    missing = indices < 0
    indices[missing] = 0
    scores[missing] = -np.inf
    return torch.from_numpy(indices).long(), torch.from_numpy(scores).float()
