"""Which transformers class reproduces an open_clip dual encoder, and its weights under that class's names.

    family = transformers_family(model)     # "clip" or "siglip"; UsageError naming the tower otherwise
    hf_model = to_transformers(model)       # transformers.CLIPModel / SiglipModel holding model's weights

Which transformers class (`transformers_family`):
  - "clip" -> `transformers.CLIPModel`: open_clip's native ViT (class token, pre-LayerNorm, pooled at the class
    token, linear projection without bias) and native text transformer (causal mask, pooled at the end-of-text
    token, projection without bias), e.g. `test-vit-micro`, `test-vit-tiny`, open_clip's `ViT-B-32` and
    `ViT-B-32-quickgelu` (GELU or QuickGELU).
  - "siglip" -> `transformers.SiglipModel`: a timm ViT without class token and with attention pooling (MAP)
    and no projection (open_clip's SigLIP configs, `test-siglip-vit-tiny`), with a native text transformer
    that attends to every position (no causal mask) and is pooled at the last position, projection with bias.
Anything else is refused with one line naming the tower and what has no transformers counterpart: timm towers
other than that ViT (`test-timm-minilm`'s ResNet), Hugging Face text towers (open_clip pools and projects
them itself), average-pooled ViTs (`test-siglip-tiny`), layer scale, QK-norm, tokenizers other than open_clip's
CLIP BPE. A checkpoint with a SigLIP bias but CLIP towers becomes a CLIPModel whose config records the bias as
`mmret_logit_bias` (CLIPModel has none; embeddings and the softmax over labels are unaffected).

The weights are mapped one by one (q/k/v split from open_clip's packed in-projection and timm's fused qkv,
timm's attention-pool query and key/value packed into nn.MultiheadAttention's in-projection, projection
matrices transposed into Linear weights) and every weight of the checkpoint must be used: one left over is an
architecture option the transformers class lacks, and is refused. Activations (GELU, tanh-GELU, QuickGELU) and
LayerNorm epsilons are read from the modules. `mmret.models.hf_export` then checks the converted model's
embeddings against the checkpoint's before writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer
from torch import nn

from mmret.errors import UsageError
from mmret.models.factory import get_tokenizer, model_info
from mmret.models.hf_processing import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE
from mmret.models.lora import has_lora, merge_lora


def transformers_family(model: nn.Module) -> str:
    """The transformers class that reproduces `model` exactly: "clip" (CLIPModel) or "siglip" (SiglipModel).

    Raises:
        UsageError: one line naming the tower that has no transformers counterpart, and why (or transformers
            older than 5).
    """
    _check_transformers_version()
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        _check_clip_vision(visual)
        family = "clip"
    elif isinstance(visual, TimmModel):
        _check_siglip_vision(visual)
        family = "siglip"
    else:
        raise UsageError(
            f"image tower {type(visual).__name__} has no transformers counterpart; transformers' CLIPModel "
            "and SiglipModel take a ViT (open_clip's, or timm's SigLIP ViT)"
        )
    text = text_tower_view(model)
    _check_text(text, family)
    _check_tokenizer(model)
    return family


def to_transformers(model: nn.Module):
    """The transformers model (CLIPModel or SiglipModel, fp32, eval mode, on CPU) holding `model`'s weights
    (LoRA adapters, `mmret.models.lora`, merged into them).

    Raises:
        UsageError: no exact transformers counterpart (see `transformers_family`).
    """
    if has_lora(model):
        model = merge_lora(model)
    family = transformers_family(model)
    state_dict = {key: value.detach().cpu().float() for key, value in model.state_dict().items()}
    mapper = _WeightMap(state_dict)
    hf_model = _clip_model(model, mapper) if family == "clip" else _siglip_model(model, mapper)
    extra = mapper.unused()
    if family == "clip" and "logit_bias" in extra:
        hf_model.config.mmret_logit_bias = float(state_dict["logit_bias"].reshape(-1)[0])
        extra.remove("logit_bias")
    if extra:
        raise UsageError(
            f"weights {extra[:3]}{' ...' if len(extra) > 3 else ''} have no counterpart in transformers' "
            f"{type(hf_model).__name__} (an architecture option it lacks)"
        )
    hf_model.load_state_dict(mapper.target, strict=True)
    return hf_model.eval()


# ---- checks: which transformers class reproduces the model ------------------------------------------------
def _check_transformers_version() -> None:
    """The export builds its tokenizer and processors with transformers 5's API (tested with 5.25)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise UsageError(
            f"exporting for transformers needs transformers >= 5 (installed: {transformers.__version__}); "
            "pip install -U transformers"
        )


