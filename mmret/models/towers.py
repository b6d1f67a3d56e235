"""What training code needs from any open_clip model: lock towers, grad checkpointing, weight-decay groups, encode.

These work on every model `mmret.models.create_model` returns (CLIP with native towers, CustomTextCLIP with a
native, timm or Hugging Face tower). They use open_clip's own methods where those exist and are correct, and
fill the gaps open_clip leaves:

  - partial locking of a BERT-family HF text tower (open_clip's `HFTextEncoder.lock` has no layer table for
    BERT and raises KeyError), and `freeze_layer_norm=False` for native text towers (open_clip asserts);
  - `set_grad_checkpointing(model, False)` on an HF text tower (open_clip's method always *enables* it);
  - AdamW groups that also keep token/position embeddings out of weight decay.

No Lightning here: the LightningModule calls these.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.utils import freeze_batch_norm_2d
from torch import nn

from mmret.errors import UsageError

# Parameter names (last dotted component) that are embeddings or logit temperature/bias: never decayed.
_NO_DECAY_PARAM_NAMES = {
    "positional_embedding",
    "class_embedding",
    "cls_emb",
    "pos_embed",
    "cls_token",
    "dist_token",
    "reg_token",
    "logit_scale",
    "logit_bias",
}
# nn.RMSNorm only exists from torch 2.4; LayerNorm stands in for it on older versions.
_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    getattr(nn, "RMSNorm", nn.LayerNorm),
)


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding the text tower: `model.text` for CustomTextCLIP; CLIP keeps it on the model itself."""
    return model.text if hasattr(model, "text") else model


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
    """Freeze the image tower (LiT), optionally leaving its last `unlocked_groups` layer groups trainable.

    Args:
        model: An open_clip model.
        unlocked_groups: Number of trailing layer groups left trainable (0: the whole tower is frozen; for timm
            towers open_clip leaves the fresh projection head trainable, since it is not pretrained).
        freeze_norm_stats: Also freeze BatchNorm running statistics in the frozen part (BN layers become
            torchvision FrozenBatchNorm2d, so `model.train()` cannot unfreeze them). No-op for LayerNorm towers.
    """
    visual = model.visual
    if hasattr(model, "lock_image_tower") and hasattr(visual, "lock"):
        try:
            model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_norm_stats)
        except AssertionError as err:  # ModifiedResNet: "partial locking not currently supported"
            raise UsageError(
                f"cannot partially lock the {type(visual).__name__} image tower: {err}"
            ) from None
        return
    if unlocked_groups:
        raise UsageError(f"partial locking is not supported for a {type(visual).__name__} image tower")
    for param in visual.parameters():
        param.requires_grad = False
    if freeze_norm_stats:
        freeze_batch_norm_2d(visual)


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Freeze the text tower, optionally leaving its last `unlocked_layers` layer groups trainable.

    Args:
        model: An open_clip model.
        unlocked_layers: Trailing groups left trainable. Native towers: groups are [embeddings, block 1, ...,
            last block + final LN, projection]. HF towers: [embeddings, layer 1, ..., layer N]; their projection
            head stays trainable (it is new), as in open_clip.
        freeze_layer_norm: Freeze LayerNorm weights inside the locked part too (False keeps them trainable).
    """
    text = text_tower(model)
    if isinstance(text, HFTextEncoder):
        if unlocked_layers:
            _lock_hf_text_partially(text, unlocked_layers, freeze_layer_norm)
        else:
            text.lock(0, freeze_layer_norm)
        return
    # open_clip's native lock treats LayerNorm like any weight (and asserts freeze_layer_norm); undo it after.
    model.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=True)
    if not freeze_layer_norm:
        for module in _native_text_modules(model):
            for sub in module.modules():
                if isinstance(sub, nn.LayerNorm):
                    sub.requires_grad_(True)


def _native_text_modules(model: nn.Module) -> list[nn.Module]:
    text = text_tower(model)
    return [m for m in (getattr(text, "transformer", None), getattr(text, "ln_final", None)) if m is not None]


def _lock_hf_text_partially(text: HFTextEncoder, unlocked_layers: int, freeze_layer_norm: bool) -> None:
    transformer = text.transformer
    encoder = getattr(transformer, "encoder", transformer)
    layers = next((getattr(encoder, a) for a in ("layer", "layers", "block") if hasattr(encoder, a)), None)
    embeddings = next(
        (getattr(transformer, a) for a in ("embeddings", "embed_tokens") if hasattr(transformer, a)), None
    )
    if layers is None or embeddings is None:
        raise UsageError(
            f"cannot find the layer list of the {type(transformer).__name__} text tower to lock partially"
        )
    # Freeze the whole HF transformer first so the result does not depend on earlier lock calls.
    for name, param in transformer.named_parameters():
        param.requires_grad = (not freeze_layer_norm) and "LayerNorm" in name.split(".")
    groups = [embeddings, *layers]
    for module in groups[max(len(groups) - unlocked_layers, 0) :]:
        module.requires_grad_(True)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Turn activation checkpointing on or off in both towers (less memory, ~30% more compute)."""
    text = text_tower(model)
    if isinstance(text, HFTextEncoder):
        model.visual.set_grad_checkpointing(enable)
        # transformers 5 renamed gradient_* to activation_checkpointing_*; older versions only have the former.
        action = "enable" if enable else "disable"
        switch = getattr(text.transformer, f"activation_checkpointing_{action}", None)
        (switch or getattr(text.transformer, f"gradient_checkpointing_{action}"))()
        return
    model.set_grad_checkpointing(enable)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that should get no weight decay.

    Those are: 1-d parameters (biases, norm scales, logit_scale/logit_bias), all parameters of norm layers and
    of nn.Embedding (token embeddings), position/class embeddings by name, and whatever any submodule lists in
    its `no_weight_decay()` (open_clip and timm towers do).
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (nn.Embedding, *_NORM_TYPES)):
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        no_wd = getattr(module, "no_weight_decay", None)
        if callable(no_wd):
            names.update(prefix + n for n in no_wd())
    for name, param in model.named_parameters():
        if param.ndim < 2 or name.rsplit(".", 1)[-1] in _NO_DECAY_PARAM_NAMES:
            names.add(name)
    return names


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices, none on norms/biases/embeddings/logit scale & bias.

    Parameters with requires_grad False (locked towers) are left out.

    Returns:
        [{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}], without
        empty groups.
    """
    no_decay = no_weight_decay_names(model)
    decay_params, no_decay_params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay_params if name in no_decay else decay_params).append(param)
    groups = [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": no_decay_params, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def encode_image(model: nn.Module, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Image embeddings: images [B, 3, H, W] -> [B, D] (L2-normalised unless normalize=False)."""
    return model.encode_image(images, normalize=normalize)


def encode_text(model: nn.Module, text: torch.Tensor | Mapping, normalize: bool = True) -> torch.Tensor:
    """Text embeddings: token ids [B, L] -> [B, D] (L2-normalised unless normalize=False).

    Also accepts a Hugging Face tokenizer's output (a mapping with "input_ids"); open_clip's HF tower derives
    the attention mask from the pad token itself, so only the ids are passed on.
    """
    if isinstance(text, Mapping):
        text = text["input_ids"]
    return model.encode_text(text, normalize=normalize)
