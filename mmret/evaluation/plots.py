"""Pictures of an evaluation (matplotlib, Agg backend: no display needed): what `mmret eval` writes beside
its results JSON.

    plot_retrieval_examples("results_examples.png", examples)          # text queries and their top-k images
    plot_recall_curves("results_recall.png", recall_curves(eval_set))   # Recall@K for K = 1..50, both directions

`RetrievalExample` holds one text query, its top-ranked images (PIL), their scores and whether each is relevant;
relevant images get a green frame, the others a thin grey one, and the query text is the row's title.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, also on machines without a display

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from mmret.io import atomic_file  # noqa: E402

RELEVANT_COLOR = "#1a9641"
IRRELEVANT_COLOR = "#bbbbbb"
DIRECTION_LABELS = {
    "image_retrieval": "image retrieval (text query → images)",
    "text_retrieval": "text retrieval (image query → texts)",
}


@dataclass
class RetrievalExample:
    """One text query and what the model ranked first for it.

    Attributes:
        query: the caption used as the query.
        images: the top-ranked images, best first.
        scores: their cosine similarities to the query.
        relevant: whether each image is one the caption was written for.
        num_relevant: how many images in the whole set are relevant to the query.
        note: a tag shown after the query (e.g. "unseen" for a held-out composition).
    """

    query: str
    images: Sequence[Image.Image]
    scores: Sequence[float]
    relevant: Sequence[bool]
    num_relevant: int
    note: str = ""


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Write the figure to a temporary sibling and rename it, so a reader never sees half a PNG."""
    path = Path(path)
    try:
        with atomic_file(path, binary=True) as handle:
            fig.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_retrieval_examples(
    path: str | os.PathLike, examples: Sequence[RetrievalExample], title: str | None = None
) -> Path:
    """One row per text query: its top-k images left to right, relevant ones framed in green.

    Args:
        path: the PNG to write.
        examples: the queries to show, each with the same number of images.
        title: a line above the grid (e.g. the model and data).
    """
    if not examples:
        raise ValueError("plot_retrieval_examples needs at least one example")
    columns = max(len(example.images) for example in examples)
    cell = 1.35  # inches per image
    row_height = cell + 0.6  # room for the query line above and the rank/score line below
    header = 0.75 if title else 0.45
    fig = plt.figure(figsize=(max(6.0, columns * cell), header + row_height * len(examples)))
    query_chars = max(30, int(fig.get_figwidth() * 13) - 25)  # ~13 characters per inch at 9 pt
    parts = fig.subfigures(len(examples) + 1, 1, height_ratios=[header] + [row_height] * len(examples))
    legend = f"top {columns} images per text query · green frame = relevant · below: rank, cosine score"
    parts[0].text(0.5, 0.5, f"{title}\n{legend}" if title else legend, ha="center", va="center", fontsize=10)
    rows = parts[1:]
    for row, example in zip(rows, examples):
        wrapped = textwrap.shorten(example.query, width=query_chars, placeholder=" …")
        found = sum(bool(flag) for flag in example.relevant)
        row.suptitle(
            f"“{wrapped}”{f'  [{example.note}]' if example.note else ''}   "
            f"({found} of {example.num_relevant} relevant in the top {len(example.images)})",
            fontsize=9,
            x=0.01,
            ha="left",
            y=0.98,
        )
        axes = row.subplots(1, columns, squeeze=False)[0]
        row.subplots_adjust(left=0.01, right=0.99, bottom=0.14, top=0.8, wspace=0.08)
        for rank, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if rank >= len(example.images):
                ax.axis("off")
                continue
            ax.imshow(example.images[rank].convert("RGB"))
            relevant = bool(example.relevant[rank])
            for spine in ax.spines.values():
                spine.set_edgecolor(RELEVANT_COLOR if relevant else IRRELEVANT_COLOR)
                spine.set_linewidth(5 if relevant else 1)
            ax.set_xlabel(f"#{rank + 1}  {example.scores[rank]:.2f}", fontsize=8, labelpad=2)
    return _save(fig, path)


def plot_recall_curves(
    path: str | os.PathLike, curves: Mapping[str, Sequence[float]], title: str | None = None
) -> Path:
    """Recall@K against K for each direction (`image_retrieval`, `text_retrieval`), K starting at 1.

    Args:
        path: the PNG to write.
        curves: direction -> [recall@1, recall@2, ...] (as `mmret.evaluation.retrieval.recall_curves`).
        title: the plot title (e.g. the model and data).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for direction, values in curves.items():
        at = ", ".join(f"R@{k} {values[k - 1]:.2f}" for k in (1, 5, 10) if k <= len(values))
        label = f"{DIRECTION_LABELS.get(direction, direction)}: {at}"
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=2.5, linewidth=1.5, label=label)
    longest = max((len(values) for values in curves.values()), default=1)
    ax.set_xlim(0.5, max(2, longest) + 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (a relevant item in the top K)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
