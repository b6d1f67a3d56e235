"""`mmret datasets NAME --output DIR`: a built-in offline dataset (digits, shapes, digit_scenes) as shards.

The shards go to DIR/train, DIR/val and DIR/test; NAME is one of `mmret.data.builtin.BUILTIN_DATASETS`.

    mmret datasets digits --output data/digits
    mmret datasets shapes --output data/shapes --image-size 64 --seed 0
    mmret datasets digit_scenes --output data/digit_scenes
    mmret datasets shapes --output data/shapes_cb --format clip_benchmark

`--format clip_benchmark` writes the same shards as DIR/SPLIT/0.tar, 1.tar, ... with DIR/SPLIT/nshards.txt,
DIR/dataset_type.txt and, for a set with classes (digits), DIR/classnames.txt and
DIR/zeroshot_classification_templates.txt: CLIP_benchmark reads DIR as `--dataset wds/NAME --dataset_root DIR`
(digits: zero-shot classification; shapes, digit_scenes: retrieval), and mmret reads it as any dataset root
(`mmret.data.clip_benchmark_wds`).

The datasets and their splits are `mmret.data.builtin` (and `digits.py`, `shapes.py`, `digit_scenes.py`
beside it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmret.data.builtin import BUILTIN_DATASETS, LAYOUTS, SPLITS, already_built, build_dataset
from mmret.progress import quiet_progress


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret datasets`."""
    parser.add_argument("name", metavar="NAME", help=f"dataset to write: {', '.join(BUILTIN_DATASETS)}")
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder to write train/, val/, test/ into"
    )
    parser.add_argument("--seed", type=int, default=0, help="split / scene seed (default: %(default)s)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=64,
        metavar="N",
        help="side of the square images (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="JPEG-encoding processes; 0: in this process (default: %(default)s)",
    )
    parser.add_argument(
        "--format",
        choices=LAYOUTS,
        default="mmret",
        help="mmret: shards DIR/SPLIT/00000.tar, ...; clip_benchmark: the same shards as DIR/SPLIT/0.tar, ... "
        "with nshards.txt, dataset_type.txt (and, for digits, classnames.txt and "
        "zeroshot_classification_templates.txt): a root that CLIP_benchmark's wds/ loader reads as it is "
        "(`--dataset wds/NAME --dataset_root DIR`) and mmret reads too (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in DIR")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress on stderr (otherwise: a bar on a terminal; in logs, a plain line every 10 s)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `mmret datasets` with parsed arguments."""
    existed = not args.overwrite and already_built(
        Path(args.output), args.name, args.seed, args.image_size, args.format
    )
    with quiet_progress(args.quiet):
        root = build_dataset(
            args.name,
            args.output,
            seed=args.seed,
            image_size=args.image_size,
            overwrite=args.overwrite,
            workers=args.workers,
            layout=args.format,
        )
    verb = "already built, left as it is:" if existed else "wrote"
    layout = " in CLIP_benchmark's wds/ layout" if args.format == "clip_benchmark" else ""
    print(
        f"{verb} {args.name} (seed {args.seed}, {args.image_size} px) in {root}/{{{','.join(SPLITS)}}}{layout}"
    )
    return 0
