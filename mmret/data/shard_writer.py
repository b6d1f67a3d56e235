"""Convert image–caption pairs into pre-resized webdataset shards (`mmret shards`).

    mmret shards photos/ --output data/mine/train --image-size 224
    mmret shards pairs.csv --output shards/ --image-size 224 --image-column file --caption-column text
    mmret shards laion_subset/ --output shards/ --image-size 256 --resize-mode pad --workers 8

SRC is a folder of images with `.txt` caption sidecars, a `.csv`/`.tsv`/`.jsonl` table, or an img2dataset
output folder (see `mmret.data.raw_sources`). The output is img2dataset-compatible:

    DIR/00000.tar, 00001.tar, ...   each sample: KEY.jpg (N×N RGB JPEG), KEY.txt (captions, one per line),
                                    KEY.json ({"id", "captions", ...}), KEY.cls (label, when there is one)
    DIR/dataset.json                counts, image size, shard list and sizes, skipped counts, class names
    DIR/skipped.txt                 one line per skipped sample: `<source>\\t<reason>`

Keys are a zero-padded running index. Decoding and resizing run in a process pool (ordered), tars are
written by the main process with fixed tar headers, so the same source always gives byte-identical shards,
whatever the number of workers. Each tar is written under a temporary name and renamed when complete,
`dataset.json` last; a failure leaves nothing behind (see `mmret.io`).

Workers start with multiprocessing's "forkserver" method, so a script that calls `convert_source` or
`write_shards` with workers > 1 must do so under `if __name__ == "__main__":` (as with any spawned pool).

Python API (used by the CLI and by the built-in datasets):

    convert_source("pairs.csv", "shards/", image_size=224)                  # -> dataset.json contents
    write_shards(samples, "shards/", image_size=64, info={"name": "x"})     # samples: Iterable[SourceSample]
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import tarfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmret import __version__
from mmret.data.image_resize import (
    RESIZE_MODES,
    ImageDecodeError,
    decode_image,
    encode_jpeg,
    resize_image,
    to_rgb,
)
from mmret.data.raw_sources import (
    MISSING_IMAGE,
    UNDECODABLE_IMAGE,
    UNREADABLE_IMAGE,
    SourceSample,
    open_source,
)
from mmret.errors import UsageError
from mmret.io import atomic_file, atomic_output_dir, check_output_dir, write_text_atomic
from mmret.progress import Progress

KEY_WIDTH = 9  # as img2dataset: keys sort correctly as strings up to a billion samples
CHUNK_SIZE = 16  # samples per pool task: amortises pickling without delaying the ordered stream much
MAX_ID = 2**62


def default_workers() -> int:
    """Worker processes used when none are asked for: the visible cores, at most 8."""
    return max(
        1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def validate_options(
    image_size: int, shard_size: int, resize_mode: str, jpeg_quality: int, workers: int
) -> None:
    """Raise UsageError for option values that cannot work (called before anything is written)."""
    if image_size <= 0:
        raise UsageError(f"--image-size must be a positive number of pixels, got {image_size}")
    if shard_size <= 0:
        raise UsageError(f"--shard-size must be a positive number of samples per tar, got {shard_size}")
    if resize_mode not in RESIZE_MODES:
        raise UsageError(f"--resize-mode {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise UsageError(f"--jpeg-quality must be between 1 and 100, got {jpeg_quality}")
    if workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")


def prepare_sample(
    sample: SourceSample, image_size: int, resize_mode: str, jpeg_quality: int
) -> tuple[SourceSample, bytes | None, str | None]:
    """Decode, resize and JPEG-encode one sample (runs in a worker process).

    Returns:
        (the sample without its source image, the JPEG bytes or None, the skip reason or None).
    """
    if sample.skip_reason is not None:
        return sample, None, sample.skip_reason
    image = sample.image
    sample = dataclasses.replace(sample, image=None)  # the source bytes need not travel back
    try:
        if isinstance(image, Image.Image):
            decoded = to_rgb(image)
        elif isinstance(image, np.ndarray):
            decoded = to_rgb(Image.fromarray(image))
        elif image is None:
            return sample, None, MISSING_IMAGE
        else:
            decoded = decode_image(image, draft_size=image_size)
    except FileNotFoundError:
        return sample, None, MISSING_IMAGE
    except ImageDecodeError:
        return sample, None, UNDECODABLE_IMAGE
    except OSError:  # permission denied, a folder named like an image, I/O errors
        return sample, None, UNREADABLE_IMAGE
    return sample, encode_jpeg(resize_image(decoded, image_size, resize_mode), jpeg_quality), None


def _prepared(samples: Iterable[SourceSample], workers: int, **options: Any) -> Iterator[tuple]:
    """`prepare_sample` over all samples, in input order, in a pool when workers > 1."""
    work = partial(prepare_sample, **options)
    if workers <= 1:
        yield from map(work, samples)
        return
    # The pool's feeder thread would otherwise read the whole source into memory ahead of the writer.
    window = threading.BoundedSemaphore(workers * CHUNK_SIZE * 4)
    stop = threading.Event()

    def throttled() -> Iterator[SourceSample]:
        for sample in samples:
            while not window.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield sample

    # forkserver: forking a process that already runs threads (torch, tqdm) can deadlock.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers)
    try:
        for result in pool.imap(work, throttled(), chunksize=CHUNK_SIZE):
            window.release()
            yield result
    finally:
        stop.set()
        pool.terminate()
        pool.join()


class _TarSink:
    """Writes samples into fixed-size tars with deterministic headers, each appearing whole when it is full
    (`mmret.io.atomic_file`: a temporary sibling, fsynced and renamed)."""

    def __init__(self, directory: Path, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        self.shards: list[str] = []
        self.shard_sizes: list[int] = []
        self.num_samples = self.num_captions = 0
        self._tar: tarfile.TarFile | None = None
        self._file: contextlib.ExitStack | None = None

    def add(self, key: str, members: list[tuple[str, bytes]], num_captions: int) -> None:
        if self._tar is None:
            name = f"{len(self.shards):05d}.tar"
            # Open across add() calls until the shard is full; closed by finish_shard() or abort().
            self._file = contextlib.ExitStack()
            handle = self._file.enter_context(atomic_file(self.directory / name, binary=True))
            self._tar = tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            self.shards.append(name)
            self.shard_sizes.append(0)
        for extension, data in members:
            # Fixed owner, mode and mtime: the tar bytes depend on the content only.
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.shard_sizes[-1] += 1
        self.num_samples += 1
        self.num_captions += num_captions
        if self.shard_sizes[-1] == self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()  # writes the end-of-archive blocks into the temporary file
            self._file.close()  # fsync, rename into place
            self._tar = self._file = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temporary
            self._tar = self._file = None


def default_id_space(info: dict, output_dir: Path) -> str:
    """The name of a shard set's id space (see `mmret.data.samples.sample_id_of`): a hash of what identifies
    the set — the source it was converted from, or for a generated set its name, seed and folder name (a
    built-in set's split) — so a rebuild of the same set gets the same ids and two different sets (or two
    splits) get different ones."""
    import hashlib

    if info.get("source"):
        identity = {"source": info["source"]}
    else:
        identity = {"name": info.get("name"), "seed": info.get("seed"), "folder": Path(output_dir).name}
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=8).hexdigest()


def write_shards(
    samples: Iterable[SourceSample],
    output_dir: str | Path,
    *,
    image_size: int,
    shard_size: int = 1000,
    resize_mode: str = "center_crop",
    jpeg_quality: int = 95,
    workers: int = 0,
    overwrite: bool = False,
    total: int | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write samples as pre-resized shards plus `dataset.json` and `skipped.txt`, all or nothing.

    Args:
        samples: the images with their captions; samples with a `skip_reason` (or whose image fails to
            load) are counted in "skipped" and listed in skipped.txt.
        output_dir: the shard folder; must be missing or empty unless `overwrite`.
        image_size: side of the square output images, in pixels.
        shard_size: samples per tar.
        resize_mode: "center_crop" or "pad" (see `mmret.data.image_resize`).
        jpeg_quality: JPEG quality, 1-100.
        workers: decode/resize processes; 0 or 1 work in this process.
        overwrite: replace a non-empty output (swapped in only once the new one is complete).
        total: number of samples, for the progress report, when known.
        info: extra dataset.json fields ("name", "source", "seed", "class_names", anything else).
        progress: report progress on stderr (`mmret.progress`: a bar on a terminal, a plain line every few
            seconds elsewhere, nothing under `quiet_progress`).

    Returns:
        The contents written to dataset.json.

    Raises:
        UsageError: bad options, an output that must not be written, or no usable sample at all.
    """
    validate_options(image_size, shard_size, resize_mode, jpeg_quality, workers)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    info = dict(info or {})
    id_space = info.pop("id_space", None) or default_id_space(info, output_dir)
    with atomic_output_dir(output_dir, overwrite) as work_dir:
        sink = _TarSink(work_dir, shard_size)
        skipped: Counter[str] = Counter()
        used_ids: set[int] = set()
        folder = output_dir.resolve().name
        name = info.get("name") or folder
        label = name if name == folder else f"{name}/{folder}"  # e.g. a built-in dataset's split
        bar = Progress(f"writing {label}", total=total, unit="samples", enabled=progress)
        try:
            with atomic_file(work_dir / "skipped.txt") as skipped_log:
                # closing(): an error in this loop stops the worker pool at once (a suspended generator
                # would keep the pool's feeder thread alive, and the process would hang at exit).
                results = contextlib.closing(
                    _prepared(
                        samples,
                        workers,
                        image_size=image_size,
                        resize_mode=resize_mode,
                        jpeg_quality=jpeg_quality,
                    )
                )
                with results as prepared:
                    for sample, jpeg, reason in prepared:
                        bar.update(1)
                        if reason is not None:
                            skipped[reason] += 1
                            where = " ".join(sample.source.split())  # one line per sample, tab-separated
                            skipped_log.write(f"{where}\t{reason}\n")
                            continue
                        index = sink.num_samples
                        sample_id = sample.metadata.get("id")
                        if not isinstance(sample_id, int) or isinstance(sample_id, bool):
                            sample_id = index
                        if not 0 <= sample_id < MAX_ID or sample_id in used_ids:
                            raise ValueError(
                                f"sample id {sample_id} from {sample.source} is out of range or repeated"
                            )
                        used_ids.add(sample_id)
                        metadata = {
                            **sample.metadata,
                            "id": sample_id,
                            "id_space": id_space,
                            "captions": sample.captions,
                        }
                        if sample.label is not None:
                            metadata["label"] = sample.label
                        members = [
                            ("jpg", jpeg),
                            ("txt", "\n".join(sample.captions).encode("utf-8")),
                            (
                                "json",
                                json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"),
                            ),
                        ]
                        if sample.label is not None:
                            members.append(("cls", str(sample.label).encode("ascii")))
                        sink.add(f"{index:0{KEY_WIDTH}d}", members, len(sample.captions))
            sink.finish_shard()
        except BaseException:
            sink.abort()
            bar.close(completed=False)
            raise
        bar.close(completed=sink.num_samples > 0)
        if sink.num_samples == 0:
            reasons = (
                ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())) or "it is empty"
            )
            raise UsageError(
                f"no usable sample in {info.get('source') or 'the source'} ({reasons}); nothing written"
            )
        dataset_info = {
            "name": info.pop("name", output_dir.name),
            "num_samples": sink.num_samples,
            "num_captions": sink.num_captions,
            "image_size": image_size,
            "resize_mode": resize_mode,
            "jpeg_quality": jpeg_quality,
            "class_names": info.pop("class_names", None),
            "shards": sink.shards,
            "shard_sizes": sink.shard_sizes,
            "skipped": dict(sorted(skipped.items())),
            "source": info.pop("source", None),
            "seed": info.pop("seed", None),
            "id_space": id_space,
            "created_by": f"mmret {__version__}",
            **info,
        }
        # Written last: its presence marks a complete shard folder.
        write_text_atomic(
            work_dir / "dataset.json", json.dumps(dataset_info, indent=2, ensure_ascii=False) + "\n"
        )
    return dataset_info


