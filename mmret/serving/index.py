"""Build and open the search index of a shard set: every image (and optionally every caption) embedded by a
trained dual encoder, stored with its metadata in the vector database (`mmret.serving.store`).

    index = build_index("runs/shapes/checkpoints/last.ckpt", "data/shapes/test", "runs/shapes.index")
    index = SearchIndex.open("runs/shapes.index")
    hits = index.search_images(query_vectors, k=10)

Layout of an index (a LanceDB database at a folder or URI):
- table `images`: one row per image — `key`, `shard` (the tar's path), `member` (the image's name in the tar),
  `offset`/`size` (its bytes in an uncompressed tar, -1 when unknown), `sample_id`, `captions` (all of them),
  `label`, `path` (the original file or URL an img2dataset/mmret shard recorded, if any) and `vector`;
- table `captions` (with `captions=True`): one row per (image, caption) — `text`, `key`, `shard`, `vector`;
- the manifest: the model (checkpoint, architecture, the width of the stored vectors `dim` and of the model's
  embeddings `embed_dim`, a fingerprint: its embeddings of fixed probe inputs), the shards done (with their size
  and modification time), and the approximate index if any.

With `dim` (`mmret index --dim D`) the vectors are the first D coordinates of each embedding, re-normalised (a
Matryoshka prefix, `mmret.evaluation.matryoshka`), and so is the fingerprint; queries are embedded the same way
(`Retriever` reads the index's `dim`). Adding shards to an index keeps its dim.

Incremental and resumable: shards are embedded one at a time and recorded in the manifest only once their rows
are in; a shard's rows that an interrupted build left behind are deleted before it is embedded again; a second
build over more shards embeds only the new ones. A shard whose file changed since it was indexed is refused
(its old rows would no longer match it). The index refuses a model whose fingerprint differs from the one it
was built with: its vectors live in another embedding space.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmret.errors import UsageError
from mmret.progress import Progress
from mmret.serving.store import AnnSettings, VectorStore

IMAGES, CAPTIONS = "images", "captions"
FORMAT_VERSION = 1
DEFAULT_APPROXIMATE_ABOVE = 50_000
# Fixed inputs whose embeddings identify a model's embedding space (the index's fingerprint).
PROBE_TEXTS = ("a photo", "a red circle left of a blue square", "mmret index fingerprint")
FINGERPRINT_TOLERANCE = 1e-3


def _probe_image(size: int) -> torch.Tensor:
    """A deterministic [1, 3, size, size] input: smooth gradients, no randomness."""
    ramp = torch.linspace(-1.0, 1.0, size)
    return torch.stack(
        [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), ramp.outer(ramp)]
    )[None]


def image_size_of(module) -> int:
    size = getattr(module.model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def model_fingerprint(module) -> list[list[float]]:
    """The dual encoder's normalised embeddings of the probe texts and the probe image ([4, D] as lists)."""
    texts = module.encode_texts(list(PROBE_TEXTS)).float().cpu()
    image = module.encode_image(_probe_image(image_size_of(module)).to(module.device)).float().cpu()
    return torch.cat([texts, image]).tolist()


def check_same_space(manifest: dict, fingerprint: Sequence[Sequence[float]], where: str, what: str) -> None:
    """Refuse a model whose probe embeddings differ from the index's: its vectors are not comparable."""
    stored = np.asarray(manifest["model"]["fingerprint"], dtype=np.float32)
    given = np.asarray(fingerprint, dtype=np.float32)
    if stored.shape != given.shape or float(np.abs(stored - given).max()) > FINGERPRINT_TOLERANCE:
        raise UsageError(
            f"{what} does not embed into the space of index {where} (built with {manifest['model']['checkpoint']}, "
            f"{manifest['model']['architecture']}, {manifest['model']['dim']}-d); expected the index's own model"
        )


@dataclass(frozen=True)
class BuildReport:
    """What one `build_index` call did."""

    index: str
    shards_added: int
    shards_skipped: int
    images: int
    captions: int
    approximate: dict | None


def _image_members(shard: str) -> dict[str, tuple[str, int, int]]:
    """key -> (image member name, byte offset, size) of an uncompressed tar (headers only, no data read)."""
    from mmret.data.samples import IMAGE_EXTENSIONS

    members: dict[str, tuple[str, int, int]] = {}
    try:
        with tarfile.open(shard, "r:") as archive:
            for member in archive.getmembers():
                base = os.path.basename(member.name)
                if not member.isreg() or "." not in base or base.startswith(("_", ".")):
                    continue
                stem, extension = base.split(".", 1)
                if extension.lower() in IMAGE_EXTENSIONS:
                    key = (
                        os.path.join(os.path.dirname(member.name), stem)
                        if os.path.dirname(member.name)
                        else stem
                    )
                    members.setdefault(key, (member.name, member.offset_data, member.size))
    except (tarfile.ReadError, tarfile.CompressionError):  # compressed: images are read by a scan instead
        return {}
    return members


