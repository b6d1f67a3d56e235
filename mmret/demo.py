"""Run the pipeline on the built-in offline data: `mmret demo [--output DIR] [--quick]`.

This stage covers the data: it builds the `digits` and `shapes` datasets under DIR/data (once; later runs
reuse them), streams one training batch of each through `RetrievalDataModule` and prints what the models
will receive — tensor shapes and a few captions. Later stages extend it to training, mining, evaluation
and a results table.

    mmret demo --output demo_output --quick     # ~10 s on a laptop CPU, no worker processes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmret.data.datamodule import RetrievalDataModule

DEMO_DATASETS = ("digits", "shapes")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret demo`."""
    parser.add_argument(
        "--output",
        default="demo_output",
        metavar="DIR",
        help="folder for the demo's data and results (default: demo_output)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smallest settings: batches of 8 read in the main process"
    )


def describe(value) -> str:
    """`[8, 3, 64, 64] float32` for a tensor, `{input_ids: [...], ...}` for a dict of tensors."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {describe(item)}" for key, item in value.items()) + "}"
    return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"


def show_batch(name: str, datamodule: RetrievalDataModule, num_captions: int = 3) -> dict:
    """Stream one training batch of `datamodule` and print its shapes and first captions."""
    loader = datamodule.train_dataloader()
    batches = iter(loader)
    batch = next(batches)
    del batches  # stops the worker processes now rather than at garbage collection
    info = datamodule.dataset_info("train") or {}
    classes = f", {len(info['class_names'])} classes" if info.get("class_names") else ""
    print(
        f"{name}: {info.get('num_samples', '?')} train samples, {info.get('image_size', '?')} px{classes}; "
        f"{len(loader)} batches of {datamodule.batch_size} per epoch"
    )
    for key in ("image", "text", "sample_id", "label"):
        print(f"  {key:<9} {describe(batch[key])}")
    for caption, label in zip(batch["caption"][:num_captions], batch["label"][:num_captions].tolist()):
        print(f"  caption   {caption!r} (label {label})")
    return batch


def run(args: argparse.Namespace) -> int:
    """Run `mmret demo` with parsed arguments."""
    data_root = Path(args.output) / "data"
    for name in DEMO_DATASETS:
        datamodule = RetrievalDataModule(
            dataset=name,
            data_root=str(data_root),
            batch_size=8 if args.quick else 32,
            num_workers=0 if args.quick else 2,
        )
        datamodule.setup("fit")  # builds DIR/data/NAME first when it is missing
        show_batch(name, datamodule)
    return 0
