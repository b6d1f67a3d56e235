"""CrossEncoder: the reranker LightningModule — a caption and an image read together, one relevance score.

    mmret fit -c experiments/shapes_reranker.yaml

Network: the two towers of an open_clip model (initialised from a trained dual-encoder checkpoint, or any
open_clip name / JSON config / `test-*` config) give text token states and image patch tokens; a few fusion
layers (`mmret.models.fusion.FusionScorer`: text self-attention + cross-attention to the patches) and a score
head turn each (text, image) pair into a logit. Either tower can be frozen. What the fusion sees of an image is
configurable: the tower's final patch tokens, plus its patch embeddings (`fusion_patch_embeddings`), plus the
tokens of a small trainable convolutional stem on the pixels (`fusion_pixel_stem`), with fixed 2-D sin-cos
positions of the patch grid (`fusion_grid_positions`) and/or a learned position embedding
(`fusion_image_positions`) added.

Training signal (the ALBEF / BLIP recipe): every positive pair of the batch gets `num_negatives` hard negatives
per direction — for a caption, images; for an image, captions — drawn from the batch gathered from ALL ranks,
in proportion to softmax(similarity / temperature) of the towers' pooled embeddings (the dual encoder's own
similarity while the towers are frozen), never a candidate with the query's sample id. Candidates with the
query's exact caption are true positives too (shapes draws many images of one description), so they are marked
positive, not negative, and the default listwise InfoNCE (`mmret.losses.listwise_infonce_loss`, "mean" over
positives) treats every one of them as a positive; `loss: bce` is the pointwise alternative. Under DDP the
negatives come from world_size × B candidates and the tokens are gathered with gradient, like the dual
encoder's embeddings. Offline negatives from `mmret mine` join them when the data module is given the mined
file (`data.mined_negatives`, see mmret.data.mined_negatives): each sample brings k mined images and k mined captions
from the whole training set — the swapped bindings and orders a batch of 64 rarely contains — scored as
extra negatives of its caption and of its image. Compositional perturbations of each caption
(`data.caption_negatives`, mmret.data.perturb) are scored as extra negatives of its image in the same way, so
the reranker still has hard lists to learn from when the first stage already ranks the batch right; the
contrastive term below sees them too. With unfrozen towers, `contrastive_weight` adds the dual
encoder's InfoNCE on the towers' pooled embeddings over the gathered batch (ALBEF's image-text contrastive
term beside its matching loss), which keeps the towers' embedding space and lets them go on learning.

The network scores each pair independently, so a pair's score never depends on the other candidates in the
batch: `mmret eval --reranker` can rescore any top-K list in any order and batch size.

LoRA (`lora: {rank, alpha, dropout, targets, unlock}`, `mmret.models.lora`) adapts the towers only: their
weights stay as loaded and low-rank adapters on their attention / MLP layers train instead (plus `unlock`: the
logit scale, the towers' projections). The fusion layers, the score head, the pixel stem and the first-stage
scale are created here, randomly initialised, so they always train in full: an adapter on a random layer would
only restrict it. Checkpoints hold the adapters beside the tower weights; `from_checkpoint` and `mmret export`
merge them, so an exported reranker is a plain one (`lora: null` in its config).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from mmret import distributed
from mmret.errors import UsageError
from mmret.evaluation.retrieval import EvalSetEmbedder, caption_hash, evaluation_metrics
from mmret.losses import CaptionKeys, HardNegatives, InfoNCELoss, ListwiseLoss, binary_cross_entropy_loss
from mmret.mining.in_batch import sample_hard_negatives
from mmret.models import (
    create_model,
    create_transforms,
    get_tokenizer,
    lock_image_tower,
    lock_text_tower,
    param_groups_for_weight_decay,
)
from mmret.models.fusion import FusionScorer, PixelStem, image_tokens, text_tokens, tower_widths
from mmret.models.lora import LoraSettings, apply_lora, has_lora, merge_lora
from mmret.training.checkpoint_io import (
    hyperparameters_for,
    is_checkpoint_path,
    load_weights,
    read_checkpoint,
)
from mmret.training.fsdp import (
    GatheredDuringValidation,
    average_replicated_gradients,
    clip_sharded_gradients,
    shard_options_of,
    shard_reranker,
)
from mmret.training.schedule import warmup_cosine, warmup_length


class CrossEncoder(LightningModule):
    """Cross-encoder reranker: fusion layers over open_clip text tokens and image patches, trained with
    hard negatives gathered from every rank.

    Args:
        model: open_clip model name, an mmret `test-*` config or a JSON config path for the towers, when no
            `dual_encoder` is given; with one, leave it out (the checkpoint names its towers; a different name is
            refused).
        pretrained: open_clip pretrained tag or local weights for `model`. None: random init.
        dual_encoder: A dual-encoder checkpoint (`mmret fit` with mmret.training.DualEncoder) whose trained towers
            initialise this reranker's towers.
        lock_image: Freeze the image tower.
        lock_text: Freeze the text tower.
        fusion_width: Width of the fusion layers.
        fusion_layers: Number of fusion layers (text self-attention + cross-attention to image patches + MLP).
        fusion_heads: Attention heads per fusion layer.
        fusion_image_positions: Give the fusion layers a learned position embedding of the image tokens (the
            final patch tokens of a frozen CLS-pooled ViT keep little of their position).
        fusion_grid_positions: Add fixed 2-D sin-cos features of each patch's row and column to the image tokens
            in the fusion (`mmret.models.fusion.grid_position_features`): where a patch is, readable from the
            first step. With them the shapes reranker learns word order and binding; with the learned
            embedding alone its fusion stayed on a plateau (README, "Reranking").
        fusion_patch_embeddings: Give the fusion each patch's input embedding (the image tower's `ln_pre`
            output: that patch's own pixels and place) beside its final token, concatenated.
        fusion_pixel_stem: Give the fusion a small convolutional network of its own, trained with it, that reads
            the image's pixels and adds a token per patch (`mmret.models.fusion.PixelStem`, fusion_width wide),
            concatenated to the tower's tokens — local shape evidence that does not depend on what the frozen
            tower learnt to tell apart.
        augment: Train on the towers' training transform (open_clip's random resized crop); False: on the
            evaluation transform, the exact images the reranker will score.
        num_negatives: Hard negatives per positive pair and direction.
        directions: "both": captions rank images and images rank captions; "text_to_image": only the first.
        negative_sampling: "similarity" (∝ softmax of similarity / sampling_temperature, ALBEF), "hardest"
            (top-K by similarity) or "uniform".
        sampling_temperature: Temperature of similarity sampling, on cosine similarities.
        gather: Draw negatives from the batch of every rank (effective candidates = world_size × batch_size).
        loss: "listwise" (InfoNCE over [positives, negatives], every positive counted) or "bce" (pointwise).
        temperature: Listwise loss temperature on the scores.
        positive_aggregation: Listwise loss with several positives: "mean" (each positive against the
            negatives) or "logsumexp" (one positive suffices).
        bce_pos_weight: BCE weight of positive pairs (None: 1).
        first_stage_residual: Add `scale × cosine(pooled text, pooled image)` of the towers to the fusion
            score, with a learned scale initialised to the dual encoder's logit scale: the reranker starts
            from the dual encoder's ranking and its fusion layers learn the corrections.
        contrastive_weight: w > 0 adds w × the dual encoder's InfoNCE loss on the towers' pooled embeddings over
            the (gathered) batch, ALBEF's image-text contrastive term: with unfrozen towers it keeps their
            embedding space, which the fusion's gradient alone tears apart (experiments/shapes_reranker.yaml
            records the measurement), and the towers keep learning what the dual encoder learns. Needs an
            unfrozen tower.
        mask_shared_captions: In the contrastive term, a caption that also describes another row's image is
            not that image's negative (`mmret.losses.CaptionKeys`), as in DualEncoder.
        lr: Peak AdamW learning rate.
        tower_lr_scale: Learning rate of unfrozen towers as a fraction of `lr`.
        weight_decay: AdamW weight decay (not on norms, biases, embeddings).
        warmup_steps: Linear warmup steps (or, below 1, a fraction of the run's steps), then cosine decay to 0.
        val_top_k: Validation reranks each query's top-K by the towers' own embeddings and logs the reranked
            metrics as `val/image_retrieval_recall@1`, ... (first stage: `val/first_stage/...`).
        lora: LoRA on the towers (`mmret.models.lora.LoraSettings`), e.g. `{rank: 8, alpha: 16, targets: [attn,
            mlp], unlock: [logit_scale]}`: the tower weights are frozen and only their adapters (and `unlock`)
            train, at `lr × tower_lr_scale` like any tower parameter (LoRA usually wants tower_lr_scale near 1);
            the fusion layers, score head, pixel stem and first-stage scale are new and train in full. `targets`
            picks towers ("image", "text"), layer kinds ("attn", "mlp") and/or module-name patterns inside the
            towers; a tower locked by `lock_image` / `lock_text` gets no adapters (targets that leave no unlocked
            tower are refused). None: unlocked towers train in full.
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        dual_encoder: str | None = None,
        lock_image: bool = False,
        lock_text: bool = False,
        fusion_width: int = 256,
        fusion_layers: int = 2,
        fusion_heads: int = 4,
        fusion_image_positions: bool = False,
        fusion_grid_positions: bool = False,
        fusion_patch_embeddings: bool = False,
        fusion_pixel_stem: bool = False,
        augment: bool = True,
        num_negatives: int = 7,
        directions: Literal["both", "text_to_image"] = "both",
        negative_sampling: Literal["similarity", "hardest", "uniform"] = "similarity",
        sampling_temperature: float = 0.05,
        gather: bool = True,
        loss: Literal["listwise", "bce"] = "listwise",
        temperature: float = 1.0,
        positive_aggregation: Literal["mean", "logsumexp"] = "mean",
        bce_pos_weight: float | None = None,
        first_stage_residual: bool = True,
        contrastive_weight: float = 0.0,
        mask_shared_captions: bool = True,
        lr: float = 3e-4,
        tower_lr_scale: float = 0.1,
        weight_decay: float = 0.05,
        warmup_steps: int | float = 50,
        val_top_k: int = 10,
        lora: dict | None = None,
    ) -> None:
        super().__init__()
        if loss not in ("listwise", "bce"):
            raise UsageError(f"model.loss is {loss!r}; expected 'listwise' or 'bce'")
        if directions not in ("both", "text_to_image"):
            raise UsageError(f"model.directions is {directions!r}; expected 'both' or 'text_to_image'")
        if negative_sampling not in ("similarity", "hardest", "uniform"):
            raise UsageError(
                f"model.negative_sampling is {negative_sampling!r}; expected similarity|hardest|uniform"
            )
        if num_negatives < 1:
            raise UsageError(f"model.num_negatives is {num_negatives}; expected an integer >= 1")
        if sampling_temperature <= 0 or temperature <= 0:
            raise UsageError("model.sampling_temperature and model.temperature must be > 0")
        if contrastive_weight < 0:
            raise UsageError(f"model.contrastive_weight is {contrastive_weight}; expected a number >= 0")
        if contrastive_weight > 0 and lock_image and lock_text:
            raise UsageError(
                "model.contrastive_weight > 0 trains the towers; unlock one (model.lock_image/lock_text)"
            )
        self.save_hyperparameters()
        warmup_length(warmup_steps, 1)  # a bad value is refused now, not when training starts
        if dual_encoder is not None:
            from mmret.training.dual_encoder import DualEncoder

            self.model = DualEncoder.from_checkpoint(dual_encoder).model.train()  # loaded in eval mode
            # The architecture name comes from the checkpoint itself: under LightningCLI the DualEncoder built
            # inside this constructor would record this module's hyperparameters as its own.
            self.tower_name = read_checkpoint(dual_encoder, "dual_encoder")["mmret"]["model"]
            if model is not None and model != self.tower_name:
                raise UsageError(
                    f"model.model is {model} but the towers of model.dual_encoder {dual_encoder} are "
                    f"{self.tower_name}; leave model.model out (the checkpoint names its towers)"
                )
        elif model is None:
            raise UsageError(
                "the reranker has no towers: set model.dual_encoder (a dual-encoder checkpoint: its towers and "
                "their architecture) or model.model (an architecture name, e.g. test-vit-tiny)"
            )
        else:
            self.model = create_model(model, pretrained)
            self.tower_name = model
        if lock_image:
            lock_image_tower(self.model, 0, True)
        if lock_text:
            lock_text_tower(self.model, 0, True)
        if lora is not None:  # adapters on the unlocked towers; from_checkpoint / export merge them
            settings = _tower_lora(lora, lock_image, lock_text)
            try:
                apply_lora(self.model, settings)
            except ValueError as error:  # targets that select no layer of these towers
                raise UsageError(f"model.lora: {error} (towers {self.tower_name})") from None
        try:
            text_width, image_width, num_patches = tower_widths(self.model, fusion_patch_embeddings)
        except ValueError as error:  # towers the fusion cannot read
            raise UsageError(f"reranker towers {self.tower_name}: {error}") from None
        self.pixel_stem = None
        if fusion_pixel_stem:
            patch = getattr(self.model.visual, "patch_size", None)
            patch = patch[0] if isinstance(patch, (tuple, list)) else patch
            try:
                self.pixel_stem = PixelStem(int(patch or 0), fusion_width)
            except ValueError as error:
                tower = type(self.model.visual).__name__
                raise UsageError(f"model.fusion_pixel_stem: {error} (image tower {tower})") from None
            image_width += fusion_width
        self.fusion = FusionScorer(
            text_width, image_width, fusion_width, fusion_layers, fusion_heads,
            image_positions=num_patches if fusion_image_positions else 0,
            image_grid=_patch_grid(self.model, num_patches) if fusion_grid_positions else None,
        )  # fmt: skip
        if first_stage_residual:
            logit_scale = getattr(self.model, "logit_scale", None)
            initial = float(logit_scale.detach().exp()) if isinstance(logit_scale, torch.Tensor) else 10.0
            self.first_stage_scale = torch.nn.Parameter(torch.tensor(initial))
        self.listwise = ListwiseLoss(temperature, positive_aggregation)
        self.contrastive = InfoNCELoss(gather=gather) if contrastive_weight > 0 else None
        self._tokenizer = None
        self._val_embedder: EvalSetEmbedder | None = None
        self._val_gather = GatheredDuringValidation()
        self._val_patches: dict[int, Tensor] = {}
        self._sharded_root = None  # FSDP2 (`shard`): the root the parts are called through; not a submodule

    # ---- network -----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # FSDP2 (strategy fsdp2, or Lightning's ModelParallelStrategy)
        options = shard_options_of(self._trainer.strategy if self._trainer is not None else None)
        if options is not None and self._sharded_root is None:
            self.shard(**options)

    def shard(self, **options) -> None:
        """FSDP2 in place (`mmret.training.fsdp.shard_reranker`): each tower block and fusion layer a unit, the
        rest under one root that encoding and scoring then run through; the 0-dim scales stay replicated
        (`on_after_backward` averages their gradients). Options: mesh, mixed_precision, reshard_after_forward."""
        root = shard_reranker(self.model, self.fusion, self.pixel_stem, **options)
        object.__setattr__(self, "_sharded_root", root)  # not registered: parameter names stay as they are

    def _through_root(self, fn, *args):
        return fn(*args) if self._sharded_root is None else self._sharded_root(fn, *args)

    def on_after_backward(self) -> None:
        if self._sharded_root is not None:  # logit_scale, first_stage_scale: replicated, averaged as DDP does
            average_replicated_gradients(self)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if self._sharded_root is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        group = self.trainer.strategy.device_mesh["data_parallel"].get_group()
        clip_sharded_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm, group)

    @property
    def tokenizer(self):
        """The towers' tokenizer (list[str] -> token tensor), built once."""
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.model)
        return self._tokenizer

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W] -> pooled normalised embedding [B, D], the fusion's image tokens [B, P, Wv]
        (the tower's final patch tokens, then its patch embeddings and the pixel stem's tokens if enabled)."""
        return self._through_root(self._encode_images, images)

    def _encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pooled, tokens = image_tokens(self.model, images, self.hparams.fusion_patch_embeddings)
        if self.pixel_stem is None:
            return pooled, tokens
        stem = self.pixel_stem(images)  # [B, P', W]
        if stem.shape[1] != tokens.shape[1]:
            raise ValueError(f"pixel stem gives {stem.shape[1]} tokens, the image tower {tokens.shape[1]}")
        return pooled, torch.cat([tokens, stem.to(tokens.dtype)], dim=-1)

    def encode_texts(self, text: Tensor | Mapping | list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens [B, L] (or caption strings) -> pooled embedding [B, D], states [B, L, Wt], mask [B, L]."""
        if isinstance(text, list):
            text = self.tokenizer(text)
        if isinstance(text, Mapping):
            text = text["input_ids"]
        return self._through_root(text_tokens, self.model, text.to(self.device))

    def score_tokens(
        self,
        text_states: Tensor,
        text_mask: Tensor,
        patch_tokens: Tensor,
        image_index: Tensor | None = None,
        text_emb: Tensor | None = None,
        image_emb: Tensor | None = None,
    ) -> Tensor:
        """Relevance logits [B] of B (text, image) pairs given as tower outputs.

        Args:
            text_states, text_mask: [B, L, Wt] token states and [B, L] real-token mask of each pair's text.
            patch_tokens: [N, P, Wv] image patch tokens.
            image_index: [B] row of pair i's image in `patch_tokens` / `image_emb` (shared images are
                projected once); None: pair i has image i.
            text_emb, image_emb: [B, D] and [N, D] pooled normalised tower embeddings, needed with
                `first_stage_residual`.
        """
        scores = self._through_root(self.fusion, text_states, text_mask, patch_tokens, image_index)  # [B]
        if not self.hparams.first_stage_residual:
            return scores
        if text_emb is None or image_emb is None:
            raise ValueError("this reranker adds the towers' cosine similarity: pass text_emb and image_emb")
        if image_index is not None:
            image_emb = image_emb[image_index]
        return scores + self.first_stage_scale * (text_emb.to(scores.dtype) * image_emb.to(scores.dtype)).sum(
            -1
        )

    def score(self, captions: list[str], images: Tensor) -> Tensor:
        """Relevance logits [B] of B (caption, image) pairs."""
        text_emb, states, mask = self.encode_texts(captions)
        image_emb, patches = self.encode_images(images.to(self.device))
        return self.score_tokens(states, mask, patches, text_emb=text_emb, image_emb=image_emb)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_preprocess"):
            datamodule.set_preprocess(
                image_transform=create_transforms(self.model, train=self.hparams.augment),
                tokenizer=self.tokenizer,
                eval_image_transform=create_transforms(self.model, train=False),
            )

    # ---- training ----------------------------------------------------------------------------------------
    def _gather(self, tensor: Tensor) -> Tensor:
        if not self.hparams.gather:
            return tensor
        return distributed.all_gather_with_grad(tensor) if tensor.requires_grad else _gather_plain(tensor)

    def _listwise_scores(
        self,
        query_emb: Tensor,
        query_ids: Tensor,
        query_captions: Tensor,
        candidate_emb: Tensor,
        candidate_ids: Tensor,
        candidate_captions: Tensor,
        positive_rows: Tensor,
        score_pairs,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Scores [Q, 1+K] of each query's [own positive, K sampled candidates] and their masks."""
        similarity = query_emb.detach() @ candidate_emb.detach().t()  # [Q, N]
        negatives, valid = sample_hard_negatives(
            similarity, query_ids, candidate_ids, self.hparams.num_negatives, self.hparams.negative_sampling,
            self.hparams.sampling_temperature,
        )  # fmt: skip
        columns = torch.cat([positive_rows[:, None], negatives], dim=1)  # [Q, 1+K] candidate rows
        candidate_mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)  # [Q, 1+K]
        positive_mask = (candidate_captions[columns] == query_captions[:, None]) & candidate_mask
        positive_mask[:, 0] = True
        scores = score_pairs(columns)  # [Q, 1+K]
        return scores, positive_mask, candidate_mask

    def _loss(self, scores: Tensor, positive_mask: Tensor, candidate_mask: Tensor) -> Tensor:
        if self.hparams.loss == "bce":
            return binary_cross_entropy_loss(
                scores, positive_mask, candidate_mask, self.hparams.bce_pos_weight
            )
        return self.listwise(scores, positive_mask, candidate_mask)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, text, sample_id = batch["image"], batch["text"], batch["sample_id"]
        captions = torch.tensor(
            [caption_hash(c) for c in batch["caption"]], dtype=torch.long, device=sample_id.device
        )  # [B]
        batch_size = images.shape[0]
        image_emb, patches = self.encode_images(images)  # [B, D], [B, P, Wv]
        text_emb, states, mask = self.encode_texts(text)  # [B, D], [B, L, Wt], [B, L]
        all_image_emb, all_text_emb = self._gather(image_emb.detach()), self._gather(text_emb.detach())
        all_patches, all_states = self._gather(patches), self._gather(states)  # [N, P, Wv], [N, L, Wt]
        all_mask = self._gather(mask.long()).bool()  # bool tensors do not travel through every backend
        all_ids, all_captions = self._gather(sample_id), self._gather(captions)
        offset = distributed.get_rank() * batch_size if self.hparams.gather else 0
        own_rows = torch.arange(batch_size, device=images.device) + offset  # this rank's rows in the gathered

        def text_to_image(columns: Tensor) -> Tensor:  # columns [B, C] image rows -> scores [B, C]
            count = columns.shape[1]
            flat = self.score_tokens(
                states.repeat_interleave(count, 0), mask.repeat_interleave(count, 0), all_patches, columns.flatten(),
                text_emb.detach().repeat_interleave(count, 0), all_image_emb,
            )  # fmt: skip
            return flat.view(batch_size, count)

        scores, positives, valid = self._listwise_scores(
            text_emb, sample_id, captions, all_image_emb, all_ids, all_captions, own_rows, text_to_image
        )
        if "mined_image" in batch:  # offline negatives of `mmret mine`, scored beside the in-batch ones
            mined_images, mined_valid = batch["mined_image"], batch["mined_image_valid"]  # [B, k, 3, H, W]
            count = mined_images.shape[1]
            mined_emb, mined_patches = self.encode_images(mined_images.flatten(0, 1))  # [B * k, P, Wv]
            mined_scores = self.score_tokens(
                states.repeat_interleave(count, 0), mask.repeat_interleave(count, 0), mined_patches, None,
                text_emb.detach().repeat_interleave(count, 0), mined_emb.detach(),
            ).view(batch_size, count)  # fmt: skip
            scores, positives, valid = _append_negatives(scores, positives, valid, mined_scores, mined_valid)
        loss = self._loss(scores, positives, valid)
        self.log("train/loss_text_to_image", loss.detach(), batch_size=batch_size)
        perturbed_emb = None
        if self.hparams.directions == "both":

            def image_to_text(columns: Tensor) -> Tensor:  # columns [B, C] text rows -> scores [B, C]
                count, rows = columns.shape[1], columns.flatten()
                own_images = torch.arange(batch_size, device=patches.device).repeat_interleave(count)
                flat = self.score_tokens(
                    all_states[rows],
                    all_mask[rows],
                    patches,
                    own_images,
                    all_text_emb[rows],
                    image_emb.detach(),
                )
                return flat.view(batch_size, count)

            scores_i, positives_i, valid_i = self._listwise_scores(
                image_emb, sample_id, captions, all_text_emb, all_ids, all_captions, own_rows, image_to_text
            )
            # Offline negatives of `mmret mine` and compositional perturbations of the caption
            # (data.caption_negatives): each is scored with its own image only, beside the in-batch ones.
            for field, valid_field in (
                ("mined_text", "mined_text_valid"),
                ("perturbed_text", "perturbed_valid"),
            ):
                if field not in batch:
                    continue
                extra_valid = batch[valid_field]  # [B, k]
                count = extra_valid.shape[1]
                extra_text_emb, extra_states, extra_mask = self.encode_texts(batch[field])  # [B * k, L, Wt]
                if field == "perturbed_text":
                    perturbed_emb = extra_text_emb
                own_images = torch.arange(batch_size, device=patches.device).repeat_interleave(count)
                extra_scores = self.score_tokens(
                    extra_states, extra_mask, patches, own_images, extra_text_emb.detach(), image_emb.detach()
                ).view(batch_size, count)
                scores_i, positives_i, valid_i = _append_negatives(
                    scores_i, positives_i, valid_i, extra_scores, extra_valid
                )
            loss_i = self._loss(scores_i, positives_i, valid_i)
            self.log("train/loss_image_to_text", loss_i.detach(), batch_size=batch_size)
            loss = (loss + loss_i) / 2
        if self.contrastive is not None:
            logit_scale = self.model.logit_scale.exp().clamp(max=100.0)
            negatives = None
            if (
                perturbed_emb is not None
            ):  # the towers' own InfoNCE sees the perturbations too (as the dual does)
                negatives = HardNegatives(
                    text=perturbed_emb.view(batch_size, -1, perturbed_emb.shape[-1]),
                    text_valid=batch["perturbed_valid"].to(image_emb.device),
                    text_keys=batch["perturbed_key"].to(image_emb.device),
                    row_text_keys=batch["caption_keys"].to(image_emb.device),
                )
            caption_keys = None  # captions that describe another row's image too are not its negatives
            if self.hparams.get("mask_shared_captions", True):
                caption_keys = CaptionKeys.from_batch(batch, image_emb.device)
            contrastive = self.contrastive(
                image_emb,
                text_emb,
                logit_scale,
                sample_ids=sample_id,
                negatives=negatives,
                caption_keys=caption_keys,
            )
            self.log("train/loss_contrastive", contrastive.detach(), batch_size=batch_size)
            loss = loss + self.hparams.contrastive_weight * contrastive
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    def optimizer_groups(self) -> list[dict]:
        """AdamW groups: the reranker's own parts (fusion, pixel stem, first-stage scale) at `lr`, the unfrozen
        tower parameters at `lr × tower_lr_scale`; no weight decay on norms, biases, embeddings and scales."""
        head = torch.nn.ModuleList([self.fusion] + ([self.pixel_stem] if self.pixel_stem is not None else []))
        groups = param_groups_for_weight_decay(head, self.hparams.weight_decay)
        if self.hparams.first_stage_residual:
            groups.append({"params": [self.first_stage_scale], "weight_decay": 0.0})
        for group in param_groups_for_weight_decay(self.model, self.hparams.weight_decay):
            groups.append({**group, "lr": self.hparams.lr * self.hparams.tower_lr_scale})
        return groups

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.optimizer_groups(), lr=self.hparams.lr, betas=(0.9, 0.98))
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = warmup_length(self.hparams.warmup_steps, total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total_steps, 0.0)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- validation: retrieve with the towers' embeddings, rerank the top-K ---------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_gather.start(
            self._sharded_root
        )  # sharded: gathered once (ranks embed unequal batch counts)
        self._val_embedder = EvalSetEmbedder(lambda image_emb: image_emb, lambda c: self.encode_texts(c)[0],
                                             device=self.device)  # fmt: skip
        self._val_patches = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image_emb, patches = self.encode_images(batch["image"])  # [B, D], [B, P, Wv]
        self._val_patches.update(zip(batch["sample_id"].tolist(), patches))
        self._val_embedder.add_batch({**batch, "image": image_emb})

    def on_validation_epoch_end(self) -> None:
        try:
            self._validation_metrics()
        finally:
            self._val_gather.stop()

    def _validation_metrics(self) -> None:
        from mmret.evaluation.rerank import PairScorer, two_stage_metrics

        eval_set = self._val_embedder.finish()  # collective: every rank gets here
        patches_of_id, self._val_embedder, self._val_patches = self._val_patches, None, {}
        if eval_set.num_images == 0:
            return
        for name, value in evaluation_metrics(eval_set).items():
            self.log(f"val/first_stage/{name}", float(value), sync_dist=False, rank_zero_only=False)
        if distributed.is_distributed():  # every rank reranks the whole set: gather the other ranks' patches
            local_ids = torch.tensor(list(patches_of_id), dtype=torch.long, device=self.device)
            if patches_of_id:
                local = torch.stack(list(patches_of_id.values()))  # [n, P, Wv]
            else:  # a rank without validation images still joins the collective, with 0 rows of the same shape
                grid = self.model.visual.grid_size
                local = torch.zeros(
                    0, grid[0] * grid[1], self.fusion.image_proj.in_features, device=self.device
                )
            all_ids, all_patches = _gather_plain(local_ids), _gather_plain(local)
            patches_of_id = dict(zip(all_ids.tolist(), all_patches))
        ids = eval_set.image_ids.tolist()
        if eval_set.captions is None or any(i not in patches_of_id for i in ids):
            return
        patches = torch.stack([patches_of_id[i] for i in ids])  # [N, P, Wv]
        scorer = PairScorer.for_images(self, eval_set, patches, eval_set.image_emb, batch_size=256)
        top_k = min(self.hparams.val_top_k, eval_set.num_images)
        reranked, ceiling = two_stage_metrics(eval_set, scorer, top_k)
        for name, value in {**reranked, **{f"ceiling/{k}": v for k, v in ceiling.items()}}.items():
            self.log(f"val/{name}", float(value), sync_dist=False, rank_zero_only=False)

    # ---- checkpoints -------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> CrossEncoder:
        """The trained reranker of a checkpoint, in eval mode on `device`.

        The towers are rebuilt from the architecture name saved in the checkpoint, so neither the dual-encoder
        checkpoint it was initialised from nor any pretrained download is needed.
        """
        checkpoint = read_checkpoint(path, "cross_encoder")
        hparams = hyperparameters_for(cls, checkpoint)
        hparams.update(model=checkpoint["mmret"]["model"], pretrained=None, dual_encoder=None)
        module = cls(**hparams)
        load_weights(module, checkpoint["state_dict"], path)
        if has_lora(module.model):  # LoRA adapters merged: plain towers for eval, search and export
            module.model = merge_lora(module.model, inplace=True)
        return module.to(device).eval()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> CrossEncoder:
        """A reranker from a checkpoint (`from_checkpoint`) or from a folder written by `mmret export`
        (`reranker_config.json` + `reranker_model.safetensors`), in eval mode on `device`."""
        import json

        folder = Path(path)
        if not folder.is_dir() or is_checkpoint_path(folder):  # a file, or a sharded checkpoint folder
            return cls.from_checkpoint(path, device)
        config_path, weights_path = folder / "reranker_config.json", folder / "reranker_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise UsageError(
                f"reranker {path} is a folder without reranker_config.json and reranker_model.safetensors; "
                "expected a reranker .ckpt or a folder written by `mmret export`"
            )
        from safetensors.torch import load_file

        try:
            config = json.loads(config_path.read_text())
            hparams = dict(config["init_args"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UsageError(f"reranker config {config_path} is unreadable ({error}); re-export it") from None
        hparams.update(pretrained=None, dual_encoder=None)
        module = cls(**hparams)
        load_weights(module, load_file(str(weights_path)), weights_path)
        return module.to(device).eval()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # `tower_name` lets `from_checkpoint` rebuild the towers without the dual-encoder checkpoint.
        checkpoint["mmret"] = {"kind": "cross_encoder", "model": self.tower_name}


def _append_negatives(
    scores: Tensor, positives: Tensor, valid: Tensor, extra_scores: Tensor, extra_valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Extend [Q, C] listwise scores and masks by [Q, k] more negatives (never positives; `extra_valid`
    False marks padding)."""
    extra_valid = extra_valid.to(valid.device).bool()
    return (
        torch.cat([scores, extra_scores], dim=1),
        torch.cat([positives, torch.zeros_like(extra_valid)], dim=1),
        torch.cat([valid, extra_valid], dim=1),
    )


def _tower_lora(lora: dict | LoraSettings, lock_image: bool, lock_text: bool) -> LoraSettings:
    """`model.lora` as LoraSettings on the towers the reranker trains: a tower locked by `lock_image` /
    `lock_text` gets no adapters. UsageError in one line for bad settings, or when every tower the targets name
    (no tower named: both) is locked."""
    try:
        settings = LoraSettings.from_value(lora)
    except (TypeError, ValueError) as error:
        raise UsageError(f"model.lora: {error}") from None
    locked = {"image": lock_image, "text": lock_text}
    towers = [target for target in settings.targets if target in locked] or list(locked)
    kept = [tower for tower in towers if not locked[tower]]
    if not kept:
        flags = " and ".join(f"model.lock_{tower}" for tower in towers)
        raise UsageError(
            f"model.lora adapts the {' and '.join(towers)} tower{'s' if len(towers) > 1 else ''}, which {flags} "
            "freeze; unlock one, target an unlocked tower, or leave model.lora out"
        )
    if kept != list(locked):  # name the towers left, so the targets select nothing in a locked one
        settings = dataclasses.replace(
            settings, targets=[*kept, *(target for target in settings.targets if target not in locked)]
        )
    return settings


def _patch_grid(model: torch.nn.Module, num_patches: int) -> tuple[int, int]:
    """(rows, columns) of an open_clip ViT's patch grid, checked against its number of patch tokens."""
    grid = getattr(model.visual, "grid_size", None)
    if grid is None or int(grid[0]) * int(grid[1]) != num_patches:
        raise UsageError(
            f"model.fusion_grid_positions needs an image tower with a patch grid; "
            f"{type(model.visual).__name__} gives {num_patches} tokens and grid_size {grid}"
        )
    return int(grid[0]), int(grid[1])


def _gather_plain(tensor: Tensor) -> Tensor:
    """All ranks' rows of a tensor that needs no gradient (ids, masks, detached embeddings)."""
    return distributed.all_gather_variable(tensor)
