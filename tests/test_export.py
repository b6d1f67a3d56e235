"""Tests for mmret.models.export: open_clip hub layout that open_clip's own loader reads back identically.

Run: .venv/bin/pytest tests/test_export.py   (`-m "not slow"` skips the MiniLM-tower export)
"""

from __future__ import annotations

import copy
import json
import shutil

import open_clip
import pytest
import torch

from mmret import models
from mmret.errors import UsageError
from mmret.models import export as export_module

CAPTIONS = ["a photo of a cat", "two dogs playing in the snow", "a red square"]


def _random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create_model(name)
    # Move logit_scale/bias off their init values so the test sees them travel too.
    with torch.no_grad():
        model.logit_scale.add_(0.123)
    return model.eval()


def _images(model: torch.nn.Module) -> torch.Tensor:
    size = models.model_info(model)["model_cfg"]["vision_cfg"]["image_size"]
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))  # [B, 3, H, W]


def _assert_same_embeddings(model, reloaded, tokens_model, tokens_reloaded) -> None:
    images = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode_image(images), model.encode_image(images), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            reloaded.encode_text(tokens_reloaded), model.encode_text(tokens_model), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(reloaded.logit_scale, model.logit_scale, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["test-vit-micro", "test-siglip-tiny"])
def test_export_reloads_with_open_clips_own_loader(name, tmp_path):
    model = _random_model(name)
    out = models.export_open_clip(model, None, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",  # the model card (tests/test_hf_export.py reads it)
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert set(config) >= {"model_cfg", "preprocess_cfg"}
    assert config["model_cfg"] == open_clip.get_model_config(name)

    reloaded, _, preprocess_val = open_clip.create_model_and_transforms(f"local-dir:{out}")
    reloaded.eval()
    assert type(reloaded) is type(model)  # CLIP stays CLIP, CustomTextCLIP (custom_text) stays CustomTextCLIP
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    tokens = models.get_tokenizer(model)(CAPTIONS)
    torch.testing.assert_close(tokenizer(CAPTIONS), tokens)
    _assert_same_embeddings(model, reloaded, tokens, tokens)
    if model.logit_bias is not None:
        torch.testing.assert_close(reloaded.logit_bias, model.logit_bias)
    assert reloaded.visual.preprocess_cfg["size"] == model.visual.preprocess_cfg["size"]


def test_export_reloads_with_mmret_create_model(tmp_path):
    model = _random_model("test-vit-micro")
    out = models.export_open_clip(model, "test-vit-micro", tmp_path / "export")
    tokens = models.get_tokenizer(model)(CAPTIONS)
    for reloaded in (
        models.create_model("test-vit-micro", pretrained=out),
        models.create_model(f"local-dir:{out}"),
        models.create_model(str(out)),
    ):
        _assert_same_embeddings(model, reloaded.eval(), tokens, tokens)
        assert models.model_info(reloaded)["kind"] == "hub_dir"


def test_export_records_overrides_such_as_image_size(tmp_path):
    model = models.create_model("test-vit-micro", force_image_size=48).eval()
    out = models.export_open_clip(model, None, tmp_path / "export")
    reloaded = open_clip.create_model(f"local-dir:{out}").eval()
    assert reloaded.visual.image_size == (48, 48)
    tokens = models.get_tokenizer(model)(CAPTIONS)
    _assert_same_embeddings(model, reloaded, tokens, tokens)


def test_export_rejects_a_config_that_does_not_fit(tmp_path):
    model = _random_model("test-vit-micro")
    with pytest.raises(UsageError, match="do not fit the config test-vit-tiny"):
        models.export_open_clip(model, "test-vit-tiny", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(UsageError, match="not created by mmret.models.create_model"):
        models.export_open_clip(open_clip.create_model("test-vit-micro"), None, tmp_path / "export")


def test_export_refuses_to_overwrite_unless_asked(tmp_path):
    model = _random_model("test-vit-micro")
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="already exists"):
        models.export_open_clip(model, None, out)
    assert (out / "keep.txt").read_text() == "user data"
    models.export_open_clip(model, None, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "open_clip_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary or backup dirs left


def test_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        models.export_open_clip(_random_model("test-vit-micro"), None, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
    """A test-timm-minilm model with a locked (FrozenBatchNorm) image tower, exported once for the module."""
    model = _random_model("test-timm-minilm")
    models.lock_image_tower(model)  # BN -> FrozenBatchNorm2d: its state dict lacks num_batches_tracked
    out = models.export_open_clip(model, None, tmp_path_factory.mktemp("minilm") / "export")
    return model, out


@pytest.mark.slow
def test_hf_text_tower_export_reloads_with_open_clip(minilm_export, monkeypatch):
    model, out = minilm_export
    names = {p.name for p in out.iterdir()}
    assert {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "config.json",
        "tokenizer_config.json",
    } <= names
    config = json.loads((out / "open_clip_config.json").read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    # ".": the folder itself, wherever it is (no machine's absolute path); open_clip resolves it against the
    # working directory, so it loads the export run from there.
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "."
    assert str(out) not in (out / "open_clip_config.json").read_text().split('"mmret"')[0]
    assert text_cfg["hf_model_pretrained"] is False
    assert config["mmret"]["source"] == "test-timm-minilm"

    monkeypatch.chdir(out)
    reloaded = open_clip.create_model(f"local-dir:{out}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    tokens = models.get_tokenizer(model)(CAPTIONS)
    torch.testing.assert_close(tokenizer(CAPTIONS), tokens)
    _assert_same_embeddings(model, reloaded, tokens, tokens)


@pytest.mark.slow
def test_hf_text_tower_export_survives_a_move(minilm_export, tmp_path):
    """Moved (the original gone) to a folder of another name and depth, as on another machine's path."""
    model, out = minilm_export
    copy_of = tmp_path / "copy"
    shutil.copytree(out, copy_of)
    moved = tmp_path / "elsewhere" / "deeper" / "moved"
    moved.parent.mkdir(parents=True)
    shutil.move(copy_of, moved)
    for reloaded in (
        models.create_model("test-timm-minilm", pretrained=moved).eval(),
        models.create_model(f"local-dir:{moved}").eval(),
    ):
        # "." in the file is re-pointed to where the directory is now
        assert models.model_info(reloaded)["model_cfg"]["text_cfg"]["hf_model_name"] == str(moved.resolve())
        tokens = models.get_tokenizer(reloaded)(CAPTIONS)
        _assert_same_embeddings(model, reloaded, tokens, tokens)


@pytest.mark.slow
def test_hf_model_name_can_be_set_for_hub_upload(minilm_export, tmp_path):
    model, _ = minilm_export
    out = models.export_open_clip(
        copy.deepcopy(model), None, tmp_path / "hub", hf_model_name="sentence-transformers/all-MiniLM-L6-v2"
    )
    text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert text_cfg["hf_tokenizer_name"] == "."  # open_clip reads local-dir tokenizers from the dir itself
