"""`mmret mine`: hard negatives per query from a trained dual encoder (for the reranker, and for the dual
encoder's own second round).

    mmret mine --model runs/shapes_dual/last.ckpt --data data/shapes --split train --output mined/shapes.jsonl
    mmret mine --model CKPT --data DIR --direction both --range-min 2 --range-max 30 --num-negatives 8 \\
        --margin 0.02 --relative-margin 0.05 --sampling random --output FILE

What is mined and how is `mmret.mining.offline`; the file format is `mmret.data.mined_negatives`.
"""

from __future__ import annotations

import argparse

from mmret.cli import add_model_arguments, add_run_arguments
from mmret.errors import UsageError
from mmret.mining.offline import DIRECTIONS, SAMPLING
from mmret.progress import quiet_progress


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret mine`."""
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="a shard directory, or a dataset root (see --split)")
    parser.add_argument("--output", required=True, help="JSON Lines file to write (replaced if it exists)")
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="train",
        help="split of a dataset root (default: %(default)s)",
    )
    parser.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="both",
        help="text_to_image: images per caption; image_to_text: captions per image (default: %(default)s)",
    )
    parser.add_argument(
        "--num-negatives", type=int, default=8, help="negatives per query (default: %(default)s)"
    )
    parser.add_argument(
        "--range-min",
        type=int,
        default=0,
        help="first eligible rank, positives excluded (default: %(default)s)",
    )
    parser.add_argument(
        "--range-max", type=int, default=50, help="ranks from here on are not eligible (default: %(default)s)"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help="absolute margin: keep scores <= positive score - MARGIN (default: no margin)",
    )
    parser.add_argument(
        "--relative-margin",
        type=float,
        default=None,
        help="relative margin: keep scores <= positive score * (1 - R) (default: no margin)",
    )
    parser.add_argument(
        "--sampling",
        choices=SAMPLING,
        default="top",
        help="top: the best eligible; random: drawn among them (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of --sampling random (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="images (and captions) per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=1024, help="queries scored at once (default: %(default)s)"
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--num-workers", type=int, default=1, help="data loader worker processes (default: %(default)s)"
    )


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
    from mmret.training.dual_encoder import check_model_spec

    check_model_spec(args.model, args.pretrained)


def run(args: argparse.Namespace) -> int:
    """Run `mmret mine` with parsed arguments."""
    from mmret.data.datamodule import RetrievalDataModule
    from mmret.evaluation.shard_set import check_has_captions, embed_data, resolve_data_path, resolve_device
    from mmret.io import check_output_file
    from mmret.mining.offline import MiningOptions, mine_to_file
    from mmret.training import DualEncoder

    check_args(args)
    output = check_output_file(args.output, expected="a mined-negatives .jsonl file")
    data_path = resolve_data_path(args.data, args.split)
    device = resolve_device(args.device)
    data = RetrievalDataModule(
        test=str(data_path), eval_batch_size=args.batch_size, num_workers=args.num_workers
    )
    check_has_captions(data.sources("test"), data_path)
    module = DualEncoder.load(args.model, args.pretrained, device)
    options = MiningOptions(
        direction=args.direction, num_negatives=args.num_negatives, range_min=args.range_min,
        range_max=args.range_max, margin=args.margin, relative_margin=args.relative_margin,
        sampling=args.sampling, seed=args.seed, split=args.split, chunk_size=args.chunk_size,
    )  # fmt: skip
    with quiet_progress(args.quiet):
        eval_set, _ = embed_data(module, data, device, args.batch_size, f"embedding {data_path}")
        if eval_set.num_images == 0:
            raise UsageError(f"data {data_path}: no usable sample; expected images with captions")
        counts = mine_to_file(eval_set, options, output, model=args.model, data=str(data_path))
    print(
        f"mined {counts['negatives']} negatives for {counts['queries']} queries "
        f"({counts['queries_without_negatives']} without any); wrote {output}"
    )
    return 0
