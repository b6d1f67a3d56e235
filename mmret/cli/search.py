"""`mmret search`: query an index built by `mmret index` with text or an image, optionally reranked.

    mmret search runs/shapes.index "a red circle left of a blue square" --k 5
    mmret search runs/shapes.index "a red circle left of a blue square" --reranker RERANKER.ckpt --rerank-top 20
    mmret search runs/shapes.index --image query.png --k 8 --sheet results.png
    mmret search runs/shapes.index --image query.png --captions --format jsonl      # image -> captions

The query is embedded by the index's own dual encoder (recorded in the index; --model to point at a moved
checkpoint of the same model). --format jsonl prints one JSON record per result (rank, key, score,
reranker_score, caption, image_path, shard, member, ...); --sheet writes a contact sheet PNG. An index built
with `mmret index --dim D` (Matryoshka prefixes) is searched at D: the query embedding is cut the same way.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmret.cli import add_index_dim_argument
from mmret.errors import UsageError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret search`."""
    parser.add_argument("index", help="an index folder (or LanceDB URI) written by `mmret index`")
    parser.add_argument("query", nargs="?", default=None, help="the text query (or use --image)")
    parser.add_argument("--image", default=None, help="an image file as the query instead of text")
    parser.add_argument("--k", type=int, default=10, help="results (default: %(default)s)")
    parser.add_argument(
        "--model",
        default=None,
        help="the index's dual-encoder .ckpt (default: the one recorded in the index)",
    )
    parser.add_argument(
        "--reranker", default=None, help="a reranker .ckpt or exported folder (default: none, no reranking)"
    )
    parser.add_argument(
        "--rerank-top",
        type=int,
        default=None,
        help="first-stage candidates the reranker rescores (default: 2 x --k, at most the index's size)",
    )
    parser.add_argument("--captions", action="store_true", help="with --image: search the captions instead")
    parser.add_argument(
        "--exact", action="store_true", help="exact search even where the index is approximate"
    )
    add_index_dim_argument(parser)
    parser.add_argument(
        "--format", choices=("table", "jsonl"), default="table", help="output (default: %(default)s)"
    )
    parser.add_argument(
        "--sheet", default=None, help="also write the results as a contact sheet PNG (default: none)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available (default: %(default)s)",
    )


def format_table(results) -> str:
    reranked = any(result.reranker_score is not None for result in results)
    header = (
        f"{'rank':>4}  {'score':>7}  "
        + (f"{'rerank':>7}  {'was':>4}  " if reranked else "")
        + f"{'key':<14}  caption"
    )
    lines = [header]
    for result in results:
        extra = f"{result.reranker_score:7.3f}  {result.first_stage_rank:>4}  " if reranked else ""
        lines.append(f"{result.rank:>4}  {result.score:7.4f}  {extra}{result.key:<14}  {result.caption}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run `mmret search` with parsed arguments."""
    from mmret.io import check_output_file
    from mmret.serving.retriever import Retriever

    if (args.query is None) == (args.image is None):
        raise UsageError("give a text QUERY or --image PATH (one of them)")
    if args.captions and args.image is None:
        raise UsageError("--captions searches captions with an image query; add --image PATH")
    if args.reranker is None and args.rerank_top is not None:
        raise UsageError("--rerank-top needs --reranker CKPT")
    if args.dim is not None and args.dim < 1:
        raise UsageError(f"--dim is {args.dim}; expected an integer >= 1 (a prefix of the embedding)")
    sheet = check_output_file(args.sheet, option="--sheet", expected="a .png file") if args.sheet else None
    retriever = Retriever.open(
        args.index, model=args.model, reranker=args.reranker, device=args.device, dim=args.dim
    )
    rerank_top = None
    if args.reranker is not None:
        available = retriever.index.num_images if not args.captions else retriever.index.num_captions
        rerank_top = (
            args.rerank_top if args.rerank_top is not None else min(max(2 * args.k, args.k), available)
        )
    results = retriever.search(
        texts=None if args.query is None else [args.query],
        images=None if args.image is None else [args.image],
        k=args.k, rerank_top=rerank_top, table="captions" if args.captions else "images",
        exact=True if args.exact else None,
    )[0]  # fmt: skip
    if args.format == "jsonl":
        for result in results:
            sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        print(format_table(results))
    if sheet is not None:
        from mmret.serving.sheet import write_contact_sheet

        images = [retriever.load_image(result) for result in results]
        write_contact_sheet(sheet, args.query or f"image {args.image}", results, images)
        print(f"wrote {sheet}", file=sys.stderr if args.format == "jsonl" else sys.stdout)
    return 0
