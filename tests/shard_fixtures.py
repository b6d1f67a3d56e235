"""Tiny webdataset shard directories with real JPEGs, for the data tests.

Two layouts: ours (`write_shards`: KEY.jpg/.txt/.json/.cls plus `dataset.json`) and img2dataset's
(`write_img2dataset_shards`: KEY.jpg/.txt/.json plus `NNNNN_stats.json`, no dataset.json). Captions encode
the sample index (`"<name> image 7 caption 1"`) so tests can tell which sample a caption came from.

    from tests.shard_fixtures import write_shards
    directory = write_shards(tmp_path / "a", num_samples=20, samples_per_shard=8)
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

CLASS_NAMES = ["zero", "one", "two"]


def jpeg_bytes(index: int, size: int = 32) -> bytes:
    """A real JPEG whose colours depend on `index` (so decoded images differ between samples)."""
    rng = np.random.default_rng(index)
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    corner = size // 2
    pixels[:corner, :corner] = rng.integers(0, 256, size=3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def caption(name: str, index: int, line: int) -> str:
    return f"{name} image {index} caption {line}"


def write_shards(
    directory: str | os.PathLike,
    num_samples: int,
    samples_per_shard: int,
    *,
    name: str = "toy",
    image_size: int = 32,
    captions_per_image: int = 2,
    id_offset: int = 0,
    corrupt: dict[int, str] | None = None,
    with_info: bool = True,
) -> Path:
    """Write shards in our layout; returns the directory.

    Args:
        corrupt: sample index -> "bad_image" (garbage bytes as .jpg), "truncated_image" (half a JPEG) or
            "missing_caption" (no .txt). Broken samples still count in dataset.json's sizes, as a writer that
            did not notice would record them.
        with_info: Write dataset.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    shards, sizes = [], []
    for start in range(0, num_samples, samples_per_shard):
        shard_name = f"{len(shards):05d}.tar"
        indices = range(start, min(start + samples_per_shard, num_samples))
        with wds.TarWriter(str(directory / shard_name)) as writer:
            for index in indices:
                captions = [caption(name, index, line) for line in range(captions_per_image)]
                sample = {
                    "__key__": f"{index:06d}",
                    "jpg": jpeg_bytes(id_offset + index, image_size),
                    "txt": "\n".join(captions),
                    "json": json.dumps({"id": id_offset + index, "captions": captions, "label": index % 3}),
                    "cls": str(index % 3),
                }
                kind = corrupt.get(index)
                if kind == "bad_image":
                    sample["jpg"] = b"this is not a jpeg at all" * 4
                elif kind == "truncated_image":
                    sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
                elif kind == "missing_caption":
                    del sample["txt"]
                elif kind is not None:
                    raise ValueError(f"unknown corruption {kind!r}")
                writer.write(sample)
        shards.append(shard_name)
        sizes.append(len(indices))
    if with_info:
        info = {
            "name": name,
            "num_samples": num_samples,
            "num_captions": num_samples * captions_per_image,
            "image_size": image_size,
            "resize_mode": "center_crop",
            "class_names": CLASS_NAMES,
            "templates": ["a photo of {c}."],
            "shards": shards,
            "shard_sizes": sizes,
            "skipped": {},
        }
        (directory / "dataset.json").write_text(json.dumps(info))
    return directory


def write_img2dataset_shards(
    directory: str | os.PathLike, num_samples: int, samples_per_shard: int, image_size: int = 32
) -> Path:
    """Write shards the way img2dataset does (keys SSSSSIIII, *_stats.json, no dataset.json, no ids)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        indices = range(start, min(start + samples_per_shard, num_samples))
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as writer:
            for position, index in enumerate(indices):
                key = f"{shard:05d}{position:04d}"
                text = caption("web", index, 0)
                metadata = {
                    "url": f"http://example.com/{index}.jpg",
                    "key": key,
                    "status": "success",
                    "caption": text,
                    "width": image_size,
                    "height": image_size,
                    "error_message": None,
                }
                writer.write(
                    {
                        "__key__": key,
                        "jpg": jpeg_bytes(10_000 + index, image_size),
                        "txt": text,
                        "json": json.dumps(metadata),
                    }
                )
        stats = {
            "count": len(indices),
            "successes": len(indices),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": len(indices)},
        }
        (directory / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return directory


def truncate(path: str | os.PathLike, keep_fraction: float) -> None:
    """Cut a file to a fraction of its size (a shard whose copy was interrupted)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])


def cut_inside_member(path: str | os.PathLike, member_name: str) -> None:
    """Cut a tar in the middle of one member's data (a copy that stopped mid-file): reading it must fail."""
    with tarfile.open(path) as archive:
        offset = archive.getmember(member_name).offset_data
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: offset + 10])


def caption_index(text: str) -> int:
    """The sample index encoded in a fixture caption."""
    return int(text.split(" image ")[1].split(" ")[0])
