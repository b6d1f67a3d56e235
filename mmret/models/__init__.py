"""mmret's model library: open_clip dual encoders (CLIP / CustomTextCLIP) and the helpers training needs.

Like open_clip's own model library this package never imports Lightning; the LightningModules import it.

    from mmret import models
    model = models.create_model("test-vit-tiny")               # or "ViT-B-32", pretrained="openai"
    tokenizer = models.get_tokenizer(model)
    image_emb = models.encode_image(model, images)              # [B, 3, H, W] -> [B, D], L2-normalised
    text_emb = models.encode_text(model, tokenizer(captions))   # [B, L] -> [B, D]
    models.export_open_clip(model, None, "export/")             # open_clip hub layout
    hf_export.export_transformers(model, "export-hf/")          # transformers CLIPModel / SiglipModel

Importing this package registers our tiny `test-*` configs (mmret/models/model_configs/*.json) with open_clip
and the tiny timm towers they name (`mmret.models.timm_towers`) with timm.
"""

from mmret.models.export import export_open_clip
from mmret.models.factory import create_model, create_transforms, get_tokenizer, model_info
from mmret.models.registry import list_models, mmret_model_names, register_model_configs
from mmret.models.timm_towers import register_timm_towers
from mmret.models.towers import (
    encode_image,
    encode_text,
    lock_image_tower,
    lock_text_tower,
    no_weight_decay_names,
    param_groups_for_weight_decay,
    set_grad_checkpointing,
    text_tower,
)

register_model_configs()
register_timm_towers()

__all__ = [
    "create_model",
    "create_transforms",
    "encode_image",
    "encode_text",
    "export_open_clip",
    "get_tokenizer",
    "list_models",
    "lock_image_tower",
    "lock_text_tower",
    "mmret_model_names",
    "model_info",
    "no_weight_decay_names",
    "param_groups_for_weight_decay",
    "set_grad_checkpointing",
    "text_tower",
]
