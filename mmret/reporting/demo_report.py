"""The report `mmret demo` ends with: one markdown table of its results files, and DIR/results.md.

table = demo_table(digits_results, shapes_results, reranked_results)   # results JSON documents
write_demo_report(Path("demo_output"), table, commands, quick=False, pictures=[(caption, "x.png")])
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from mmret.io import write_text_atomic


def demo_table(digits: dict, dual: dict, reranked: dict) -> str:
    """The demo's markdown table (percent) from its three results documents: digits zero-shot top-1; shapes
    retrieval, dual vs reranked, all / seen / unseen compositions; and the first stage's recall@K, the ceiling
    of any reranker of those lists."""
    top_k = reranked.get("top_k")

    def cells(metrics: dict, name: str) -> list[str]:
        return [
            f"{100 * metrics[key]:.1f}" if key in metrics else "–"
            for key in (name, f"seen/{name}", f"unseen/{name}")
        ]

    rows = [
        [
            "digits: zero-shot top-1",
            "dual encoder",
            f"{100 * digits['metrics']['acc1']:.1f}",
            "–",
            "–",
        ]
    ]
    for label, name in [
        ("shapes: text→image R@1", "image_retrieval_recall@1"),
        ("shapes: text→image R@5", "image_retrieval_recall@5"),
        ("shapes: text→image NDCG@10", "image_retrieval_ndcg@10"),
        ("shapes: image→text R@1", "text_retrieval_recall@1"),
        ("shapes: image→text R@5", "text_retrieval_recall@5"),
    ]:
        rows.append([label, "dual encoder", *cells(dual["metrics"], name)])
        rows.append(["", f"+ reranker (top-{top_k})", *cells(reranked["reranked_metrics"], name)])
    ceiling = reranked.get("first_stage_ceiling", {})
    rows.append(
        [
            f"shapes: text→image R@{top_k}",
            "first stage = rerank ceiling",
            *cells(ceiling, f"image_retrieval_recall@{top_k}"),
        ]
    )
    header = ["result (test split, %)", "model", "all", "seen", "unseen"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    counts = dual.get("counts", {})
    note = (
        f"digits test: {digits['num_images']} images. shapes test: {dual['num_images']} images, "
        f"{dual['num_texts']} caption queries ({counts.get('unseen/image_retrieval_num_queries', '?')} about "
        "unseen compositions: held-out colour–shape bindings and relation orders, never in training)."
    )
    return "\n".join(lines) + "\n\n" + textwrap.fill(note, width=110, break_on_hyphens=False) + "\n"


def write_demo_report(
    output: Path, table: str, commands: list[str], quick: bool, pictures: list[tuple[str, str]]
) -> Path:
    """`output/results.md`: the table, the pictures (caption, file name relative to `output`) that exist, and
    the commands that made them."""
    title = (
        "mmret demo --quick (tiny models, a few steps: the numbers mean nothing)" if quick else "mmret demo"
    )
    text = [f"# {title}", "", table]
    text += [f"![{caption}]({name})\n" for caption, name in pictures if (output / name).is_file()]
    text += ["## How these numbers were made", "", "From the folder the demo ran in:", ""]
    text += [f"    {command}" for command in commands]
    path = output / "results.md"
    write_text_atomic(path, "\n".join(text) + "\n")
    return path
