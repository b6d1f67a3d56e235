"""Pictures of an evaluation (matplotlib, Agg backend: no display needed): what `mmret eval` writes beside
its results JSON.

    plot_retrieval_examples("results_examples.png", examples)          # text queries and their top-k images
    plot_recall_curves("results_recall.png", recall_curves(eval_set))   # Recall@K for K = 1..50, both directions
    plot_recall_curves("r_recall.png", curves, reranked_curves=reranked, rerank_depth=20)   # + the reranked curves

`RetrievalExample` holds one text query and one or more rankings of it (`RankedImages`: the first stage's, and
the reranked one when a reranker was evaluated), each with its top images (PIL), their scores and whether each
is correct; correct images get a green frame, wrong ones a red one. A query with several rankings gets one
labelled row per ranking ("first stage", "reranked"), so the two lists can be compared image by image.
`examples_layout` and `recall_series` return what the two pictures draw (rows, labels, frames; curves and
their legend labels), so tests check the pictures' content without reading pixels.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, also on machines without a display

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from mmret.io import atomic_file  # noqa: E402

CORRECT_COLOR = "#1a9641"
WRONG_COLOR = "#d7191c"
CORRECT, WRONG = "correct", "wrong"
FIRST_STAGE, RERANKED = "first stage", "reranked"
DIRECTION_LABELS = {
    "image_retrieval": "image retrieval (text query → images)",
    "text_retrieval": "text retrieval (image query → texts)",
}
DIRECTION_COLORS = {"image_retrieval": "C0", "text_retrieval": "C1"}  # matplotlib's first two
CAPTION_WRITTEN_FOR = "an image the query caption was written for"


@dataclass
class RankedImages:
    """One ranking of a query's images, best first: one row of the examples picture.

    Attributes:
        images: the top-ranked images.
        scores: their scores (cosine similarity in the first stage, the reranker's score when reranked).
        correct: whether each image is a correct answer to the query.
        label: what ranked them ("first stage", "reranked"); shown beside the row when a query has several.
        notes: per image, a few words after the score (e.g. "was #4": its first-stage rank).
    """

    images: Sequence[Image.Image]
    scores: Sequence[float]
    correct: Sequence[bool]
    label: str = ""
    notes: Sequence[str] = ()


@dataclass
class RetrievalExample:
    """One text query and what was ranked first for it.

    Attributes:
        query: the caption used as the query.
        rankings: its rankings, each drawn as a row (one for a first-stage evaluation; first stage and reranked
            with a reranker).
        num_correct: how many images in the whole set are correct answers to the query.
        note: a tag shown after the query (e.g. "unseen" for a held-out composition, "class three").
    """

    query: str
    rankings: Sequence[RankedImages]
    num_correct: int
    note: str = ""


@dataclass(frozen=True)
class ExampleRow:
    """One drawn row of the examples picture (`examples_layout`).

    Attributes:
        example: index of the example (query) the row belongs to.
        label: the ranking's label, shown at the row's left ("" for a query with a single ranking).
        frames: per image, left to right: `CORRECT` (green frame) or `WRONG` (red frame).
        captions: per image, the line under it (rank, score, note).
    """

    example: int
    label: str
    frames: tuple[str, ...]
    captions: tuple[str, ...] = field(default=())


def examples_layout(examples: Sequence[RetrievalExample]) -> list[ExampleRow]:
    """The rows `plot_retrieval_examples` draws, top to bottom: each query's rankings in order."""
    rows = []
    for index, example in enumerate(examples):
        labelled = len(example.rankings) > 1
        for ranking in example.rankings:
            notes = list(ranking.notes) + [""] * (len(ranking.images) - len(ranking.notes))
            rows.append(
                ExampleRow(
                    example=index,
                    label=ranking.label if labelled else "",
                    frames=tuple(
                        CORRECT if flag else WRONG for flag in ranking.correct[: len(ranking.images)]
                    ),
                    captions=tuple(
                        f"#{rank + 1}  {score:.2f}{f'  {note}' if note else ''}"
                        for rank, (score, note) in enumerate(zip(ranking.scores, notes))
                    ),
                )
            )
    return rows


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
    path: str | os.PathLike,
    examples: Sequence[RetrievalExample],
    title: str | None = None,
    correct_means: str = CAPTION_WRITTEN_FOR,
) -> Path:
    """A block per text query: one row per ranking of it (labelled when there are several), its top-k images
    left to right, correct ones framed in green and wrong ones in red.

    Args:
        path: the PNG to write.
        examples: the queries to show.
        title: a line above the grid (e.g. the model and data).
        correct_means: what makes an image correct, for the legend (caption relevance, or the class label in
            a zero-shot evaluation).
    """
    if not examples or any(not example.rankings for example in examples):
        raise ValueError("plot_retrieval_examples needs at least one example, each with a ranking")
    layout = examples_layout(examples)
    columns = max(len(row.frames) for row in layout)
    labelled = any(row.label for row in layout)
    cell = 1.35  # inches per image
    ranking_height = cell + 0.35  # an image row and the rank/score line below it
    header = 1.0 if title else 0.7
    heights = [0.3 + ranking_height * len(example.rankings) for example in examples]  # + the query line
    width = max(6.0, columns * cell + (0.5 if labelled else 0.0))
    fig = plt.figure(figsize=(width, header + sum(heights)))
    query_chars = max(30, int(width * 13) - 25)  # ~13 characters per inch at 9 pt
    parts = fig.subfigures(len(examples) + 1, 1, height_ratios=[header, *heights])
    legend = _examples_legend(examples, columns, correct_means)
    parts[0].text(0.5, 0.5, f"{title}\n{legend}" if title else legend, ha="center", va="center", fontsize=9)
    left = 0.5 / width + 0.01 if labelled else 0.01
    for index, (block, example) in enumerate(zip(parts[1:], examples)):
        wrapped = textwrap.shorten(example.query, width=query_chars, placeholder=" …")
        note = f"  [{example.note}]" if example.note else ""
        if len(example.rankings) == 1:
            found = sum(bool(flag) for flag in example.rankings[0].correct)
            counts = (
                f"({found} of {example.num_correct} correct in the top {len(example.rankings[0].images)})"
            )
        else:
            counts = f"(correct images in the whole set: {example.num_correct})"
        block.suptitle(f"“{wrapped}”{note}   {counts}", fontsize=9, x=0.01, ha="left", y=0.99)
        rows = [row for row in layout if row.example == index]
        axes = block.subplots(len(rows), columns, squeeze=False)
        top = 1 - 0.3 / heights[index]
        block.subplots_adjust(left=left, right=0.99, bottom=0.2 / heights[index], top=top, wspace=0.08,
                              hspace=0.35)  # fmt: skip
        for ranking, row, row_axes in zip(example.rankings, rows, axes):
            _draw_ranking(row_axes, ranking, row, example.num_correct)
    return _save(fig, path)


