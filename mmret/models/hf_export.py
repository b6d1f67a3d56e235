"""Export a dual encoder as a transformers model (CLIPModel / SiglipModel) or a sentence-transformers model.

    export_transformers(model, "exported/hf")            # config.json, model.safetensors, tokenizer, processor
    transformers.CLIPModel.from_pretrained("exported/hf"); transformers.CLIPProcessor.from_pretrained(...)
    transformers.pipeline("zero-shot-image-classification", model="exported/hf")
    export_sentence_transformers(model, "exported/st")   # the same model + sentence-transformers' files
    SentenceTransformer("exported/st").encode(["a caption", PIL.Image.open(...)])

Which architectures have a transformers counterpart, and how the weights map, is `mmret.models.hf_convert`
(anything else is refused in one line naming the tower). Before anything is written the converted model
embeds a few random images and captions and must agree with the checkpoint (1e-4 on unit-norm embeddings;
1e-7 is typical), with the exported tokenizer giving open_clip's token ids. The embeddings are those of
`mmret.models.encode_image` / `encode_text`; sentence-transformers' `encode` L2-normalises them too (a
Normalize module), transformers' `get_*_features` return them unnormalised, like open_clip. Text is tokenised
and images preprocessed as open_clip does (`mmret.models.hf_processing`). A model with LoRA adapters
(`mmret.models.lora`) is exported with them merged into its weights (`merge_lora`; the model itself keeps them),
and the check compares the export with the adapted model.

Everything is written into a work folder renamed into place at the end (`mmret.io.atomic_output_dir`), with a
model card (`mmret.models.model_card`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from mmret.errors import UsageError
from mmret.io import atomic_output_dir, follow_umask
from mmret.models.factory import get_tokenizer, model_info, quiet_transformers
from mmret.models.hf_convert import text_tower_view, to_transformers, transformers_family
from mmret.models.hf_processing import clip_image_processor, clip_tokenizer, write_bpe_files
from mmret.models.lora import has_lora, merge_lora
from mmret.models.model_card import CardInfo, write_model_card

__all__ = [
    "embedding_difference",
    "export_sentence_transformers",
    "export_transformers",
    "processor_for",
    "to_transformers",
    "transformers_family",
]

# Largest difference allowed between the checkpoint's and the export's unit-norm embeddings.
MAX_EMBEDDING_DIFFERENCE = 1e-4
_CHECK_CAPTIONS = ["a photo of the digit seven", "two dogs on a sofa!", "x"]


def processor_for(model: nn.Module, family: str | None = None):
    """The transformers processor (image processor + tokenizer) doing `model`'s preprocessing as open_clip does."""
    from transformers import CLIPProcessor, SiglipProcessor

    family = family or transformers_family(model)
    context_length = text_tower_view(model).context_length
    tokenizer = clip_tokenizer(context_length, attention_mask=family == "clip")
    image_processor = clip_image_processor(_preprocess_cfg(model))
    processor_class = CLIPProcessor if family == "clip" else SiglipProcessor
    return processor_class(image_processor=image_processor, tokenizer=tokenizer)


def export_transformers(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    card: CardInfo | None = None,
) -> Path:
    """Write `model` as a transformers model directory (CLIPModel or SiglipModel with its processor).

    Args:
        model: An open_clip model from `mmret.models.create_model` (e.g. a trained DualEncoder's `model`).
        output_dir: Destination; must not exist (or be empty) unless `overwrite`.
        overwrite: Replace an existing directory (the old one goes only once the new one is in place).
        card: What the model card (README.md) says about the model; None writes a card without training
            details.

    Returns:
        The absolute path of the written directory.

    Raises:
        UsageError: no exact transformers counterpart, an existing destination, or one that cannot be written.
    """
    output_dir = _check_destination(output_dir, overwrite)
    hf_model, processor, family = _checked_export(model)
    with atomic_output_dir(output_dir, overwrite=True) as work, quiet_transformers():
        _save_transformers(hf_model, processor, work)
        write_model_card(
            work, card or CardInfo(model_name=output_dir.name), library_name="transformers", family=family
        )
        follow_umask(work)
    return output_dir


