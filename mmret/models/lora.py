"""LoRA adapters on open_clip dual encoders: open_clip ViT / text transformers, timm and Hugging Face towers.

    settings = LoraSettings(rank=8, alpha=16, dropout=0.0, targets=["image", "text", "attn", "mlp"])
    model = apply_lora(create_model("ViT-B-32", "openai"), settings)   # only adapters (+ `unlock`) train
    lora_state(model)                                                   # {name: tensor} of the adapter weights
    plain = merge_lora(model)                                           # an ordinary open_clip model again
    export_open_clip(plain, None, "export/")

Linear and Conv layers (MLPs, Hugging Face attention projections, timm convs) get peft's LoRA layers
(`peft.inject_adapter_in_model`; the model keeps its own class, so `encode_image` / `logit_scale` work as before).

open_clip's attention is `nn.MultiheadAttention`, whose q/k/v projection is a bare parameter (`in_proj_weight`) and
whose `out_proj.forward` is never called. peft 0.22 has an experimental LoRA for it, but it works by adding the
delta into the base weight before each forward and subtracting it afterwards, so the frozen base weights drift by
float rounding on every forward (`(W + d) - d != W`) and are re-registered as new Parameter objects each call
(bad for DDP/FSDP and for "the base stays bit-identical"). So attention layers are wrapped here instead
(`LoraMultiheadAttention`): the base weights are only read; q/k/v and the output projection get a low-rank branch
`scale * B(A(dropout(x)))` and attention is computed with `scaled_dot_product_attention`.

Targets: "image" / "text" pick towers (neither: both); "attn" / "mlp" pick layer kinds across architectures
(neither: both); any other string is a regular expression searched in the full module name
(e.g. r"resblocks\\.(10|11)\\.", "c_fc"), restricting the selection further.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from open_clip.utils import freeze_batch_norm_2d
from torch import nn

TOWERS = ("image", "text")
KINDS = ("attn", "mlp")
UNLOCKABLE = ("logit_scale", "logit_bias", "projections")

# timm's attention pooling (SigLIP's MAP head): its q / kv / proj are attention, its mlp an MLP.
_ATTN_NAME = re.compile(
    r"(^|\.)(attn|attention|self_attn|q_proj|k_proj|v_proj|qkv)(\.|$)|(^|\.)attn_pool\.(q|kv|proj)$"
)
_MLP_NAME = re.compile(
    r"(^|\.)(mlp|intermediate|ffn|feed_forward|fc1|fc2)(\.|$)|(^|\.)layer\.\d+\.output\.dense$"
)
# The towers' output projections: CLIP's matrices, a CustomTextCLIP native text tower's Linear, timm / HF heads.
_PROJECTION_PARAM = re.compile(
    r"^(visual\.proj|text_projection|text\.text_projection(\.\w+)?|visual\.head\.proj\.\w+|text\.proj\.\w+)$"
)


@dataclass
class LoraSettings:
    """What LoRA adapts and how.

    Args:
        rank: Rank r of each adapter (A: r × in, B: out × r; B starts at zero, so the model is unchanged at start).
        alpha: The adapter output is scaled by alpha / rank.
        dropout: Dropout on the adapter's input.
        targets: Towers ("image", "text"), layer kinds ("attn", "mlp") and/or module-name regular expressions.
        unlock: Parameters trained besides the adapters: "logit_scale", "logit_bias", "projections" (the towers'
            output projections).
        freeze_norm_stats: Freeze BatchNorm running statistics too (timm CNN towers; `FrozenBatchNorm2d`, as a
            locked tower), so no base tensor changes in training.
        use_rslora: rank-stabilised LoRA (peft's `use_rslora`): scale by alpha / sqrt(rank) instead of alpha / rank.
        use_dora: weight-decomposed LoRA (DoRA, peft's `use_dora`): a trained magnitude per output row besides the
            low-rank direction update; on Linear layers (timm and Hugging Face towers, open_clip MLPs), not on
            open_clip's nn.MultiheadAttention (leave `attn` out of the targets there).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["image", "text", "attn", "mlp"])
    unlock: list[str] = field(default_factory=list)
    freeze_norm_stats: bool = True
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ValueError(f"lora.rank is {self.rank}; expected a positive integer")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout is {self.dropout}; expected a number in [0, 1)")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.unlock, str):
            self.unlock = [self.unlock]
        for name in self.unlock:
            if name not in UNLOCKABLE:
                raise ValueError(f"lora.unlock has {name!r}; expected some of {', '.join(UNLOCKABLE)}")
        for pattern in self.targets:
            if pattern not in TOWERS + KINDS:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(
                        f"lora.targets has {pattern!r}, not a regular expression: {error}"
                    ) from None

    @classmethod
    def from_value(cls, value: LoraSettings | dict | None) -> LoraSettings | None:
        """Settings from a LightningCLI dict (`model.lora: {rank: 8, ...}`), a LoraSettings, or None."""
        if value is None or isinstance(value, LoraSettings):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"lora is {value!r}; expected a mapping like {{rank: 8, alpha: 16}}")
        known = [f.name for f in fields(cls)]
        unknown = [key for key in value if key not in known]
        if unknown:
            raise ValueError(f"lora has unknown keys {unknown}; expected some of {', '.join(known)}")
        return cls(**dict(value))

    @property
    def scaling(self) -> float:
        return float(self.alpha) / (math.sqrt(int(self.rank)) if self.use_rslora else int(self.rank))


class LoraMultiheadAttention(nn.Module):
    """LoRA around an `nn.MultiheadAttention` (q/k/v in-projection and out-projection), base weights read-only."""

    def __init__(
        self,
        base: nn.MultiheadAttention,
        rank: int,
        alpha: float,
        dropout: float,
        scaling: float | None = None,
    ) -> None:
        super().__init__()
        if not base._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim")
        self.base = base
        self.scaling = float(alpha) / rank if scaling is None else float(scaling)
        embed = base.embed_dim
        self.lora_in_A = nn.Parameter(torch.empty(rank, embed, dtype=base.in_proj_weight.dtype))
        self.lora_in_B = nn.Parameter(torch.zeros(3 * embed, rank, dtype=base.in_proj_weight.dtype))
        self.lora_out_A = nn.Parameter(torch.empty(rank, embed, dtype=base.in_proj_weight.dtype))
        self.lora_out_B = nn.Parameter(torch.zeros(embed, rank, dtype=base.in_proj_weight.dtype))
        for weight in (self.lora_in_A, self.lora_out_A):  # peft's / the LoRA paper's init: B = 0, A ~ kaiming
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def batch_first(self) -> bool:
        return self.base.batch_first

    def _lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(in_proj delta [3E, E], out_proj delta [E, E]) = scale · B @ A."""
        return (
            (self.lora_in_B @ self.lora_in_A) * self.scaling,
            (self.lora_out_B @ self.lora_out_A) * self.scaling,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        base = self.base
        if not base.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, q_len, embed = query.shape
        k_len = key.shape[1]
        heads = base.num_heads
        w_q, w_k, w_v = base.in_proj_weight.chunk(3)
        b_q, b_k, b_v = base.in_proj_bias.chunk(3) if base.in_proj_bias is not None else (None, None, None)
        lb_q, lb_k, lb_v = self.lora_in_B.chunk(3)
        q = F.linear(query, w_q, b_q) + self._lora(query, self.lora_in_A, lb_q)
        k = F.linear(key, w_k, b_k) + self._lora(key, self.lora_in_A, lb_k)
        v = F.linear(value, w_v, b_v) + self._lora(value, self.lora_in_A, lb_v)
        if base.bias_k is not None or base.add_zero_attn:
            raise NotImplementedError("LoRA on nn.MultiheadAttention with add_bias_kv / add_zero_attn")

        def split(t: torch.Tensor, length: int) -> torch.Tensor:
            return t.reshape(batch, length, heads, embed // heads).transpose(1, 2)

        mask = _additive_mask(attn_mask, key_padding_mask, batch, heads, q_len, k_len, q.dtype)
        out = F.scaled_dot_product_attention(
            split(q, q_len),
            split(k, k_len),
            split(v, k_len),
            attn_mask=mask,
            dropout_p=base.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        out = out.transpose(1, 2).reshape(batch, q_len, embed)
        out = F.linear(out, base.out_proj.weight, base.out_proj.bias) + self._lora(
            out, self.lora_out_A, self.lora_out_B
        )
        if not base.batch_first:
            out = out.transpose(0, 1)
        if need_weights:
            raise NotImplementedError("LoRA attention does not return attention weights (need_weights=True)")
        return out, None

    def merged(self) -> nn.MultiheadAttention:
        """The base attention with the adapter added into its weights (a new plain module)."""
        base = copy.deepcopy(self.base)
        delta_in, delta_out = self.delta_weights()
        with torch.no_grad():
            base.in_proj_weight.add_(delta_in.to(base.in_proj_weight.dtype))
            base.out_proj.weight.add_(delta_out.to(base.out_proj.weight.dtype))
        return base


def _additive_mask(attn_mask, key_padding_mask, batch, heads, q_len, k_len, dtype):
    """nn.MultiheadAttention's masks (bool: True = masked out; float: added) as one SDPA float mask or None."""

    def as_float(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = as_float(attn_mask)
        if mask.dim() == 3:  # [B*H, L, S]
            mask = mask.reshape(batch, heads, q_len, k_len)
    if key_padding_mask is not None:
        padding = as_float(key_padding_mask).reshape(batch, 1, 1, k_len)
        mask = padding if mask is None else mask + padding
    return mask


def _tower_of(name: str) -> str:
    return "image" if name == "visual" or name.startswith("visual.") else "text"


def _kind_of(name: str, module: nn.Module) -> str | None:
    if isinstance(module, nn.MultiheadAttention) or _ATTN_NAME.search(name):
        return "attn"
    if _MLP_NAME.search(name):
        return "mlp"
    return None


def lora_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the modules `apply_lora` adapts (nn.MultiheadAttention, nn.Linear, nn.Conv2d)."""
    towers = [t for t in settings.targets if t in TOWERS] or list(TOWERS)
    kinds = [t for t in settings.targets if t in KINDS]
    patterns = [re.compile(t) for t in settings.targets if t not in TOWERS + KINDS]
    if not kinds and not patterns:
        kinds = list(KINDS)
    attention = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.MultiheadAttention, nn.Linear, nn.Conv2d)):
            continue
        if any(name.startswith(a + ".") for a in attention):
            continue  # an attention's out_proj: adapted with its attention (its forward is never called)
        if _tower_of(name) not in towers:
            continue
        if _PROJECTION_PARAM.match(name + ".weight"):
            continue  # output projections are unlocked, not adapted
        kind_ok = not kinds or _kind_of(name, module) in kinds
        pattern_ok = not patterns or any(p.search(name) for p in patterns)
        if kind_ok and pattern_ok:
            names.append(name)
    return names


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


def apply_lora(model: nn.Module, settings: LoraSettings | dict) -> nn.Module:
    """Add LoRA adapters to `model` in place and freeze everything else but `settings.unlock`; returns `model`.

    The model keeps its class (CLIP / CustomTextCLIP), so it is used exactly as before.
    """
    settings = LoraSettings.from_value(settings)
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    names = lora_targets(model, settings)
    if not names:
        raise ValueError(f"lora.targets {settings.targets} select no layer of this model")
    modules = dict(model.named_modules())
    attention = [n for n in names if isinstance(modules[n], nn.MultiheadAttention)]
    linear = [n for n in names if n not in attention]
    if attention and settings.use_dora:
        raise ValueError(
            f"lora.use_dora: {attention[0]} is an nn.MultiheadAttention (open_clip), which mmret adapts with plain "
            "LoRA only; leave attn out of lora.targets, or set use_dora false"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    if settings.freeze_norm_stats:
        freeze_batch_norm_2d(model)
    for name in attention:
        _set_child(
            model,
            name,
            LoraMultiheadAttention(
                modules[name], settings.rank, settings.alpha, settings.dropout, scaling=settings.scaling
            ),
        )
    if linear:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=int(settings.rank),
            lora_alpha=settings.alpha,
            lora_dropout=float(settings.dropout),
            use_rslora=bool(settings.use_rslora),
            use_dora=bool(settings.use_dora),
            # One regular expression, which peft matches against whole names: a list would be matched by suffix,
            # and CLIP's text layers (`transformer.resblocks.0.mlp.c_fc`) end the image tower's names too.
            target_modules="|".join(re.escape(name) for name in linear),
            bias="none",
        )
        inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for name, param in model.named_parameters():
        if _unlocked(name, settings.unlock):
            param.requires_grad_(True)
    return model


def _unlocked(name: str, unlock: Sequence[str]) -> bool:
    return (
        ("logit_scale" in unlock and name == "logit_scale")
        or ("logit_bias" in unlock and name == "logit_bias")
        or ("projections" in unlock and bool(_PROJECTION_PARAM.match(name)))
    )


def has_lora(model: nn.Module) -> bool:
    """Whether `model` carries LoRA adapters (from `apply_lora`)."""
    return any("lora_" in name for name, _ in model.named_parameters())


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters, {full parameter name: tensor} (detached)."""
    return {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable": ..., "total": ..., "adapter": ...} parameter counts."""
    params = list(model.named_parameters())
    return {
        "trainable": sum(p.numel() for _, p in params if p.requires_grad),
        "total": sum(p.numel() for n, p in params if "lora_" not in n),
        "adapter": sum(p.numel() for n, p in params if "lora_" in n),
    }


def merge_lora(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain model (same class, no adapters) whose weights include the adapters; every parameter trainable.

    The result saves and exports like any open_clip model (`export_open_clip`, transformers, sentence-transformers).
    Unless `inplace`, `model` itself is left as it is.
    """
    if not inplace:
        model = copy.deepcopy(model)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraMultiheadAttention):
            _set_child(model, name, module.merged())
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            _set_child(model, name, module.get_base_layer())
    if has_lora(model):
        raise RuntimeError("adapters left after merging: " + ", ".join(lora_state(model))[:200])
    for param in model.parameters():
        param.requires_grad_(True)
    return model
