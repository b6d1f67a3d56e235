"""`mmret index`: embed every image of a shard set with a trained dual encoder into a search index.

    mmret index --model runs/shapes/checkpoints/last.ckpt --data data/shapes/test --output runs/shapes.index
    mmret index --model CKPT --data /data/laion/{00000..00099}.tar --output s3://bucket/laion.index --captions
    mmret index --model MATRYOSHKA.ckpt --data data/shapes/test --output runs/shapes32.index --dim 32

The index is a LanceDB database (a local folder, or any LanceDB URI: s3://, gs://, db:// for LanceDB
Cloud/Enterprise) holding each image's vector and metadata (key, captions, shard and member, original path).
Running it again with more shards embeds only the new ones; an interrupted build resumes where it stopped.
Tables of at least --approximate-above rows get an IVF-PQ index; smaller ones are searched exactly.
`--dim D` stores the first D coordinates of each embedding, re-normalised (a Matryoshka prefix): the index
records D, and `mmret search` / `mmret serve` embed their queries the same way.
What an index holds and how it is kept consistent: `mmret.serving.index`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmret.cli import add_model_arguments, add_run_arguments
from mmret.errors import UsageError
from mmret.progress import quiet_progress


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret index`."""
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="shard directories (ours or img2dataset's), .tar files, globs or brace patterns; or a dataset "
        "root with train/val/test (see --split)",
    )
    parser.add_argument("--output", required=True, help="the index: a folder (created) or a LanceDB URI")
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="test",
        help="split of a dataset root (default: %(default)s)",
    )
    parser.add_argument(
        "--captions", action="store_true", help="also embed every caption (image -> text search)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--dim",
        type=int,
        default=None,
        help="store the first DIM coordinates of each embedding, re-normalised (a Matryoshka prefix; 1 .. the "
        "embedding width). Default: the full width (an existing index: its own dim)",
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--approximate-above",
        type=int,
        default=None,
        help="build an IVF-PQ index once a table holds this many rows (default: 50000); below, exact search",
    )


def shard_sources(specs: list[str], split: str):
    """The shard sources of --data: directories (or dataset roots), files and patterns."""
    from mmret.data.shard_sets import resolve_source
    from mmret.evaluation.shard_set import resolve_data_path

    sources = []
    for spec in specs:
        if Path(spec).is_dir():
            spec = str(resolve_data_path(spec, split))
        sources.append(resolve_source(spec, role="index"))
    return sources


def run(args: argparse.Namespace) -> int:
    """Run `mmret index` with parsed arguments."""
    from mmret.evaluation.shard_set import resolve_device
    from mmret.serving.index import DEFAULT_APPROXIMATE_ABOVE, build_index

    if args.batch_size < 1:
        raise UsageError(f"--batch-size is {args.batch_size}; expected an integer >= 1")
    if args.dim is not None and args.dim < 1:
        raise UsageError(f"--dim is {args.dim}; expected an integer >= 1 (a prefix of the embedding)")
    approximate_above = (
        DEFAULT_APPROXIMATE_ABOVE if args.approximate_above is None else args.approximate_above
    )
    if approximate_above < 1:
        raise UsageError(f"--approximate-above is {approximate_above}; expected an integer >= 1")
    from mmret.training.dual_encoder import check_model_spec

    check_model_spec(args.model, args.pretrained)
    output = str(args.output)
    if "://" not in output and Path(output).is_file():
        raise UsageError(f"--output {output} is a file; expected a folder for the index")
    if "://" not in output:
        from mmret.io import check_output_parent

        check_output_parent(output)
    sources = shard_sources(args.data, args.split)
    shards = [shard for source in sources for shard in source.shards]
    sizes = {shard: size for source in sources for shard, size in zip(source.shards, source.shard_sizes)}
    if not shards:
        raise UsageError(f"--data {' '.join(args.data)} holds no .tar shards; expected webdataset shards")
    with quiet_progress(args.quiet):
        report = build_index(
            args.model, shards, output, captions=args.captions, batch_size=args.batch_size,
            device=resolve_device(args.device), approximate_above=approximate_above, shard_sizes=sizes,
            pretrained=args.pretrained, dim=args.dim,
        )  # fmt: skip
    search = "approximate (IVF-PQ)" if report.approximate else "exact"
    print(
        f"indexed {report.shards_added} new shards ({report.shards_skipped} already in): {report.images} images"
        f"{f', {report.captions} captions' if report.captions else ''} in {report.index}; search: {search}"
    )
    return 0
