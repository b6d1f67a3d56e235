"""Released compositional benchmarks (SugarCrepe, ARO) read from their JSON files and scored like
`mmret.evaluation.compositional` scores its own pairs.

    mmret eval --task compositional --model CKPT --benchmark sugar_crepe/swap_att.json --image-root val2017 \
        --output swap_att.json
    triples = read_benchmark("swap_att.json", image_root="val2017")

Formats (extra keys are ignored; relative image paths are found under `image_root`, by default the file's folder):
- SugarCrepe: a JSON object `{"<id>": {"filename": IMAGE, "caption": POSITIVE, "negative_caption": NEGATIVE}}`.
- ARO (VG-Relation, VG-Attribution): a JSON list `[{"image_path": IMAGE, "true_caption": POSITIVE,
  "false_caption": NEGATIVE, ...}]` (ARO's bounding-box crop is not applied: the whole image is scored).
A file is one perturbation type named after its stem (`swap_att`); several files give one type each and
`compositional_text_acc` is their macro mean. A triple is correct when score(image, positive) > score(image,
negative), ties wrong. Images are read with PIL and given the model's own evaluation transform (open_clip's
`preprocess_val`, as the eval shards are), 'batch_size' at a time. Anything malformed is a `UsageError` that
names the file, the entry and what was expected, before any model runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmret.errors import UsageError
from mmret.evaluation.compositional import (
    CompositionalPairs,
    TextPair,
    compositional_document,
    compositional_metrics,
    embed_texts,
    embedding_scorer,
    write_results,
)

SUGARCREPE_KEYS = ("filename", "caption", "negative_caption")
ARO_KEYS = ("image_path", "true_caption", "false_caption")
EXPECTED = (
    'a SugarCrepe JSON object {"<id>": {"filename", "caption", "negative_caption"}} or an ARO JSON list '
    '[{"image_path", "true_caption", "false_caption"}]'
)


@dataclass(frozen=True)
class Triple:
    """One benchmark item: `image` should score `positive` above `negative`."""

    image: Path
    positive: str
    negative: str
    type: str
    entry: str  # where it came from: "FILE entry ID", for messages


def read_benchmark(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Triple]:
    """The (image, positive, negative) triples of a SugarCrepe or ARO file, every image checked to exist.

    Args:
        path: the JSON file; its stem names the perturbation type.
        image_root: folder of relative image paths (default: the file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--benchmark {path} does not exist; expected {EXPECTED}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(
            f"--benchmark {path} is not valid JSON ({err.msg} at line {err.lineno}); expected {EXPECTED}"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(f"--benchmark {path} is not UTF-8 text; expected {EXPECTED}") from None
    root = Path(image_root) if image_root is not None else path.parent
    if image_root is not None and not root.is_dir():
        raise UsageError(
            f"--image-root {root} is not a directory; expected the folder of the benchmark's images"
        )
    if isinstance(content, dict):
        items, keys, name = list(content.items()), SUGARCREPE_KEYS, "SugarCrepe"
    elif isinstance(content, list):
        items, keys, name = [(str(i), item) for i, item in enumerate(content)], ARO_KEYS, "ARO"
    else:
        raise UsageError(f"--benchmark {path} holds a JSON {type(content).__name__}; expected {EXPECTED}")
    if not items:
        raise UsageError(f"--benchmark {path} holds no entries; expected {EXPECTED}")
    triples = []
    for entry, item in items:
        where = f"--benchmark {path}: entry {entry}"
        if not isinstance(item, dict):
            raise UsageError(
                f"{where} is a {type(item).__name__}; expected a {name} object with keys {', '.join(keys)}"
            )
        missing = [key for key in keys if not isinstance(item.get(key), str) or not item[key].strip()]
        if missing:
            raise UsageError(
                f"{where} has no {' / '.join(repr(k) for k in missing)} string; expected {name} keys {', '.join(keys)}"
            )
        image = Path(item[keys[0]]).expanduser()
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise UsageError(f"{where}: image {image} not found; expected it under --image-root {root}")
        triples.append(Triple(image, item[keys[1]], item[keys[2]], path.stem, where))
    return triples


def benchmark_pairs(triples: Sequence[Triple]) -> tuple[CompositionalPairs, list[Path]]:
    """The triples as text pairs over a sorted table of their distinct captions and one of their images."""
    texts = sorted({t for triple in triples for t in (triple.positive, triple.negative)})
    images = sorted({triple.image for triple in triples})
    text_row = {text: row for row, text in enumerate(texts)}
    image_row = {image: row for row, image in enumerate(images)}
    pairs = [
        TextPair(image_row[t.image], text_row[t.positive], text_row[t.negative], t.type) for t in triples
    ]
    return CompositionalPairs(texts, len(images), pairs), images


def image_batches(images: Sequence[Path], transform, batch_size: int) -> Iterator[Tensor]:
    """[B, 3, H, W] batches of the images, read with PIL (RGB) and `transform`ed."""
    from PIL import Image

    for start in range(0, len(images), batch_size):
        tensors = []
        for image_path in images[start : start + batch_size]:
            try:
                with Image.open(image_path) as image:
                    tensors.append(transform(image.convert("RGB")))
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
                raise UsageError(
                    f"benchmark image {image_path} is not a readable image ({type(err).__name__}); expected a "
                    "JPEG or PNG file"
                ) from None
        yield torch.stack(tensors)


@torch.no_grad()
def dual_encoder_scorer(module, pairs: CompositionalPairs, images: Sequence[Path], device, batch_size: int):
    """Cosine scores of the dual encoder: images embedded once each, captions once each."""
    from mmret.models import create_transforms

    transform = create_transforms(module.model, train=False)
    image_emb = torch.cat(
        [
            module.encode_image(batch.to(device)).float()
            for batch in image_batches(images, transform, batch_size)
        ]
    )  # [N, D]
    text_emb = embed_texts(module.encode_texts, pairs.texts, device, batch_size)  # [T, D]
    return embedding_scorer(text_emb, image_emb)


@torch.no_grad()
def reranker_scorer(reranker, pairs: CompositionalPairs, images: Sequence[Path], device, batch_size: int):
    """A `PairScorer` of the cross-encoder over the pairs' caption table and images (tower outputs once each)."""
    from mmret.evaluation.rerank import PairScorer
    from mmret.models import create_transforms

    transform = create_transforms(reranker.model, train=False)
    pooled, patches = [], []
    for batch in image_batches(images, transform, batch_size):
        image_emb, tokens = reranker.encode_images(batch.to(device))  # [B, D], [B, P, Wv]
        pooled.append(image_emb)
        patches.append(tokens)
    text_emb, states, masks = [], [], []
    for start in range(0, len(pairs.texts), batch_size):
        emb, state, mask = reranker.encode_texts(pairs.texts[start : start + batch_size])
        text_emb.append(emb)
        states.append(state)
        masks.append(mask)
    return PairScorer(
        reranker,
        torch.cat(states),
        torch.cat(masks),
        torch.cat(patches),
        torch.cat(text_emb),
        torch.cat(pooled),
    )


def read_benchmarks(
    paths: Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None
) -> list[Triple]:
    """The triples of several benchmark files (one type each: their stems must differ)."""
    stems: dict[str, Path] = {}
    triples: list[Triple] = []
    for path in paths:
        stem = Path(path).stem
        if stem in stems:
            raise UsageError(
                f"--benchmark {path} and {stems[stem]} have the same name {stem!r}; expected one file per type"
            )
        stems[stem] = Path(path)
        triples += read_benchmark(path, image_root)
    return triples


def evaluate_benchmark(
    module,
    paths: Sequence[str | os.PathLike],
    options,
    image_root: str | os.PathLike | None = None,
    reranker=None,
    triples: Sequence[Triple] | None = None,
) -> dict:
    """Score benchmark files with `module` (and `reranker`), draw the bar chart and write the results JSON.

    Args:
        module: a dual encoder (`encode_image`, `encode_texts`, `model`).
        paths: SugarCrepe / ARO JSON files.
        options: `mmret.evaluation.results.EvalOptions` (output, batch size, device, reranker path).
        image_root: folder of relative image paths (default: each file's folder).
        reranker: a cross-encoder, or None.
        triples: the files already read by `read_benchmarks` (read here when None).
    """
    device = torch.device(options.device)
    triples = list(triples) if triples is not None else read_benchmarks(paths, image_root)
    pairs, images = benchmark_pairs(triples)
    metrics, counts = compositional_metrics(
        pairs, dual_encoder_scorer(module, pairs, images, device, options.batch_size)
    )
    reranked = None
    if reranker is not None:
        scorer = reranker_scorer(reranker, pairs, images, device, options.batch_size)
        reranked, _ = compositional_metrics(pairs, scorer, 4 * options.batch_size)
    data = [str(path) for path in paths]
    results = compositional_document(
        options, data[0] if len(data) == 1 else data, {"num_images": len(images), "num_texts": len(pairs.texts)},
        metrics, counts, reranked, seed=None,
        extra_eval={"benchmark": data, "image_root": None if image_root is None else str(image_root)},
    )  # fmt: skip
    return write_results(results, options, f"{options.model} on {', '.join(Path(p).name for p in paths)}")