@dataclass
class TextTowerView:
    """open_clip's native text tower, wherever it lives (CLIP keeps it on the model, CustomTextCLIP in .text)."""

    prefix: str  # state-dict prefix of its weights ("" or "text.")
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Module | nn.Parameter | None
    pool_type: str
    eos_id: int | None
    causal: bool
    pad_mask: bool
    context_length: int
    cls_emb: nn.Parameter | None


def text_tower_view(model: nn.Module) -> TextTowerView:
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        name = Path(getattr(text.config, "name_or_path", "") or type(text.transformer).__name__).name
        raise UsageError(
            f"text tower is the Hugging Face model {name!r} inside open_clip (its own pooling and projection "
            "on top), which has no transformers CLIPModel / SiglipModel counterpart"
        )
    if isinstance(text, TextTransformer):
        return TextTowerView(
            prefix="text.",
            transformer=text.transformer,
            ln_final=text.ln_final,
            text_projection=text.text_projection,
            pool_type=text.pool_type,
            eos_id=getattr(text, "eos_id", None),
            causal=text.attn_mask is not None,
            pad_mask=bool(getattr(text, "use_pad_mask", False)),
            context_length=text.context_length,
            cls_emb=text.cls_emb,
        )
    if text is None and hasattr(model, "token_embedding"):  # CLIP: CLIP.encode_text masks no padding
        return TextTowerView(
            prefix="",
            transformer=model.transformer,
            ln_final=model.ln_final,
            text_projection=model.text_projection,
            pool_type=model.text_pool_type,
            eos_id=getattr(model, "text_eos_id", None),
            causal=model.attn_mask is not None,
            pad_mask=False,
            context_length=model.context_length,
            cls_emb=None,
        )
    raise UsageError(f"text tower {type(text).__name__} has no transformers counterpart")


def _check_clip_vision(visual: VisionTransformer) -> None:
    if visual.attn_pool is not None:
        raise UsageError(
            "image tower pools with open_clip's attentional pooler (CoCa-style), which transformers' "
            "CLIPVisionModel lacks"
        )
    if visual.pool_type != "tok":
        raise UsageError(
            f"image tower pools the {'average of the patch tokens' if visual.pool_type == 'avg' else 'tokens'} "
            f"(pool_type {visual.pool_type!r}); transformers' CLIPVisionModel pools the class token and "
            "SiglipVisionModel has no class token (an attention-pooled timm ViT maps to SiglipModel: see "
            "the test-siglip-vit-tiny config)"
        )
    if isinstance(visual.ln_pre, nn.Identity):
        raise UsageError(
            "image tower has no LayerNorm before its blocks (no_ln_pre); CLIPVisionModel has one"
        )
    if visual.proj is None:
        raise UsageError("image tower has no projection; transformers' CLIPModel projects both towers")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise UsageError(
            f"image tower takes {visual.image_size} images in {visual.patch_size} patches; transformers' "
            "CLIPVisionModel takes square images and patches"
        )


