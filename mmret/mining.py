"""Hard-negative mining with a trained dual encoder (`mmret mine`): for every query, the candidates the dual
encoder ranks highest that are not its positives — the confusers a reranker should learn to reject.

    mmret mine --model runs/shapes_dual/last.ckpt --data data/shapes --split train --output mined/shapes.jsonl
    mmret mine --model CKPT --data DIR --direction both --range-min 2 --range-max 30 --num-negatives 8 \\
        --margin 0.02 --relative-margin 0.05 --sampling random --output FILE

Queries are the unique captions (text -> image) and/or the images (image -> text), exactly the queries of
`mmret eval`. Positives are known by id (an image is positive for every caption it was paired with), and are
never returned. Of the remaining candidates, ranks [range_min, range_max) are eligible (skipping the very top
avoids the likeliest unlabelled positives); `--margin M` keeps only scores <= positive − M and
`--relative-margin R` only scores <= positive × (1 − R), where "positive" is the query's best positive score
(both drop near-duplicates of the positive: probable false negatives). Then `--sampling top` keeps the best
`--num-negatives`, `random` draws them uniformly (seeded) from the eligible ones. Scoring is chunked over
queries (memory O(chunk × candidates)), with a progress bar.

Output: JSON Lines, written to a temporary name and renamed. Line 1 is a header
`{"format": "mmret-mined-negatives", "version": 1, "model", "data", "options", "counts"}`; then one record per
query:
    {"direction": "text_to_image", "query": CAPTION, "positive_ids": [IMAGE_ID...], "positive_score": s,
     "negative_ids": [IMAGE_ID...], "negative_scores": [...]}
    {"direction": "image_to_text", "query_id": IMAGE_ID, "positive_captions": [...], "positive_score": s,
     "negative_captions": [...], "negative_scores": [...]}
`read_mined_negatives(path)` reads it back (header, records).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mmret.errors import UsageError

FORMAT = "mmret-mined-negatives"
DIRECTIONS = ("text_to_image", "image_to_text", "both")
SAMPLING = ("top", "random")


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
        progress: show a progress bar on stderr.

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
    starts = range(0, query_emb.shape[0], chunk_size)
    for start in tqdm(
        starts, desc="mining", unit="chunk", file=sys.stderr, disable=not progress, leave=False
    ):
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
    return results


def read_mined_negatives(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The header and the records of a file written by `mmret mine`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"mined negatives file {path} does not exist; write it with `mmret mine`")
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FORMAT:
        raise UsageError(f"{path} is not a `mmret mine` output (no {FORMAT!r} header on its first line)")
    return header, [json.loads(line) for line in lines[1:]]


# ---- command line ---------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a dual-encoder .ckpt written by `mmret fit`")
    parser.add_argument("--data", required=True, help="a shard directory, or a dataset root (see --split)")
    parser.add_argument("--output", required=True, help="JSON Lines file to write (replaced if it exists)")
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="train",
        help="split of a dataset root (default: train)",
    )
    parser.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="both",
        help="text_to_image: images per caption; image_to_text: captions per image (default both)",
    )
    parser.add_argument("--num-negatives", type=int, default=8, help="negatives per query (default 8)")
    parser.add_argument("--range-min", type=int, default=0, help="first eligible rank, positives excluded")
    parser.add_argument("--range-max", type=int, default=50, help="ranks from here on are not eligible")
    parser.add_argument(
        "--margin", type=float, default=None, help="absolute margin: keep scores <= positive score - MARGIN"
    )
    parser.add_argument(
        "--relative-margin",
        type=float,
        default=None,
        help="relative margin: keep scores <= positive score * (1 - R)",
    )
    parser.add_argument("--sampling", choices=SAMPLING, default="top", help="top (default) or random")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sampling random")
    parser.add_argument("--batch-size", type=int, default=128, help="images (and captions) per forward pass")
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries scored at once")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num-workers", type=int, default=1, help="data loader worker processes")


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_negatives", "batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}; expected an integer >= 1")
    if not 0 <= args.range_min < args.range_max:
        raise UsageError(
            f"--range-min {args.range_min} / --range-max {args.range_max}: expected 0 <= min < max"
        )
    if args.margin is not None and args.margin < 0:
        raise UsageError(f"--margin is {args.margin}; expected a value >= 0")
    if args.relative_margin is not None and not 0 <= args.relative_margin < 1:
        raise UsageError(f"--relative-margin is {args.relative_margin}; expected a value in [0, 1)")
    if not Path(args.model).is_file():
        raise UsageError(
            f"--model {args.model} does not exist; expected a dual-encoder .ckpt written by `mmret fit`"
        )


def run(args: argparse.Namespace) -> int:
    from mmret.checkpoints import load_dual_encoder
    from mmret.data.datamodule import RetrievalDataModule
    from mmret.evaluation.evaluate_cli import (
        check_has_captions,
        check_output_path,
        embed_data,
        resolve_data_path,
        resolve_device,
    )

    check_args(args)
    output = check_output_path(args.output)
    data_path = resolve_data_path(args.data, args.split)
    device = resolve_device(args.device)
    data = RetrievalDataModule(
        test=str(data_path), eval_batch_size=args.batch_size, num_workers=args.num_workers
    )
    check_has_captions(data.sources("test"), data_path)
    module = load_dual_encoder(args.model, device)
    eval_set, _ = embed_data(module, data, device, args.batch_size, f"embedding {data_path}")
    if eval_set.num_images == 0:
        raise UsageError(f"data {data_path}: no usable sample; expected images with captions")
    options = {
        key: getattr(args, key)
        for key in (
            "direction",
            "num_negatives",
            "range_min",
            "range_max",
            "margin",
            "relative_margin",
            "sampling",
            "seed",
            "split",
        )
    }
    records = list(_mine_records(eval_set, args))
    counts = {
        "queries": len(records),
        "negatives": sum(len(r.get("negative_ids", r.get("negative_captions", []))) for r in records),
        "queries_without_negatives": sum(
            not (r.get("negative_ids") or r.get("negative_captions")) for r in records
        ),
    }
    header = {
        "format": FORMAT,
        "version": 1,
        "model": str(args.model),
        "data": str(data_path),
        "options": options,
        "counts": counts,
    }
    _write_jsonl_atomic(output, [header, *records])
    print(
        f"mined {counts['negatives']} negatives for {counts['queries']} queries "
        f"({counts['queries_without_negatives']} without any); wrote {output}"
    )
    return 0


def _mine_records(eval_set, args: argparse.Namespace) -> Iterator[dict]:
    image_ids = eval_set.image_ids.tolist()
    relevance = eval_set.text_to_image_relevance()
    image_positives = [relevance.indices[relevance.indptr[q] : relevance.indptr[q + 1]].tolist()
                       for q in range(eval_set.num_texts)]  # fmt: skip
    captions = eval_set.captions or [f"query {q}" for q in range(eval_set.num_texts)]
    common = dict(num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
                  margin=args.margin, relative_margin=args.relative_margin, sampling=args.sampling,
                  seed=args.seed, chunk_size=args.chunk_size, progress=True)  # fmt: skip
    if args.direction in ("text_to_image", "both"):
        mined = mine_hard_negatives(eval_set.text_emb, eval_set.image_emb, image_positives, **common)
        for query, result in enumerate(mined):
            yield {
                "direction": "text_to_image",
                "query": captions[query],
                "positive_ids": [image_ids[i] for i in image_positives[query]],
                "positive_score": result.positive_score,
                "negative_ids": [image_ids[i] for i in result.indices],
                "negative_scores": result.scores,
            }
    if args.direction in ("image_to_text", "both"):
        text_positives: list[list[int]] = [[] for _ in image_ids]
        for query, images in enumerate(image_positives):
            for image in images:
                text_positives[image].append(query)
        mined = mine_hard_negatives(eval_set.image_emb, eval_set.text_emb, text_positives, **common)
        for image, result in enumerate(mined):
            yield {
                "direction": "image_to_text",
                "query_id": image_ids[image],
                "positive_captions": [captions[q] for q in text_positives[image]],
                "positive_score": result.positive_score,
                "negative_captions": [captions[q] for q in result.indices],
                "negative_scores": result.scores,
            }


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    from mmret.data.atomic_output import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
