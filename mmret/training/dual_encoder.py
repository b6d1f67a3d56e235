"""DualEncoder: the CLIP / SigLIP LightningModule that trains and finetunes image-text embedders.

    mmret fit -c experiments/digits_clip.yaml

The network is an open_clip model built by `mmret.models.create_model` (any open_clip name + pretrained tag, a
local checkpoint, a JSON config or one of our tiny `test-*` configs). The loss is `mmret.losses.InfoNCELoss` or
`SigLIPLoss` with negatives gathered from every rank, so the effective batch is world_size × batch_size.

Large batches: Lightning's `accumulate_grad_batches` averages per-micro-batch losses, which is wrong for
contrastive learning (each micro-batch would only see its own negatives), so it is rejected; set
`gradcache_chunk_size` instead — the full batch's gradient, computed chunk by chunk (`mmret.training.gradcache`).

Hard negatives: when the data module puts them in the batch — compositional perturbations of each caption
(`data.caption_negatives`, mmret.data.perturb) and images/captions mined by `mmret mine`
(`data.mined_negatives`) — they join the loss's denominators (`mmret.losses.HardNegatives`): text negatives
against every image row, image negatives against every caption row, gathered from every rank, in the GradCache
path too. Negatives that are another row's positive (same sample id, or a caption of that row's image) are masked.

Validation embeds every val image and caption once (exact under DDP: gathered and deduplicated by sample id) and
logs retrieval metrics (`val/image_retrieval_recall@1`, ...) and, where the data has classes, zero-shot accuracy.

Matryoshka embeddings (`matryoshka_dims: [256, 128, 64]`, `mmret.losses.MatryoshkaLoss`): the loss is summed
(with `matryoshka_weights`) over nested prefixes of the embedding, each re-normalised, so its first d coordinates
are an embedding of their own. The full width is always trained: when it is not the first dim it is added in
front with weight 1. Validation also logs every smaller trained dim as `val/dim<d>/<metric>` (retrieval and
zero-shot; the compositional metrics at the full width only).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from mmret.errors import UsageError
from mmret.evaluation.matryoshka import truncate_eval_set
from mmret.evaluation.metrics import build_zeroshot_classifier
from mmret.evaluation.retrieval import (  # noqa: F401  (caption_hash, group_text_queries: re-exported)
    EvalSetEmbedder,
    caption_hash,
    evaluation_metrics,
    group_text_queries,
)
from mmret.losses import (
    CaptionKeys,
    HardNegatives,
    InfoNCELoss,
    MatryoshkaLoss,
    SigLIPLoss,
    truncate_embeddings,
)
from mmret.models import (
    create_model,
    create_transforms,
    encode_image,
    encode_text,
    get_tokenizer,
    lock_image_tower,
    lock_text_tower,
    model_info,
    param_groups_for_weight_decay,
    set_grad_checkpointing,
)
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
    fsdp_encoders,
    is_sharded,
    shard_dual_encoder,
    shard_options_of,
)
from mmret.training.gradcache import lightning_gradcache_backward
from mmret.training.schedule import warmup_cosine, warmup_length, warmup_stable_decay


@dataclass
class _NegativeInput:
    """One kind of hard negative in a batch: what to encode (`[B*k, ...]`), its `[B, k]` validity and keys/ids."""

    kind: str  # "text" or "image"
    data: Any
    valid: torch.Tensor
    keys: torch.Tensor


MODEL_SPEC_HELP = "a .ckpt written by `mmret fit` (a file, or a folder under strategy fsdp2), a folder written by `mmret export`, or an open_clip model name with --pretrained"


def check_model_spec(model: str | os.PathLike, pretrained: str | None) -> None:
    """Refuse, before any work, a `--model` / `--pretrained` pair that `DualEncoder.load` cannot load."""
    path = Path(model)
    if is_checkpoint_path(path):
        if pretrained is not None:
            raise UsageError(
                f"--pretrained {pretrained} applies to a model name; {model} is a checkpoint (it holds the weights)"
            )
        return
    if path.is_dir() or pretrained is not None or str(model).startswith("hf-hub:"):
        return  # a folder, or a name whose weights come from --pretrained / the hub: checked when loading
    if str(model).endswith(".ckpt") or os.sep in str(model):
        raise UsageError(f"--model {model} does not exist; expected {MODEL_SPEC_HELP}")
    raise UsageError(
        f"--model {model} is a model name without weights; add --pretrained TAG_OR_FILE (e.g. ViT-B-32 with "
        "openai), or give a .ckpt or an exported folder"
    )


class DualEncoder(LightningModule):
    """Image-text dual encoder trained with gathered in-batch negatives.

    Args:
        model: open_clip model name (e.g. "ViT-B-32"), an mmret `test-*` config, or a path to a JSON config.
        pretrained: open_clip pretrained tag (e.g. "openai"; needs internet the first time), a local checkpoint
            file, or an exported model directory. None: random init.
        loss: "infonce" (CLIP) or "siglip" (pairwise sigmoid with a learnable bias).
        gather: Use the embeddings of every rank as negatives (effective batch = world_size × batch_size).
        local_loss: InfoNCE only: score local rows against all columns (memory O(B × world·B), not O((world·B)²)).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay; never applied to norms, biases, embeddings and the temperature/bias.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warmup steps (or, below 1, a fraction of the run's steps, e.g. 0.1), then the
            `lr_schedule` down to `min_lr_ratio × lr` at the last step.
        min_lr_ratio: Final learning rate as a fraction of `lr`.
        lr_schedule: After warmup, "cosine" (decay over all remaining steps, CLIP's) or "wsd" (hold `lr`, then
            decay linearly over the last `decay_fraction` of the steps;
            `mmret.training.schedule.warmup_stable_decay`).
        decay_fraction: "wsd" only: the fraction of all steps spent decaying.
        init_logit_scale: Initial temperature as exp(logit_scale) = this value (None: the model's own, 1/0.07
            for CLIP, 10 for SigLIP).
        max_logit_scale: exp(logit_scale) is clamped to [1, this] after every optimizer step.
        init_logit_bias: SigLIP initial bias (None: the model's own, or -10 when the model has none).
        lock_image: Freeze the image tower (LiT): its weights leave the optimizer and receive no gradient.
        lock_image_unlocked_groups: Keep this many last layer groups of a locked image tower trainable.
        lock_image_freeze_norm_stats: Also freeze BatchNorm running statistics of the locked image tower.
        lock_text: Freeze the text tower.
        lock_text_unlocked_layers: Keep this many last layers of a locked text tower trainable.
        lock_text_freeze_norm_stats: Also freeze norm statistics of the locked text tower.
        grad_checkpointing: Recompute tower activations in backward to save memory.
        compile: torch.compile both towers.
        gradcache_chunk_size: Encode the batch in chunks of this many samples and backpropagate cached embedding
            gradients (GradCache): the exact full-batch gradient at a fraction of the activation memory. None:
            one ordinary step.
        retrieval_ks: K values of Recall@K logged at validation.
        hard_negatives: Use the hard negatives the batch carries (perturbed captions, mined images and
            captions); False trains on in-batch negatives only, whatever the data module attaches.
        mask_shared_captions: When the batch carries caption keys (it does with hard negatives or
            `data.batch_twins`), a caption that also describes another row's image (two images of one
            composition) is not that image's negative (`mmret.losses.CaptionKeys`).
        compositional_val: Also log the compositional accuracies of the validation set at each validation
            (`val/compositional_text_acc[/<type>][/seen|/unseen]`, `val/compositional_image_acc...`; see
            mmret.evaluation.compositional), with the word classes of the val data's dataset.json.
        matryoshka_dims: Train nested prefixes of the embedding too (`mmret.losses.MatryoshkaLoss`), e.g.
            [512, 256, 128, 64]: strictly decreasing, at most the embedding width, which is added in front
            (weight 1) when missing. None: the full width only.
        matryoshka_weights: One loss weight per entry of `matryoshka_dims` (default: all 1).
        lora: LoRA finetuning (`mmret.models.lora.LoraSettings`): `{rank, alpha, dropout, targets, unlock}`, e.g.
            `{rank: 8, alpha: 16, targets: [image, text, attn, mlp], unlock: [logit_scale]}`; only the adapters
            (and `unlock`) train. None: full finetuning.
        embed_dim: Width of the shared embedding, replacing the model config's `embed_dim` (both towers'
            output projections are built at this width; pretrained weights of another width do not fit).
            None: the config's. A model trained at one small width alone, the baseline of Matryoshka.
    """

    def __init__(
        self,
        model: str = "test-vit-tiny",
        pretrained: str | None = None,
        loss: Literal["infonce", "siglip"] = "infonce",
        gather: bool = True,
        local_loss: bool = True,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int | float = 100,
        min_lr_ratio: float = 0.0,
        lr_schedule: Literal["cosine", "wsd"] = "cosine",
        decay_fraction: float = 0.2,
        init_logit_scale: float | None = None,
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_image_freeze_norm_stats: bool = True,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        lock_text_freeze_norm_stats: bool = True,
        grad_checkpointing: bool = False,
        compile: bool = False,
        gradcache_chunk_size: int | None = None,
        retrieval_ks: tuple[int, ...] = (1, 5, 10),
        hard_negatives: bool = True,
        mask_shared_captions: bool = True,
        compositional_val: bool = False,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
        lora: dict | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if loss not in ("infonce", "siglip"):
            raise UsageError(f"model.loss is {loss!r}; expected 'infonce' or 'siglip'")
        if gradcache_chunk_size is not None and gradcache_chunk_size < 1:
            raise UsageError(
                f"model.gradcache_chunk_size is {gradcache_chunk_size}; expected a positive integer"
            )
        if max_logit_scale < 1:
            raise UsageError(f"model.max_logit_scale is {max_logit_scale}; expected a value >= 1")
        if lr_schedule not in ("cosine", "wsd"):
            raise UsageError(f"model.lr_schedule is {lr_schedule!r}; expected 'cosine' or 'wsd'")
        if not 0.0 < decay_fraction <= 1.0:
            raise UsageError(f"model.decay_fraction is {decay_fraction}; expected a number in (0, 1]")
        if embed_dim is not None and (
            isinstance(embed_dim, bool) or int(embed_dim) != embed_dim or embed_dim < 1
        ):
            raise UsageError(f"model.embed_dim is {embed_dim!r}; expected a positive integer, or null")
        self.save_hyperparameters()
        warmup_length(warmup_steps, 1)  # a bad value is refused now, not when training starts
        overrides = {}
        if init_logit_scale is not None:
            overrides["init_logit_scale"] = math.log(init_logit_scale)
        elif loss == "siglip":
            overrides["init_logit_scale"] = math.log(10.0)
        if init_logit_bias is not None:
            overrides["init_logit_bias"] = init_logit_bias
        elif loss == "siglip":
            overrides["init_logit_bias"] = -10.0
        if embed_dim is not None:
            overrides["embed_dim"] = int(embed_dim)
        self.model = create_model(model, pretrained, **overrides)
        if loss == "siglip" and getattr(self.model, "logit_bias", None) is None:
            raise UsageError(
                f"model {model!r} has no logit_bias; SigLIP needs one (set model.init_logit_bias)"
            )
        if lock_image:
            lock_image_tower(self.model, lock_image_unlocked_groups, lock_image_freeze_norm_stats)
        if lock_text:
            lock_text_tower(self.model, lock_text_unlocked_layers, lock_text_freeze_norm_stats)
        if grad_checkpointing:
            set_grad_checkpointing(self.model, True)
        if lora is not None:  # only adapters (+ lora.unlock) train; from_checkpoint merges them
            try:
                apply_lora(self.model, LoraSettings.from_value(lora))
            except (TypeError, ValueError) as error:
                raise UsageError(f"model.lora: {error}") from None
        self.loss_fn = (
            InfoNCELoss(gather=gather, local_loss=local_loss)
            if loss == "infonce"
            else SigLIPLoss(gather=gather)
        )
        # (dim, weight) of every trained prefix, the full width first; [] without Matryoshka.
        self.matryoshka = _matryoshka_dims(
            matryoshka_dims, matryoshka_weights, model_info(self.model)["model_cfg"].get("embed_dim")
        )
        if self.matryoshka:
            dims, weights = zip(*self.matryoshka)
            self.loss_fn = MatryoshkaLoss(self.loss_fn, dims, weights)
        self.automatic_optimization = gradcache_chunk_size is None
        self._tokenizer = None
        self._val_embedder: EvalSetEmbedder | None = None
        self._val_gather = GatheredDuringValidation()
        # The last validation's embedded set (every rank holds the gathered whole), for callbacks that show
        # what the model retrieves (mmret.training.wandb_tracking.ValidationExamplesToWandb).
        self.last_val_eval_set = None

    # ---- network -----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # FSDP2 (strategy fsdp2, or Lightning's ModelParallelStrategy): each tower block and the root a unit
        options = shard_options_of(self._trainer.strategy if self._trainer is not None else None)
        if options is not None and not is_sharded(self.model):
            shard_dual_encoder(self.model, **options)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.visual.compile()
            text = getattr(self.model, "text", None) or self.model.transformer
            text.compile()
            self._compiled = True

    @property
    def tokenizer(self):
        """The model's tokenizer (list[str] -> token tensor or dict), built once."""
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.model)
        return self._tokenizer

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D]."""
        if is_sharded(self.model):  # through the root's forward, which gathers its parameters
            return fsdp_encoders(self.model)[0](images)
        return encode_image(self.model, images, normalize=True)

    def encode_text(self, text) -> torch.Tensor:
        """L2-normalised text embeddings [B, D] from tokenizer output."""
        if is_sharded(self.model):
            return fsdp_encoders(self.model)[1](text)
        return encode_text(self.model, text, normalize=True)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [B, D] of caption strings (tokenised here, on the module's device)."""
        return self.encode_text(_to_device(self.tokenizer(texts), self.device))

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer.accumulate_grad_batches > 1:
            raise UsageError(
                f"trainer.accumulate_grad_batches is {trainer.accumulate_grad_batches}: averaging per-micro-batch "
                "contrastive losses gives each micro-batch only its own negatives (a wrong gradient); set "
                "model.gradcache_chunk_size to the micro-batch size and data.batch_size to the full batch instead"
            )
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_preprocess"):
            datamodule.set_preprocess(
                image_transform=create_transforms(self.model, train=True),
                tokenizer=self.tokenizer,
                eval_image_transform=create_transforms(self.model, train=False),
            )

    # ---- training ----------------------------------------------------------------------------------------
    def _loss(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        sample_id: torch.Tensor,
        negatives: HardNegatives | None = None,
        caption_keys: CaptionKeys | None = None,
    ) -> torch.Tensor:
        logit_scale = self.model.logit_scale.exp()
        extra = {"sample_ids": sample_id, "negatives": negatives, "caption_keys": caption_keys}
        if self.hparams.loss == "siglip":
            return self.loss_fn(image_emb, text_emb, logit_scale, self.model.logit_bias, **extra)
        return self.loss_fn(image_emb, text_emb, logit_scale, **extra)

    def caption_keys(self, batch: dict) -> CaptionKeys | None:
        """The batch's `CaptionKeys` (which captions describe which of its images), when it carries them."""
        if not self.hparams.get("mask_shared_captions", True):
            return None
        return CaptionKeys.from_batch(batch, self.device)

    def hard_negative_inputs(self, batch: dict) -> list[_NegativeInput]:
        """The hard negatives a batch carries, to encode: perturbed captions, mined captions, mined images."""
        if not self.hparams.hard_negatives:
            return []
        inputs = []
        if "perturbed_text" in batch:
            inputs.append(
                _NegativeInput(
                    "text", batch["perturbed_text"], batch["perturbed_valid"], batch["perturbed_key"]
                )
            )
        if "mined_text" in batch and "mined_text_key" in batch:
            inputs.append(
                _NegativeInput(
                    "text", batch["mined_text"], batch["mined_text_valid"], batch["mined_text_key"]
                )
            )
        if "mined_image" in batch:
            images = batch["mined_image"]  # [B, k, 3, H, W]
            inputs.append(
                _NegativeInput(
                    "image", images.flatten(0, 1), batch["mined_image_valid"], batch["mined_image_id"]
                )
            )
        return [item for item in inputs if item.valid.shape[1] > 0]

    def _negatives(
        self, inputs: list[_NegativeInput], embeddings: list[torch.Tensor], batch: dict
    ) -> HardNegatives | None:
        """`HardNegatives` from the encoded inputs (`[B*k, D]` each, in the order of `inputs`)."""
        if not inputs:
            return None
        parts: dict[str, list] = {"text": [], "image": []}
        for item, emb in zip(inputs, embeddings):
            rows, k = item.valid.shape
            parts[item.kind].append((emb.reshape(rows, k, -1), item.valid, item.keys))
        fields: dict = {}
        for kind, found in parts.items():
            if found:
                fields[kind] = torch.cat([emb for emb, _, _ in found], dim=1)
                fields[f"{kind}_valid"] = torch.cat([valid for _, valid, _ in found], dim=1).to(self.device)
                fields[f"{kind}_keys" if kind == "text" else "image_ids"] = torch.cat(
                    [keys for _, _, keys in found], dim=1
                ).to(self.device)
        if "caption_keys" in batch:
            fields["row_text_keys"] = batch["caption_keys"].to(self.device)
        return HardNegatives(**fields)

    def _encoder_of(self, kind: str):
        return self.encode_text if kind == "text" else self.encode_image

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, text, sample_id = batch["image"], batch["text"], batch["sample_id"]
        negative_inputs = self.hard_negative_inputs(batch)
        if self.automatic_optimization:
            embeddings = [self._encoder_of(item.kind)(item.data) for item in negative_inputs]
            negatives = self._negatives(negative_inputs, embeddings, batch)
            loss = self._loss(
                self.encode_image(images),
                self.encode_text(text),
                sample_id,
                negatives,
                self.caption_keys(batch),
            )
        else:
            loss = self._gradcache_step(images, text, sample_id, negative_inputs, batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=images.shape[0])
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=images.shape[0])
        if self.hparams.loss == "siglip":
            self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=images.shape[0])
        return loss

    def _gradcache_step(
        self, images: torch.Tensor, text, sample_id: torch.Tensor, negative_inputs: list, batch: dict
    ) -> torch.Tensor:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)

        caption_keys = self.caption_keys(batch)

        def loss_fn(image_emb, text_emb, *negative_embs):
            negatives = self._negatives(negative_inputs, list(negative_embs), batch)
            return self._loss(image_emb, text_emb, sample_id, negatives, caption_keys)

        output = lightning_gradcache_backward(
            self,
            self.encode_image,
            self.encode_text,
            images,
            text,
            loss_fn,
            chunk_size=self.hparams.gradcache_chunk_size,
            extra_inputs=[(self._encoder_of(item.kind), item.data) for item in negative_inputs],
        )
        loss = output.loss
        self.configure_gradient_clipping(
            optimizer, self.trainer.gradient_clip_val, self.trainer.gradient_clip_algorithm
        )
        optimizer.step()
        scheduler.step()
        self._clamp_logit_scale()
        return loss

    def on_after_backward(self) -> None:
        # FSDP2 leaves the 0-dim logit_scale / logit_bias replicated: average their gradients as DDP would
        # (after each GradCache chunk's backward too: averaging is linear, so the sum stays exact)
        if is_sharded(self.model):
            average_replicated_gradients(self.model)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if not is_sharded(self.model) or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # sharded and replicated gradients together (torch's clip_grad_norm_ refuses the mix)
        group = self.trainer.strategy.device_mesh["data_parallel"].get_group()
        clip_sharded_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm, group)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.automatic_optimization:
            self._clamp_logit_scale()

    @torch.no_grad()
    def _clamp_logit_scale(self) -> None:
        self.model.logit_scale.clamp_(0.0, math.log(self.hparams.max_logit_scale))

    def optimizer_param_groups(self) -> list[dict]:
        """AdamW groups over the trainable parameters: no weight decay on norms, biases, embeddings, temperature."""
        return param_groups_for_weight_decay(self.model, self.hparams.weight_decay)

    def configure_optimizers(self):
        groups = self.optimizer_param_groups()
        optimizer = torch.optim.AdamW(
            groups,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            eps=self.hparams.eps,
            fused=_fused_adamw_supported(groups),
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = warmup_length(self.hparams.warmup_steps, total_steps)
        min_ratio = self.hparams.min_lr_ratio
        if self.hparams.get("lr_schedule", "cosine") == "wsd":
            decay = self.hparams.decay_fraction
            multiplier = lambda step: warmup_stable_decay(step, warmup, total_steps, min_ratio, decay)  # noqa: E731
        else:
            multiplier = lambda step: warmup_cosine(step, warmup, total_steps, min_ratio)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> DualEncoder:
        """The trained dual encoder of a checkpoint, in eval mode on `device`.

        The network is rebuilt from the saved hyperparameters WITHOUT downloading its original pretrained
        weights (the checkpoint holds the trained ones). This is how every command (eval, mine, export), the
        reranker and the notebooks read a dual-encoder checkpoint.
        """
        checkpoint = read_checkpoint(path, "dual_encoder")
        hparams = hyperparameters_for(cls, checkpoint)
        hparams["pretrained"] = None  # the trained weights come from the checkpoint, not from a download
        hparams["compile"] = False
        module = cls(**hparams)
        load_weights(module, checkpoint["state_dict"], path)
        if has_lora(module.model):  # LoRA adapters merged: a plain open_clip model for eval / mine / export
            module.model = merge_lora(module.model, inplace=True)
        return module.to(device).eval()

    @classmethod
    def load(
        cls, model: str | os.PathLike, pretrained: str | None = None, device: str | torch.device = "cpu"
    ) -> DualEncoder:
        """A dual encoder to evaluate, mine or index with, in eval mode on `device`, from any of:

        - a training checkpoint written by `mmret fit` (`from_checkpoint`);
        - a folder written by `mmret export` (open_clip's hub layout: open_clip_config.json + weights), or any
          open_clip hub folder;
        - an open_clip or mmret model name (`ViT-B-32`, `test-vit-tiny`, `hf-hub:org/repo`) with `pretrained`
          a tag (`openai`, `laion2b_s34b_b79k`: downloaded the first time) or a weights file: the zero-shot
          baseline measured before finetuning. Without `pretrained` a name is refused: random towers measure
          nothing.
        """
        check_model_spec(model, pretrained)
        if is_checkpoint_path(model):
            return cls.from_checkpoint(model, device)
        module = cls(model=str(model), pretrained=pretrained, compile=False)
        return module.to(device).eval()

    # RNG state in the checkpoint, so a resumed run continues the same random stream.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmret"] = {
            "kind": "dual_encoder",
            "model": self.hparams.model,
            "rng_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            checkpoint["mmret"]["rng_cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("mmret", {})
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    # ---- validation --------------------------------------------------------------------------------------
    # The evaluation path of `mmret eval` (mmret.evaluation.retrieval): images embedded per step, unique
    # captions at the end, gathered from every rank and deduplicated by id, so DDP gives the 1-process result.
    def on_validation_epoch_start(self) -> None:
        self._val_gather.start(self.model)  # sharded: gathered once (ranks embed unequal batch counts)
        self._val_embedder = EvalSetEmbedder(self.encode_image, self.encode_texts, device=self.device)
        self._val_records: dict[int, tuple[list[str], dict]] = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val_embedder.add_batch(batch)
        if self.hparams.get("compositional_val"):
            for sample_id, captions, metadata in zip(
                batch["sample_id"].tolist(), batch["captions"], batch["metadata"]
            ):
                self._val_records[int(sample_id)] = (list(captions), dict(metadata or {}))

    def on_validation_epoch_end(self) -> None:
        try:
            self._validation_metrics()
        finally:
            self._val_gather.stop()

    def _validation_metrics(self) -> None:
        eval_set = self._val_embedder.finish()  # collective: every rank gets here, with or without batches
        self._val_embedder = None
        self.last_val_eval_set = eval_set
        if eval_set.num_images == 0:
            return
        class_names, templates = self._class_names_and_templates()
        zeroshot = bool(class_names) and bool((eval_set.labels >= 0).any())
        prompt_emb: dict[tuple[str, ...], torch.Tensor] = {}  # prompts embedded once, reused at every dim

        def encode_prompts(texts: list[str]) -> torch.Tensor:
            if tuple(texts) not in prompt_emb:
                prompt_emb[tuple(texts)] = self.encode_texts(texts)
            return prompt_emb[tuple(texts)]

        classifier = None
        if zeroshot:
            with torch.no_grad():
                classifier = build_zeroshot_classifier(encode_prompts, class_names, templates)
        metrics = evaluation_metrics(eval_set, ks=tuple(self.hparams.retrieval_ks), classifier=classifier)
        if self.hparams.get("compositional_val"):
            metrics.update(self._compositional_metrics(eval_set))
        for dim, _ in self.matryoshka[1:]:  # the full width is the unprefixed metrics above
            metrics.update(
                {
                    f"dim{dim}/{name}": value
                    for name, value in self._prefix_metrics(
                        eval_set, dim, encode_prompts, class_names, templates, zeroshot
                    ).items()
                }
            )
        for name, value in metrics.items():
            self.log(f"val/{name}", float(value), sync_dist=False, rank_zero_only=False)

    @torch.no_grad()
    def _prefix_metrics(
        self, eval_set, dim: int, encode_prompts, class_names, templates, zeroshot: bool
    ) -> dict:
        """Retrieval (and zero-shot) metrics of the validation set on the first `dim` coordinates, re-normalised."""
        prefix_set = truncate_eval_set(eval_set, dim)
        classifier = None
        if zeroshot:
            classifier = build_zeroshot_classifier(
                lambda texts: truncate_embeddings(encode_prompts(texts), dim), class_names, templates
            )
        return evaluation_metrics(prefix_set, ks=tuple(self.hparams.retrieval_ks), classifier=classifier)

    def _compositional_metrics(self, eval_set) -> dict[str, float]:
        """The compositional accuracies of the validation set (every rank computes the same numbers)."""
        from mmret.data.perturb import CaptionPerturber
        from mmret.evaluation.compositional import ImageRecord, score_eval_set

        records = self._val_records
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = {key: value for part in gathered for key, value in part.items()}
        self._val_records = {}
        ordered = [ImageRecord(i, *records[i]) for i in eval_set.image_ids.tolist()]
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        info = datamodule.dataset_info("val") if hasattr(datamodule, "dataset_info") else None
        _, metrics, _ = score_eval_set(
            self.encode_texts, eval_set, ordered, CaptionPerturber.for_dataset(info), self.device, 256
        )
        return metrics

    def _class_names_and_templates(self) -> tuple[list[str] | None, list[str]]:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        info = (
            datamodule.dataset_info("val")
            if datamodule is not None and hasattr(datamodule, "dataset_info")
            else {}
        )
        return info.get("class_names"), info.get("templates") or ["a photo of a {}."]


def _matryoshka_dims(
    dims: list[int] | None, weights: list[float] | None, width: int | None
) -> list[tuple[int, float]]:
    """(dim, weight) pairs of `model.matryoshka_dims` / `_weights`, the full `width` first (added with weight 1
    when missing); [] without dims. Refuses, in one line, dims that are not positive, not strictly decreasing,
    or wider than the embedding, and weights that do not match them."""
    if dims is None:
        if weights is not None:
            raise UsageError("model.matryoshka_weights is set without model.matryoshka_dims")
        return []
    dims = [int(d) for d in dims]
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if not dims:
        raise UsageError(
            "model.matryoshka_dims is empty; give the prefix widths, e.g. [256, 128, 64], or null"
        )
    if len(weights) != len(dims):
        raise UsageError(
            f"model.matryoshka_weights has {len(weights)} values for {len(dims)} model.matryoshka_dims {dims}"
        )
    if any(w < 0 for w in weights):
        raise UsageError(f"model.matryoshka_weights is {weights}; expected non-negative weights")
    if any(d < 1 for d in dims) or any(a <= b for a, b in zip(dims, dims[1:])):
        raise UsageError(f"model.matryoshka_dims is {dims}; expected positive, strictly decreasing widths")
    if width is not None:
        if dims[0] > width:
            raise UsageError(f"model.matryoshka_dims is {dims}; the model's embedding width is {width}")
        if dims[0] < width:
            dims, weights = [width, *dims], [1.0, *weights]
    return list(zip(dims, weights))


def _fused_adamw_supported(groups: list[dict]) -> bool:
    """torch's fused AdamW (one kernel for all tensors) needs floating-point parameters on CPU or CUDA; otherwise
    torch loops over the tensors one by one (the cost is in the header of experiments/digits_clip.yaml)."""
    params = [param for group in groups for param in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _to_device(text, device: torch.device):
    if isinstance(text, dict):
        return {key: value.to(device) for key, value in text.items()}
    return text.to(device)
