"""Tiny timm image towers that our `test-*` configs name, registered with timm when `mmret.models` is imported.

    register_timm_towers()                       # idempotent; `import mmret.models` calls it
    timm.create_model("mmret_test_vit_siglip")   # what open_clip builds for `test-siglip-vit-tiny`

open_clip passes no size arguments to timm (only the model name, pooling and projection), so a timm tower at
toy size needs a timm name of its own. `mmret_test_vit_siglip` is SigLIP's image tower at toy size: a ViT
without a class token whose patch embedding has a bias, no LayerNorm before the blocks, a final LayerNorm on
every token and a multi-head attention-pooling ("MAP") head, exactly the architecture of timm's
`vit_*_siglip_*` models and of `transformers.SiglipVisionModel` (so `mmret export --format transformers` maps
it weight for weight). Like every timm model it is known only where it is registered: an open_clip export of
a model that uses it loads with open_clip after `import mmret.models`.
"""

from __future__ import annotations

import timm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from mmret.errors import UsageError

# Arguments timm.create_model passes to every entry point; a plain VisionTransformer takes none of them.
_FACTORY_ONLY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def mmret_test_vit_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """SigLIP's image tower at toy size: 32 px, patch 8 (16 tokens), width 64, 2 blocks of 2 heads, MAP pooling."""
    if pretrained:
        raise UsageError("timm model 'mmret_test_vit_siglip' has no pretrained weights; use pretrained=False")
    for key in _FACTORY_ONLY_ARGS:
        kwargs.pop(key, None)
    args = dict(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        class_token=False,
        global_pool="map",
    )
    args.update(kwargs)
    return VisionTransformer(**args)


TOWERS = (mmret_test_vit_siglip,)


def register_timm_towers() -> None:
    """Make our tiny timm towers known to `timm.create_model` (once: timm warns when a name is registered again)."""
    for entry_point in TOWERS:
        if not timm.is_model(entry_point.__name__):
            register_model(entry_point)
