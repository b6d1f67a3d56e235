"""The model card (README.md in the Hugging Face Hub's format) that every `mmret export` writes.

    info = CardInfo(model_name="digits-clip", architecture="test-vit-micro", results=[read_results(path)])
    write_model_card(export_dir, info, library_name="transformers", family="clip")

The card is YAML front matter (`library_name`, `pipeline_tag`, `tags`, `datasets`, and a `model-index` holding
the metrics of the given `mmret eval` results files) followed by Markdown: how to load the export with its
library, the metrics as tables, the training hyperparameters (the checkpoint's) and the run's `config.yaml`,
and where it came from (checkpoint, git commit of the training run and of the export). The front matter is
written by huggingface_hub's own `ModelCardData`, so `huggingface_hub.ModelCard.load` and `metadata_load` read
it back. In the model-index zero-shot accuracies (`acc1`, `acc5`, `mean_per_class_recall`) are a
`zero-shot-image-classification` result, the compositional accuracies of `--task compositional` an
`image-text-matching` one and every other metric an `image-text-retrieval` one; reranked metrics are named
`reranked_<name>`. A dual encoder trained with Matryoshka embeddings (`matryoshka_dims`) gets the `matryoshka`
tag and a section naming its trained dims and how to cut an embedding to one (sentence-transformers'
`truncate_dim` plus normalisation; a slice plus normalisation elsewhere).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import mmret
from mmret.errors import UsageError

CARD_NAME = "README.md"
PIPELINE_TAGS = {
    "open_clip": "zero-shot-image-classification",
    "transformers": "zero-shot-image-classification",
    "sentence-transformers": "sentence-similarity",
    "mmret": None,  # a reranker: mmret's own format (scores image-text pairs; no Hub pipeline does that)
}
# Metric names (the last part of names like "seen/acc1") of zero-shot classification.
_ZERO_SHOT_METRIC = re.compile(r"acc\d+|mean_per_class_recall")
# model-index task (type, name) of each kind of metric.
_TASKS = {
    "zeroshot": ("zero-shot-image-classification", "Zero-shot image classification"),
    "retrieval": ("image-text-retrieval", "Image-text retrieval"),
    "compositional": ("image-text-matching", "Compositional image-text matching"),
}


@dataclass
class CardInfo:
    """What a model card says about an exported model (every field optional except the name).

    Attributes:
        model_name: The model's name (the model-index entry; usually the export folder's name).
        architecture: The mmret / open_clip architecture name (e.g. "test-vit-micro", "ViT-B-32").
        checkpoint: The checkpoint the export was made from.
        hyper_parameters: The checkpoint's model hyperparameters.
        data_hyper_parameters: The checkpoint's data module hyperparameters.
        run_config: The text of the training run's `config.yaml`.
        trained_commit: The git commit the training run ran at (its `run_info.json`).
        exported_commit: The git commit of the mmret that exported it.
        datasets: Names of the training data sets.
        results: `mmret eval` results documents (`{"task", "data", "metrics", ...}`).
        matryoshka_dims: The prefix widths a Matryoshka dual encoder was trained at, the full width first
            (`DualEncoder.matryoshka`); empty for any other model.
    """

    model_name: str
    architecture: str | None = None
    checkpoint: str | None = None
    hyper_parameters: dict = field(default_factory=dict)
    data_hyper_parameters: dict = field(default_factory=dict)
    run_config: str | None = None
    trained_commit: str | None = None
    exported_commit: str | None = None
    datasets: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    matryoshka_dims: list[int] = field(default_factory=list)


def read_results(path: str | Path) -> dict:
    """An `mmret eval` results file, checked to hold numeric metrics.

    Raises:
        UsageError: unreadable, not JSON, or not a results document (no "metrics" of numbers).
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"--results {path}: no such file; expected a results JSON written by `mmret eval`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not JSON"
        raise UsageError(
            f"--results {path}: {reason}; expected a results JSON written by `mmret eval`"
        ) from None
    metrics = document.get("metrics") if isinstance(document, dict) else None
    if not isinstance(metrics, dict) or not metrics:
        raise UsageError(
            f"--results {path}: no 'metrics' object; expected a results JSON written by `mmret eval`"
        )
    for section in ("metrics", "reranked_metrics"):
        for name, value in (document.get(section) or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UsageError(f"--results {path}: {section}.{name} is {value!r}; expected a number")
    return document


def write_model_card(directory: str | Path, info: CardInfo, library_name: str, family: str) -> Path:
    """Write `directory/README.md` for an export made for `library_name` ("open_clip", "transformers" or
    "sentence-transformers") of a `family` ("clip" or "siglip") model. Returns its path."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        model_name=info.model_name,
        library_name=library_name,
        pipeline_tag=PIPELINE_TAGS[library_name],
        tags=_tags(library_name, family) + (["matryoshka"] if info.matryoshka_dims else []),
        datasets=list(info.datasets) or None,
        eval_results=_eval_results(info.results) or None,
    )
    text = f"---\n{data.to_yaml()}\n---\n\n{_body(info, library_name, family)}"
    path = Path(directory) / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path


def _tags(library_name: str, family: str) -> list[str]:
    if family == "reranker":
        return ["mmret", "reranker", "cross-encoder", "image-text-retrieval"]
    tags = ["mmret", family, "image-text-retrieval", "zero-shot-image-classification"]
    if library_name == "sentence-transformers":
        tags += ["sentence-transformers", "feature-extraction"]
    elif library_name == "transformers":
        tags.append("transformers")
    else:
        tags.append("open_clip")
    return tags


def _eval_results(documents: list[dict]) -> list:
    from huggingface_hub import EvalResult

    entries = []
    for document in documents:
        dataset = _dataset_name(document)
        split = (document.get("config") or {}).get("eval", {}).get("split")
        sections = [
            ("", document.get("metrics") or {}),
            ("reranked_", document.get("reranked_metrics") or {}),
        ]
        for prefix, metrics in sections:
            for name, value in metrics.items():
                task_type, task_name = _TASKS[_task_of(name, document.get("task"))]
                entries.append(
                    EvalResult(
                        task_type=task_type,
                        task_name=task_name,
                        dataset_type=dataset,
                        dataset_name=dataset,
                        dataset_split=split,
                        metric_type=prefix + name,
                        metric_name=prefix + name,
                        metric_value=float(value),
                    )
                )
    return entries


def _task_of(metric: str, document_task: str | None) -> str:
    """ "zeroshot", "retrieval" or "compositional": which task a metric of a results document measures."""
    if _ZERO_SHOT_METRIC.fullmatch(metric.rsplit("/", 1)[-1]):
        return "zeroshot"
    if "retrieval" in metric:
        return "retrieval"
    return "compositional" if document_task == "compositional" or "compositional" in metric else "retrieval"


def _dataset_name(document: dict) -> str:
    """The name in the evaluated data's dataset.json, else the data folder's name (its split folder's parent)."""
    data = Path(str(document.get("data") or "unknown"))
    try:
        name = json.loads((data / "dataset.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    if name:
        return str(name)
    return data.parent.name if data.name in ("train", "val", "test") and data.parent.name else data.name


def _body(info: CardInfo, library_name: str, family: str) -> str:
    if family == "reranker":
        summary = (
            "A cross-encoder reranker trained with mmret: fusion layers over a dual encoder's text and image "
            "towers score each (caption, image) pair; rerank the top candidates of a first-stage search."
        )
    else:
        what = {"clip": "A CLIP-style (softmax contrastive)", "siglip": "A SigLIP-style (sigmoid)"}[family]
        summary = (
            f"{what} image-text dual encoder trained with mmret and exported for {library_name}. Images and "
            "captions map to one embedding space: rank images for a caption, captions for an image, or classify "
            "images zero-shot against prompts of class names."
        )
    lines = [
        f"# {info.model_name}",
        "",
        summary,
        "",
        "## Usage",
        "",
        "```python",
        *_usage(library_name),
        "```",
        "",
    ]
    if info.matryoshka_dims:
        lines += _matryoshka_section(info.matryoshka_dims, library_name)
    if info.results:
        lines += ["## Evaluation (`mmret eval`)", ""]
        for document in info.results:
            lines += _metrics_table(document)
    lines += ["## Training", ""]
    if info.architecture:
        lines += [f"Architecture: `{info.architecture}`.", ""]
    if info.datasets:
        lines += [f"Training data: {', '.join(f'`{name}`' for name in info.datasets)}.", ""]
    if info.hyper_parameters:
        lines += [
            "Model hyperparameters (from the checkpoint):",
            "",
            "```yaml",
            _yaml(info.hyper_parameters),
            "```",
            "",
        ]
    if info.data_hyper_parameters:
        lines += ["Data hyperparameters:", "", "```yaml", _yaml(info.data_hyper_parameters), "```", ""]
    if info.run_config:  # folded: it repeats the hyperparameters among the trainer's settings
        lines += ["<details><summary>The run's <code>config.yaml</code></summary>", "", "```yaml"]
        lines += [info.run_config.rstrip(), "```", "", "</details>", ""]
    lines += [
        "## Provenance",
        "",
        f"- checkpoint: `{info.checkpoint or 'unknown'}`",
        f"- trained at git commit: `{info.trained_commit or 'unknown'}`",
        f"- exported by mmret {mmret.__version__} at git commit `{info.exported_commit or 'unknown'}`",
        "",
    ]
    return "\n".join(lines)


def _usage(library_name: str) -> list[str]:
    if library_name == "mmret":
        return [
            "from mmret.serving import Retriever",
            "from mmret.training import CrossEncoder",
            'reranker = CrossEncoder.load("PATH")  # needs mmret: open_clip towers + mmret\'s fusion layers',
            'retriever = Retriever.open("INDEX", reranker="PATH")  # or `mmret search INDEX "..." --reranker PATH`',
        ]
    if library_name == "open_clip":
        return [
            "import open_clip",
            'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH")  # or "hf-hub:ORG/NAME"',
            'tokenizer = open_clip.get_tokenizer("local-dir:PATH")',
        ]
    if library_name == "transformers":
        return [
            "from transformers import AutoModel, AutoProcessor, pipeline",
            'model = AutoModel.from_pretrained("PATH")',
            'processor = AutoProcessor.from_pretrained("PATH", backend="pil")  # open_clip\'s pixels exactly',
            'classify = pipeline("zero-shot-image-classification", model="PATH")',
        ]
    return [
        "from PIL import Image",
        "from sentence_transformers import SentenceTransformer",
        'model = SentenceTransformer("PATH")',
        'embeddings = model.encode(["a photo of a cat", Image.open("cat.jpg")])  # L2-normalised',
    ]


def _matryoshka_section(dims: list[int], library_name: str) -> list[str]:
    """How to use the smaller embeddings of a Matryoshka model: cut to the first d coordinates, re-normalise."""
    small = dims[-1]
    listed = ", ".join(str(dim) for dim in dims)
    if library_name == "sentence-transformers":
        usage = [
            "from sentence_transformers import SentenceTransformer",
            f'model = SentenceTransformer("PATH", truncate_dim={small})',
            f'embeddings = model.encode(["a photo of a cat"], normalize_embeddings=True)  # [1, {small}], unit norm',
        ]
    else:
        usage = [
            "import torch.nn.functional as F",
            f"small = F.normalize(embeddings[..., :{small}], dim=-1)  # the first {small} coordinates, unit norm",
        ]
    return [
        "## Matryoshka embeddings",
        "",
        f"Trained with Matryoshka representation learning at dims {listed}: the first d coordinates of an "
        "embedding, re-normalised, are an embedding of their own (smaller indexes, faster search). Cut image "
        "and caption embeddings alike (`mmret eval --dim d` measures a prefix; the metrics below at each dim "
        "are named `dim<d>/...`):",
        "",
        "```python",
        *usage,
        "```",
        "",
    ]


def _metrics_table(document: dict) -> list[str]:
    lines = [
        f"Task `{document.get('task', '?')}` on `{document.get('data', '?')}`"
        f" ({document.get('num_images', '?')} images, {document.get('num_texts', '?')} texts):",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {float(value):.4f} |" for name, value in document["metrics"].items()]
    lines += [
        f"| reranked_{name} | {float(value):.4f} |"
        for name, value in (document.get("reranked_metrics") or {}).items()
    ]
    return [*lines, ""]


def _yaml(values: Any) -> str:
    plain = json.loads(json.dumps(values, default=str))  # tuples, paths, ... -> JSON types YAML can write
    return yaml.safe_dump(plain, sort_keys=False).rstrip()
