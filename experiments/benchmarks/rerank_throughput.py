"""Benchmark: cross-encoder reranking throughput (pairs/s) and cost per query at K in {10, 50, 100}, on CPU.

    .venv/bin/python experiments/benchmarks/rerank_throughput.py              # test-vit-tiny towers, ~1 min
    .venv/bin/python experiments/benchmarks/rerank_throughput.py --quick      # test-vit-micro, K in {10, 50}

What is timed is what `mmret eval --reranker` does per query: the reranker's tower outputs are cached once
(every image's patch tokens, every caption's token states), then each query's K candidates go through the
fusion layers and the score head (`PairScorer`, batched pairs). The tower pass is reported apart (per image /
per caption, paid once per corpus, not per query). Random weights: the cost does not depend on training.

Output: a table of K, pairs/s, ms per query (K pairs), and the cost relative to K=10.
"""

from __future__ import annotations

import argparse
import time

import torch

from mmret.evaluation.rerank import PairScorer, rerank_candidates
from mmret.evaluation.retrieval import TopKCandidates
from mmret.training import CrossEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="micro towers, K in {10, 50}")
    parser.add_argument("--queries", type=int, default=32, help="queries reranked per K")
    parser.add_argument("--pair-batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = "test-vit-micro" if args.quick else "test-vit-tiny"
    ks = (10, 50) if args.quick else (10, 50, 100)
    reranker = CrossEncoder(model=model, fusion_width=128, fusion_layers=2, fusion_heads=4).eval()
    size = reranker.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    num_images = max(ks)

    with torch.no_grad():
        images = torch.randn(num_images, 3, *size)
        start = time.perf_counter()
        image_emb, patches = reranker.encode_images(images)  # [N, D], [N, P, Wv]
        image_ms = (time.perf_counter() - start) * 1000 / num_images
        captions = [f"a red circle left of a blue square {i}" for i in range(args.queries)]
        start = time.perf_counter()
        text_emb, states, masks = reranker.encode_texts(captions)
        text_ms = (time.perf_counter() - start) * 1000 / args.queries
        scorer = PairScorer(reranker, states, masks, patches, text_emb, image_emb)
        scorer(torch.zeros(8, dtype=torch.long), torch.arange(8))  # warm-up

        rows = []
        for k in ks:
            indices = torch.stack([torch.randperm(num_images)[:k] for _ in range(args.queries)])  # [Q, K]
            candidates = TopKCandidates(indices, torch.zeros(indices.shape), num_images)
            start = time.perf_counter()
            rerank_candidates(candidates, scorer, args.pair_batch_size)
            seconds = time.perf_counter() - start
            pairs = args.queries * k
            rows.append((k, pairs / seconds, seconds * 1000 / args.queries))

    print(
        f"towers {model}, fusion 2 x 128, {args.threads} threads; patch tokens {tuple(patches.shape[1:])}, "
        f"text tokens {tuple(states.shape[1:])}"
    )
    print(f"tower pass (once per corpus): {image_ms:.2f} ms/image, {text_ms:.2f} ms/caption")
    print(f"{'K':>5} | {'pairs/s':>9} | {'ms/query':>9} | {'cost vs K=10':>12}")
    print(f"{'-' * 5}-+-{'-' * 9}-+-{'-' * 9}-+-{'-' * 12}")
    for k, pairs_per_second, ms_per_query in rows:
        print(
            f"{k:>5} | {pairs_per_second:>9.0f} | {ms_per_query:>9.1f} | {ms_per_query / rows[0][2]:>11.1f}x"
        )


if __name__ == "__main__":
    main()
