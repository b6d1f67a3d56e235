"""Tests for mmret.models.lora: LoRA adapters on open_clip towers (ViT attention + MLP) and HF text towers;
the dual encoder's `lora` option; merging on load and in every export format (open_clip, transformers,
sentence-transformers); the lora_memory benchmark's smoke form. The reranker's: tests/test_lora_reranker.py.

Run: .venv/bin/pytest tests/test_lora.py -s   (-s shows the trainable-parameter counts vs full finetuning;
`-m "not slow"` skips the MiniLM tower, the `mmret fit` round trip and the benchmark)
"""

from __future__ import annotations

import copy
import json

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


@pytest.mark.parametrize("targets", [["text"], ["image", "mlp"], ["text", r"c_fc$"]])
def test_adapters_go_exactly_on_the_selected_layers(targets):
    # CLIP's text layers (`transformer.resblocks.0.mlp.c_fc`) end the image tower's names too: one tower only
    model = models.create_model("test-vit-micro")
    selected = lora_targets(model, LoraSettings(targets=targets))
    apply_lora(model, LoraSettings(rank=2, targets=targets))
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if "lora_" in name}
    assert adapted == set(selected)


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


# ---- every export format merges the adapters ------------------------------------------------------------------
EXPORT_FORMATS = ("open_clip", "transformers", "sentence-transformers")