def read_member(shard: str, member: str, offset: int, size: int) -> bytes:
    """The bytes of one file of a tar shard: a seek when its offset is known, else a scan of the tar."""
    if offset >= 0:
        with open(shard, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) == size:
            return data
    with tarfile.open(shard, "r|*") as archive:
        for entry in archive:
            if entry.name == member:
                return archive.extractfile(entry).read()
    raise FileNotFoundError(f"{member} is not in shard {shard}")


def _shard_state(shard: str) -> dict:
    stat = os.stat(shard)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _iter_shard_batches(shard: str, transform, batch_size: int, counter) -> Iterator[list[dict]]:
    """Decoded, transformed samples of one shard in batches (unreadable samples skipped and counted)."""
    from mmret.data.samples import IMAGE_EXTENSIONS, SkippedSample, decode_sample, iter_shard

    batch: list[dict] = []
    for raw in iter_shard(shard, counter):
        try:
            sample = decode_sample(raw)
        except SkippedSample as skipped:
            counter.add(skipped.reason, f"{os.path.basename(shard)}/{raw['__key__']}", skipped.detail)
            continue
        sample["pixels"] = transform(sample["image"])
        extension = next(ext for ext in IMAGE_EXTENSIONS if ext in raw)
        sample["member"] = f"{raw['__key__']}.{extension}"
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _original_path(metadata: dict) -> str:
    for field in ("path", "source_path", "url"):
        if isinstance(metadata.get(field), str):
            return metadata[field]
    return ""


def _vectors_column(vectors: np.ndarray):
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


@torch.no_grad()
def _embed_shard(module, shard: str, transform, batch_size: int, with_captions: bool, counter):
    """(image rows, caption rows) of one shard as pyarrow tables."""
    import pyarrow as pa

    members = _image_members(shard)
    images: dict[str, list] = {name: [] for name in
                               ("key", "shard", "member", "offset", "size", "sample_id", "captions", "label", "path")}  # fmt: skip
    image_vectors, caption_rows, caption_texts = [], {"text": [], "key": [], "shard": []}, []
    for batch in _iter_shard_batches(shard, transform, batch_size, counter):
        pixels = torch.stack([sample["pixels"] for sample in batch]).to(module.device)
        image_vectors.append(module.encode_image(pixels).float().cpu().numpy())
        for sample in batch:
            member, offset, size = members.get(sample["key"], (sample["member"], -1, -1))
            images["key"].append(sample["key"])
            images["shard"].append(shard)
            images["member"].append(member)
            images["offset"].append(offset)
            images["size"].append(size)
            images["sample_id"].append(int(sample["sample_id"]))
            images["captions"].append(list(sample["captions"]))
            images["label"].append(int(sample["label"]))
            images["path"].append(_original_path(sample["metadata"]))
            if with_captions:
                for caption in sample["captions"]:
                    caption_rows["text"].append(caption)
                    caption_rows["key"].append(sample["key"])
                    caption_rows["shard"].append(shard)
    if not image_vectors:
        return None, None
    image_table = pa.table(
        {
            **images,
            "sample_id": pa.array(images["sample_id"], pa.int64()),
            "vector": _vectors_column(np.concatenate(image_vectors)),
        }
    )
    caption_table = None
    if with_captions and caption_rows["text"]:
        texts = caption_rows["text"]
        for start in range(0, len(texts), batch_size):
            caption_texts.append(module.encode_texts(texts[start : start + batch_size]).float().cpu().numpy())
        caption_table = pa.table({**caption_rows, "vector": _vectors_column(np.concatenate(caption_texts))})
    return image_table, caption_table


