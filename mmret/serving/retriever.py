"""`Retriever`: an index, the dual encoder it was built with, and optionally a reranker — search and rerank.

    retriever = Retriever.open("runs/shapes.index", reranker="runs/shapes_reranker/checkpoints/last.ckpt")
    results = retriever.search(texts=["a red circle left of a blue square"], k=5, rerank_top=20)[0]
    results[0].key, results[0].score, results[0].reranker_score, results[0].caption
    image = retriever.load_image(results[0])
    reordered = retriever.rerank("a red circle left of a blue square", [image_a, image_b, results[3]])

Text queries search the images (text -> image); image queries search the images (nearest images) or, with
`table="captions"` on an index built with captions, the captions (image -> text). With `rerank_top=K` the
first stage's top K are rescored by the cross-encoder (pairs of the query text and each candidate image, or of
each candidate caption and the query image) and the best k of them returned in the reranker's order; each
record keeps its first-stage rank and score. The dual encoder must embed into the index's space (checked by the
index's fingerprint); the reranker's towers must be the index model's architecture. An index of Matryoshka
prefixes (`mmret index --dim D`) is searched with the query model's first D coordinates, re-normalised, read
from the index (`mmret.evaluation.matryoshka`): nothing to pass, and a `dim` that is not the index's is refused.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmret.errors import UsageError
from mmret.serving.index import CAPTIONS, IMAGES, SearchIndex, check_same_space, model_fingerprint

MAX_QUERY_CHARS = 2000


@dataclass
class SearchResult:
    """One ranked result; `to_dict()` is the JSON record of `mmret search --format jsonl` and of the service.

    Attributes:
        rank: 1-based rank in the returned order (after reranking when reranked).
        key: the sample's key in its shard (an image), or the key of the image a caption belongs to.
        score: the dual encoder's cosine similarity to the query.
        reranker_score: the cross-encoder's logit (None when not reranked).
        first_stage_rank: rank in the dual encoder's list.
        caption: the caption (captions table) or the image's first caption.
        captions: all captions of the image.
        image_path: the original file or URL recorded in the shard's metadata ("" when none).
        shard, member: where the image's bytes are: `member` inside tar `shard`.
        sample_id: the sample's id.
    """

    rank: int
    key: str
    score: float
    caption: str
    captions: list[str] = field(default_factory=list)
    reranker_score: float | None = None
    first_stage_rank: int = 0
    image_path: str = ""
    shard: str = ""
    member: str = ""
    sample_id: int | None = None
    offset: int = field(default=-1, repr=False)
    size: int = field(default=-1, repr=False)

    def to_dict(self) -> dict:
        record = asdict(self)
        record.pop("offset")
        record.pop("size")
        return record


def check_k(k: int, available: int, what: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UsageError(f"{what} is {k!r}; expected an integer >= 1")
    if k > available:
        raise UsageError(
            f"{what} is {k} but the index holds {available} entries; expected at most {available}"
        )


def check_text_query(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UsageError("the text query is empty; expected a few words describing the image")
    if len(text) > MAX_QUERY_CHARS:
        raise UsageError(f"the text query has {len(text)} characters; expected at most {MAX_QUERY_CHARS}")
    return text.strip()


def open_query_image(source):
    """A query image as RGB PIL: a path, raw bytes or a PIL image; UsageError for anything unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    where = "the uploaded image" if isinstance(source, (bytes, bytearray)) else f"image {source}"
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise UsageError(f"{where} does not exist; expected an image file")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UsageError(
            f"{where} is not a readable image ({type(error).__name__}); expected PNG/JPEG/WebP"
        ) from None


def load_dual_encoder(path: str | os.PathLike, device, pretrained: str | None = None):
    """The query model: a checkpoint, an exported folder, or a model name with `pretrained` (DualEncoder.load)."""
    from mmret.training import DualEncoder

    if pretrained is None and not Path(path).exists():
        raise UsageError(
            f"model {path} does not exist; expected the dual-encoder .ckpt (or exported folder) the index was "
            "built with"
        )
    return DualEncoder.load(path, pretrained, device)


def load_reranker(path: str | os.PathLike, device):
    from mmret.training import CrossEncoder

    if not Path(path).exists():
        raise UsageError(f"reranker {path} does not exist; expected a reranker .ckpt or an exported folder")
    return CrossEncoder.load(path, device)


