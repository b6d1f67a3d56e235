"""`mmret shards SRC --output DIR --image-size N`: image-caption pairs -> pre-resized webdataset shards.

    mmret shards photos/ --output shards/photos --image-size 224            # image + same-stem .txt caption
    mmret shards pairs.csv --output shards/pairs --image-size 224      # columns recognised by name, or:
    mmret shards pairs.csv --output shards/pairs --image-size 224 --image-column file --caption-column text
    mmret shards img2dataset_out/ --output shards/mine --image-size 224

SRC is a folder, a CSV/TSV/JSONL table or an img2dataset output (`mmret.data.raw_sources`); the conversion and
the shard format are `mmret.data.shard_writer`. A table's columns that are not named by flag are recognised
by the usual names (`mmret.data.raw_sources.table_columns`), and the choice is printed before the conversion.
"""

from __future__ import annotations

import argparse

from mmret.data.image_resize import RESIZE_MODES
from mmret.data.raw_sources import table_columns
from mmret.data.shard_writer import convert_source
from mmret.progress import quiet_progress


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret shards`."""
    parser.add_argument(
        "src",
        metavar="SRC",
        help="folder of images with same-stem .txt captions, a .csv/.tsv/.jsonl table, or an "
        "img2dataset output folder",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="shard folder to create")
    parser.add_argument(
        "--image-size", type=int, required=True, metavar="N", help="side of the square images"
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, metavar="M", help="samples per tar (default: %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="decode/resize processes (default: cores, at most 8; 0 or 1 = in this process)",
    )
    parser.add_argument(
        "--resize-mode",
        default="center_crop",
        metavar="|".join(RESIZE_MODES),
        help="center_crop: shorter side to N, central square; pad: longer side to N, black borders "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--image-column",
        default=None,
        help="table column with image paths (default: the one column named image, filepath, image_path, "
        "file_name, file, path, img or url)",
    )
    parser.add_argument(
        "--caption-column",
        default=None,
        help="table column with captions, several separated by newlines (default: the one column named caption, "
        "title, text, captions or txt)",
    )
    parser.add_argument(
        "--label-column",
        default=None,
        help="table column with integer labels (.cls); read only when given",
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=95, help="JPEG quality 1-100 (default: %(default)s)"
    )
    parser.add_argument(
        "--name", default=None, help="dataset name in dataset.json (default: output folder name)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress on stderr (otherwise: a bar on a terminal; in logs, a plain line every 10 s)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `mmret shards` with parsed arguments."""
    columns = table_columns(args.src, args.image_column, args.caption_column, args.label_column)
    if columns is not None and columns.describe():
        print(columns.describe(), flush=True)
    with quiet_progress(args.quiet):
        info = convert_source(
            args.src,
            args.output,
            image_size=args.image_size,
            shard_size=args.shard_size,
            resize_mode=args.resize_mode,
            jpeg_quality=args.jpeg_quality,
            workers=args.workers,
            image_column=columns.image if columns else args.image_column,
            caption_column=columns.caption if columns else args.caption_column,
            label_column=args.label_column,
            name=args.name,
            overwrite=args.overwrite,
        )
    skipped = sum(info["skipped"].values())
    print(
        f"wrote {info['num_samples']} samples ({info['num_captions']} captions) in {len(info['shards'])} "
        f"shards to {args.output}; skipped {skipped} (see skipped.txt)"
    )
    return 0
