"""A contact sheet of search results: one PNG, the query on top, the results in rank order with their scores.

write_contact_sheet("results.png", "a red circle left of a blue square", results, images)
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mmret.io import atomic_file

CELL = 160  # pixels per result image
COLUMNS = 5


def write_contact_sheet(path: str | os.PathLike, query: str, results: Sequence, images: Sequence) -> Path:
    """Write the results (`SearchResult`s) with their images (PIL, same order) as a PNG grid at `path`."""
    font = ImageFont.load_default()
    columns = max(1, min(COLUMNS, len(results)))
    rows = max(1, math.ceil(len(results) / columns))
    label_height, header = 46, 40
    sheet = Image.new("RGB", (columns * (CELL + 8) + 8, header + rows * (CELL + label_height + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (8, 8),
        textwrap.shorten(f"query: {query}", width=columns * 26, placeholder=" …"),
        fill="black",
        font=font,
    )
    reranked = any(getattr(result, "reranker_score", None) is not None for result in results)
    legend = "rank · reranker score (cosine) · first-stage rank" if reranked else "rank · cosine score"
    draw.text((8, 22), legend, fill=(90, 90, 90), font=font)
    for position, (result, image) in enumerate(zip(results, images)):
        left = 8 + (position % columns) * (CELL + 8)
        top = header + (position // columns) * (CELL + label_height + 8)
        sheet.paste(image.convert("RGB").resize((CELL, CELL)), (left, top))
        if reranked:
            line = f"#{result.rank} {result.reranker_score:.2f} ({result.score:.2f}) was #{result.first_stage_rank}"
        else:
            line = f"#{result.rank}  {result.score:.3f}"
        draw.text((left, top + CELL + 3), line, fill="black", font=font)
        draw.text((left, top + CELL + 17), textwrap.shorten(result.key, width=26, placeholder="…"),
                  fill=(90, 90, 90), font=font)  # fmt: skip
        caption = textwrap.shorten(result.caption or "", width=26, placeholder="…")
        draw.text((left, top + CELL + 30), caption, fill=(90, 90, 90), font=font)
    path = Path(path)
    with atomic_file(path, binary=True) as handle:
        sheet.save(handle, format="PNG")
    return path