def _check_siglip_vision(visual: TimmModel) -> None:
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    trunk = visual.trunk
    name = getattr(trunk, "pretrained_cfg", {}).get("architecture") or type(trunk).__name__
    if not isinstance(trunk, TimmViT):
        raise UsageError(
            f"image tower is timm {name!r} ({type(trunk).__name__}), which has no transformers "
            "counterpart; transformers' SiglipModel takes a timm ViT with attention pooling (SigLIP's)"
        )
    pool = trunk.attn_pool
    if trunk.num_prefix_tokens or not isinstance(pool, AttentionPoolLatent):
        raise UsageError(
            f"image tower is timm ViT {name!r} with {trunk.num_prefix_tokens} class/register token(s) and "
            f"global_pool {trunk.global_pool!r}; transformers' SiglipVisionModel needs no prefix tokens and "
            "attention pooling (global_pool 'map')"
        )
    if pool.latent_len != 1 or pool.pool != "token" or pool.pos_embed is not None or pool.mlp is None:
        raise UsageError(
            f"image tower {name!r}: its attention pooling (latent_len {pool.latent_len}, pool {pool.pool!r}) "
            "is not SigLIP's single-probe MAP head"
        )
    height, width = trunk.patch_embed.img_size
    if height != width or trunk.patch_embed.patch_size[0] != trunk.patch_embed.patch_size[1]:
        raise UsageError(
            f"image tower {name!r} takes {height}x{width} images; SiglipVisionModel takes square ones"
        )


def _check_text(text: TextTowerView, family: str) -> None:
    if text.cls_emb is not None:
        raise UsageError("text tower appends a class token (embed_cls, CoCa); transformers has no such tower")
    if family == "clip":
        eos_pool = text.pool_type == "argmax" or (text.pool_type == "eos" and text.eos_id == EOS_TOKEN_ID)
        if not (text.causal and eos_pool):
            raise UsageError(
                f"text tower (pool_type {text.pool_type!r}, {'causal' if text.causal else 'bidirectional'}) "
                "does not match transformers' CLIPTextModel: causal attention pooled at the end-of-text token"
            )
        bias = getattr(text.text_projection, "bias", None)  # a Linear (proj_bias) has one, a matrix not
        if bias is not None and bool(bias.detach().abs().max() > 0):
            raise UsageError(
                "text projection has a bias (proj_bias); transformers' CLIPModel projects without one"
            )
    elif text.causal or text.pad_mask or text.pool_type != "last":
        raise UsageError(
            f"text tower (pool_type {text.pool_type!r}, {'causal' if text.causal else 'bidirectional'}"
            f"{', padding masked' if text.pad_mask else ''}) does not match transformers' SiglipTextModel: "
            "bidirectional attention over every position, pooled at the last position"
        )
    if text.text_projection is None:
        raise UsageError("text tower has no projection (proj_type 'none'); transformers projects the text")


def _check_tokenizer(model: nn.Module) -> None:
    tokenizer = get_tokenizer(model)
    text_cfg = model_info(model)["model_cfg"]["text_cfg"]
    if not isinstance(tokenizer, SimpleTokenizer) or tokenizer.vocab_size != VOCAB_SIZE:
        raise UsageError(
            f"the model's tokenizer is {type(tokenizer).__name__}; the transformers export writes open_clip's "
            "CLIP BPE tokenizer only"
        )
    if text_cfg.get("tokenizer_kwargs"):
        raise UsageError(
            f"the model's tokenizer has options {text_cfg['tokenizer_kwargs']}; transformers' CLIPTokenizer "
            "cleans and splits text as open_clip's default CLIP tokenizer does"
        )


# ---- weights ----------------------------------------------------------------------------------------------
class _WeightMap:
    """Moves weights from open_clip's state dict to transformers names, remembering which it used."""

    def __init__(self, source: dict[str, torch.Tensor]) -> None:
        self.source = source
        self.used: set[str] = set()
        self.target: dict[str, torch.Tensor] = {}

    def take(self, key: str) -> torch.Tensor:
        if key not in self.source:
            raise UsageError(f"the model has no weight {key!r}, which transformers' model needs")
        self.used.add(key)
        return self.source[key]

    def copy(self, target_key: str, source_key: str) -> None:
        self.target[target_key] = self.take(source_key).clone()

    def linear(self, target: str, source: str) -> None:
        self.copy(f"{target}.weight", f"{source}.weight")
        self.copy(f"{target}.bias", f"{source}.bias")

    def unused(self) -> list[str]:
        return sorted(set(self.source) - self.used)


