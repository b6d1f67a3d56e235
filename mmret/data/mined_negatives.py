"""The mined-negatives file (`mmret mine` writes it, the data module reads it) and its use in training.

    write_mined_negatives(path, header, records)      # JSON Lines: a header line, then one record per query
    header, records = read_mined_negatives(path)

    RetrievalDataModule(dataset="shapes", mined_negatives="mined/shapes_train.jsonl", mined_per_sample=4)
    # every training batch then also carries, per sample, up to 4 mined negative images and 4 captions:
    #   batch["mined_image"]       [B, k, 3, H, W]   images the dual encoder confused with the sample's caption
    #   batch["mined_image_valid"] [B, k] bool       False where fewer than k were mined (zero image)
    #   batch["mined_image_id"]    [B, k]            their sample ids (-1 where not valid)
    #   batch["mined_text"]        [B * k, L]        captions it confused with the sample's image, tokenised
    #   batch["mined_text_valid"]  [B, k] bool
    #   batch["mined_caption"]     list of B lists of k strings ("" where not valid)

Format: line 1 is a header `{"format": "mmret-mined-negatives", "version": 1, "model", "data", "options",
"counts"}`; then one record per query:
    {"direction": "text_to_image", "query": CAPTION, "positive_ids": [IMAGE_ID...], "positive_score": s,
     "negative_ids": [IMAGE_ID...], "negative_scores": [...]}
    {"direction": "image_to_text", "query_id": IMAGE_ID, "positive_captions": [...], "positive_score": s,
     "negative_captions": [...], "negative_scores": [...]}

The mined file is keyed by what the training stream hands out: text -> image records by the exact caption
string, image -> text records by the image's sample id, so it must be mined on the same training shards
(`mmret mine --split train`, the default). Each time a sample is drawn, k of its mined negatives are chosen
at random (seeded by the stream), so over the epochs the reranker sees all of them.

Negative images are read by random access: the first time a worker needs one, it indexes the training tars
(one pass over their headers and JSON members, no image decoding) into id -> (tar, byte offset, size); each
negative is then one seek and one read. The index holds three integers per sample.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmret.data.samples import IMAGE_EXTENSIONS, _split_name, sample_id_of
from mmret.errors import UsageError
from mmret.io import write_text_atomic

FORMAT = "mmret-mined-negatives"
VERSION = 1


def write_mined_negatives(path: str | os.PathLike, header: dict, records: Sequence[dict]) -> Path:
    """Write a mined-negatives file all-or-nothing; `header` gets the format name and version."""
    header = {"format": FORMAT, "version": VERSION, **header}
    return write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in [header, *records]))


def read_mined_negatives(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The header and the records of a file written by `mmret mine`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"mined negatives file {path} does not exist; write it with `mmret mine`")
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FORMAT:
        raise UsageError(f"{path} is not a `mmret mine` output (no {FORMAT!r} header on its first line)")
    return header, [json.loads(line) for line in lines[1:]]


class MinedNegativeStore:
    """The mined negatives of a training set and random access to its images.

    Args:
        path: JSON Lines file written by `mmret mine`.
        shards: The training tar shards the file was mined on.
        per_sample: k, mined negatives attached per sample and direction.
    """

    def __init__(self, path: str | os.PathLike, shards: Sequence[str], per_sample: int):
        if per_sample < 1:
            raise UsageError(f"data module: mined_per_sample is {per_sample}; expected an integer >= 1")
        header, records = read_mined_negatives(path)
        self.path = str(path)
        self.per_sample = per_sample
        self.shards = list(shards)
        self.images_for_caption: dict[str, list[int]] = {}
        self.captions_for_image: dict[int, list[str]] = {}
        for record in records:
            if record.get("direction") == "text_to_image" and record.get("negative_ids"):
                self.images_for_caption[record["query"]] = [int(i) for i in record["negative_ids"]]
            elif record.get("direction") == "image_to_text" and record.get("negative_captions"):
                self.captions_for_image[int(record["query_id"])] = list(record["negative_captions"])
        if not self.images_for_caption and not self.captions_for_image:
            raise UsageError(
                f"mined negatives file {path} holds no negatives; mine with --num-negatives >= 1"
            )
        self._index: dict[int, tuple[int, int, int]] | None = None  # id -> (shard, offset, size)

    # ---- random access to images ----------------------------------------------------------------------
    def _build_index(self) -> dict[int, tuple[int, int, int]]:
        index: dict[int, tuple[int, int, int]] = {}
        for shard_number, shard in enumerate(self.shards):
            shard_name = os.path.basename(shard)
            pending: dict[str, dict[str, Any]] = {}
            with tarfile.open(shard, "r:") as archive:  # uncompressed tars: offsets are file offsets
                for member in archive:
                    split = member.isreg() and _split_name(member.name)
                    if not split:
                        continue
                    key, extension = split
                    entry = pending.setdefault(key, {})
                    if extension in IMAGE_EXTENSIONS and "image" not in entry:
                        entry["image"] = (member.offset_data, member.size)
                    elif extension == "json":
                        try:
                            entry["metadata"] = json.loads(archive.extractfile(member).read())
                        except (json.JSONDecodeError, UnicodeDecodeError):
                            entry["metadata"] = None
            for key, entry in pending.items():
                if "image" not in entry:
                    continue
                metadata = entry.get("metadata")
                sample_id = sample_id_of(metadata if isinstance(metadata, dict) else {}, shard_name, key)
                index[sample_id] = (shard_number, *entry["image"])
        return index

    def read_image(self, sample_id: int) -> Image.Image | None:
        """The RGB image of a training sample by id, or None when the training shards do not hold it."""
        if self._index is None:
            self._index = self._build_index()
        location = self._index.get(sample_id)
        if location is None:
            return None
        shard_number, offset, size = location
        with open(self.shards[shard_number], "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            return image.convert("RGB")
        except Exception:  # a broken image is simply not used as a negative
            return None

    # ---- per-sample attachment -------------------------------------------------------------------------
    def attach(
        self, sample: dict, rng: np.random.Generator, image_transform: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        """Add `mined_images` (list of tensors), `mined_image_ids` and `mined_captions` to a prepared sample."""
        k = self.per_sample
        image_ids = self.images_for_caption.get(sample["caption"], [])
        chosen = _choose(image_ids, k, rng)
        images, ids = [], []
        for sample_id in chosen:
            image = self.read_image(sample_id)
            if image is not None:
                images.append(image_transform(image))
                ids.append(sample_id)
        sample["mined_images"], sample["mined_image_ids"] = images, ids
        sample["mined_captions"] = _choose(self.captions_for_image.get(sample["sample_id"], []), k, rng)


def _choose(items: Sequence, k: int, rng: np.random.Generator) -> list:
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False).tolist())]


def collate_mined(samples: Sequence[dict], tokenizer: Callable[[list[str]], Any], k: int) -> dict[str, Any]:
    """The `mined_*` batch fields (see the module docstring) of samples that went through `attach`."""
    reference = samples[0]["image"]
    images = torch.zeros(len(samples), k, *reference.shape, dtype=reference.dtype)  # [B, k, 3, H, W]
    image_valid = torch.zeros(len(samples), k, dtype=torch.bool)
    image_ids = torch.full((len(samples), k), -1, dtype=torch.long)
    text_valid = torch.zeros(len(samples), k, dtype=torch.bool)
    captions: list[list[str]] = []
    for row, sample in enumerate(samples):
        count = len(sample["mined_images"])
        if count:
            images[row, :count] = torch.stack(sample["mined_images"])
            image_valid[row, :count] = True
            image_ids[row, :count] = torch.tensor(sample["mined_image_ids"], dtype=torch.long)
        mined = sample["mined_captions"]
        text_valid[row, : len(mined)] = True
        captions.append(list(mined) + [""] * (k - len(mined)))
    text = tokenizer([caption for row in captions for caption in row])
    if not isinstance(text, torch.Tensor):
        text = dict(text)
    return {
        "mined_image": images,
        "mined_image_valid": image_valid,
        "mined_image_id": image_ids,
        "mined_text": text,
        "mined_text_valid": text_valid,
        "mined_caption": captions,
    }
