"""Raw pairs -> `mmret shards` -> RetrievalDataModule batches, for each source kind (folder, CSV, JSONL): the
images arrive resized, every caption of an image arrives with it, labels and ids survive.

    .venv/bin/pytest tests/test_pipeline_round_trip.py -q
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmret.cli import main
from mmret.data.datamodule import RetrievalDataModule

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def write_images(folder) -> dict[str, str]:
    """Four solid-colour images of different sizes; returns file name -> colour."""
    folder.mkdir(parents=True)
    names = {}
    for index, (colour, rgb) in enumerate(COLOURS.items()):
        name = f"img{index}.png"
        Image.new("RGB", (40 + 10 * index, 30 + 5 * index), rgb).save(folder / name)
        names[name] = colour
    return names


def captions_of(colour: str) -> list[str]:
    return [f"a {colour} square", f"something {colour}"]


def make_source(tmp_path, kind: str):
    folder = tmp_path / "raw"
    names = write_images(folder)
    if kind == "folder":
        for name, colour in names.items():
            (folder / name).with_suffix(".txt").write_text("\n".join(captions_of(colour)))
        return folder, []
    rows = [
        {"file": name, "text": caption, "y": index}
        for index, (name, colour) in enumerate(names.items())
        for caption in captions_of(colour)
    ]
    columns = ["--image-column", "file", "--caption-column", "text", "--label-column", "y"]
    if kind == "csv":
        path = folder / "pairs.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "text", "y"])
            writer.writeheader()
            writer.writerows(rows)
        return path, columns
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, columns


def to_pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # [3, H, W]


@pytest.mark.parametrize("kind", ["folder", "csv", "jsonl"])
def test_raw_pairs_to_shards_to_batches(tmp_path, kind):
    source, columns = make_source(tmp_path, kind)
    shards = tmp_path / "shards"
    assert (
        main(
            ["shards", str(source), "--output", str(shards), "--image-size", "16", "--workers", "0", *columns]
        )
        == 0
    )
    data = RetrievalDataModule(train=str(shards), val=str(shards), batch_size=4, num_workers=0)
    data.set_preprocess(to_pixels, lambda texts: torch.tensor([[len(t)] for t in texts]))
    data.setup("fit")
    (batch,) = list(data.val_dataloader())
    assert batch["image"].shape == (4, 3, 16, 16)
    assert len(set(batch["sample_id"].tolist())) == 4
    for image, captions in zip(batch["image"], batch["captions"]):
        colour = captions[0].split()[1]
        assert sorted(captions) == sorted(captions_of(colour))
        mean_rgb = image.mean(dim=(1, 2)) * 255
        assert torch.allclose(mean_rgb, torch.tensor(COLOURS[colour], dtype=torch.float32), atol=12), colour
    if kind != "folder":
        assert sorted(batch["label"].tolist()) == [0, 1, 2, 3]
    (train_batch,) = list(data.train_dataloader())
    assert train_batch["text"].shape == (4, 1)
    assert all(c in captions_of(c.split()[1]) for c in train_batch["caption"])