# Names inside one source block: packed q/k/v weight (its bias beside it), out-projection, the two norms, MLP.
_OPEN_CLIP_BLOCK = (
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj",
    "ln_1",
    "ln_2",
    "mlp.c_fc",
    "mlp.c_proj",
)
_TIMM_BLOCK = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2")


def _encoder_layers(
    mapper: _WeightMap, source: str, target: str, layers: int, names: tuple[str, ...]
) -> None:
    """Transformer blocks (`names`: `_OPEN_CLIP_BLOCK` or `_TIMM_BLOCK`) -> CLIP/SigLIP encoder layers, the packed
    q/k/v split in q, k, v order."""
    qkv_weight, qkv_bias, out_proj, norm1, norm2, fc1, fc2 = names
    for index in range(layers):
        block, layer = f"{source}.{index}", f"{target}.{index}"
        q_w, k_w, v_w = mapper.take(f"{block}.{qkv_weight}").chunk(3, dim=0)  # [3W, W] -> 3 x [W, W]
        q_b, k_b, v_b = mapper.take(f"{block}.{qkv_bias}").chunk(3, dim=0)
        for name, weight, bias in (("q_proj", q_w, q_b), ("k_proj", k_w, k_b), ("v_proj", v_w, v_b)):
            mapper.target[f"{layer}.self_attn.{name}.weight"] = weight.clone()
            mapper.target[f"{layer}.self_attn.{name}.bias"] = bias.clone()
        mapper.linear(f"{layer}.self_attn.out_proj", f"{block}.{out_proj}")
        mapper.linear(f"{layer}.layer_norm1", f"{block}.{norm1}")
        mapper.linear(f"{layer}.layer_norm2", f"{block}.{norm2}")
        mapper.linear(f"{layer}.mlp.fc1", f"{block}.{fc1}")
        mapper.linear(f"{layer}.mlp.fc2", f"{block}.{fc2}")


def _text_weights(mapper: _WeightMap, text: TextTowerView, layers: int) -> None:
    """Embeddings, blocks and final LayerNorm of a native text tower -> `text_model.*` (CLIP and SigLIP alike)."""
    prefix = text.prefix
    mapper.copy("text_model.embeddings.token_embedding.weight", f"{prefix}token_embedding.weight")
    mapper.copy("text_model.embeddings.position_embedding.weight", f"{prefix}positional_embedding")
    _encoder_layers(
        mapper, f"{prefix}transformer.resblocks", "text_model.encoder.layers", layers, _OPEN_CLIP_BLOCK
    )
    mapper.linear("text_model.final_layer_norm", f"{prefix}ln_final")


def _text_projection(mapper: _WeightMap, text: TextTowerView) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text projection as a Linear's (weight [D, W], bias [D] or None)."""
    key = f"{text.prefix}text_projection"
    if isinstance(text.text_projection, nn.Linear):
        bias = mapper.take(f"{key}.bias").clone() if text.text_projection.bias is not None else None
        return mapper.take(f"{key}.weight").clone(), bias
    return mapper.take(key).t().contiguous(), None  # open_clip's [W, D] matrix applied as x @ P


