"""Offline hard-negative mining with a trained dual encoder (what `mmret mine` runs): for every query, the candidates the dual
encoder ranks highest that are not its positives — the confusers a reranker should learn to reject.

    eval_set, _ = embed_data(DualEncoder.from_checkpoint(CKPT), data, device, 128, "embedding")
    counts = mine_to_file(eval_set, MiningOptions(num_negatives=8, range_max=30), "mined.jsonl", model=CKPT)
    mined = mine_hard_negatives(query_emb, candidate_emb, positives, num_negatives=8)   # the tensor core

From the command line: `mmret mine --model CKPT --data data/shapes --split train --output mined/shapes.jsonl`.

Queries are the unique captions (text -> image) and/or the images (image -> text), exactly the queries of
`mmret eval`. Positives are known by id (an image is positive for every caption it was paired with), and are
never returned. Of the remaining candidates, ranks [range_min, range_max) are eligible (skipping the very top
avoids the likeliest unlabelled positives); `--margin M` keeps only scores <= positive − M and
`--relative-margin R` only scores <= positive × (1 − R), where "positive" is the query's best positive score
(both drop near-duplicates of the positive: probable false negatives). Then `--sampling top` keeps the best
`--num-negatives`, `random` draws them uniformly (seeded) from the eligible ones. Scoring is chunked over
queries (memory O(chunk × candidates)), with progress on stderr (`mmret.progress`).

Output: the mined-negatives file of `mmret.data.mined_negatives` (a header line, then one record per query),
written by `mine_to_file`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmret.data.mined_negatives import write_mined_negatives
from mmret.progress import Progress

DIRECTIONS = ("text_to_image", "image_to_text", "both")
SAMPLING = ("top", "random")


@dataclass
class MiningOptions:
    """Which negatives to mine (the options of `mmret mine`, recorded in the file's header)."""

    direction: str = "both"
    num_negatives: int = 8
    range_min: int = 0
    range_max: int = 50
    margin: float | None = None
    relative_margin: float | None = None
    sampling: str = "top"
    seed: int = 0
    split: str = "train"
    chunk_size: int = 1024


@dataclass
class MinedNegatives:
    """The negatives of one query: candidate indices, best first, with their scores."""

    indices: list[int]
    scores: list[float]
    positive_score: float


def mine_hard_negatives(
    query_emb: Tensor,
    candidate_emb: Tensor,
    positives: Sequence[Sequence[int]],
    num_negatives: int,
    range_min: int = 0,
    range_max: int = 50,
    margin: float | None = None,
    relative_margin: float | None = None,
    sampling: str = "top",
    seed: int = 0,
    chunk_size: int = 1024,
    progress: bool = False,
    description: str = "mining hard negatives",
) -> list[MinedNegatives]:
    """Hard negatives of every query by cosine similarity, positives excluded.

    Args:
        query_emb: [Q, D] query embeddings.
        candidate_emb: [C, D] candidate embeddings.
        positives: for each query, the indices of its positive candidates (never returned).
        num_negatives: negatives kept per query (fewer when fewer are eligible).
        range_min: first eligible rank among the non-positive candidates (0 = the most similar).
        range_max: ranks >= this are not eligible.
        margin: keep scores <= best positive score − margin.
        relative_margin: keep scores <= best positive score × (1 − relative_margin).
        sampling: "top": the best eligible ones; "random": uniformly drawn among the eligible (seeded).
        seed: seed of "random" sampling.
        chunk_size: queries scored at once.
        progress: report progress on stderr (`mmret.progress`), as `description`.
        description: what the progress report calls this run.

    Returns:
        One `MinedNegatives` per query (indices into the candidates, sorted by score, best first).
    """
    if len(positives) != query_emb.shape[0]:
        raise ValueError(f"{query_emb.shape[0]} queries but {len(positives)} positive lists")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if not 0 <= range_min < range_max:
        raise ValueError(f"need 0 <= range_min < range_max, got {range_min}, {range_max}")
    query_emb = F.normalize(query_emb.float(), dim=-1)
    candidate_t = F.normalize(candidate_emb.float(), dim=-1).t()  # [D, C]
    depth = min(range_max, candidate_t.shape[1])
    rng = np.random.default_rng(seed)
    results: list[MinedNegatives] = []
    with Progress(description, query_emb.shape[0], "queries", enabled=progress) as queries_done:
        for start in range(0, query_emb.shape[0], chunk_size):
            scores = query_emb[start : start + chunk_size] @ candidate_t  # [b, C]
            rows = [(row, index) for row, query in enumerate(range(start, start + scores.shape[0]))
                    for index in positives[query]]  # fmt: skip
            positive_score = torch.full((scores.shape[0],), float("nan"))
            if rows:
                row_index, column_index = (torch.tensor(values) for values in zip(*rows))
                best = torch.full((scores.shape[0],), float("-inf")).scatter_reduce(
                    0, row_index, scores[row_index, column_index], reduce="amax"
                )
                positive_score = torch.where(torch.isinf(best), positive_score, best)
                scores[row_index, column_index] = float("-inf")  # positives are never negatives
            top = scores.topk(depth, dim=1) if depth else None
            for row in range(scores.shape[0]):
                values = top.values[row, range_min:].tolist() if top is not None else []
                indices = top.indices[row, range_min:].tolist() if top is not None else []
                reference = float(positive_score[row])
                keep = []
                for value, index in zip(values, indices):
                    if value == float("-inf"):
                        continue
                    if margin is not None and reference == reference and value > reference - margin:
                        continue
                    if (
                        relative_margin is not None
                        and reference == reference
                        and value > reference * (1 - relative_margin)
                    ):
                        continue
                    keep.append((value, index))
                if sampling == "random" and len(keep) > num_negatives:
                    chosen = sorted(rng.choice(len(keep), size=num_negatives, replace=False).tolist())
                    keep = [keep[i] for i in chosen]
                keep = keep[:num_negatives]
                results.append(MinedNegatives([i for _, i in keep], [v for v, _ in keep], reference))
            queries_done.update(scores.shape[0])
    return results


def mine_to_file(
    eval_set,
    options: MiningOptions,
    output: str | os.PathLike,
    model: str,
    data: str = "",
    progress: bool = True,
) -> dict:
    """Mine every query of an embedded eval set and write the mined-negatives file; returns its counts
    (`progress`: report each direction's mining on stderr)."""
    records = list(mine_records(eval_set, options, progress))
    counts = {
        "queries": len(records),
        "negatives": sum(len(r.get("negative_ids", r.get("negative_captions", []))) for r in records),
        "queries_without_negatives": sum(
            not (r.get("negative_ids") or r.get("negative_captions")) for r in records
        ),
    }
    recorded = {key: value for key, value in asdict(options).items() if key != "chunk_size"}
    header = {"model": str(model), "data": str(data), "options": recorded, "counts": counts}
    write_mined_negatives(Path(output), header, records)
    return counts


def mine_records(eval_set, options: MiningOptions, progress: bool = True) -> Iterator[dict]:
    """The records of the mined-negatives file: text -> image per unique caption, image -> text per image."""
    image_ids = eval_set.image_ids.tolist()
    relevance = eval_set.text_to_image_relevance()
    image_positives = [relevance.indices[relevance.indptr[q] : relevance.indptr[q + 1]].tolist()
                       for q in range(eval_set.num_texts)]  # fmt: skip
    captions = eval_set.captions or [f"query {q}" for q in range(eval_set.num_texts)]
    common = dict(num_negatives=options.num_negatives, range_min=options.range_min, range_max=options.range_max,
                  margin=options.margin, relative_margin=options.relative_margin, sampling=options.sampling,
                  seed=options.seed, chunk_size=options.chunk_size, progress=progress)  # fmt: skip
    if options.direction in ("text_to_image", "both"):
        mined = mine_hard_negatives(eval_set.text_emb, eval_set.image_emb, image_positives, **common,
                                    description="mining text_to_image negatives")  # fmt: skip
        for query, result in enumerate(mined):
            yield {
                "direction": "text_to_image",
                "query": captions[query],
                "positive_ids": [image_ids[i] for i in image_positives[query]],
                "positive_score": result.positive_score,
                "negative_ids": [image_ids[i] for i in result.indices],
                "negative_scores": result.scores,
            }
    if options.direction in ("image_to_text", "both"):
        text_positives: list[list[int]] = [[] for _ in image_ids]
        for query, images in enumerate(image_positives):
            for image in images:
                text_positives[image].append(query)
        mined = mine_hard_negatives(eval_set.image_emb, eval_set.text_emb, text_positives, **common,
                                    description="mining image_to_text negatives")  # fmt: skip
        for image, result in enumerate(mined):
            yield {
                "direction": "image_to_text",
                "query_id": image_ids[image],
                "positive_captions": [captions[q] for q in text_positives[image]],
                "positive_score": result.positive_score,
                "negative_captions": [captions[q] for q in result.indices],
                "negative_scores": result.scores,
            }
