"""The tokenizer and image processor of a transformers export: open_clip's preprocessing as transformers files.

    tokenizer = clip_tokenizer(context_length=16, attention_mask=True)   # transformers.CLIPTokenizer
    write_bpe_files(tokenizer_dir)                                       # vocab.json + merges.txt
    image_processor = clip_image_processor(model.visual.preprocess_cfg)  # transformers.CLIPImageProcessor

Tokenizer: open_clip's CLIP tokenizer (`SimpleTokenizer`) is a byte-level BPE over
`open_clip/bpe_simple_vocab_16e6.txt.gz`; its vocabulary (the 256 byte symbols, the same with the word-end mark
`</w>`, one token per merge, then the two special tokens) and its merge ranks are read from open_clip's own
tokenizer object, so the ids are open_clip's by construction: `<|startoftext|>` = 49406, `<|endoftext|>` =
49407, padding with id 0 (the token "!", as open_clip pads). `split_special_tokens` keeps a "!" in a caption
an ordinary character (otherwise the pad token would be matched inside text). Known differences from
open_clip, both outside ordinary captions: open_clip repairs mojibake and HTML entities first (ftfy,
`html.unescape`), and reads its own `<start_of_text>` / `<end_of_text>` strings inside a caption as the
special tokens.

Image processor: open_clip's eval transform for the `preprocess_cfg` open_clip set on the model — resize the
shortest edge and center-crop (`resize_mode` "shortest"), or resize to the exact size ("squash") — with its
interpolation, mean and std. transformers picks the torchvision backend by default, which resizes with its
own antialiasing (within one grey level, 0.015 after normalisation, of open_clip's); load the processor with
`backend="pil"` (`CLIPProcessor.from_pretrained(DIR, backend="pil")`) for open_clip's pixels exactly (PIL
resizes in both).
"""

from __future__ import annotations

import json
from pathlib import Path

from open_clip.tokenizer import SimpleTokenizer

from mmret.errors import UsageError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"  # id 0: the id open_clip pads with
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN_ID = 0
VOCAB_SIZE = 49408
# open_clip's names of its special tokens -> the names transformers' CLIP tokenizer gives the same ids.
_SPECIAL_TOKEN_NAMES = {"<start_of_text>": BOS_TOKEN, "<end_of_text>": EOS_TOKEN}
# open_clip's interpolation names -> PIL.Image.Resampling values (what transformers' `resample` holds).
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's CLIP BPE as (vocabulary: token -> id, merges in rank order)."""
    reference = SimpleTokenizer()
    vocab = {_SPECIAL_TOKEN_NAMES.get(token, token): index for token, index in reference.encoder.items()}
    merges = [pair for pair, _ in sorted(reference.bpe_ranks.items(), key=lambda item: item[1])]
    if len(vocab) != VOCAB_SIZE or vocab[BOS_TOKEN] != BOS_TOKEN_ID or vocab[EOS_TOKEN] != EOS_TOKEN_ID:
        raise UsageError(
            f"open_clip's CLIP tokenizer has {len(vocab)} tokens (expected {VOCAB_SIZE}, with "
            f"{BOS_TOKEN}={BOS_TOKEN_ID} and {EOS_TOKEN}={EOS_TOKEN_ID}); this open_clip version cannot be exported"
        )
    return vocab, merges


def write_bpe_files(directory: str | Path) -> None:
    """`vocab.json` and `merges.txt` of open_clip's CLIP BPE (the files a slow CLIPTokenizer reads)."""
    directory = Path(directory)
    vocab, merges = clip_bpe()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2", *(f"{first} {second}" for first, second in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def clip_tokenizer(context_length: int, attention_mask: bool = True):
    """transformers' CLIPTokenizer with open_clip's CLIP BPE, truncating to `context_length` tokens.

    Args:
        context_length: The text tower's context length (its positional table).
        attention_mask: Whether the tokenizer returns an attention mask. False for a tower that attends to
            every position, padding included (SigLIP-style text towers, pooled at the last position): there a
            mask would change what the padding positions contribute.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=context_length,
        split_special_tokens=True,
        model_input_names=["input_ids", "attention_mask"] if attention_mask else ["input_ids"],
    )


def clip_image_processor(preprocess_cfg: dict):
    """transformers' CLIPImageProcessor doing open_clip's eval transform for `preprocess_cfg`.

    Raises:
        UsageError: a preprocessing transformers' image processor cannot do (resize the longest edge and pad,
            a non-square shortest-edge crop, an interpolation or colour mode it lacks).
    """
    from transformers import CLIPImageProcessor

    height, width = _size(preprocess_cfg.get("size", 224))
    mode = preprocess_cfg.get("resize_mode", "shortest")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation not in _RESAMPLE:
        raise UsageError(
            f"image preprocessing interpolation {interpolation!r} has no transformers equivalent; expected one "
            f"of {sorted(_RESAMPLE)}"
        )
    if preprocess_cfg.get("mode", "RGB") != "RGB":
        raise UsageError(
            f"image mode {preprocess_cfg['mode']!r}: transformers' CLIP image processor gives RGB"
        )
    common = dict(
        do_resize=True,
        resample=_RESAMPLE[interpolation],
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[
            float(value) for value in preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        ],
        image_std=[float(value) for value in preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))],
        do_convert_rgb=True,
    )
    if mode == "shortest" and height == width:
        return CLIPImageProcessor(
            size={"shortest_edge": height},
            do_center_crop=True,
            crop_size={"height": height, "width": width},
            **common,
        )
    if mode == "squash":
        return CLIPImageProcessor(size={"height": height, "width": width}, do_center_crop=False, **common)
    raise UsageError(
        f"image preprocessing resize_mode {mode!r} at {height}x{width} has no transformers equivalent "
        "(supported: 'shortest' to a square, 'squash')"
    )


def _size(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)