def _move_trainable(model: nn.Module) -> None:
    """Adapters off zero and the unlocked parameters off their init, as training would leave them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.1)
            elif param.requires_grad:
                param.add_(0.25 if param.dim() == 0 else torch.randn_like(param) * 0.05)


def _random_pictures(count: int, size: int = 48) -> list:
    from PIL import Image

    generator = torch.Generator().manual_seed(count)
    pixels = torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(array.numpy()) for array in pixels]


def _saved_keys(directory) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for path in directory.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            keys.update(handle.keys())
    return keys


@pytest.mark.parametrize(
    ("name", "loss"), [("test-vit-micro", "infonce"), ("test-siglip-vit-tiny", "siglip")]
)
def test_every_export_format_of_a_lora_checkpoint_embeds_like_the_adapted_model(name, loss, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from mmret.cli import main
    from mmret.training import DualEncoder

    torch.manual_seed(0)
    lora = {"rank": 2, "alpha": 4, "unlock": ["logit_scale", "projections"]}  # every tower, attn and mlp
    module = DualEncoder(model=name, loss=loss, lora=lora)
    _move_trainable(module.model)
    module.eval()
    checkpoint = tmp_path / "lora.ckpt"  # what `mmret fit` saves: the adapters beside the base weights
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "mmret": {"kind": "dual_encoder", "model": name},
        },
        checkpoint,
    )
    pictures = _random_pictures(3)
    captions = ["a photo of the digit seven", "two red circles", "x"]
    transform = models.create_transforms(module.model, train=False)
    pixels = torch.stack([transform(picture) for picture in pictures])
    tokens = module.tokenizer(captions)
    with torch.no_grad():
        image_emb, text_emb = module.encode_image(pixels), module.encode_texts(captions)  # adapted
        without = copy.deepcopy(module.model)
        for param_name, param in without.named_parameters():
            if "lora_" in param_name:
                param.zero_()
        # the adapters matter: an export that dropped them would embed visibly differently
        assert (models.encode_image(without, pixels) - image_emb).abs().max() > 1e-3
        assert (models.encode_text(without, tokens) - text_emb).abs().max() > 1e-3
    assert has_lora(module.model)

    embeddings = {}
    for export_format in EXPORT_FORMATS:
        out = tmp_path / export_format
        assert main(["export", str(checkpoint), "--format", export_format, "--output", str(out)]) == 0
        keys = _saved_keys(out)
        assert keys and not [k for k in keys if "lora" in k or "base_layer" in k], export_format
        with torch.no_grad():
            if export_format == "open_clip":
                reloaded = models.create_model("local-dir:" + str(out)).eval()
                embeddings[export_format] = (
                    models.encode_image(reloaded, pixels),
                    models.encode_text(reloaded, tokens),
                )
            elif export_format == "transformers":
                hf_model = AutoModel.from_pretrained(out).eval()
                embeddings[export_format] = (
                    hf_model.get_image_features(pixel_values=pixels).pooler_output,
                    hf_model.get_text_features(input_ids=tokens).pooler_output,
                )
            else:
                encoder = SentenceTransformer(str(out), device="cpu")
                embeddings[export_format] = (
                    encoder.encode(pictures, convert_to_tensor=True),
                    encoder.encode(captions, convert_to_tensor=True),
                )
    for export_format, exported in embeddings.items():
        for exported_emb, adapted_emb in zip(exported, (image_emb, text_emb)):
            torch.testing.assert_close(
                torch.nn.functional.normalize(exported_emb, dim=-1),
                adapted_emb,
                atol=1e-5,
                rtol=0,
                msg=lambda text, where=export_format: f"--format {where}: {text}",
            )


def test_library_exports_merge_a_model_with_adapters(tmp_path):
    from mmret.models import hf_export

    torch.manual_seed(0)
    model = apply_lora(models.create_model("test-vit-micro"), LoraSettings(rank=2)).eval()
    _move_trainable(model)
    hf_model = hf_export.to_transformers(model)
    assert not any("lora" in key for key in hf_model.state_dict())
    assert hf_export.embedding_difference(model, hf_model, hf_export.processor_for(model)) <= 1e-5
    hf_export.export_transformers(model, tmp_path / "hf")
    assert has_lora(model)  # the model itself keeps its adapters


def test_unlock_projections_covers_a_custom_text_towers_linear_projection():
    model = apply_lora(models.create_model("test-siglip-vit-tiny"), {"rank": 2, "unlock": ["projections"]})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"text.text_projection.weight", "text.text_projection.bias"}
    # the attention pooling (SigLIP's MAP head) is attention: its q / kv / proj are adapted with "attn"
    plain = models.create_model("test-siglip-vit-tiny")
    assert lora_targets(plain, LoraSettings(targets=["image", "attn", r"attn_pool"])) == [
        "visual.trunk.attn_pool.q",
        "visual.trunk.attn_pool.kv",
        "visual.trunk.attn_pool.proj",
    ]


@pytest.mark.slow
def test_lora_memory_benchmark_reports_ratios_to_full_finetuning():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = repo / "experiments" / "benchmarks" / "lora_memory.py"
    argv = [
        sys.executable,
        str(script),
        "--model",
        "test-vit-micro",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=True)
    rows = {row["config"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert list(rows)[0] == "full" and rows["full"]["trainable_ratio"] == 1.0
    for name, row in rows.items():
        assert row["trainable"] == round(row["trainable_ratio"] * rows["full"]["trainable"])
        if name != "full":
            assert 0 < row["trainable"] < rows["full"]["trainable"] / 10, name


# --- peft's relatives: rank-stabilised LoRA and DoRA ------------------------------------------------------------


def test_dora_on_the_minilm_tower_trains_adapters_and_magnitudes_only_and_merges():
    torch.manual_seed(0)
    model = models.create_model("test-timm-minilm")
    settings = LoraSettings(rank=4, alpha=8, targets=["text"], use_dora=True)
    images = torch.randn(4, 3, 64, 64)
    texts = models.get_tokenizer(model)(["a red square", "two blue circles", "a digit", "green"])
    _check_trains_adapters_only_and_merges(model, settings, images, texts)
    magnitudes = [k for k in lora_state(model) if "lora_magnitude_vector" in k]
    assert magnitudes, "DoRA adds a magnitude vector per adapted layer"


def test_rslora_scales_by_the_square_root_of_the_rank_and_merges():
    torch.manual_seed(0)
    model = models.create_model("test-vit-micro")
    settings = LoraSettings(rank=4, alpha=8, targets=["attn", "mlp"], use_rslora=True)
    images = torch.randn(8, 3, 32, 32)
    texts = models.get_tokenizer(model)([f"a photo of the digit {i}" for i in range(8)])
    _check_trains_adapters_only_and_merges(model, settings, images, texts)
    assert model.visual.transformer.resblocks[0].attn.scaling == pytest.approx(8 / 2)  # alpha / sqrt(4)
    assert model.visual.transformer.resblocks[0].mlp.c_fc.scaling["default"] == pytest.approx(8 / 2)


def test_dora_on_open_clip_attention_is_refused_in_one_line():
    model = models.create_model("test-vit-micro")
    with pytest.raises(ValueError, match=r"use_dora: .*nn.MultiheadAttention.*leave attn out") as error:
        apply_lora(model, LoraSettings(targets=["attn", "mlp"], use_dora=True))
    assert "\n" not in str(error.value)
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters()), "refused, yet changed"
    apply_lora(model, LoraSettings(targets=["mlp"], use_dora=True))  # the MLP Linears take DoRA
    assert has_lora(model)
