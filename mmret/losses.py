"""Contrastive losses with global negatives (dual encoders) and listwise losses (rerankers).

Dual encoders (`InfoNCELoss`, `SigLIPLoss`) take L2-normalised `[B, D]` image and text embeddings and an
already exponentiated `logit_scale` (open_clip's convention). Under DDP every rank's embeddings are gathered
(`mmret.distributed`) so each row is contrasted against `world_size * B` candidates. Both equal open_clip's
`ClipLoss` / `SigLipLoss` with the same options (forward and gradient, tests/test_losses*.py).

Gradient convention: each rank's loss is a mean over its local rows (InfoNCE) or a sum over pairs divided by
the local batch size (SigLIP, open_clip's normalisation). The gather's backward sums gradients over ranks and
DDP averages parameter gradients over ranks, so with `gather_with_grad=True` a 2-rank run with B rows each gives
exactly the parameter gradient of one process on the concatenated 2B batch (tests/test_losses_ddp.py).
`gather_with_grad=False` reproduces open_clip's cheaper approximation, which is NOT that gradient: with
`local_loss=False` the embedding (tower) gradients are the true ones divided by `world_size` while
logit_scale's is exact; with `local_loss=True` the gradient that flows through other ranks' rows is dropped.

Optional `sample_ids` (`[B]`, e.g. the image id of each caption): two rows with the same id are never each
other's negatives (several captions of one image in a batch). Optional `caption_keys` (`CaptionKeys`) go
further: a row's caption that also describes another row's image (two images of one composition, a caption
shared by several images) is not that image's negative either.

Hard negatives (`HardNegatives`, optional `negatives=` of both dual-encoder losses): extra text embeddings per
image row (compositional perturbations of its caption, mined captions) and extra image embeddings per caption row
(mined images), `[B, K, D]` each. They are gathered from every rank with gradient, like the batch, and every row
is contrasted with all of them (sentence-transformers' MultipleNegativesRankingLoss with negative columns: equal
loss and gradients, tests/test_hard_negatives.py). Padding (`*_valid`) and negatives that are a row's positive
(an image negative with the row's sample id, a text negative whose caption key is one of the row's captions)
are left out of that row's denominator.

    negatives = HardNegatives(text=perturbed_emb.view(B, k, D), text_keys=keys, row_text_keys=row_keys)
    loss = InfoNCELoss()(image_emb, text_emb, logit_scale.exp(), sample_ids=ids, negatives=negatives)

Rerankers: `listwise_infonce_loss` / `ListwiseLoss` (several positives per query) and
`binary_cross_entropy_loss` over a `[Q, C]` score matrix.

    loss = InfoNCELoss()(image_emb, text_emb, logit_scale.exp(), sample_ids=image_ids)
    loss = ListwiseLoss(temperature=0.05)(scores, positive_mask)

Tests: `.venv/bin/pytest tests/test_losses.py` (single process) and `-m ddp tests/test_losses_ddp.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmret import distributed


def _no_autocast(device: torch.device):
    # Logits reach |scale| ~ 100: computed in half precision they lose ~0.1 absolute, so the loss runs in the
    # embeddings' own (full) precision even inside an autocast region.
    return torch.autocast(device_type=device.type, enabled=False)


def _full_precision(*tensors: Tensor | float) -> list[Tensor | float]:
    low = (torch.float16, torch.bfloat16)
    return [t.float() if isinstance(t, Tensor) and t.dtype in low else t for t in tensors]


def _same_id_off_positive(row_ids: Tensor, col_ids: Tensor, positive_cols: Tensor) -> Tensor:
    """Pairs (row, col) that share a sample id but are not the row's own positive: neither positive nor negative.

    Returns:
        bool `[R, C]`.
    """
    same = row_ids[:, None] == col_ids[None, :]  # [R, C]
    same[torch.arange(len(row_ids), device=same.device), positive_cols] = False
    return same


@dataclass
class HardNegatives:
    """Extra negatives of a dual-encoder batch, a fixed number per row, gathered from every rank like the batch.

    Every row is contrasted against every rank's hard negatives of its kind, not only its own (the in-batch
    convention of sentence-transformers' MultipleNegativesRankingLoss with negative columns), so the
    effective number of hard negatives also grows with the world size.

    Attributes:
        text: `[B, Kt, D]` normalised text embeddings: negatives of image row i (e.g. compositional
            perturbations of its caption, or captions mined for it); contrasted with the image rows.
        text_valid: bool `[B, Kt]`; False marks padding (neither positive nor negative).
        text_keys: int64 `[B, Kt]` caption keys (`mmret.data.perturb.caption_key`) of the text negatives.
        row_text_keys: int64 `[B, C]` keys of each row's own positive captions (-1 pads): a text negative whose
            key is one of a row's keys describes that row's image, so it is not that row's negative.
        image: `[B, Ki, D]` normalised image embeddings: negatives of caption row i (e.g. images mined for it).
        image_valid: bool `[B, Ki]`.
        image_ids: int64 `[B, Ki]` sample ids of the image negatives: one whose id is a row's `sample_ids`
            entry is that row's own image, not its negative.
    """

    text: Tensor | None = None
    text_valid: Tensor | None = None
    text_keys: Tensor | None = None
    row_text_keys: Tensor | None = None
    image: Tensor | None = None
    image_valid: Tensor | None = None
    image_ids: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("text", "image"):
            emb = getattr(self, name)
            if emb is not None and emb.dim() != 3:
                raise ValueError(f"HardNegatives.{name} must be [B, K, D], got shape {tuple(emb.shape)}")
            for suffix in ("valid", "keys", "ids"):
                extra = getattr(self, f"{name}_{suffix}", None)
                if extra is not None and (emb is None or tuple(extra.shape) != tuple(emb.shape[:2])):
                    raise ValueError(f"HardNegatives.{name}_{suffix} must be [B, K] like {name}")

    def with_embeddings(self, text: Tensor | None, image: Tensor | None) -> HardNegatives:
        """The same masks and keys with other embeddings (GradCache's cached leaves)."""
        return HardNegatives(
            text=text,
            text_valid=self.text_valid,
            text_keys=self.text_keys,
            row_text_keys=self.row_text_keys,
            image=image,
            image_valid=self.image_valid,
            image_ids=self.image_ids,
        )


@dataclass
class CaptionKeys:
    """Which captions describe which images of a batch: in-batch false negatives beyond a shared sample id.

    Two images of one composition ("a red circle left of a blue square" drawn twice), or a caption several
    images carry, make a pair (image i, caption of row j) that is really positive; as an in-batch negative it
    would push apart what should meet. Such a pair (j not i's own row) is left out of both denominators, like
    rows sharing a sample id, on every rank's columns.

    Attributes:
        text: int64 `[B]` key (`mmret.data.perturb.caption_key`) of each row's caption.
        image: int64 `[B, C]` keys of every caption of each row's image (-1 pads; C may differ across ranks).
    """

    text: Tensor
    image: Tensor

    @classmethod
    def from_batch(cls, batch: dict, device: torch.device | str | None = None) -> CaptionKeys | None:
        """The keys a batch carries (`text_key` [B], `caption_keys` [B, C]; DESIGN's Batches contract), on
        `device`; None when it carries neither."""
        if "text_key" not in batch or "caption_keys" not in batch:
            return None
        return cls(batch["text_key"].to(device), batch["caption_keys"].to(device))

    def __post_init__(self) -> None:
        if self.text.dim() != 1 or self.image.dim() != 2 or self.image.shape[0] != self.text.shape[0]:
            raise ValueError(
                f"CaptionKeys: expected text [B] and image [B, C], got {tuple(self.text.shape)} and "
                f"{tuple(self.image.shape)}"
            )


def _describes(image_keys: Tensor, text_keys: Tensor) -> Tensor:
    """bool `[I, T]`: caption column t is one of the captions of image row i (`image_keys` `[I, C]`, -1 pads)."""
    match = (image_keys[:, :, None] == text_keys[None, None, :]) & (image_keys[:, :, None] >= 0)
    return match.any(dim=1)


def _gather_key_rows(keys: Tensor, world_size: int) -> Tensor:
    """Every rank's `[B, C]` key rows, padded with -1 to the widest C (ranks may hold different C)."""
    if world_size == 1:
        return keys
    width = int(distributed.all_gather_no_grad(torch.tensor([keys.shape[1]], device=keys.device)).max())
    padded = F.pad(keys, (0, width - keys.shape[1]), value=-1)
    return distributed.all_gather_no_grad(padded)


def _shared_caption_masks(
    keys: CaptionKeys, world_size: int, local_rows: bool, positive_cols: Tensor
) -> tuple[Tensor, Tensor]:
    """Masks `[R, N]` of the pairs `keys` makes positive off each row's own column: (image rows x text
    columns, text rows x image columns)."""
    device = positive_cols.device
    text_keys, image_keys = keys.text.to(device), keys.image.to(device)
    if world_size > 1:
        all_text_keys = distributed.all_gather_no_grad(text_keys)  # [N]
        all_image_keys = _gather_key_rows(image_keys, world_size)  # [N, C']
    else:
        all_text_keys, all_image_keys = text_keys, image_keys
    row_text_keys, row_image_keys = (text_keys, image_keys) if local_rows else (all_text_keys, all_image_keys)
    rows = torch.arange(len(positive_cols), device=device)
    image_rows = _describes(row_image_keys, all_text_keys)  # [R, N]
    text_rows = _describes(all_image_keys, row_text_keys).T  # [R, N]
    image_rows[rows, positive_cols] = False
    text_rows[rows, positive_cols] = False
    return image_rows, text_rows


@dataclass
class _NegativeColumns:
    """Gathered hard negatives of one kind: `[M, D]` embeddings and a `[rows, M]` mask of non-negatives."""

    emb: Tensor
    excluded: Tensor


def _gather_rows(tensor: Tensor | None, gather: Callable[[Tensor], Tensor], world_size: int) -> Tensor | None:
    if tensor is None or world_size == 1:
        return tensor
    return gather(tensor)


def _negative_columns(
    emb: Tensor,
    valid: Tensor | None,
    column_keys: Tensor | None,
    row_keys: Tensor | None,
    world_size: int,
    gather_emb: Callable[[Tensor], Tensor],
) -> _NegativeColumns:
    """Flatten (and gather) `[B, K, D]` negatives into columns; exclude padding and columns matching a row key.

    `row_keys` is `[rows, C]` (C keys per row; -1 pads) already aligned with the rows being scored.
    """
    batch, k, dim = emb.shape
    device = emb.device
    flat = emb.reshape(batch * k, dim)  # [B*K, D], row-major: (row, k)
    all_emb = _gather_rows(flat, gather_emb, world_size)  # [M, D], M = world*B*K
    num = all_emb.shape[0]
    rows = row_keys.shape[0] if row_keys is not None else None
    excluded = None
    if valid is not None:
        all_valid = _gather_rows(
            valid.to(device).reshape(-1), distributed.all_gather_no_grad, world_size
        )  # [M]
        excluded = ~all_valid.bool()[None, :]  # [1, M]
    if column_keys is not None and row_keys is not None:
        all_keys = _gather_rows(
            column_keys.to(device).reshape(-1), distributed.all_gather_no_grad, world_size
        )
        row_keys = row_keys.to(device)
        match = ((row_keys[:, :, None] == all_keys[None, None, :]) & (row_keys[:, :, None] >= 0)).any(dim=1)
        excluded = match if excluded is None else (excluded | match)  # [rows, M]
    if excluded is None:
        excluded = torch.zeros(1, num, dtype=torch.bool, device=device)
    if rows is not None and excluded.shape[0] == 1:
        excluded = excluded.expand(rows, num)
    return _NegativeColumns(all_emb, excluded)


def _with_negative_columns(
    logits: Tensor, rows_emb: Tensor, logit_scale: Tensor, columns: _NegativeColumns | None
) -> Tensor:
    """`[R, N]` logits extended by the hard-negative columns `[R, M]` (excluded ones at -inf)."""
    if columns is None:
        return logits
    extra = (logit_scale * rows_emb) @ columns.emb.T  # [R, M]
    extra = extra.masked_fill(columns.excluded.expand_as(extra), float("-inf"))
    return torch.cat([logits, extra], dim=1)


def _as_key_rows(ids: Tensor | None) -> Tensor | None:
    return None if ids is None else ids[:, None]


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP) loss with negatives gathered from every rank.

    Args:
        gather: contrast against every rank's embeddings (global batch); False keeps in-rank negatives only.
        local_loss: score only this rank's rows against all gathered columns (`[B, world*B]` logits, labels
            offset by `rank * B`); False computes the full `[world*B, world*B]` matrix on every rank.
        gather_with_grad: gather with an exact gradient (recommended); False gathers constants, open_clip's
            cheaper approximation (see the module docstring for what it changes).
    """

    def __init__(self, gather: bool = True, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather = gather
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def _gather(self, tensor: Tensor) -> Tensor:
        if self.gather_with_grad:
            return distributed.all_gather_with_grad(tensor)
        # open_clip puts the local grad-carrying slice back only for the full-matrix form; mirrored for parity.
        return distributed.all_gather_no_grad(tensor, keep_local_grad=not self.local_loss)

    def forward(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        logit_scale: Tensor,
        sample_ids: Tensor | None = None,
        negatives: HardNegatives | None = None,
        caption_keys: CaptionKeys | None = None,
    ) -> Tensor:
        """Mean over this rank's rows (or all rows) of (CE image->text + CE text->image) / 2.

        Args:
            image_emb: `[B, D]` normalised image embeddings; row i is paired with text row i.
            text_emb: `[B, D]` normalised text embeddings.
            logit_scale: scalar, already exponentiated.
            sample_ids: optional `[B]` integer ids; rows sharing an id are not each other's negatives.
            negatives: optional hard negatives (`HardNegatives`): text negatives join the image->text
                denominators, image negatives the text->image ones, gathered from every rank.
            caption_keys: optional `CaptionKeys`; a caption of another row that describes a row's image is
                neither its positive nor its negative (in both directions).

        Returns:
            scalar loss.
        """
        with _no_autocast(image_emb.device):
            image_emb, text_emb, logit_scale = _full_precision(image_emb, text_emb, logit_scale)
            world_size = distributed.get_world_size() if self.gather else 1
            batch = image_emb.shape[0]
            if sample_ids is not None:
                sample_ids = sample_ids.to(image_emb.device)  # NCCL gathers device tensors only
            if world_size == 1:
                all_image, all_text, all_ids = image_emb, text_emb, sample_ids
            else:
                all_image, all_text = self._gather(image_emb), self._gather(text_emb)  # [N, D], N = world*B
                all_ids = None if sample_ids is None else distributed.all_gather_no_grad(sample_ids)

            local_rows = self.local_loss and world_size > 1
            if local_rows:
                row_image, row_text, row_ids = image_emb, text_emb, sample_ids
                # Scaling the [B, D] rows rather than the [B, N] product saves one logits-sized buffer.
                logits_per_image = (logit_scale * image_emb) @ all_text.T  # [B, N]
                logits_per_text = (logit_scale * text_emb) @ all_image.T  # [B, N]
                labels = torch.arange(batch, device=image_emb.device) + distributed.get_rank() * batch
            else:
                row_image, row_text, row_ids = all_image, all_text, all_ids
                logits_per_image = (logit_scale * all_image) @ all_text.T  # [N, N]
                logits_per_text = logits_per_image.T
                labels = torch.arange(all_image.shape[0], device=image_emb.device)

            if sample_ids is not None:
                masked = _same_id_off_positive(
                    row_ids, all_ids, labels
                )  # [rows, N], same for both directions
                logits_per_image = logits_per_image.masked_fill(masked, float("-inf"))
                logits_per_text = logits_per_text.masked_fill(masked, float("-inf"))
            if caption_keys is not None:
                image_rows, text_rows = _shared_caption_masks(caption_keys, world_size, local_rows, labels)
                logits_per_image = logits_per_image.masked_fill(image_rows, float("-inf"))
                logits_per_text = logits_per_text.masked_fill(text_rows, float("-inf"))

            if negatives is not None:
                text_columns, image_columns = self._negative_columns(
                    negatives, world_size, local_rows, row_ids
                )
                logits_per_image = _with_negative_columns(
                    logits_per_image, row_image, logit_scale, text_columns
                )
                logits_per_text = _with_negative_columns(
                    logits_per_text, row_text, logit_scale, image_columns
                )

            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def _negative_columns(
        self, negatives: HardNegatives, world_size: int, local_rows: bool, row_ids: Tensor | None
    ) -> tuple[_NegativeColumns | None, _NegativeColumns | None]:
        device = (negatives.text if negatives.text is not None else negatives.image).device

        def rows_of(tensor: Tensor | None) -> Tensor | None:
            # Row-aligned per-row tensors: this rank's rows, or every rank's for the full matrix.
            if tensor is None or local_rows or world_size == 1:
                return tensor
            return _gather_key_rows(tensor.to(device), world_size)

        text_columns = image_columns = None
        if negatives.text is not None and negatives.text.shape[1] > 0:
            negatives_text = _full_precision(negatives.text)[0]
            text_columns = _negative_columns(
                negatives_text,
                negatives.text_valid,
                negatives.text_keys,
                rows_of(negatives.row_text_keys),
                world_size,
                self._gather,
            )
        if negatives.image is not None and negatives.image.shape[1] > 0:
            negatives_image = _full_precision(negatives.image)[0]
            image_columns = _negative_columns(
                negatives_image,
                negatives.image_valid,
                negatives.image_ids,
                _as_key_rows(row_ids),
                world_size,
                self._gather,
            )
        return text_columns, image_columns


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid (SigLIP) loss with negatives from every rank.

    Sum over (local image, any text) pairs of -log sigmoid(label * logit), label +1 for a row's own text and -1
    otherwise, divided by the local batch size (open_clip's normalisation).

    Args:
        gather: use every rank's texts as negatives; False keeps in-rank pairs only.
        dist_impl: "gather" all-gathers the texts once (`[world*B, D]`, one `[B, world*B]` logits block);
            "ring" passes text blocks around the ranks with neighbour exchange (open_clip's "shift" scheme),
            so no step needs every rank's embeddings in one buffer. Under autograd both keep every block alive
            for the backward, so their peak memory is alike; the ring trades one collective for
            `world_size - 1` point-to-point steps.
    """

    def __init__(self, gather: bool = True, dist_impl: Literal["gather", "ring"] = "gather") -> None:
        super().__init__()
        if dist_impl not in ("gather", "ring"):
            raise ValueError(f"SigLIPLoss: dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
        self.gather = gather
        self.dist_impl = dist_impl

    @staticmethod
    def _pair_loss_sum(
        image_emb: Tensor,
        text_block: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        positive_cols: Tensor | None,
        dropped: Tensor | None,
    ) -> Tensor:
        """Sum of -log sigmoid(label * logit) over `[B, C]` pairs; `positive_cols[i]` is row i's positive (or None)."""
        logits = (logit_scale * image_emb) @ text_block.T + logit_bias  # [B, C]
        labels = torch.full_like(logits, -1.0)
        if positive_cols is not None:
            labels[torch.arange(len(positive_cols), device=logits.device), positive_cols] = 1.0
        terms = -F.logsigmoid(labels * logits)  # [B, C]
        if dropped is not None:
            terms = terms.masked_fill(dropped, 0.0)
        return terms.sum()

    @staticmethod
    def _hard_negative_sum(
        image_emb: Tensor,
        text_emb: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        sample_ids: Tensor | None,
        negatives: HardNegatives,
        world_size: int,
    ) -> Tensor:
        """Sum of -log sigmoid(-logit) over local rows against every rank's hard negatives of the other modality."""
        total = image_emb.new_zeros(())
        pairs = []
        if negatives.text is not None and negatives.text.shape[1] > 0:
            columns = _negative_columns(
                _full_precision(negatives.text)[0], negatives.text_valid, negatives.text_keys,
                negatives.row_text_keys, world_size, distributed.all_gather_with_grad,
            )  # fmt: skip
            pairs.append((image_emb, columns))
        if negatives.image is not None and negatives.image.shape[1] > 0:
            columns = _negative_columns(
                _full_precision(negatives.image)[0], negatives.image_valid, negatives.image_ids,
                _as_key_rows(sample_ids), world_size, distributed.all_gather_with_grad,
            )  # fmt: skip
            pairs.append((text_emb, columns))
        for rows, columns in pairs:
            logits = (logit_scale * rows) @ columns.emb.T + logit_bias  # [B, M]
            terms = -F.logsigmoid(-logits)
            total = total + terms.masked_fill(columns.excluded.expand_as(terms), 0.0).sum()
        return total

    def forward(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        sample_ids: Tensor | None = None,
        negatives: HardNegatives | None = None,
        caption_keys: CaptionKeys | None = None,
    ) -> Tensor:
        """Sigmoid loss of this rank's images against every rank's texts.

        Args:
            image_emb: `[B, D]` normalised image embeddings; row i is paired with text row i.
            text_emb: `[B, D]` normalised text embeddings.
            logit_scale: scalar, already exponentiated.
            logit_bias: scalar bias added to every logit.
            sample_ids: optional `[B]` integer ids; pairs that share an id (other than a row's own pair) are
                dropped from the sum.
            negatives: optional hard negatives (`HardNegatives`, "gather" only): every (local image, gathered
                text negative) and (local text, gathered image negative) pair joins the sum as a negative pair.
            caption_keys: optional `CaptionKeys`; a pair whose caption describes the image (other than a row's
                own pair) is dropped from the sum.

        Returns:
            scalar loss.
        """
        with _no_autocast(image_emb.device):
            image_emb, text_emb, logit_scale, logit_bias = _full_precision(
                image_emb, text_emb, logit_scale, logit_bias
            )
            world_size = distributed.get_world_size() if self.gather else 1
            rank = distributed.get_rank() if world_size > 1 else 0
            batch = image_emb.shape[0]
            own_cols = torch.arange(batch, device=image_emb.device)
            if sample_ids is not None:
                sample_ids = sample_ids.to(image_emb.device)

            if world_size == 1 or self.dist_impl == "gather":
                all_text = (
                    distributed.all_gather_with_grad(text_emb) if world_size > 1 else text_emb
                )  # [N, D]
                positive_cols = own_cols + rank * batch
                dropped = None
                if sample_ids is not None:
                    all_ids = distributed.all_gather_no_grad(sample_ids) if world_size > 1 else sample_ids
                    dropped = _same_id_off_positive(sample_ids, all_ids, positive_cols)  # [B, N]
                if caption_keys is not None:
                    shared, _ = _shared_caption_masks(caption_keys, world_size, True, positive_cols)
                    dropped = shared if dropped is None else dropped | shared
                total = self._pair_loss_sum(
                    image_emb, all_text, logit_scale, logit_bias, positive_cols, dropped
                )
                if negatives is not None:
                    total = total + self._hard_negative_sum(
                        image_emb, text_emb, logit_scale, logit_bias, sample_ids, negatives, world_size
                    )
                return total / batch
            if negatives is not None:
                raise ValueError("SigLIPLoss: hard negatives need dist_impl='gather'")

            dropped = None if sample_ids is None else _same_id_off_positive(sample_ids, sample_ids, own_cols)
            image_keys = key_block = None
            if caption_keys is not None:
                image_keys = caption_keys.image.to(image_emb.device)
                key_block = caption_keys.text.to(image_emb.device)
                shared = _describes(image_keys, key_block)
                shared[own_cols, own_cols] = False
                dropped = shared if dropped is None else dropped | shared
            total = self._pair_loss_sum(image_emb, text_emb, logit_scale, logit_bias, own_cols, dropped)
            right, left = (rank + 1) % world_size, (rank - 1) % world_size
            text_block, id_block = text_emb, sample_ids
            for _ in range(world_size - 1):
                # After step k this rank holds rank (rank - k)'s texts: every pair is negative.
                text_block = distributed.neighbour_exchange(text_block, send_to=right, recv_from=left)
                dropped = None
                if sample_ids is not None:
                    id_block = distributed.neighbour_exchange(id_block, send_to=right, recv_from=left)
                    dropped = sample_ids[:, None] == id_block[None, :]  # [B, B]
                if key_block is not None:
                    key_block = distributed.neighbour_exchange(key_block, send_to=right, recv_from=left)
                    shared = _describes(image_keys, key_block)  # [B, B]
                    dropped = shared if dropped is None else dropped | shared
                total = total + self._pair_loss_sum(
                    image_emb, text_block, logit_scale, logit_bias, None, dropped
                )
            return total / batch


def _masked_value(dtype: torch.dtype) -> float:
    # The most negative finite value rather than -inf: it vanishes in logsumexp exactly as -inf does, but a
    # query whose negatives are all masked gets a finite logsumexp and a NaN-free backward.
    return torch.finfo(dtype).min


def _check_listwise_inputs(scores: Tensor, *masks: Tensor | None) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [Q, C], got shape {tuple(scores.shape)}")
    for mask in masks:
        if mask is not None and mask.shape != scores.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match scores {tuple(scores.shape)}")


def listwise_infonce_loss(
    scores: Tensor,
    positive_mask: Tensor | None = None,
    temperature: float = 1.0,
    candidate_mask: Tensor | None = None,
    positive_aggregation: Literal["mean", "logsumexp"] = "mean",
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Listwise softmax loss over each query's candidates, with one or several positives.

    With one positive per query both aggregations equal `F.cross_entropy(scores / temperature, positive)`.
    With several positives:

    - "mean" (default): the average over the query's positives p of
      `-log(exp(s_p) / (exp(s_p) + sum_negatives exp(s_n)))`. Every positive is pushed above every negative
      on its own, and positives never compete with each other — what precision@k needs when a query has
      several relevant candidates.
    - "logsumexp": `-log(sum_positives exp(s_p) / sum_all exp(s_c))`. Satisfied as soon as ONE positive
      dominates, so the other positives get little gradient (it can lower precision@5).

    Args:
        scores: `[Q, C]` reranker scores (logits).
        positive_mask: bool `[Q, C]`; None means column 0 is the single positive (the `[Q, 1+K]` layout).
        temperature: scores are divided by it.
        candidate_mask: optional bool `[Q, C]`; False marks padding that is neither positive nor negative.
        positive_aggregation: "mean" or "logsumexp", see above.
        reduction: "mean" over queries that have at least one positive, or "none" for `[Q]` per-query losses
            (0 where a query has no positive).

    Returns:
        scalar (or `[Q]`) loss.
    """
    _check_listwise_inputs(scores, positive_mask, candidate_mask)
    if positive_aggregation not in ("mean", "logsumexp"):
        raise ValueError(f"positive_aggregation must be 'mean' or 'logsumexp', got {positive_aggregation!r}")
    if positive_mask is None:
        positive_mask = torch.zeros_like(scores, dtype=torch.bool)
        positive_mask[:, 0] = True
    valid = torch.ones_like(positive_mask) if candidate_mask is None else candidate_mask.bool()
    positives = positive_mask.bool() & valid  # [Q, C]
    negatives = valid & ~positives  # [Q, C]
    fill = _masked_value(scores.dtype)

    logits = scores / temperature  # [Q, C]
    num_positives = positives.sum(dim=1)  # [Q]
    if positive_aggregation == "mean":
        negative_lse = torch.logsumexp(logits.masked_fill(~negatives, fill), dim=1, keepdim=True)  # [Q, 1]
        positive_logits = logits.masked_fill(~positives, 0.0)  # [Q, C]; zeros keep the backward finite
        per_positive = torch.logaddexp(positive_logits, negative_lse) - positive_logits  # [Q, C]
        per_query = (per_positive * positives).sum(dim=1) / num_positives.clamp(min=1)  # [Q]
    else:
        all_lse = torch.logsumexp(logits.masked_fill(~valid, fill), dim=1)  # [Q]
        positive_lse = torch.logsumexp(logits.masked_fill(~positives, fill), dim=1)  # [Q]
        per_query = all_lse - positive_lse

    has_positive = num_positives > 0  # [Q]
    per_query = per_query * has_positive
    if reduction == "none":
        return per_query
    return per_query.sum() / has_positive.sum().clamp(min=1)


def binary_cross_entropy_loss(
    scores: Tensor,
    positive_mask: Tensor,
    candidate_mask: Tensor | None = None,
    pos_weight: float | None = None,
) -> Tensor:
    """Pointwise BCE-with-logits over every (query, candidate) pair, averaged over non-padding candidates.

    Args:
        scores: `[Q, C]` reranker logits.
        positive_mask: bool `[Q, C]` relevance labels.
        candidate_mask: optional bool `[Q, C]`; False marks padding, left out of the mean.
        pos_weight: optional weight of the positive terms (to offset many negatives per positive).

    Returns:
        scalar loss.
    """
    _check_listwise_inputs(scores, positive_mask, candidate_mask)
    weight = (
        None if pos_weight is None else torch.as_tensor(pos_weight, dtype=scores.dtype, device=scores.device)
    )
    terms = F.binary_cross_entropy_with_logits(
        scores, positive_mask.to(scores.dtype), pos_weight=weight, reduction="none"
    )  # [Q, C]
    if candidate_mask is None:
        return terms.mean()
    candidate_mask = candidate_mask.bool()
    return (terms * candidate_mask).sum() / candidate_mask.sum().clamp(min=1)


class ListwiseLoss(nn.Module):
    """Module form of `listwise_infonce_loss` for reranker configs (arguments as there)."""

    def __init__(
        self, temperature: float = 1.0, positive_aggregation: Literal["mean", "logsumexp"] = "mean"
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"ListwiseLoss: temperature must be > 0, got {temperature}")
        if positive_aggregation not in ("mean", "logsumexp"):
            raise ValueError(
                f"ListwiseLoss: positive_aggregation must be 'mean' or 'logsumexp', got {positive_aggregation!r}"
            )
        self.temperature = temperature
        self.positive_aggregation = positive_aggregation

    def forward(
        self, scores: Tensor, positive_mask: Tensor | None = None, candidate_mask: Tensor | None = None
    ) -> Tensor:
        """Scalar listwise loss of `[Q, C]` scores (see `listwise_infonce_loss`)."""
        return listwise_infonce_loss(
            scores, positive_mask, self.temperature, candidate_mask, self.positive_aggregation
        )


def truncate_embeddings(emb: Tensor, dim: int) -> Tensor:
    """The first `dim` coordinates of `[..., D]` embeddings, L2-normalised (a Matryoshka prefix).

    Normalising before or after truncation gives the same prefix (x[:d] / |x[:d]| is scale invariant), so
    already-normalised embeddings (what the towers return) and raw ones are truncated alike, gradients too.
    """
    emb = _full_precision(emb)[0]
    return F.normalize(emb[..., :dim], dim=-1)


class MatryoshkaLoss(nn.Module):
    """Matryoshka representation learning over a dual-encoder loss (Kusupati et al., 2022).

    The sum over `dims` of `weight * loss(prefix_d(image_emb), prefix_d(text_emb), ...)`, where `prefix_d` keeps
    the first d coordinates and re-normalises (`truncate_embeddings`); every other argument (logit scale and
    bias, sample ids, caption keys, gathered negatives) is passed unchanged, and hard negatives are truncated
    like the batch. This is sentence-transformers' `MatryoshkaLoss` (weighted sum, not mean) for InfoNCE /
    SigLIP; the wrapped loss gathers across ranks once per dim.

        loss = MatryoshkaLoss(InfoNCELoss(), dims=(512, 256, 128, 64))(image_emb, text_emb, logit_scale.exp())

    Args:
        loss: the wrapped `InfoNCELoss` or `SigLIPLoss` (any loss taking image and text embeddings first).
        dims: the prefix widths, strictly decreasing and positive (each at most the embedding width).
        weights: one weight per dim (default: all 1).
    """

    def __init__(self, loss: nn.Module, dims: tuple[int, ...] | list[int], weights=None) -> None:
        super().__init__()
        dims = tuple(int(d) for d in dims)
        weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(dims)
        if not dims or any(d < 1 for d in dims) or any(a <= b for a, b in zip(dims, dims[1:])):
            raise ValueError(
                f"MatryoshkaLoss: dims must be positive and strictly decreasing, got {list(dims)}"
            )
        if len(weights) != len(dims):
            raise ValueError(f"MatryoshkaLoss: {len(weights)} weights for {len(dims)} dims")
        self.loss = loss
        self.dims = dims
        self.weights = weights

    def terms(
        self, image_emb: Tensor, text_emb: Tensor, *args, negatives: HardNegatives | None = None, **kwargs
    ) -> dict[int, Tensor]:
        """The unweighted loss at each dim, `{d: scalar}`."""
        if self.dims[0] > image_emb.shape[-1]:
            raise ValueError(
                f"MatryoshkaLoss: dim {self.dims[0]} exceeds the embedding width {image_emb.shape[-1]}"
            )
        out = {}
        for dim in self.dims:
            dim_negatives = None
            if negatives is not None:
                dim_negatives = negatives.with_embeddings(
                    None if negatives.text is None else truncate_embeddings(negatives.text, dim),
                    None if negatives.image is None else truncate_embeddings(negatives.image, dim),
                )
            out[dim] = self.loss(
                truncate_embeddings(image_emb, dim),
                truncate_embeddings(text_emb, dim),
                *args,
                negatives=dim_negatives,
                **kwargs,
            )
        return out

    def forward(
        self, image_emb: Tensor, text_emb: Tensor, *args, negatives: HardNegatives | None = None, **kwargs
    ) -> Tensor:
        """Weighted sum of the wrapped loss over the prefixes (arguments as the wrapped loss's)."""
        terms = self.terms(image_emb, text_emb, *args, negatives=negatives, **kwargs)
        return sum(weight * terms[dim] for dim, weight in zip(self.dims, self.weights))
