"""Read tar shards into raw samples, decode them, count what had to be skipped, and collate batches.

A shard sample is `KEY.jpg` (or .jpeg/.png/.webp), `KEY.txt` (captions, one per line), optional `KEY.json`
(metadata; our writer puts `id` there) and optional `KEY.cls` (integer label). Broken input never raises: a
truncated tar ends its shard early, an undecodable image / missing caption / unreadable metadata drops the
sample, and each case is counted in a `SkipCounter` and logged (the first few at WARNING, the rest at DEBUG).

    counter = SkipCounter()
    for raw in iter_shard("/data/train/00000.tar", counter):
        sample = decode_sample(raw)          # raises SkippedSample(reason) for a broken sample
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from mmret.errors import UsageError

log = logging.getLogger("mmret.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Reasons a sample (or the rest of a shard) is skipped; the keys of `SkipCounter.totals`.
SKIP_REASONS = (
    "truncated_shard",  # the tar ended inside a member or could not be read: the rest of the shard is lost
    "missing_samples",  # a shard held fewer samples than dataset.json / *_stats.json promised
    "missing_image",
    "bad_image",
    "missing_caption",
    "bad_metadata",
)
# Batches carry the skips counted since the previous batch under this key; the loaders pop it.
SKIPPED_KEY = "_skipped"
_WARNINGS_PER_COUNTER = 10


class SkippedSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts skipped samples by reason in one worker; `take_unreported()` hands out what is new."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def add(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        """Count `count` skips for `reason` at `where` (shard/key) and log them."""
        self.totals[reason] += count
        level = logging.WARNING if sum(self.totals.values()) <= _WARNINGS_PER_COUNTER else logging.DEBUG
        log.log(
            level, "skipped %d sample(s) (%s) at %s%s", count, reason, where, f": {detail}" if detail else ""
        )

    def take_unreported(self) -> dict[str, int]:
        """Counts added since the previous call."""
        delta = self.totals - self._reported
        self._reported = Counter(self.totals)
        return dict(delta)


def stable_sample_id(shard_name: str, key: str) -> int:
    """A 63-bit id from (shard file name, key): the same on every machine and run, for dirs without our ids."""
    digest = hashlib.blake2b(f"{shard_name}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def sample_id_of(metadata: Mapping[str, Any], shard_name: str, key: str) -> int:
    """The identity of a sample, unique across shard sets.

    A shard set written by mmret numbers its samples (`id` in KEY.json) and names its id space (`id_space`: a
    hash of the set's name, seed and source, in every sample's metadata and in dataset.json); the identity is
    a 63-bit hash of the two, so the shards of two sets merged into one folder never share an id. An `id`
    without an id space (shards of older mmret versions, or other tools') is used as it is; without an `id`,
    the identity is a hash of the shard's file name and the key.
    """
    sample_id = metadata.get("id")
    if not isinstance(sample_id, int) or isinstance(sample_id, bool):
        return stable_sample_id(shard_name, key)
    space = metadata.get("id_space")
    if not isinstance(space, str) or not space:
        return sample_id
    digest = hashlib.blake2b(f"{space}#{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _split_name(name: str) -> tuple[str, str] | None:
    """'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg'): the key runs to the first dot of the base name."""
    directory, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, extension = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


_END_SEEN = "_mmret_end_of_archive"


class _EndAwareTarInfo(tarfile.TarInfo):
    """Marks the archive when its end-of-archive block (512 zero bytes) is read: tarfile ends iteration the
    same way at that block and at a file that simply stops, and only the first is a complete tar."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            setattr(tarfile_, _END_SEEN, True)
            raise


