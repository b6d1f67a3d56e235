"""LoRA on the reranker (`CrossEncoder(lora=...)`): only the tower adapters (+ `unlock`) and the reranker's own
new layers train, the base tower weights stay bit-identical, and `from_checkpoint`, `mmret export` and
`CrossEncoder.load` of the export give the adapted model's scores with plain weights.

Run: .venv/bin/pytest tests/test_lora_reranker.py   (`-m "not slow"` skips the `mmret fit` round trip)
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmret.errors import UsageError
from mmret.models.lora import has_lora
from tests.test_lora import _move_trainable

RERANKER = dict(model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2, num_negatives=2)


def _reranker_batch(module, captions: list[str]) -> dict:
    generator = torch.Generator().manual_seed(len(captions))
    return {
        "image": torch.randn(len(captions), 3, 32, 32, generator=generator),
        "text": module.tokenizer(captions),
        "sample_id": torch.arange(len(captions)),
        "caption": captions,
    }


def test_reranker_lora_trains_adapters_and_its_new_layers_only():
    from mmret.training import CrossEncoder

    torch.manual_seed(0)
    lora = {"rank": 2, "alpha": 4, "targets": ["attn", "mlp"], "unlock": ["logit_scale"]}
    module = CrossEncoder(**RERANKER, contrastive_weight=0.5, fusion_pixel_stem=True, lora=lora).train()
    names = [name for name, _ in module.named_parameters()]
    intended = {
        name
        for name in names
        if "lora_" in name
        or name.startswith(("fusion.", "pixel_stem."))
        or name in ("first_stage_scale", "model.logit_scale")
    }
    assert {name for name, p in module.named_parameters() if p.requires_grad} == intended
    assert any(n.startswith("model.visual.") and "lora_" in n for n in intended)
    assert any(n.startswith("model.transformer.") and "lora_" in n for n in intended)
    optimised = {id(p) for group in module.optimizer_groups() for p in group["params"]}
    assert optimised == {id(p) for name, p in module.named_parameters() if name in intended}

    before = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    optimizer = torch.optim.AdamW(module.optimizer_groups(), lr=1e-2, weight_decay=0.05)
    captions = ["a red circle", "a blue square", "a green diamond", "a big purple square"]
    for step in range(3):
        loss = module.training_step(_reranker_batch(module, captions), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = module.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= intended, f"frozen tensors changed: {sorted(changed - intended)[:5]}"
    assert {"model.logit_scale", "first_stage_scale", "fusion.head.weight"} <= changed
    assert any("lora_B" in name or "lora_in_B" in name for name in changed)
    assert any(name.startswith("pixel_stem.") for name in changed)


def test_reranker_lora_merges_on_load_and_on_export(tmp_path):
    from safetensors.torch import load_file

    from mmret.cli import main
    from mmret.training import CrossEncoder

    torch.manual_seed(0)
    module = CrossEncoder(**RERANKER, lora={"rank": 2, "alpha": 4, "unlock": ["projections"]})
    _move_trainable(module.model)
    module.eval()
    checkpoint = tmp_path / "reranker.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "mmret": {"kind": "cross_encoder", "model": "test-vit-micro"},
        },
        checkpoint,
    )
    captions = ["a red circle", "a blue square left of a red circle", "x"]
    images = _reranker_batch(module, captions)["image"]
    with torch.no_grad():
        adapted = module.score(captions, images)
        without = copy.deepcopy(module)
        for name, param in without.named_parameters():
            if "lora_" in name:
                param.zero_()
        assert (without.score(captions, images) - adapted).abs().max() > 1e-3  # the adapters matter

    loaded = CrossEncoder.from_checkpoint(checkpoint)
    assert not has_lora(loaded.model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(captions, images), adapted, atol=1e-5, rtol=0)

    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--output", str(out)]) == 0
    state = load_file(str(out / "reranker_model.safetensors"))
    assert not [key for key in state if "lora" in key or "base_layer" in key or ".attn.base." in key]
    assert set(state) == set(CrossEncoder(**RERANKER).state_dict())  # a plain reranker's weights
    config = json.loads((out / "reranker_config.json").read_text())
    assert config["init_args"]["lora"] is None
    reloaded = CrossEncoder.load(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.score(captions, images), adapted, atol=1e-5, rtol=0)


def test_reranker_lora_respects_locked_towers_and_refuses_conflicts():
    from mmret.training import CrossEncoder

    module = CrossEncoder(**RERANKER, lock_image=True, lora={"rank": 2})
    adapted = {name for name, _ in module.named_parameters() if "lora_" in name}
    assert adapted and not any(name.startswith("model.visual.") for name in adapted)
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if "lora_" not in n)
    refusals = {
        "adapts the image tower, which model.lock_image freeze": dict(
            lock_image=True, lora={"targets": ["image"]}
        ),
        "image and text towers, which model.lock_image and model.lock_text": dict(
            lock_image=True, lock_text=True, lora={"targets": ["attn"]}
        ),
        "select no layer": dict(lora={"targets": ["no-such-layer"]}),
        "rank": dict(lora={"rank": 0}),
        "unknown keys \\['rnak'\\]": dict(lora={"rnak": 2}),
    }
    for message, options in refusals.items():
        with pytest.raises(UsageError, match=message) as refused:
            CrossEncoder(**RERANKER, **options)
        assert str(refused.value).startswith("model.lora") and "\n" not in str(refused.value)


@pytest.mark.slow
def test_reranker_fit_with_lora_checkpoint_holds_adapters_and_exports_merged(tmp_path, digits_root):
    from mmret.cli import main
    from mmret.training import CrossEncoder
    from tests.fit_args import CROSS_ENCODER, fit_argv

    run_dir = tmp_path / "run"
    model_args = {**{k: v for k, v in RERANKER.items() if k != "model"}, "warmup_steps": 1}
    model_args["lora"] = "{rank: 2, alpha: 4, targets: [attn, mlp], unlock: [logit_scale]}"
    argv = fit_argv(module=CROSS_ENCODER, model_args=model_args, train=digits_root / "train",
                    samples_per_epoch=32, max_epochs=1, limit_val_batches=0, run_dir=run_dir)  # fmt: skip
    assert main(argv) == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["lora"]["rank"] == 2
    assert any("lora_" in key for key in checkpoint["state_dict"])
    module = CrossEncoder.from_checkpoint(last)
    assert not has_lora(module.model)
    assert main(["export", str(last), "--output", str(tmp_path / "exported")]) == 0
    reloaded = CrossEncoder.load(tmp_path / "exported")
    captions, images = ["a 1", "a 2"], torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.score(captions, images), module.score(captions, images), atol=1e-5, rtol=0
        )
