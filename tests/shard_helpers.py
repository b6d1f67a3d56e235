"""Read shards back in tests: every sample of a shard folder, decoded, in key order.

from tests.shard_helpers import read_shards
samples = read_shards(tmp_path / "out")   # [{"key", "image", "captions", "json", "cls", "jpg"}, ...]
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def read_shards(directory: Path) -> list[dict]:
    """All samples of the shards listed in DIR/dataset.json, with the image opened (PIL) and captions split."""
    info = json.loads((Path(directory) / "dataset.json").read_text())
    members: dict[str, dict[str, bytes]] = {}
    for shard in info["shards"]:
        with tarfile.open(Path(directory) / shard) as archive:
            for member in archive:
                key, extension = member.name.split(".", 1)
                members.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return [
        {
            "key": key,
            "jpg": m["jpg"],
            "image": Image.open(io.BytesIO(m["jpg"])),  # lazy: decoded on first pixel access
            "captions": m["txt"].decode().split("\n"),
            "json": json.loads(m["json"]),
            "cls": m.get("cls"),
        }
        for key, m in members.items()
    ]


def tar_bytes(directory: Path) -> dict[str, bytes]:
    """{shard name: bytes} of every tar in DIR."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.tar"))}