def _draw_ranking(axes, ranking: RankedImages, row: ExampleRow, num_correct: int) -> None:
    """One row: the images with their frames and captions, the ranking's label at the left."""
    for rank, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if rank >= len(ranking.images):
            ax.axis("off")
            continue
        ax.imshow(ranking.images[rank].convert("RGB"))
        correct = row.frames[rank] == CORRECT
        for spine in ax.spines.values():
            spine.set_edgecolor(CORRECT_COLOR if correct else WRONG_COLOR)
            spine.set_linewidth(5 if correct else 2.5)
        ax.set_xlabel(row.captions[rank], fontsize=7 if row.label else 8, labelpad=2)
    if row.label:
        found = sum(frame == CORRECT for frame in row.frames)
        axes[0].set_ylabel(f"{row.label}\n{found} of {num_correct}", fontsize=8, fontweight="bold")


def _examples_legend(examples: Sequence[RetrievalExample], columns: int, correct_means: str) -> str:
    frames = f"green frame = correct ({correct_means}), red = wrong"
    if not any(len(example.rankings) > 1 for example in examples):
        return f"top {columns} images per text query · {frames} · below: rank, cosine score"
    labels = " / ".join(dict.fromkeys(ranking.label for example in examples for ranking in example.rankings))
    return (
        f"top {columns} images per text query, one row each: {labels} · {frames}\n"
        "below: rank, score (cosine in the first stage, the reranker's when reranked) and the first-stage rank"
    )