class Retriever:
    """Search an index with its dual encoder; rerank with a cross-encoder.

    Args:
        index: the opened index.
        dual_encoder: its model (a loaded `DualEncoder`), checked against the index's fingerprint.
        reranker: a loaded `CrossEncoder` whose towers are the index model's architecture, or None.
        batch_size: images per reranker forward pass.
    """

    def __init__(self, index: SearchIndex, dual_encoder, reranker=None, batch_size: int = 64) -> None:
        from mmret.evaluation.matryoshka import embedding_width, prefix_encoder

        if index.dim < embedding_width(dual_encoder):  # an index of prefixes: queries cut the same way
            dual_encoder = prefix_encoder(dual_encoder, index.dim)
        check_same_space(index.manifest, model_fingerprint(dual_encoder), index.where, "the query model")
        architecture = index.manifest["model"]["architecture"]
        if reranker is not None and architecture and reranker.tower_name != architecture:
            raise UsageError(
                f"the reranker's towers are {reranker.tower_name} but index {index.where} was built with "
                f"{architecture}; expected a reranker trained from the index's dual encoder"
            )
        self.index, self.dual_encoder, self.reranker, self.batch_size = (
            index,
            dual_encoder,
            reranker,
            batch_size,
        )
        self._lock = threading.Lock()  # one forward pass at a time (the service calls from several threads)
        from mmret.models import create_transforms

        self._transform = create_transforms(dual_encoder.model, train=False)
        self._rerank_transform = None if reranker is None else create_transforms(reranker.model, train=False)

    @classmethod
    def open(
        cls,
        index: str | os.PathLike,
        model: str | os.PathLike | None = None,
        reranker: str | os.PathLike | None = None,
        device: str = "auto",
        dim: int | None = None,
    ) -> Retriever:
        """Open an index with its model (default: the checkpoint recorded in the index) and a reranker.

        `dim`: the query embedding's width, checked against the index's (None: the index's, as always).
        """
        from mmret.evaluation.shard_set import resolve_device

        opened = SearchIndex.open(index)
        if dim is not None and dim != opened.dim:
            raise UsageError(
                f"--dim {dim}: index {opened.where} holds {opened.dim}-d vectors and its queries are embedded at "
                f"that width; expected --dim {opened.dim}, or none"
            )
        device = resolve_device(device)
        pretrained = None
        if model is None:  # the model the index records (a name comes with its pretrained weights)
            model, pretrained = (
                opened.manifest["model"]["checkpoint"],
                opened.manifest["model"].get("pretrained"),
            )
        dual = load_dual_encoder(model, device, pretrained)
        return cls(opened, dual, load_reranker(reranker, device) if reranker is not None else None)

    # ---- embedding ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return self.dual_encoder.encode_texts(list(texts)).float().cpu().numpy()

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> np.ndarray:
        pixels = torch.stack([self._transform(open_query_image(image)) for image in images])
        with self._lock:
            return self.dual_encoder.encode_image(pixels.to(self.dual_encoder.device)).float().cpu().numpy()

    # ---- search ------------------------------------------------------------------------------------------
    def search(
        self,
        texts: Sequence[str] | None = None,
        images: Sequence | None = None,
        k: int = 10,
        rerank_top: int | None = None,
        table: str = IMAGES,
        exact: bool | None = None,
    ) -> list[list[SearchResult]]:
        """Results of each query, best first: `texts` (strings) or `images` (paths, bytes or PIL images).

        Args:
            k: results per query.
            rerank_top: rescore the first stage's top `rerank_top` (>= k) with the reranker.
            table: "images" or "captions" (image queries only; needs an index built with captions).
            exact: force exact (True) or approximate (False) search; None: the index's choice.
        """
        if (texts is None) == (images is None):
            raise UsageError("give text queries or image queries (one of texts=, images=)")
        if table not in (IMAGES, CAPTIONS):
            raise UsageError(f"table is {table!r}; expected 'images' or 'captions'")
        if texts is not None and table == CAPTIONS:
            raise UsageError("text queries search the images; captions are searched with an image query")
        available = self.index.num_images if table == IMAGES else self.index.num_captions
        if table == CAPTIONS and available == 0:
            raise UsageError(
                f"index {self.index.where} holds no captions; build it with `mmret index --captions`"
            )
        check_k(k, available)
        depth = k
        if rerank_top is not None:
            if self.reranker is None:
                raise UsageError("reranking needs a reranker (--reranker CKPT)")
            if texts is None and table == IMAGES:
                raise UsageError(
                    "the reranker scores a caption against an image; an image query has no caption"
                )
            check_k(rerank_top, available, "rerank_top")
            if rerank_top < k:
                raise UsageError(f"rerank_top is {rerank_top}, fewer than k={k}; expected rerank_top >= k")
            depth = rerank_top
        if texts is not None:
            texts = [check_text_query(text) for text in texts]
            vectors = self.embed_texts(texts)
        else:
            images = [open_query_image(image) for image in images]
            vectors = self.embed_images(images)
        hits = self._search_table(table, vectors, depth, exact, available)
        results = [
            [_record(rank, hit.row, hit.score, table) for rank, hit in enumerate(row, 1)] for row in hits
        ]
        if rerank_top is None:
            return results
        reranked = []
        for query, candidates in zip(texts if texts is not None else images, results):
            reranked.append(self._rerank_records(query, candidates, table)[:k])
        return reranked

    def _search_table(self, table: str, vectors: np.ndarray, depth: int, exact, available: int):
        """The index's hits; for captions, the `depth` best DISTINCT caption texts (a caption shared by several
        images is one result, its best-scoring image's row), widening the search until found or exhausted."""
        if table == IMAGES:
            return self.index.search(table, vectors, depth, exact)
        fetch = depth
        while True:
            hits = self.index.search(table, vectors, min(fetch, available), exact)
            distinct = []
            for row in hits:
                seen, kept = set(), []
                for hit in row:
                    if hit.row["text"] not in seen:
                        seen.add(hit.row["text"])
                        kept.append(hit)
                distinct.append(kept[:depth])
            if all(len(kept) >= depth for kept in distinct) or fetch >= available:
                return distinct
            fetch *= 4

    def rerank(self, query: str, candidates: Sequence) -> list[SearchResult]:
        """Candidates (SearchResults of this index, or images from anywhere: paths, bytes, PIL) reordered by the
        reranker for a text query; images from elsewhere get keys `candidate-<i>`."""
        if self.reranker is None:
            raise UsageError("reranking needs a reranker (--reranker CKPT)")
        query = check_text_query(query)
        records, images = [], []
        for position, candidate in enumerate(candidates):
            if isinstance(candidate, SearchResult):
                records.append(candidate)
                images.append(None)
            else:
                records.append(SearchResult(rank=position + 1, key=f"candidate-{position}", score=float("nan"),
                                            caption="", first_stage_rank=position + 1))  # fmt: skip
                images.append(open_query_image(candidate))
        return self._rerank_records(query, records, IMAGES, images)

    @torch.no_grad()
    def _rerank_records(
        self, query, records: list[SearchResult], table: str, images=None
    ) -> list[SearchResult]:
        if not records:
            return []
        if table == IMAGES:
            pictures = [image if image is not None else self.load_image(record)
                        for record, image in zip(records, images or [None] * len(records))]  # fmt: skip
            captions = [query] * len(records)
        else:  # image query against captions: the same image with each candidate caption
            pictures = [query] * len(records)
            captions = [record.caption for record in records]
        scores = []
        for start in range(0, len(records), self.batch_size):
            batch = torch.stack(
                [self._rerank_transform(picture) for picture in pictures[start : start + self.batch_size]]
            )
            with self._lock:
                scores.append(
                    self.reranker.score(captions[start : start + self.batch_size], batch).float().cpu()
                )
        scores = torch.cat(scores).tolist()
        for record, score in zip(records, scores):
            record.reranker_score = float(score)
        order = sorted(range(len(records)), key=lambda i: (-scores[i], records[i].first_stage_rank))
        reordered = [records[i] for i in order]
        for rank, record in enumerate(reordered, 1):
            record.rank = rank
        return reordered

    # ---- images ------------------------------------------------------------------------------------------
    def row_of(self, key: str) -> dict:
        row = self.index.image_row(key)
        if row is None:
            raise KeyError(key)
        return row

    def image_bytes(self, result: SearchResult | str) -> bytes:
        """The stored (pre-resized) image of a result or key, as the bytes in its shard."""
        if isinstance(result, str) or not result.member:
            row = self.row_of(result if isinstance(result, str) else result.key)
        else:
            row = {
                "shard": result.shard,
                "member": result.member,
                "offset": result.offset,
                "size": result.size,
            }
        return self.index.image_bytes(row)

    def load_image(self, result: SearchResult | str):
        from PIL import Image

        return Image.open(io.BytesIO(self.image_bytes(result))).convert("RGB")


def _record(rank: int, row: dict, score: float, table: str) -> SearchResult:
    if table == CAPTIONS:
        return SearchResult(rank=rank, key=row["key"], score=score, caption=row["text"], first_stage_rank=rank,
                            shard=row["shard"])  # fmt: skip
    captions = list(row.get("captions") or [])
    return SearchResult(
        rank=rank, key=row["key"], score=score, caption=captions[0] if captions else "", captions=captions,
        first_stage_rank=rank, image_path=row.get("path", ""), shard=row["shard"], member=row["member"],
        sample_id=row.get("sample_id"), offset=int(row.get("offset", -1)), size=int(row.get("size", -1)),
    )  # fmt: skip
