"""Matryoshka prefixes at evaluation, indexing and search: a dual encoder's embeddings cut to their first D
coordinates and re-normalised (`mmret.losses.truncate_embeddings`, what `MatryoshkaLoss` trains).

    module = DualEncoder.load(CKPT)
    check_dim(32, module, "--model " + CKPT)           # UsageError unless 1 <= 32 <= the embedding width
    small = prefix_encoder(module, 32)                  # encode_image / encode_text(s) give [B, 32] unit vectors
    eval_set_32 = truncate_eval_set(eval_set, 32)       # an embedded set cut after embedding: the same numbers
    trained_dims(module)                                # [32, 8] for matryoshka_dims [128, 32, 8]; [] otherwise

`prefix_encoder` is what `mmret eval --dim`, `mmret index --dim` and the search of a D-dim index embed with:
everything downstream (metrics, zero-shot classifier, reranking, pictures, the index's fingerprint) sees D-dim
embeddings. Cutting an embedded set (`truncate_eval_set`) gives the same embeddings without embedding again;
that is how `mmret eval` reports every trained dim of a Matryoshka checkpoint and how validation logs
`val/dim<d>/...`.
"""

from __future__ import annotations

import dataclasses

import torch

from mmret.errors import UsageError
from mmret.losses import truncate_embeddings
from mmret.models import model_info


def embedding_width(module) -> int:
    """The full width of `module`'s embeddings (its model config's `embed_dim`, else measured on a caption)."""
    inner = module.module if isinstance(module, PrefixEncoder) else module
    width = (model_info(inner.model) or {}).get("model_cfg", {}).get("embed_dim")
    if width is None:
        with torch.no_grad():
            width = inner.encode_texts(["a photo"]).shape[-1]
    return int(width)


def check_dim(dim: int, module, where: str, option: str = "--dim") -> None:
    """Refuse, in one line, a prefix width that is not in [1, the embedding width of `module`]."""
    width = embedding_width(module)
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= width:
        raise UsageError(
            f"{option} is {dim}; expected an integer in [1, {width}] (the embedding width of {where})"
        )


def trained_dims(module) -> list[int]:
    """The smaller prefix widths a Matryoshka dual encoder was trained at (`model.matryoshka_dims` without the
    full width), widest first; [] for any other model. Seen through a prefix (`PrefixEncoder`): those below it."""
    dims = [int(dim) for dim, _ in (getattr(module, "matryoshka", None) or [])[1:]]
    return [dim for dim in dims if dim < module.dim] if isinstance(module, PrefixEncoder) else dims


class PrefixEncoder:
    """A dual encoder seen through its first `dim` embedding coordinates, re-normalised.

    `encode_image`, `encode_text` and `encode_texts` return `[B, dim]` unit vectors; every other attribute
    (`model`, `tokenizer`, `device`, `hparams`, ...) is the wrapped module's.
    """

    def __init__(self, module, dim: int) -> None:
        self.module, self.dim = module, int(dim)

    def encode_image(self, *args, **kwargs) -> torch.Tensor:
        return truncate_embeddings(self.module.encode_image(*args, **kwargs), self.dim)

    def encode_text(self, *args, **kwargs) -> torch.Tensor:
        return truncate_embeddings(self.module.encode_text(*args, **kwargs), self.dim)

    def encode_texts(self, *args, **kwargs) -> torch.Tensor:
        return truncate_embeddings(self.module.encode_texts(*args, **kwargs), self.dim)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


def prefix_encoder(module, dim: int | None):
    """`module` embedding into its first `dim` coordinates (re-normalised); `module` itself when `dim` is None
    or the full width (nothing to cut)."""
    if dim is None or int(dim) == embedding_width(module):
        return module
    return PrefixEncoder(module, dim)


def truncate_eval_set(eval_set, dim: int):
    """An `EmbeddedEvalSet` with its image and text embeddings cut to their first `dim` coordinates and
    re-normalised (the queries, relevance and labels unchanged)."""
    return dataclasses.replace(
        eval_set,
        image_emb=truncate_embeddings(eval_set.image_emb, dim),
        text_emb=truncate_embeddings(eval_set.text_emb, dim),
    )
