"""A built dataset root laid out so that CLIP_benchmark's `wds/` loader reads it as it is (and mmret still does).

    mmret datasets digits --output data/digits_cb --format clip_benchmark
    clip_benchmark eval --dataset wds/digits --dataset_root data/digits_cb --model local-dir:EXPORT ...
    mmret eval --model CKPT --data data/digits_cb --output digits.json      # the same tar files

    from mmret.data.clip_benchmark_wds import to_clip_benchmark_layout
    to_clip_benchmark_layout(root)          # ROOT/{train,val,test} written by mmret.data.shard_writer

The layout (CLIP_benchmark's `datasets/builder.py`, `build_wds_dataset`):

    ROOT/dataset_type.txt                          "classification" (the set has class names) or "retrieval"
    ROOT/classnames.txt                            classification: one class name per line, in label order
    ROOT/zeroshot_classification_templates.txt     classification: one prompt per line, `{c}` for the class
    ROOT/SPLIT/nshards.txt                         the number of shards n of the split
    ROOT/SPLIT/0.tar ... ROOT/SPLIT/{n-1}.tar      the split's shards, renamed from 00000.tar ...
    ROOT/SPLIT/dataset.json                        mmret's, listing 0.tar ... and `"format": "clip_benchmark"`

A sample keeps mmret's members: `KEY.jpg` (CLIP_benchmark reads `.webp/.png/.jpg/.jpeg`), `KEY.txt` (the
captions, one per line: a retrieval sample's texts), `KEY.cls` (the label of a classification sample) and
`KEY.json` (ignored by CLIP_benchmark). Shards are only renamed, so both tools read the same bytes in the
same order (shard 0 first, samples in tar order): the data order that CLIP_benchmark's retrieval protocol
indexes texts and images by. A root holds one CLIP_benchmark task: a set with class names (digits) is a
zero-shot classification set, one without (shapes, digit_scenes) a retrieval set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mmret.io import write_json_atomic, write_text_atomic

FORMAT = "clip_benchmark"
# A labelled set without its own templates is prompted as `mmret eval` prompts it (evaluation's default).
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def to_clip_benchmark_layout(root: Path, splits: Sequence[str]) -> None:
    """Rename each split's shards to 0.tar, 1.tar, ... and write the text files CLIP_benchmark reads.

    Args:
        root: a dataset root whose `splits` were written by `mmret.data.shard_writer.write_shards`.
        splits: the split folders under `root`.
    """
    info: dict = {}
    for split in splits:
        info = _rename_shards(root / split)
    class_names = info.get("class_names")
    if not class_names:
        write_text_atomic(root / "dataset_type.txt", "retrieval\n")
        return
    write_text_atomic(root / "dataset_type.txt", "classification\n")
    write_text_atomic(root / "classnames.txt", "".join(f"{name}\n" for name in class_names))
    templates = [clip_benchmark_template(t) for t in info.get("templates") or DEFAULT_TEMPLATES]
    write_text_atomic(root / "zeroshot_classification_templates.txt", "".join(f"{t}\n" for t in templates))


def clip_benchmark_template(template: str) -> str:
    """An mmret prompt template (`str.format` with one `{}`) as CLIP_benchmark writes it (`{c}`)."""
    converted = template.replace("{}", "{c}")
    try:
        same = converted.format(c="CLASS") == template.format("CLASS")
    except (IndexError, KeyError, ValueError):
        same = False
    if not same or "\n" in template:
        raise ValueError(f"template {template!r} is not one line with a single `{{}}` for the class name")
    return converted


def _rename_shards(split_dir: Path) -> dict:
    """`00000.tar, 00001.tar, ...` -> `0.tar, 1.tar, ...` (dataset.json follows), plus nshards.txt."""
    info = json.loads((split_dir / "dataset.json").read_text())
    names = [f"{index}.tar" for index in range(len(info["shards"]))]
    for old, new in zip(info["shards"], names):
        (split_dir / old).rename(split_dir / new)
    info.update(shards=names, format=FORMAT)
    write_json_atomic(split_dir / "dataset.json", info)
    write_text_atomic(split_dir / "nshards.txt", f"{len(names)}\n")
    return info
