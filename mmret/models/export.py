"""Export a dual encoder in open_clip's hub layout, loadable by open_clip alone.

    DIR/open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {...}, "mmret": {...}}
    DIR/open_clip_model.safetensors  the full model state dict
    DIR/config.json, tokenizer files only for Hugging Face text towers (see below)
    DIR/README.md                    the model card (`mmret.models.model_card`)

This is the layout open_clip's `push_to_hf_hub` uploads, so any of these loads the directory:

    open_clip.create_model_and_transforms("local-dir:" + DIR)   # open_clip >= 2.32 (3.3 here)
    open_clip.get_tokenizer("local-dir:" + DIR)
    mmret.models.create_model("local-dir:" + DIR)  or  create_model(name, pretrained=DIR)

Hugging Face text towers: open_clip rebuilds the tower from `text_cfg.hf_model_name` via
`AutoConfig.from_pretrained`, and for `local-dir:` reads an HF tokenizer from DIR itself. So the export keeps
the tower's `config.json` and tokenizer files in DIR and writes `hf_model_name` / `hf_tokenizer_name` as ".":
DIR itself, wherever it is. mmret (`DualEncoder.load`, `create_model("local-dir:" + DIR)`) resolves "." to DIR,
so a moved or copied export loads with no network on any machine; open_clip alone resolves it against the
working directory (run it from DIR), and before uploading DIR to the hub, export with
`hf_model_name="org/hub-model"`.

The directory is written next to its destination under a temporary name and renamed at the end, so an
interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file

import mmret
from mmret.errors import UsageError
from mmret.io import atomic_output_dir, follow_umask
from mmret.models.downloads import explain_download_errors
from mmret.models.factory import model_info
from mmret.models.lora import has_lora, merge_lora
from mmret.models.model_card import CardInfo, write_model_card
from mmret.models.registry import (
    HUB_CONFIG_NAME,
    HUB_WEIGHTS_NAME,
    resolve_local_hf_names,
    resolve_model_source,
)


def export_open_clip(
    model: torch.nn.Module,
    model_name_or_config: str | dict | None,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    hf_model_name: str | None = None,
    card: CardInfo | None = None,
) -> Path:
    """Write `model` to `output_dir` as open_clip_config.json + open_clip_model.safetensors.

    Args:
        model: An open_clip CLIP / CustomTextCLIP (e.g. the `model` of a trained DualEncoder).
        model_name_or_config: The architecture: a name/path `create_model` accepts, an open_clip model config
            dict (bare or {"model_cfg": ...}), or None to use the config `create_model` recorded on the model
            (preferred: it includes overrides such as force_image_size).
        output_dir: Destination directory; must not exist (or be empty) unless `overwrite`.
        overwrite: Replace an existing directory (atomically: the old one is removed only after the new one
            is in place).
        hf_model_name: For HF text towers, the hub id to write as `hf_model_name` instead of "." (DIR)
            (makes the export portable to other machines with internet, e.g. before a hub upload).
        card: What the model card (README.md, `mmret.models.model_card`) says; None: a card without training
            details.

    Returns:
        The absolute path of the written directory.

    Raises:
        UsageError: output exists, or the config does not describe this model's weights.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UsageError(
            f"export destination {output_dir} already exists; choose a new directory or pass overwrite"
        )
    if has_lora(model):  # LoRA adapters (mmret.models.lora): exported merged into the weights
        model = merge_lora(model)
    model_cfg, source_name = _export_model_cfg(model, model_name_or_config)
    state_dict = _portable_state_dict(model)
    _check_config_fits(model_cfg, state_dict, source_name)

    with atomic_output_dir(output_dir, overwrite=True) as tmp_dir:
        text_cfg = model_cfg["text_cfg"]
        original_hf_name = text_cfg.get("hf_model_name")
        if original_hf_name:
            _write_hf_text_files(model, text_cfg, tmp_dir)
            # ".": the export folder itself, wherever it is later (never this machine's absolute path)
            text_cfg["hf_model_name"] = hf_model_name or "."
            if text_cfg.get("hf_tokenizer_name"):  # without one, open_clip uses its CLIP BPE tokenizer
                text_cfg["hf_tokenizer_name"] = "."
        save_file(state_dict, str(tmp_dir / HUB_WEIGHTS_NAME), metadata={"format": "pt"})
        config = {
            "model_cfg": model_cfg,
            "preprocess_cfg": _preprocess_cfg(model),
            "mmret": {"version": mmret.__version__, "source": source_name, "hf_model_name": original_hf_name},
        }
        (tmp_dir / HUB_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        family = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"
        write_model_card(tmp_dir, card or CardInfo(model_name=output_dir.name), "open_clip", family)
        follow_umask(tmp_dir)  # safetensors (and HF's save_pretrained through it) write 0600
    return output_dir


def _export_model_cfg(model: torch.nn.Module, model_name_or_config: str | dict | None) -> tuple[dict, str]:
    """The config to write (a private copy, local HF placeholders resolved) and a name for messages."""
    if model_name_or_config is None:
        info = model_info(model)
        model_cfg, name = info["model_cfg"], info["name"]
    elif isinstance(model_name_or_config, dict):
        model_cfg = model_name_or_config.get("model_cfg", model_name_or_config)
        name = "<config dict>"
    else:
        source = resolve_model_source(str(model_name_or_config))
        model_cfg, name = source.model_cfg, source.name
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UsageError(
            f"{name}: not an open_clip model config (needs 'embed_dim', 'vision_cfg', 'text_cfg')"
        )
    model_cfg = resolve_local_hf_names(model_cfg)
    # The weights file holds every tower; loaders must not fetch ImageNet/HF weights only to overwrite them.
    if model_cfg["vision_cfg"].get("timm_model_name"):
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    if model_cfg["text_cfg"].get("hf_model_name"):
        model_cfg["text_cfg"]["hf_model_pretrained"] = False
    return model_cfg, name


def _portable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; safetensors refuses tensors that share storage, so shared ones are copied."""
    seen_storages: set[int] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    return tensors


def _check_config_fits(model_cfg: dict, state_dict: dict[str, torch.Tensor], name: str) -> None:
    """Build the config's model on the meta device (no memory, no weights) and compare state-dict shapes."""
    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False) or bool(cfg["text_cfg"].get("hf_model_name"))
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    if "multimodal_cfg" in cfg:
        model_class = open_clip.CoCa
    with torch.device("meta"), explain_download_errors(f"the text tower config of {name!r}"):
        reference = model_class(**cfg)
    # FrozenBatchNorm2d (a locked timm tower) has no num_batches_tracked; BatchNorm restores it as 0.
    expected = {
        k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    actual = {k: tuple(v.shape) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    if expected != actual:
        missing = sorted(set(expected) - set(actual))[:3]
        unexpected = sorted(set(actual) - set(expected))[:3]
        shapes = [k for k in sorted(set(expected) & set(actual)) if expected[k] != actual[k]][:3]
        raise UsageError(
            f"the model's weights do not fit the config {name}: missing {missing}, unexpected {unexpected}, "
            f"different shapes {shapes}"
        )


def _write_hf_text_files(model: torch.nn.Module, text_cfg: dict, directory: Path) -> None:
    """config.json of the HF text tower (so AutoConfig can rebuild it) and its HF tokenizer's files, if any."""
    text = getattr(model, "text", None)
    if not isinstance(text, HFTextEncoder):
        raise UsageError(
            "the config has an HF text tower (hf_model_name) but the model's text tower is not one"
        )
    text.config.save_pretrained(directory)
    tokenizer_name = text_cfg.get("hf_tokenizer_name")
    if tokenizer_name:
        from transformers import AutoTokenizer

        with explain_download_errors(f"the tokenizer {tokenizer_name!r}"):
            AutoTokenizer.from_pretrained(tokenizer_name).save_pretrained(directory)


def _preprocess_cfg(model: torch.nn.Module) -> dict:
    """The image preprocessing open_clip set on the model (mean/std may come from a pretrained tag)."""
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None)
    if cfg is None:
        cfg = asdict(PreprocessCfg(size=getattr(visual, "image_size", 224)))
    return json.loads(json.dumps(cfg))  # tuples -> lists, and fail here if anything is not JSON