def iter_shard(path: str, counter: SkipCounter, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one tar shard: dicts of `__key__`, `__shard__` and extension -> bytes.

    Files of one sample are consecutive in the tar (webdataset convention). A read error ends the shard: the
    sample being read is dropped and counted as `truncated_shard`. So does a tar that stops without its
    end-of-archive block (zeros; every tar writer ends with it), e.g. one cut exactly between two members:
    tarfile reads that as a normal end, and the last sample's remaining files (its caption, its metadata)
    would otherwise be missing without a word.

    Args:
        path: The tar file.
        counter: Where skips are counted.
        expected: The number of samples the shard should hold; a shortfall is counted as `missing_samples`.
    """
    shard_name = os.path.basename(path)
    current: dict[str, Any] | None = None
    yielded = 0
    try:
        with tarfile.open(path, "r|*", tarinfo=_EndAwareTarInfo) as archive:
            for member in archive:
                if not member.isreg():
                    continue
                split = _split_name(member.name)
                if split is None or os.path.basename(member.name).startswith("__"):
                    continue
                key, extension = split
                data = archive.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yielded += 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard_name}
                current[extension] = data
            if not getattr(archive, _END_SEEN, False):
                raise tarfile.ReadError(f"no end-of-archive block after {archive.offset} bytes: cut short")
    except (tarfile.TarError, OSError, EOFError) as err:
        counter.add("truncated_shard", shard_name, str(err))
        current = None  # the sample being read when the error came may be incomplete
    if current is not None:
        yielded += 1
        yield current
    if expected is not None and yielded < expected:
        counter.add("missing_samples", shard_name, f"read {yielded} of {expected}", count=expected - yielded)


def count_shard_samples(path: str) -> int:
    """The samples of one tar shard that have an image, from its member headers alone (file data is skipped).

    Members are grouped into samples as `iter_shard` groups them (consecutive members of one key, the same
    members ignored), and damage costs what it costs there: a tar cut inside a member's data loses the sample
    being read and, when that member began a new sample, the one before it; a tar that stops between members
    without its end-of-archive block loses its last sample. So the count is what reading the shard yields.

    Raises:
        OSError: the file cannot be opened.
    """
    count, key, has_image, pending, last, plain = 0, None, False, 0, None, False
    try:
        # Random access (not the stream mode `iter_shard` reads in): tarfile seeks over each member's data, and
        # a member cut short raises when the next header is sought.
        with tarfile.open(path, "r:*", tarinfo=_EndAwareTarInfo) as archive:
            # Not decompressed: member offsets are file offsets (used when the tar is cut, below).
            plain = isinstance(archive.fileobj, io.BufferedReader)
            for last in archive:
                count, pending = count + pending, 0  # the member before this one is whole: its sample stands
                split = _split_name(last.name) if last.isreg() else None
                if split is None or os.path.basename(last.name).startswith("__"):
                    continue
                if split[0] != key:
                    pending = int(has_image)  # stands once this member, which ends it, proves whole
                    key, has_image = split[0], False
                has_image = has_image or split[1] in IMAGE_EXTENSIONS
            count += pending
            if getattr(archive, _END_SEEN, False):
                count += has_image
    except tarfile.TarError:
        # Cut after the last member's data but inside its padding: a stop between members for the stream reader.
        if last is not None and plain and last.offset_data + last.size <= os.path.getsize(path):
            count += pending
    return count


def decode_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a raw sample into `image` (RGB PIL), `captions`, `sample_id`, `label`, `metadata`, `key`.

    Raises:
        SkippedSample: the image, the captions or the metadata are missing or unreadable.
    """
    image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_bytes is None:
        raise SkippedSample("missing_image", f"extensions {sorted(k for k in raw if not k.startswith('__'))}")
    try:
        image = Image.open(io.BytesIO(image_bytes))
        image.load()  # decode now: PIL is lazy and a broken JPEG would otherwise fail inside the transform
        image = image.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError or DecompressionBombError
        raise SkippedSample("bad_image", str(err)) from None
    text = raw.get("txt")
    captions = [] if text is None else [line.strip() for line in text.decode("utf-8", "replace").splitlines()]
    captions = [caption for caption in captions if caption]
    if not captions:
        raise SkippedSample("missing_caption")
    metadata: dict = {}
    if "json" in raw:
        try:
            metadata = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SkippedSample("bad_metadata", f"json: {err}") from None
        if not isinstance(metadata, dict):
            raise SkippedSample("bad_metadata", "json is not an object")
    label = -1
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise SkippedSample("bad_metadata", f"cls {raw['cls'][:20]!r}") from None
    elif isinstance(metadata.get("label"), int):
        label = metadata["label"]
    sample_id = sample_id_of(metadata, raw["__shard__"], raw["__key__"])
    return {
        "image": image,
        "captions": captions,
        "sample_id": sample_id,
        "label": label,
        "metadata": metadata,
        "key": raw["__key__"],
    }


def collate_samples(
    samples: Sequence[Mapping[str, Any]],
    tokenizer: Callable[[list[str]], Any],
    with_eval_fields: bool,
) -> dict[str, Any]:
    """Stack decoded, transformed samples into the batch dict every model reads (README "Batches").

    Each sample holds `image` (a transformed tensor [3, H, W]), `caption`, `captions`, `sample_id`, `label`,
    `metadata`, `key`. Eval batches also carry `captions`, `metadata` and `key`.
    """
    shapes = {tuple(sample["image"].shape) for sample in samples}
    if len(shapes) > 1:
        raise UsageError(
            f"images in one batch have different sizes {sorted(shapes)}; set the data module's image_size "
            "(or an image transform that resizes) so every image has the same shape"
        )
    captions = [sample["caption"] for sample in samples]
    text = tokenizer(captions)
    if isinstance(text, Mapping):  # HF BatchEncoding -> a plain dict, so it pins and moves like one
        text = dict(text)
    batch: dict[str, Any] = {
        "image": torch.stack([sample["image"] for sample in samples]),  # [B, 3, H, W]
        "text": text,  # [B, L] or dict of [B, L]
        "sample_id": torch.tensor([sample["sample_id"] for sample in samples], dtype=torch.long),  # [B]
        "label": torch.tensor([sample["label"] for sample in samples], dtype=torch.long),  # [B]
        "caption": captions,
    }
    if with_eval_fields:
        batch["captions"] = [sample["captions"] for sample in samples]
        batch["metadata"] = [sample["metadata"] for sample in samples]
        batch["key"] = [sample["key"] for sample in samples]
    return batch