@dataclass(frozen=True)
class CurveSeries:
    """One line of the recall picture (`recall_series`).

    Attributes:
        direction: `image_retrieval` or `text_retrieval`.
        stage: `FIRST_STAGE` or `RERANKED`.
        label: its legend entry.
        ks: the K values (1, 2, ...).
        values: Recall@K at each.
    """

    direction: str
    stage: str
    label: str
    ks: tuple[int, ...]
    values: tuple[float, ...]


def recall_series(
    curves: Mapping[str, Sequence[float]],
    reranked_curves: Mapping[str, Sequence[float]] | None = None,
    rerank_depth: int | None = None,
) -> list[CurveSeries]:
    """The lines `plot_recall_curves` draws: per direction the first stage, then (with `reranked_curves`) the
    reranked lists, whose curve stops at the rerank depth: past it nothing is reordered."""
    series = []
    for direction, values in curves.items():
        name = DIRECTION_LABELS.get(direction, direction)
        stage = "" if reranked_curves is None else f", {FIRST_STAGE}"
        series.append(
            CurveSeries(
                direction,
                FIRST_STAGE,
                f"{name}{stage}: {_recall_at(values)}",
                tuple(range(1, len(values) + 1)),
                tuple(float(v) for v in values),
            )  # fmt: skip
        )
        reranked = (reranked_curves or {}).get(direction)
        if reranked:
            depth = len(reranked) if rerank_depth is None else min(rerank_depth, len(reranked))
            series.append(
                CurveSeries(
                    direction,
                    RERANKED,
                    f"{name}, {RERANKED} (top {depth}): {_recall_at(reranked[:depth])}",
                    tuple(range(1, depth + 1)),
                    tuple(float(v) for v in reranked[:depth]),
                )  # fmt: skip
            )
    return series


def _recall_at(values: Sequence[float]) -> str:
    return ", ".join(f"R@{k} {values[k - 1]:.2f}" for k in (1, 5, 10) if k <= len(values))


def plot_recall_curves(
    path: str | os.PathLike,
    curves: Mapping[str, Sequence[float]],
    title: str | None = None,
    reranked_curves: Mapping[str, Sequence[float]] | None = None,
    rerank_depth: int | None = None,
) -> Path:
    """Recall@K against K for each direction (`image_retrieval`, `text_retrieval`), K starting at 1; with
    `reranked_curves`, the reranked lists' curves too (dashed, up to `rerank_depth`).

    Args:
        path: the PNG to write.
        curves: direction -> [recall@1, recall@2, ...] (as `mmret.evaluation.retrieval.recall_curves`).
        title: the plot title (e.g. the model and data).
        reranked_curves: direction -> recall@1.. of the reranked lists
            (`mmret.evaluation.rerank.reranked_recall_curves`).
        rerank_depth: K of the lists the reranker reorders (marked by a dotted line).
    """
    series = recall_series(curves, reranked_curves, rerank_depth)
    reranking = any(line.stage == RERANKED for line in series)
    fig, ax = plt.subplots(figsize=(6.4, 6.0 if reranking else 4.4))
    for index, line in enumerate(series):
        color = DIRECTION_COLORS.get(line.direction, f"C{index}")
        if line.stage == RERANKED:
            ax.plot(line.ks, line.values, color=color, linestyle="--", marker="s", markersize=3.5,
                    linewidth=2.0, label=line.label)  # fmt: skip
        else:
            ax.plot(line.ks, line.values, color=color, marker="o", markersize=2.5, linewidth=1.5,
                    label=line.label)  # fmt: skip
    depth = max((len(line.ks) for line in series if line.stage == RERANKED), default=0)
    if reranking:
        ax.axvline(depth, color="#555555", linestyle=":", linewidth=1.0)
        ax.text(depth, 0.02, f" rerank depth {depth}", fontsize=7, color="#555555", ha="left", va="bottom")
    longest = max((len(line.ks) for line in series), default=1)
    ax.set_xlim(0.5, max(2, longest) + 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (a relevant item in the top K)")
    ax.grid(True, alpha=0.3)
    if reranking:  # four long entries: below the axes, where they hide no curve
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7, frameon=False)
    else:
        ax.legend(loc="best", fontsize=8)
    lines = [title] if title else []
    if reranking:
        lines.append(
            f"dashed: the first stage's top {depth} in the reranker's order (from K = {depth} on: as the first stage)"
        )
    if lines:
        ax.set_title("\n".join(lines), fontsize=8 if reranking else 9)
    fig.tight_layout()
    return _save(fig, path)