def convert_source(
    src: str | Path,
    output: str | Path,
    *,
    image_size: int,
    shard_size: int = 1000,
    resize_mode: str = "center_crop",
    jpeg_quality: int = 95,
    workers: int | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a folder, table or img2dataset output into shards (what `mmret shards` runs).

    Args:
        src: the source (see `mmret.data.raw_sources.open_source`).
        output: the shard folder to create.
        image_size: side of the square output images, in pixels.
        shard_size: samples per tar.
        resize_mode: "center_crop" or "pad".
        jpeg_quality: JPEG quality, 1-100.
        workers: decode/resize processes (default: visible cores, at most 8).
        image_column: table column holding image paths (default "image").
        caption_column: table column holding captions (default "caption").
        label_column: optional table column with integer class labels.
        name: dataset name for dataset.json (default: the output folder's name).
        overwrite: replace an existing non-empty output.
        progress: report progress on stderr (see `write_shards`).

    Returns:
        The contents of the written dataset.json.

    Raises:
        UsageError: any bad input; nothing is written then.
    """
    workers = default_workers() if workers is None else workers
    validate_options(image_size, shard_size, resize_mode, jpeg_quality, workers)
    output, src_path = Path(output).expanduser(), Path(src).expanduser()
    if src_path.exists() and (
        output.resolve() == src_path.resolve() or output.resolve() in src_path.resolve().parents
    ):
        raise UsageError(
            f"output {str(output)!r} contains the source {str(src)!r}; choose an --output outside it"
        )
    check_output_dir(output, overwrite)
    source = open_source(src, image_column, caption_column, label_column)
    info = {
        "name": name or output.resolve().name,
        "source": str(src_path.resolve()),
        "source_kind": source.kind,
        "class_names": source.class_names,
    }
    return write_shards(
        source.samples(),
        output,
        image_size=image_size,
        shard_size=shard_size,
        resize_mode=resize_mode,
        jpeg_quality=jpeg_quality,
        workers=workers,
        overwrite=overwrite,
        total=source.num_samples,
        info=info,
        progress=progress,
    )