def export_sentence_transformers(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    card: CardInfo | None = None,
) -> Path:
    """Write `model` as a sentence-transformers model: `SentenceTransformer(DIR).encode()` takes captions and
    PIL images and gives the checkpoint's L2-normalised embeddings.

    The folder is the transformers export (the root module, sentence-transformers' `Transformer` over the
    CLIPModel / SiglipModel, whose `get_text_features` / `get_image_features` it calls) plus a `Normalize`
    module. Its image processor is loaded with the PIL backend (open_clip's pixels exactly) and a SigLIP text
    tower's captions are padded to the full context length (it is pooled at the last position).

    Args: as `export_transformers`.

    Raises:
        UsageError: as `export_transformers`, or sentence-transformers is not installed.
    """
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Transformer
    except ImportError:
        raise UsageError(
            "--format sentence-transformers needs the sentence-transformers package: "
            "pip install 'sentence-transformers>=6.3'"
        ) from None
    output_dir = _check_destination(output_dir, overwrite)
    hf_model, processor, family = _checked_export(model)
    processing = {}
    if family == "siglip":
        context_length = text_tower_view(model).context_length
        processing = {"text": {"padding": "max_length", "max_length": context_length}}
    with tempfile.TemporaryDirectory(prefix="mmret-hf-") as staging, quiet_transformers():
        _save_transformers(hf_model, processor, Path(staging))
        encoder = SentenceTransformer(
            modules=[Transformer(staging, processing_kwargs=processing or None), Normalize()], device="cpu"
        )
        with atomic_output_dir(output_dir, overwrite=True) as work:
            encoder.save(str(work), create_model_card=False)
            write_bpe_files(work)
            _set_processor_backend(work / "sentence_bert_config.json")
            write_model_card(
                work,
                card or CardInfo(model_name=output_dir.name),
                library_name="sentence-transformers",
                family=family,
            )
            follow_umask(work)
    return output_dir


def _preprocess_cfg(model: nn.Module) -> dict:
    cfg = getattr(model.visual, "preprocess_cfg", None)
    if not cfg:
        size = model_info(model)["model_cfg"]["vision_cfg"].get("image_size", 224)
        cfg = {"size": size}
    return dict(cfg)


# ---- checking and writing ---------------------------------------------------------------------------------
def _checked_export(model: nn.Module):
    """(transformers model, processor, family), checked to embed like `model` (else a UsageError); LoRA
    adapters merged into the weights, and the check made against the adapted model."""
    plain = merge_lora(model) if has_lora(model) else model
    family = transformers_family(plain)
    with quiet_transformers():
        hf_model = to_transformers(plain)
        processor = processor_for(plain, family)
    difference = embedding_difference(model, hf_model, processor)
    if not difference <= MAX_EMBEDDING_DIFFERENCE:
        raise UsageError(
            f"the converted {type(hf_model).__name__} embeds differently from the checkpoint (max |difference| "
            f"{difference:.2e} > {MAX_EMBEDDING_DIFFERENCE:g}); this architecture does not map exactly"
        )
    return hf_model, processor, family


@torch.no_grad()
def embedding_difference(model: nn.Module, hf_model, processor) -> float:
    """Largest absolute difference between `model`'s and `hf_model`'s unit-norm embeddings of a few random
    images and captions (the captions tokenised by `processor`; its ids must be open_clip's)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        reference_ids = get_tokenizer(model)(_CHECK_CAPTIONS).to(device)  # [3, L]
        tokens = processor.tokenizer(
            _CHECK_CAPTIONS,
            padding="max_length",
            truncation=True,
            max_length=reference_ids.shape[1],
            return_tensors="pt",
        )
        if not torch.equal(tokens["input_ids"].to(device), reference_ids):
            raise UsageError("the exported tokenizer gives other token ids than open_clip's; cannot export")
        size = hf_model.config.vision_config.image_size
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        hf_model.to(device)
        hf_image = hf_model.get_image_features(pixel_values=images).pooler_output
        hf_text = hf_model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}).pooler_output
        ours_image = model.encode_image(images, normalize=True).float()
        ours_text = model.encode_text(reference_ids, normalize=True).float()
        differences = [
            (torch.nn.functional.normalize(hf_image, dim=-1) - ours_image).abs().max(),
            (torch.nn.functional.normalize(hf_text, dim=-1) - ours_text).abs().max(),
        ]
        return float(max(differences))
    finally:
        hf_model.to("cpu")
        model.train(was_training)


def _save_transformers(hf_model, processor, directory: Path) -> None:
    """config.json + model.safetensors, the processor (processor_config.json, tokenizer.json, ...), plus what
    older transformers versions read: preprocessor_config.json and the BPE files of a slow tokenizer."""
    hf_model.save_pretrained(directory)
    processor.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    write_bpe_files(directory)


def _set_processor_backend(config_path: Path) -> None:
    """Have sentence-transformers load the image processor with the PIL backend (open_clip's pixels)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.setdefault("processor_kwargs", {})["backend"] = "pil"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _check_destination(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    output_dir = Path(output_dir).expanduser().resolve()
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UsageError(
            f"export destination {output_dir} already exists; choose a new directory or pass overwrite"
        )
    return output_dir