def _clip_model(model: nn.Module, mapper: _WeightMap):
    from transformers import CLIPConfig, CLIPModel

    visual, text = model.visual, text_tower_view(model)
    vision_blocks, text_blocks = visual.transformer.resblocks, text.transformer.resblocks
    embed_dim = visual.proj.shape[1]
    vision_config = dict(
        hidden_size=visual.transformer.width,
        intermediate_size=vision_blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(vision_blocks),
        num_attention_heads=vision_blocks[0].attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=_hidden_act(visual.transformer, "vision"),
        layer_norm_eps=_layer_norm_eps(visual, "vision"),
        projection_dim=embed_dim,
    )
    # eos_token_id != 2 makes CLIPTextModel pool at the first end-of-text token, where open_clip's argmax pooling
    # looks (<|endoftext|> is the largest id, and each caption has exactly one).
    text_config = dict(_text_config(mapper, text, text_blocks), projection_dim=embed_dim)
    logit_scale = mapper.take("logit_scale").reshape(())
    config = CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=embed_dim,
        logit_scale_init_value=float(logit_scale),
    )
    hf_model = CLIPModel(config)

    mapper.copy("vision_model.embeddings.class_embedding", "visual.class_embedding")
    mapper.copy("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight")
    mapper.copy("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding")
    mapper.linear("vision_model.pre_layrnorm", "visual.ln_pre")
    _encoder_layers(
        mapper,
        "visual.transformer.resblocks",
        "vision_model.encoder.layers",
        len(vision_blocks),
        _OPEN_CLIP_BLOCK,
    )
    mapper.linear("vision_model.post_layernorm", "visual.ln_post")
    mapper.target["visual_projection.weight"] = (
        mapper.take("visual.proj").t().contiguous()
    )  # [W, D] -> [D, W]
    _text_weights(mapper, text, len(text_blocks))
    projection, _ = _text_projection(mapper, text)  # a bias is zero here (checked)
    mapper.target["text_projection.weight"] = projection
    mapper.target["logit_scale"] = logit_scale.clone()
    return hf_model


def _siglip_model(model: nn.Module, mapper: _WeightMap):
    from transformers import SiglipConfig, SiglipModel

    trunk, text = model.visual.trunk, text_tower_view(model)
    vision_blocks, text_blocks = trunk.blocks, text.transformer.resblocks
    width = trunk.embed_dim
    projection, projection_bias = _text_projection(mapper, text)
    if projection.shape[0] != width:
        raise UsageError(
            f"text embeddings ({projection.shape[0]}) and image embeddings ({width}) differ in size; "
            "transformers' SiglipModel has no image projection (the image tower's width is the embedding size)"
        )
    vision_config = dict(
        hidden_size=width,
        intermediate_size=vision_blocks[0].mlp.fc1.out_features,
        num_hidden_layers=len(vision_blocks),
        num_attention_heads=vision_blocks[0].attn.num_heads,
        image_size=trunk.patch_embed.img_size[0],
        patch_size=trunk.patch_embed.patch_size[0],
        hidden_act=_hidden_act(trunk, "vision"),
        layer_norm_eps=_layer_norm_eps(trunk, "vision"),
        vision_use_head=True,
    )
    text_config = dict(_text_config(mapper, text, text_blocks), projection_size=width)
    if trunk.attn_pool.num_heads != vision_config["num_attention_heads"]:
        raise UsageError(
            "the image tower's attention pooling has other heads than its blocks; SigLIP's share them"
        )
    hf_model = SiglipModel(SiglipConfig(text_config=text_config, vision_config=vision_config))

    vision = "visual.trunk"
    mapper.linear("vision_model.embeddings.patch_embedding", f"{vision}.patch_embed.proj")
    position = mapper.take(f"{vision}.pos_embed")  # [1, N, W]
    mapper.target["vision_model.embeddings.position_embedding.weight"] = position.reshape(-1, width).clone()
    _encoder_layers(
        mapper, f"{vision}.blocks", "vision_model.encoder.layers", len(vision_blocks), _TIMM_BLOCK
    )
    mapper.linear("vision_model.post_layernorm", f"{vision}.norm")
    head, pool = "vision_model.head", f"{vision}.attn_pool"
    mapper.copy(f"{head}.probe", f"{pool}.latent")
    # timm's query and fused key/value projections are nn.MultiheadAttention's packed in-projection (q, k, v).
    mapper.target[f"{head}.attention.in_proj_weight"] = torch.cat(
        [mapper.take(f"{pool}.q.weight"), mapper.take(f"{pool}.kv.weight")], dim=0
    )
    mapper.target[f"{head}.attention.in_proj_bias"] = torch.cat(
        [mapper.take(f"{pool}.q.bias"), mapper.take(f"{pool}.kv.bias")], dim=0
    )
    mapper.linear(f"{head}.attention.out_proj", f"{pool}.proj")
    mapper.linear(f"{head}.layernorm", f"{pool}.norm")
    mapper.linear(f"{head}.mlp.fc1", f"{pool}.mlp.fc1")
    mapper.linear(f"{head}.mlp.fc2", f"{pool}.mlp.fc2")
    _text_weights(mapper, text, len(text_blocks))
    mapper.target["text_model.head.weight"] = projection
    mapper.target["text_model.head.bias"] = (
        projection_bias if projection_bias is not None else torch.zeros(projection.shape[0])
    )
    mapper.target["logit_scale"] = mapper.take("logit_scale").reshape(1).clone()
    bias = mapper.take("logit_bias") if "logit_bias" in mapper.source else torch.zeros(())
    mapper.target["logit_bias"] = bias.reshape(1).clone()
    return hf_model


