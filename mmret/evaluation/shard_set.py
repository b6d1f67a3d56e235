"""A shard set to evaluate: finding it (`--data` and `--split`), checking it, embedding it once.

    data_path = resolve_data_path("data/shapes", "test")        # a shard dir, or DATA/SPLIT of a dataset root
    data = RetrievalDataModule(test=str(data_path), eval_batch_size=128)
    eval_set, key_of_id = embed_data(dual_encoder, data, device, 128, "embedding shapes/test")
    images = read_images(data.sources("test"), {image_id: key_of_id[image_id] for image_id in some_ids})

Used by `mmret eval`, `mmret mine`, validation pictures and the notebooks: the embedding here is the one every
metric of mmret is computed on. `module` is anything with `encode_image`, `encode_texts`, `tokenizer` and
`model` (a `DualEncoder` or a `CrossEncoder`'s towers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmret.errors import UsageError
from mmret.progress import Progress

SPLITS = ("train", "val", "test")
DEVICES = ("auto", "cpu", "cuda")


def resolve_data_path(data: str, split: str) -> Path:
    """The shard directory to evaluate: `data` itself, or `data/split` for a dataset root."""
    path = Path(data)
    if not path.exists():
        raise UsageError(
            f"--data {data} does not exist; expected a shard directory or a dataset root holding train/val/test"
        )
    is_shard_dir = path.is_file() or (path / "dataset.json").is_file() or any(path.glob("*.tar"))
    if is_shard_dir:
        return path
    if any((path / name).is_dir() for name in SPLITS):
        if not (path / split).is_dir():
            raise UsageError(
                f"--data {data} has no {split}/ split; expected {data}/{split} (or pick --split)"
            )
        return path / split
    raise UsageError(
        f"--data {data} holds no *.tar shards and no train/val/test splits; expected a shard directory"
    )


def resolve_device(device: str) -> torch.device:
    """`auto` (cuda when visible), `cpu` or `cuda`; refuses `cuda` without a visible device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(device)


def check_has_captions(sources, data_path: Path) -> None:
    """Refuse data whose samples have no caption at all (read raw, stops at the first captioned sample)."""
    from mmret.data.samples import SkipCounter, iter_shard

    counter, seen = SkipCounter(), 0
    for source in sources:
        for shard in source.shards:
            for raw in iter_shard(shard, counter):
                seen += 1
                if raw.get("txt", b"").strip():
                    return
    if seen == 0:
        raise UsageError(
            f"data {data_path}: its shards hold no readable sample; expected webdataset tar shards"
        )
    raise UsageError(
        f"data {data_path}: no captions in any of its {seen} samples; retrieval needs captions (KEY.txt, one "
        "per line, beside each image)"
    )


def embed_data(
    module,
    data,
    device: torch.device,
    batch_size: int,
    description: str,
    progress: bool = True,
    protocol: str = "mmret",
):
    """Embed the data module's test set with `module` (eval transform, its tokenizer), reporting progress
    (`mmret.progress`: images, then unique captions) as `description` unless `progress` is False.
    `protocol` (`mmret.evaluation.metrics.PROTOCOLS`) decides what the text queries are.

    Returns:
        The `EmbeddedEvalSet`, and sample id -> shard key of every image (to find example images again).
    """
    from mmret.evaluation.retrieval import EvalSetEmbedder
    from mmret.models import create_transforms

    data.set_preprocess(
        None, module.tokenizer, eval_image_transform=create_transforms(module.model, train=False)
    )
    embedder = EvalSetEmbedder(
        module.encode_image,
        module.encode_texts,
        device=device,
        text_batch_size=batch_size,
        progress=description if progress else None,
        protocol=protocol,
    )
    sizes = [source.num_samples for source in data.sources("test")]
    known = None if None in sizes else sum(sizes)  # from dataset.json; skipped samples make it an upper bound
    keys: dict[int, str] = {}
    with Progress(description, total=known, unit="images", enabled=progress) as images_done:
        for batch in data.test_dataloader():
            batch["image"] = batch["image"].to(device)
            embedder.add_batch(batch)
            keys.update(zip(batch["sample_id"].tolist(), batch["key"]))
            images_done.update(len(batch["key"]))
    return embedder.finish(), keys


def read_images(sources, key_of_id: dict[int, str]):
    """The decoded images of the given sample ids, found by a second pass over the shards (only matching keys
    are decoded; stops once all are found)."""
    from mmret.data.samples import SkipCounter, SkippedSample, decode_sample, iter_shard

    wanted_keys = set(key_of_id.values())
    found = {}
    counter = SkipCounter()
    for source in sources:
        for shard in source.shards:
            for raw in iter_shard(shard, counter):
                if raw["__key__"] not in wanted_keys:
                    continue
                try:
                    sample = decode_sample(raw)
                except SkippedSample:
                    continue
                if key_of_id.get(sample["sample_id"]) == raw["__key__"]:
                    found[sample["sample_id"]] = sample["image"]
                if len(found) == len(key_of_id):
                    return found
    return found
