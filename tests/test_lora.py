"""Tests for mmret.models.lora: LoRA adapters on open_clip towers (ViT attention + MLP) and HF text towers.

Run: .venv/bin/pytest tests/test_lora.py -s   (-s shows the trainable-parameter counts vs full finetuning)
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import nn

from mmret import models
from mmret.errors import UsageError
from mmret.losses import InfoNCELoss
from mmret.models.lora import (
    LoraMultiheadAttention,
    LoraSettings,
    apply_lora,
    has_lora,
    lora_state,
    lora_targets,
    merge_lora,
    parameter_counts,
)


def _train_steps(model: nn.Module, images: torch.Tensor, texts, steps: int = 3) -> None:
    """A few AdamW steps of CLIP's loss on the trainable parameters (adapters move: B starts at zero)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = InfoNCELoss(gather=False)
    for _ in range(steps):
        loss = loss_fn(
            models.encode_image(model, images), models.encode_text(model, texts), model.logit_scale.exp()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-adapter weights by their plain (un-wrapped) names, cloned."""
    return {
        name.replace(".base_layer", "").replace("attn.base.", "attn."): tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if "lora_" not in name and not name.endswith("num_batches_tracked")  # gone with FrozenBatchNorm2d
    }


def _report(label: str, model: nn.Module) -> None:
    counts = parameter_counts(model)
    print(
        f"\n[{label}] LoRA trainable params: {counts['trainable']:,} vs full finetuning {counts['total']:,} "
        f"({100 * counts['trainable'] / counts['total']:.2f}%)"
    )


def _check_trains_adapters_only_and_merges(model: nn.Module, settings: LoraSettings, images, texts) -> None:
    before = _base_weights(model)
    apply_lora(model, settings)
    _report(settings.targets, model)
    assert all(("lora_" in name) == param.requires_grad for name, param in model.named_parameters())
    adapters_before = {k: v.clone() for k, v in lora_state(model).items()}
    assert adapters_before

    _train_steps(model, images, texts)

    after = _base_weights(model)
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == [], f"base weights changed: {changed[:5]}"
    moved = [k for k, v in lora_state(model).items() if not torch.equal(v, adapters_before[k])]
    assert any("lora_B" in k or "lora_in_B" in k or "lora_out_B" in k for k in moved)

    model.eval()
    merged = merge_lora(model)
    assert type(merged) is type(model) and not has_lora(merged)
    assert has_lora(model)  # merge_lora copies by default
    assert set(_base_weights(merged)) == set(before)
    with torch.no_grad():
        for encode, data in ((models.encode_image, images), (models.encode_text, texts)):
            adapted, plain = encode(model, data), encode(merged, data)
            torch.testing.assert_close(plain, adapted, atol=1e-5, rtol=0)
    # the adapters did something: merged weights differ from the original base somewhere
    assert any(not torch.equal(before[k], v) for k, v in merged.state_dict().items())


def test_vit_lora_on_attention_and_mlp_trains_adapters_only_and_merges():
    torch.manual_seed(0)
    model = models.create_model("test-vit-micro")
    settings = LoraSettings(rank=4, alpha=8, dropout=0.0, targets=["image", "text", "attn", "mlp"])
    names = lora_targets(model, settings)
    assert names == [
        "visual.transformer.resblocks.0.attn",
        "visual.transformer.resblocks.0.mlp.c_fc",
        "visual.transformer.resblocks.0.mlp.c_proj",
        "transformer.resblocks.0.attn",
        "transformer.resblocks.0.mlp.c_fc",
        "transformer.resblocks.0.mlp.c_proj",
    ]
    images = torch.randn(8, 3, 32, 32)
    texts = models.get_tokenizer(model)([f"a photo of the digit {i}" for i in range(8)])
    _check_trains_adapters_only_and_merges(model, settings, images, texts)
    assert isinstance(model.visual.transformer.resblocks[0].attn, LoraMultiheadAttention)


@pytest.mark.slow
def test_minilm_text_tower_lora_trains_adapters_only_and_merges():
    torch.manual_seed(0)
    model = models.create_model("test-timm-minilm")
    settings = LoraSettings(rank=4, alpha=8, targets=["text"])
    names = lora_targets(model, settings)
    assert "text.transformer.encoder.layer.0.attention.self.query" in names
    assert "text.transformer.encoder.layer.0.attention.output.dense" in names
    assert "text.transformer.encoder.layer.0.intermediate.dense" in names
    assert "text.transformer.encoder.layer.0.output.dense" in names
    assert not any(n.startswith("visual.") or n == "text.proj" for n in names)
    images = torch.randn(4, 3, 64, 64)
    texts = models.get_tokenizer(model)(["a red square", "two blue circles", "a digit", "green"])
    _check_trains_adapters_only_and_merges(model, settings, images, texts)


def test_unlock_trains_logit_scale_and_projections():
    model = apply_lora(
        models.create_model("test-vit-micro"),
        {"rank": 2, "targets": ["attn"], "unlock": ["logit_scale", "projections"]},
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"logit_scale", "visual.proj", "text_projection"} <= trainable
    assert all("lora_" in n for n in trainable - {"logit_scale", "visual.proj", "text_projection"})
    assert not any("mlp" in n for n in trainable)


def test_patterns_and_towers_select_layers():
    model = models.create_model("test-vit-micro")
    assert lora_targets(model, LoraSettings(targets=["image", "mlp"])) == [
        "visual.transformer.resblocks.0.mlp.c_fc",
        "visual.transformer.resblocks.0.mlp.c_proj",
    ]
    assert lora_targets(model, LoraSettings(targets=["text", r"c_fc$"])) == [
        "transformer.resblocks.0.mlp.c_fc"
    ]
    with pytest.raises(ValueError, match="select no layer"):
        apply_lora(model, LoraSettings(targets=["nothing-like-this"]))
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="unlock"):
        LoraSettings(unlock=["everything"])


@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_attention_matches_multihead_attention_with_masks(batch_first):
    torch.manual_seed(0)
    base = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    wrapped = LoraMultiheadAttention(copy.deepcopy(base), rank=2, alpha=4, dropout=0.0).eval()
    with torch.no_grad():
        wrapped.lora_in_B.normal_()
        wrapped.lora_out_B.normal_()
    merged = wrapped.merged().eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    for kwargs in ({}, {"attn_mask": causal}, {"key_padding_mask": padding}, {"attn_mask": causal.isinf()}):
        out = wrapped(x, x, x, need_weights=False, **kwargs)[0]
        expected = merged(x, x, x, need_weights=False, **kwargs)[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_merged_model_exports_and_reloads_in_open_clip(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(models.create_model("test-vit-micro"), LoraSettings(rank=2, targets=["attn", "mlp"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.1)
    model.eval()
    merged = merge_lora(model)
    models.export_open_clip(merged, "test-vit-micro", tmp_path / "export")
    reloaded, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path / "export"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            models.encode_image(reloaded.eval(), images),
            models.encode_image(model, images),
            atol=1e-5,
            rtol=0,
        )


def test_dual_encoder_lora_option():
    from mmret.training.dual_encoder import DualEncoder

    module = DualEncoder(model="test-vit-micro", lora={"rank": 2, "alpha": 4, "targets": ["attn", "mlp"]})
    assert has_lora(module.model)
    groups = module.optimizer_param_groups()
    trainable = [p for group in groups for p in group["params"]]
    named = dict(module.model.named_parameters())
    assert trainable and {id(p) for p in trainable} == {id(named[n]) for n in named if "lora_" in n}
    # a checkpoint's state dict (adapters included) loads into a module rebuilt from the same hyperparameters
    rebuilt = DualEncoder(**module.hparams)
    rebuilt.load_state_dict(module.state_dict())
    with pytest.raises(UsageError, match="model.lora"):
        DualEncoder(model="test-vit-micro", lora={"rank": 0})


def test_export_open_clip_merges_adapters(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(models.create_model("test-vit-micro"), LoraSettings(rank=2, targets=["attn"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.1)
    models.export_open_clip(model.eval(), "test-vit-micro", tmp_path / "export")
    assert has_lora(model)  # the model itself keeps its adapters
    reloaded = models.create_model("local-dir:" + str(tmp_path / "export")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            models.encode_image(reloaded, images), models.encode_image(model, images), atol=1e-5, rtol=0
        )


@pytest.mark.slow
def test_fit_with_lora_checkpoint_holds_adapters_and_exports_merged(tmp_path, digits_root):
    from mmret.cli import main
    from mmret.training.dual_encoder import DualEncoder
    from tests.fit_args import DUAL_ENCODER, fit_argv

    run_dir = tmp_path / "run"
    code = main(
        fit_argv(
            module=DUAL_ENCODER,
            model_args={
                "warmup_steps": 1,
                "lora": "{rank: 2, alpha: 4, targets: [attn, mlp], unlock: [logit_scale]}",
            },
            train=digits_root / "train",
            samples_per_epoch=32,
            max_epochs=1,
            run_dir=run_dir,
        )
    )
    assert code == 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["lora"]["rank"] == 2
    assert any("lora_" in key for key in checkpoint["state_dict"])
    module = DualEncoder.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert not has_lora(module.model)  # merged for eval / mine / export
    assert (
        main(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--output", str(tmp_path / "export")])
        == 0
    )
    reloaded = models.create_model("local-dir:" + str(tmp_path / "export")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            models.encode_image(reloaded, images), module.encode_image(images), atol=1e-5, rtol=0
        )