class _HeldWarnings(logging.Filter):
    """Holds the data logger's per-sample skip warnings until the index has its first image: when no shard has
    one, the one-line refusal says what was skipped instead (no log lines before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("mmret.data")
        self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self, emit: bool) -> None:
        if self not in self.logger.filters:
            return
        self.logger.removeFilter(self)
        for record in self.records if emit else ():
            self.logger.handle(record)
        self.records.clear()


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def build_index(
    model: str | os.PathLike,
    shards: Sequence[str],
    output: str | os.PathLike,
    captions: bool = False,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    approximate_above: int = DEFAULT_APPROXIMATE_ABOVE,
    ann: AnnSettings = AnnSettings(),
    progress: bool = True,
    module=None,
    pretrained: str | None = None,
    shard_sizes: dict[str, int | None] | None = None,
    dim: int | None = None,
) -> BuildReport:
    """Embed the shards not yet in the index at `output` (created if missing) and store them.

    Args:
        model: the dual-encoder checkpoint (recorded in the index; `module`, when given, is its loaded model).
        shards: tar shard paths, in order.
        output: the index folder or LanceDB URI.
        captions: also embed and store every caption (for image -> text search).
        approximate_above: build an IVF-PQ index once the image table holds at least this many rows; below
            it every search is exact.
        progress: report progress on stderr (mmret.progress: a bar on a terminal, plain lines in logs).
        module: the loaded dual encoder of `model`, when the caller has it already.
        pretrained: with `model` a model name: its open_clip pretrained tag or weights file.
        shard_sizes: samples per shard where known (the progress total).
        dim: store the first `dim` coordinates of each embedding, re-normalised (a Matryoshka prefix); None: the
            full width for a new index, an existing index's own dim. A dim other than an existing index's is
            refused.
    """
    from mmret.data.samples import SkipCounter
    from mmret.evaluation.matryoshka import check_dim, embedding_width, prefix_encoder
    from mmret.models import create_transforms
    from mmret.training import DualEncoder

    module = module if module is not None else DualEncoder.load(model, pretrained, device)
    width = embedding_width(module)
    if dim is not None:
        check_dim(dim, module, f"--model {model}")
    local = "://" not in str(output)
    created = local and not Path(output).exists()
    store = VectorStore.connect(output)
    manifest = store.read_manifest()
    where = str(output)
    if manifest is not None:  # adding to an index: at its own dim
        stored = int(manifest["model"]["dim"])
        if dim is not None and dim != stored:
            raise UsageError(
                f"--dim {dim}: index {where} holds {stored}-d vectors; expected --dim {stored} (or none) to add "
                "to it, or a new --output for another dim"
            )
        # a stored dim wider than this model's embeddings: the fingerprint check below refuses the model
        dim = stored if stored < width else None
    module = prefix_encoder(module, dim)
    fingerprint = model_fingerprint(module)
    if manifest is None:
        manifest = {
            "format": FORMAT_VERSION,
            "model": {
                # a checkpoint or exported folder by absolute path; a model name as given, with its weights
                "checkpoint": str(Path(model).resolve()) if Path(model).exists() else str(model),
                "pretrained": pretrained,
                "architecture": str(module.hparams.get("model", "")),
                "dim": len(fingerprint[0]),
                "embed_dim": width,
                "fingerprint": fingerprint,
            },
            "captions": captions,
            "shards": {},
            "approximate": None,
        }
    else:
        check_same_space(manifest, fingerprint, where, f"model {model}")
        if captions and not manifest["captions"]:
            raise UsageError(
                f"index {where} was built without captions; rebuild it into a new folder with --captions"
            )
        captions = manifest["captions"]
    shard_sizes = {str(Path(shard).resolve()): size for shard, size in (shard_sizes or {}).items()}
    shards = [str(Path(shard).resolve()) for shard in shards]
    todo = []
    for shard in shards:
        done = manifest["shards"].get(shard)
        if done is None:
            todo.append(shard)
        elif {key: done[key] for key in ("bytes", "mtime_ns")} != _shard_state(shard):
            raise UsageError(
                f"shard {shard} changed since index {where} embedded it; build a new index for changed data"
            )
    transform = create_transforms(module.model, train=False)
    counter = SkipCounter()
    sizes = [(shard_sizes or {}).get(shard) for shard in todo]
    expected = None if None in sizes else sum(sizes)
    bar = Progress(f"indexing {len(todo)} shards", total=expected, unit="images", enabled=progress)
    added_images = added_captions = 0
    held = _HeldWarnings() if store.count(IMAGES) == 0 else None
    try:
        with bar:
            for shard in todo:
                # rows an interrupted build wrote for this shard before recording it
                store.delete_where(IMAGES, f"shard = {_quote(shard)}")
                store.delete_where(CAPTIONS, f"shard = {_quote(shard)}")
                image_table, caption_table = _embed_shard(
                    module, shard, transform, batch_size, captions, counter
                )
                if image_table is not None:
                    store.add(IMAGES, image_table)
                    added_images += image_table.num_rows
                    bar.update(image_table.num_rows)
                    if held is not None:
                        held.release(emit=True)
                if caption_table is not None:
                    store.add(CAPTIONS, caption_table)
                    added_captions += caption_table.num_rows
                manifest["shards"][shard] = {
                    **_shard_state(shard),
                    "images": 0 if image_table is None else image_table.num_rows,
                }
                store.write_manifest(manifest)
    finally:
        if held is not None:  # no image at all: the refusal below names what was skipped
            held.release(emit=added_images > 0)
    skipped = counter.take_unreported()
    total = store.count(IMAGES)
    if total == 0:
        if created:  # nothing worth keeping: leave no empty index behind
            shutil.rmtree(output, ignore_errors=True)
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        raise UsageError(
            f"no readable image in {len(shards)} shards{f' (skipped: {reasons})' if reasons else ''}; "
            "expected webdataset tars of images + captions"
        )
    for reason, count in skipped.items():
        print(f"skipped {count} samples: {reason}", file=sys.stderr)
    if added_images and total >= approximate_above:
        manifest["approximate"] = {IMAGES: store.build_ann_index(IMAGES, manifest["model"]["dim"], ann)}
        if captions and store.count(CAPTIONS) >= approximate_above:
            manifest["approximate"][CAPTIONS] = store.build_ann_index(CAPTIONS, manifest["model"]["dim"], ann)
        store.write_manifest(manifest)
    return BuildReport(
        where, len(todo), len(shards) - len(todo), total, store.count(CAPTIONS), manifest["approximate"]
    )


@dataclass
class Hit:
    """One search result: the stored row (metadata, no vector) and its cosine score."""

    row: dict
    score: float


class SearchIndex:
    """An index opened for searching."""

    def __init__(
        self, store: VectorStore, manifest: dict, where: str, ann: AnnSettings = AnnSettings()
    ) -> None:
        self.store, self.manifest, self.where, self.ann = store, manifest, where, ann

    @classmethod
    def open(cls, where: str | os.PathLike, ann: AnnSettings = AnnSettings()) -> SearchIndex:
        where = str(where)
        if "://" not in where and not Path(where).is_dir():
            raise UsageError(f"index {where} does not exist; expected a folder written by `mmret index`")
        store = VectorStore.connect(where)
        manifest = store.read_manifest()
        if manifest is None or not store.has(IMAGES):
            raise UsageError(
                f"{where} is not an mmret index (no manifest or no images); build one with `mmret index`"
            )
        return cls(store, manifest, where, ann)

    @property
    def num_images(self) -> int:
        return self.store.count(IMAGES)

    @property
    def num_captions(self) -> int:
        return self.store.count(CAPTIONS)

    @property
    def dim(self) -> int:
        return int(self.manifest["model"]["dim"])

    def exact(self, table: str) -> bool:
        approximate = self.manifest.get("approximate") or {}
        return table not in approximate

    def search(self, table: str, vectors: np.ndarray, k: int, exact: bool | None = None) -> list[list[Hit]]:
        """The k nearest rows of `table` for each query vector [Q, D] (metadata without vectors)."""
        if not self.store.has(table):
            raise UsageError(f"index {self.where} has no {table}; build it with `mmret index --captions`")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"query vectors of shape {tuple(vectors.shape)}; the index holds {self.dim}-d vectors"
            )
        exact = self.exact(table) if exact is None else exact
        handle = self.store.db.open_table(table)
        columns = [
            name for name in handle.schema.names if name != "vector"
        ]  # the vectors stay in the database
        results = self.store.search(table, vectors, k, exact, self.ann, columns)
        return [
            [Hit({k_: v for k_, v in row.items() if k_ != "vector"}, score) for row, score in hits]
            for hits in results
        ]

    def rows(self, table: str = IMAGES, columns: Sequence[str] | None = None) -> list[dict]:
        """Every row of `table` (without vectors unless asked for), in storage order."""
        handle = self.store.db.open_table(table)
        names = (
            [name for name in handle.schema.names if name != "vector"] if columns is None else list(columns)
        )
        return handle.to_arrow().select(names).to_pylist()

    def image_row(self, key: str) -> dict | None:
        rows = self.store.rows_where(IMAGES, f"key = {_quote(key)}")
        return {k: v for k, v in rows[0].items() if k != "vector"} if rows else None

    def image_bytes(self, row: dict) -> bytes:
        return read_member(row["shard"], row["member"], int(row["offset"]), int(row["size"]))

    def image(self, row: dict):
        from PIL import Image

        return Image.open(io.BytesIO(self.image_bytes(row))).convert("RGB")
