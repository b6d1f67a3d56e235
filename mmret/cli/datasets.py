"""`mmret datasets NAME --output DIR`: a built-in offline dataset (digits, shapes, digit_scenes) as shards.

The shards go to DIR/train, DIR/val and DIR/test; NAME is one of `mmret.data.builtin.BUILTIN_DATASETS`.

    mmret datasets digits --output data/digits
    mmret datasets shapes --output data/shapes --image-size 64 --seed 0
    mmret datasets digit_scenes --output data/digit_scenes

The datasets and their splits are `mmret.data.builtin` (and `digits.py`, `shapes.py`, `digit_scenes.py`
beside it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmret.data.builtin import BUILTIN_DATASETS, SPLITS, already_built, build_dataset


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret datasets`."""
    parser.add_argument("name", metavar="NAME", help=f"dataset to write: {', '.join(BUILTIN_DATASETS)}")
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder to write train/, val/, test/ into"
    )
    parser.add_argument("--seed", type=int, default=0, help="split / scene seed (default 0)")
    parser.add_argument(
        "--image-size", type=int, default=64, metavar="N", help="side of the square images (default 64)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="JPEG-encoding processes (default 0: in this process)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in DIR")


def run(args: argparse.Namespace) -> int:
    """Run `mmret datasets` with parsed arguments."""
    existed = not args.overwrite and already_built(Path(args.output), args.name, args.seed, args.image_size)
    root = build_dataset(
        args.name,
        args.output,
        seed=args.seed,
        image_size=args.image_size,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    verb = "already built, left as it is:" if existed else "wrote"
    print(f"{verb} {args.name} (seed {args.seed}, {args.image_size} px) in {root}/{{{','.join(SPLITS)}}}")
    return 0
