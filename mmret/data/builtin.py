"""Write a built-in offline dataset as shards (`mmret datasets`): `digits`, `shapes` and `digit_scenes`.

    mmret datasets digits --output data/digits            # ROOT/train, ROOT/val, ROOT/test
    mmret datasets shapes --output data/shapes --seed 1 --image-size 96
    mmret datasets digit_scenes --output data/digit_scenes
    mmret datasets digits --output data/digits_cb --format clip_benchmark   # also CLIP_benchmark's wds/ layout

    from mmret.data.builtin import build_dataset
    root = build_dataset("shapes", "data/shapes")          # what a data module calls when data/shapes is missing

None needs a download; each builds in seconds on a CPU (see `mmret.data.digits`, `mmret.data.shapes` and
`mmret.data.digit_scenes` for what they hold). The same (name, seed, image_size) gives byte-identical
shards; another seed gives another split (digits) or other scenes (shapes, digit_scenes: also another
split of the scans). The three splits
appear together: they are written into a hidden sibling folder that is renamed to ROOT at the end, so two
processes building the same dataset at once (e.g. DDP ranks) both end up with one complete copy. Asking
again for a dataset that is already there with the same seed and image size does nothing.

`layout="clip_benchmark"` (`--format clip_benchmark`) writes the same shards under the names and beside the
text files that CLIP_benchmark's `wds/` loader reads (`mmret.data.clip_benchmark_wds`); mmret reads that root
as it reads its own.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from mmret.data.clip_benchmark_wds import to_clip_benchmark_layout
from mmret.data.shard_writer import write_shards
from mmret.errors import UsageError
from mmret.io import atomic_output_dir, check_output_dir

BUILTIN_DATASETS = ("digits", "shapes", "digit_scenes")
SPLITS = ("train", "val", "test")
SHARD_SIZE = 1000
LAYOUTS = ("mmret", "clip_benchmark")  # mmret's shard names only; or also CLIP_benchmark's wds/ layout


def is_complete(root: str | Path) -> bool:
    """True when ROOT holds a dataset.json in each of train, val and test."""
    return all((Path(root) / split / "dataset.json").is_file() for split in SPLITS)


def already_built(root: Path, name: str, seed: int, image_size: int, layout: str = "mmret") -> bool:
    """ROOT is a complete build of the same dataset with the same seed and image size, in `layout` (a
    clip_benchmark root also serves as an mmret one)."""
    if not is_complete(root):
        return False
    for split in SPLITS:
        try:
            info = json.loads((root / split / "dataset.json").read_text())
        except (OSError, ValueError):
            return False
        if (info.get("name"), info.get("seed"), info.get("image_size")) != (name, seed, image_size):
            return False
        if layout != "mmret" and info.get("format", "mmret") != layout:
            return False
    return True


def build_dataset(
    name: str,
    root: str | Path,
    seed: int = 0,
    image_size: int = 64,
    overwrite: bool = False,
    workers: int = 0,
    progress: bool = True,
    layout: str = "mmret",
) -> Path:
    """Write the built-in dataset `name` as shards in ROOT/train, ROOT/val and ROOT/test.

    Args:
        name: one of BUILTIN_DATASETS.
        root: the dataset folder; must be missing or empty unless `overwrite`.
        seed: chooses the split (digits), the scenes and their jitter (shapes), or all three (digit_scenes).
        image_size: side of the square images, in pixels.
        overwrite: replace an existing dataset (the old one stays until the new one is complete). Without
            it, a complete ROOT built with the same name, seed and image size is returned as it is, and any
            other non-empty ROOT is an error.
        workers: JPEG-encoding processes (0: in this process, the fastest for these small images).
        progress: report each split's shard writing on stderr (`mmret.progress`).
        layout: `mmret` (shards 00000.tar, ...), or `clip_benchmark`: the same shards as SPLIT/0.tar, ... with
            the text files of CLIP_benchmark's `wds/` loader (`mmret.data.clip_benchmark_wds`).

    Returns:
        ROOT, as a Path.

    Raises:
        UsageError: unknown name, bad image size, or a ROOT that must not be written.
    """
    if name not in BUILTIN_DATASETS:
        raise UsageError(f"unknown built-in dataset {name!r}; expected one of: {', '.join(BUILTIN_DATASETS)}")
    if image_size <= 0:
        raise UsageError(f"--image-size must be a positive number of pixels, got {image_size}")
    if workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    if layout not in LAYOUTS:
        raise UsageError(f"unknown dataset format {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    root = Path(root).expanduser()
    if not overwrite and already_built(root, name, seed, image_size, layout):
        return root  # deterministic, so the existing copy is what we would write (e.g. another rank made it)
    check_output_dir(root, overwrite)
    splits = importlib.import_module(f"mmret.data.{name}").build_splits(seed=seed, image_size=image_size)
    try:
        with atomic_output_dir(root, overwrite) as work_dir:
            for split in SPLITS:
                count, samples, info = splits[split]
                write_shards(
                    samples,
                    work_dir / split,
                    image_size=image_size,
                    shard_size=SHARD_SIZE,
                    workers=workers,
                    total=count,
                    progress=progress,
                    info={"name": name, "seed": seed, **info},
                )
            if layout == "clip_benchmark":
                to_clip_benchmark_layout(work_dir, SPLITS)
    except FileExistsError:
        # Someone else (another rank) finished the same build first; theirs is as good as ours.
        if is_complete(root):
            return root
        raise
    return root