def _text_modules(text: TextTowerView) -> nn.Module:
    return nn.ModuleList([text.transformer, text.ln_final])


# Activation modules by class name (open_clip's and timm's own classes) -> transformers' `hidden_act`.
_ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELU": "gelu", "GELUTanh": "gelu_pytorch_tanh"}
_OTHER_ACTIVATIONS = (nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish, nn.GLU)


def _text_config(mapper, text, text_blocks) -> dict:
    """The text-tower settings CLIPTextConfig and SiglipTextConfig share, read from an open_clip text tower."""
    return dict(
        vocab_size=mapper.source[f"{text.prefix}token_embedding.weight"].shape[0],
        hidden_size=text.transformer.width,
        intermediate_size=text_blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(text_blocks),
        num_attention_heads=text_blocks[0].attn.num_heads,
        max_position_embeddings=text.context_length,
        hidden_act=_hidden_act(text.transformer, "text"),
        layer_norm_eps=_layer_norm_eps(_text_modules(text), "text"),
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def _hidden_act(tower: nn.Module, which: str) -> str:
    """transformers' `hidden_act` for the activations in `tower` (they must all be the same)."""
    names = set()
    for module in tower.modules():
        if isinstance(module, nn.GELU):
            names.add("gelu" if module.approximate == "none" else "gelu_pytorch_tanh")
        elif isinstance(module, QuickGELU) or type(module).__name__ in _ACTIVATIONS:
            names.add(_ACTIVATIONS[type(module).__name__])
        elif isinstance(module, _OTHER_ACTIVATIONS):
            names.add(type(module).__name__)
    if len(names) != 1 or not names <= set(_ACTIVATIONS.values()):
        raise UsageError(
            f"the {which} tower's activations are {sorted(names) or 'unknown'}; transformers' tower takes one "
            "of GELU, tanh-GELU or QuickGELU"
        )
    return names.pop()


def _layer_norm_eps(tower: nn.Module, which: str) -> float:
    """The tower's LayerNorm epsilon (transformers' tower has one for all its LayerNorms)."""
    eps = {module.eps for module in tower.modules() if isinstance(module, nn.LayerNorm)}
    others = {type(m).__name__ for m in tower.modules() if "Norm" in type(m).__name__} - {"LayerNorm"}
    others -= {"LayerNormFp32"}
    if len(eps) != 1 or others:
        raise UsageError(
            f"the {which} tower's norms ({sorted(others) or 'LayerNorm'} with eps {sorted(eps)}) differ from "
            "transformers' single-epsilon LayerNorms"
        )
    return float(eps.pop())
