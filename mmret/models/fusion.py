"""The cross-encoder's parts: token features from open_clip towers and the fusion layers that score a pair.

    image_pooled, patch_tokens = image_tokens(model, images)          # [B, D], [B, P, Wv]
    text_pooled, token_states, token_mask = text_tokens(model, text)  # [B, D], [B, L, Wt], [B, L]
    fusion = FusionScorer(text_width=Wt, image_width=Wv, width=256, layers=2, heads=4)
    scores = fusion(token_states, token_mask, patch_tokens)          # [B] one relevance logit per pair
    scores = fusion(token_states, token_mask, patch_tokens, index)   # pair i has image patch_tokens[index[i]]

Text tokens attend to each other (self-attention, padding masked) and to the image's patch tokens
(cross-attention), in a few pre-norm transformer layers (ALBEF / BLIP's fusion encoder, in small). An
image's keys and values are computed once however many pairs share it. The fused
text states are mean-pooled over the real tokens and a linear head gives the score. Each pair is scored on its
own — nothing mixes pairs — so a pair's score does not depend on which other candidates share the batch.
What the image tokens hold is the caller's choice: the final patch tokens, with the tower's patch embeddings
beside them (`image_tokens(..., patch_embeddings=True)`), and/or a `PixelStem`'s tokens concatenated; the
scorer can add fixed 2-D grid positions (`image_grid`, `grid_position_features`) and a learned embedding.

No Lightning here: `mmret.training.CrossEncoder` trains these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmret.models.towers import text_tower


def image_tokens(model: nn.Module, images: Tensor, patch_embeddings: bool = False) -> tuple[Tensor, Tensor]:
    """An open_clip image tower's L2-normalised embedding and its patch tokens.

    Args:
        model: an open_clip CLIP / CustomTextCLIP whose `visual` is a VisionTransformer, or a timm tower (its
            trunk's last feature map, one token per position, e.g. a ResNet's 2 x 2 grid at 64 px).
        images: [B, 3, H, W].
        patch_embeddings: also return each patch's embedding at the tower's input (the output of `ln_pre`:
            patch pixels projected, plus the tower's position embedding), concatenated to its final token
            along the width. The final tokens have been mixed across the whole image by every block; the
            input embeddings still hold that patch's own pixels and place.

    Returns:
        pooled embedding [B, D] (normalised, what the dual encoder ranks with) and patch tokens [B, P, Wv]
        ([B, P, 2 Wv] with `patch_embeddings`).
    """
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "forward_features") and hasattr(trunk, "forward_head"):
        # open_clip's timm tower: the trunk's last feature map is the token grid, [B, C, H, W] -> [B, H*W, C]
        # (a timm ViT trunk gives [B, N, C] already); the pooled embedding is the tower's own head on it.
        if patch_embeddings:
            raise ValueError(
                f"image tower {type(trunk).__name__} (timm) has no patch embeddings; leave "
                "fusion_patch_embeddings off"
            )
        features = trunk.forward_features(images)
        pooled = visual.head(trunk.forward_head(features))
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        return F.normalize(pooled, dim=-1), tokens
    if not hasattr(visual, "output_tokens"):
        raise ValueError(
            f"image tower {type(visual).__name__} cannot return patch tokens; use an open_clip ViT or timm tower"
        )
    captured: list[Tensor] = []
    hook = (
        visual.ln_pre.register_forward_hook(lambda module, args, output: captured.append(output))
        if patch_embeddings
        else None
    )
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = previous
        if hook is not None:
            hook.remove()
    if patch_embeddings:
        inputs = captured[0]  # [B, prefix + P, Wv]: class (and register) tokens come first
        tokens = torch.cat([tokens, inputs[:, inputs.shape[1] - tokens.shape[1] :]], dim=-1)
    return F.normalize(pooled, dim=-1), tokens


def text_tokens(model: nn.Module, text: Tensor | Mapping) -> tuple[Tensor, Tensor, Tensor]:
    """An open_clip text tower's L2-normalised embedding, its final token states and the real-token mask.

    Args:
        model: an open_clip CLIP (text tower built in) or CustomTextCLIP with a native TextTransformer.
        text: token ids [B, L] (open_clip tokenizers pad with 0).

    Returns:
        pooled embedding [B, D] (normalised), token states [B, L, Wt], bool mask [B, L] (True = real token).
    """
    if isinstance(text, Mapping):
        text = text["input_ids"]
    mask = text != 0  # [B, L]
    tower = text_tower(model)
    if tower is not model:  # CustomTextCLIP: a TextTransformer module with its own output_tokens switch
        if not hasattr(tower, "output_tokens"):
            raise ValueError(f"text tower {type(tower).__name__} cannot return token states")
        previous = tower.output_tokens
        tower.output_tokens = True
        try:
            pooled, states = tower(text)
        finally:
            tower.output_tokens = previous
        return F.normalize(pooled, dim=-1), states, mask[:, : states.shape[1]]
    # CLIP keeps its text tower on the model: the steps of `CLIP.encode_text`, keeping the token states.
    from open_clip.transformer import text_global_pool

    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding.to(cast_dtype)  # [B, L, Wt]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))  # [B, L, Wt]
    pooled = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        projection = model.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
    return F.normalize(pooled, dim=-1), x, mask


def tower_widths(model: nn.Module, patch_embeddings: bool = False) -> tuple[int, int, int]:
    """(text token width Wt, image patch width Wv, number of patch tokens P) of an open_clip model, found by a
    tiny forward pass (`patch_embeddings` as in `image_tokens`)."""
    image_size = model.visual.image_size
    size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    context_length = getattr(text_tower(model), "context_length", None) or model.context_length
    with torch.no_grad():
        _, patches = image_tokens(model, torch.zeros(1, 3, *size), patch_embeddings)
        _, states, _ = text_tokens(model, torch.ones(1, context_length, dtype=torch.long))
    return int(states.shape[-1]), int(patches.shape[-1]), int(patches.shape[1])


def grid_position_features(rows: int, columns: int, width: int, base: float = 100.0) -> Tensor:
    """Fixed 2-D sin-cos features [rows * columns, width] of a row-major patch grid.

    A quarter of the width each: sin and cos of the column, sin and cos of the row, at width / 4 frequencies
    from 1 down to 1 / base per patch step (the lowest still turns less than once across a grid of ~100
    patches). Entries are in [-1, 1], the scale of layer-normed features.
    """
    if width % 4:
        raise ValueError(f"grid position features need a width divisible by 4, got {width}")
    if rows < 1 or columns < 1:
        raise ValueError(f"grid position features need a grid of at least 1 x 1, got {rows} x {columns}")
    frequencies = torch.exp(-math.log(base) * torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    row, column = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32), torch.arange(columns, dtype=torch.float32), indexing="ij"
    )
    column_angles = column.flatten()[:, None] * frequencies  # [P, width / 4]
    row_angles = row.flatten()[:, None] * frequencies
    return torch.cat(
        [column_angles.sin(), column_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1
    )  # [P, width]


class PixelStem(nn.Module):
    """A small convolutional network, trained with the fusion, that reads an image's pixels and gives one token
    per patch of the image tower's grid: [B, 3, H, W] -> [B, P, width] (layer-normed).

    log2(patch_size) stride-2 3x3 convolutions with GELU between them, channels doubling up to `width`. A frozen
    dual-encoder tower describes objects the way its training pairs did; small local filters shared over the
    image see edges and corners directly, which carried over best to colour-shape bindings training never
    showed (measured on shapes' held-out bindings, README "Reranking").
    """

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"a pixel stem needs a power-of-two patch size, got {patch_size}")
        steps = patch_size.bit_length() - 1  # stride-2 stages: 8 -> 3
        channels = [3] + [max(8, width >> (steps - 1 - i)) for i in range(steps - 1)] + [width]
        layers: list[nn.Module] = []
        for i in range(steps):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Conv2d(channels[i], channels[i + 1], kernel_size=3, stride=2, padding=1))
        self.convs = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(channels[-1])

    def forward(self, images: Tensor) -> Tensor:
        return self.norm(self.convs(images).flatten(2).transpose(1, 2))  # [B, P, width], row-major


class CrossAttention(nn.Module):
    """Multi-head attention from text tokens to image tokens whose keys and values are computed once per image.

    A reranker scores many (text, image) pairs that share images (a caption against K candidates, an image
    against K captions): projecting an image's P tokens to keys and values dominates the cost, so
    `keys_values` runs on the distinct images and `forward` indexes them per pair.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def keys_values(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """image [N, P, W] -> keys, values [N, heads, P, W / heads]."""
        n, p, width = image.shape
        key, value = (
            self.key_value(image).view(n, p, 2, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        )
        return key, value

    def forward(self, text: Tensor, key: Tensor, value: Tensor, image_index: Tensor) -> Tensor:
        """text [B, L, W], keys/values of N images, image_index [B] (the image of each pair) -> [B, L, W]."""
        b, length, width = text.shape
        query = self.query(text).view(b, length, self.heads, width // self.heads).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, key[image_index], value[image_index])  # [B, h, L, d]
        return self.out(attended.transpose(1, 2).reshape(b, length, width))


class FusionLayer(nn.Module):
    """Pre-norm transformer layer: text self-attention, cross-attention to image tokens, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.norm_image = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, text: Tensor, text_padding: Tensor, image: Tensor, image_index: Tensor) -> Tensor:
        """text [B, L, W], text_padding [B, L] (True = pad), image [N, P, W] of the distinct images,
        image_index [B] (pair -> image row) -> text [B, L, W]."""
        x = self.norm_self(text)
        text = text + self.self_attn(x, x, x, key_padding_mask=text_padding, need_weights=False)[0]
        key, value = self.cross_attn.keys_values(self.norm_image(image))
        text = text + self.cross_attn(self.norm_cross(text), key, value, image_index)
        return text + self.mlp(self.norm_mlp(text))


class FusionScorer(nn.Module):
    """Fusion layers over (text token states, image patch tokens) and a score head: one logit per pair.

    Args:
        text_width: width Wt of the text tower's token states.
        image_width: width Wv of the image tower's patch tokens.
        width: fusion width (both token streams are projected to it).
        layers: number of fusion layers.
        heads: attention heads per layer.
        dropout: self-attention dropout.
        image_positions: P > 0 adds a learned position embedding [P, width] to the P projected image tokens
            (for towers whose final patch tokens keep little of where they are, as a frozen CLS-pooled ViT's
            do); 0: none.
        image_grid: (rows, columns) of the patch grid: adds fixed 2-D sin-cos features of each token's row and
            column (`grid_position_features`) to the projected image tokens. Unlike a learned embedding
            (initialised near zero), they say where a patch is from the first step, so attention from a word
            to an object brings back where the object is and "left of" / "above" become comparisons the
            fusion layers can learn early (measured on shapes: without them the fusion sat on a plateau).
    """

    def __init__(
        self, text_width: int, image_width: int, width: int = 256, layers: int = 2, heads: int = 4,
        dropout: float = 0.0, image_positions: int = 0, image_grid: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by {heads} heads")
        self.text_proj = nn.Linear(text_width, width)
        self.image_proj = nn.Linear(image_width, width)
        self.image_position = (
            nn.Parameter(torch.randn(image_positions, width) * 0.02) if image_positions else None
        )
        grid = grid_position_features(*image_grid, width) if image_grid else None
        self.register_buffer("image_grid_position", grid, persistent=False)  # recomputed, not stored
        self.layers = nn.ModuleList(FusionLayer(width, heads, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(
        self, text_states: Tensor, text_mask: Tensor, image_tokens: Tensor, image_index: Tensor | None = None
    ) -> Tensor:
        """Score B pairs -> [B] logits.

        Args:
            text_states: [B, L, Wt] token states of each pair's text.
            text_mask: [B, L] bool, True for real tokens.
            image_tokens: [N, P, Wv] patch tokens; with `image_index`, of images that pairs may share.
            image_index: [B] row of `image_tokens` of each pair; None: pair i has image i (N == B).
        """
        # Trailing padding columns change nothing (masked as keys, pooled out as queries) but cost attention
        # over the full context length: cut them off (captions are ~15 of 77 tokens).
        text_mask = text_mask.bool()
        used = text_mask.any(dim=0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        text_states, text_mask = text_states[:, :length], text_mask[:, :length]
        if image_index is None:
            image_index = torch.arange(image_tokens.shape[0], device=image_tokens.device)
        else:  # only the images some pair uses are projected
            distinct, image_index = image_index.unique(return_inverse=True)
            image_tokens = image_tokens[distinct]
        text = self.text_proj(text_states)  # [B, L, W]
        image = self.image_proj(image_tokens)  # [N, P, W]
        if self.image_position is not None:
            if image.shape[1] != self.image_position.shape[0]:
                raise ValueError(
                    f"fusion learned positions for {self.image_position.shape[0]} image tokens, got {image.shape[1]}"
                )
            image = image + self.image_position
        if self.image_grid_position is not None:
            if image.shape[1] != self.image_grid_position.shape[0]:
                raise ValueError(
                    f"fusion has grid positions for {self.image_grid_position.shape[0]} image tokens, got {image.shape[1]}"
                )
            image = image + self.image_grid_position.to(image.dtype)
        padding = ~text_mask
        for layer in self.layers:
            text = layer(text, padding, image, image_index)
        text = self.norm(text)
        weights = text_mask.to(text.dtype).unsqueeze(-1)  # [B, L, 1]
        pooled = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # [B, W]
        return self.head(pooled).squeeze(-1)  # [B]
