"""Tests of the DualEncoder LightningModule: locking, temperature clamp, GradCache = plain step, the
accumulate_grad_batches guard, validation metrics, and the `mmret fit` path on real digits shards.

    .venv/bin/pytest tests/test_dual_encoder.py -q
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from mmret.cli import main
from mmret.data.datamodule import RetrievalDataModule
from mmret.errors import UsageError
from mmret.training import DualEncoder
from mmret.training.dual_encoder import group_text_queries, warmup_cosine
from tests.fit_args import DUAL_ENCODER, fit_argv


def fixed_batch(model: DualEncoder, batch_size: int = 8, seed: int = 0) -> dict:
    """A deterministic batch of random images and real tokenised captions for `model`."""
    generator = torch.Generator().manual_seed(seed)
    size = model.model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    captions = [f"a photo of the digit {i % 10}" for i in range(batch_size)]
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=generator),
        "text": model.tokenizer(captions),
        "sample_id": torch.arange(batch_size),
        "label": torch.arange(batch_size) % 10,
        "caption": captions,
    }


class BatchList(torch.utils.data.Dataset):
    """A list of ready batches (batch_size=None loader)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return self.batches[index]


def fit_steps(model: DualEncoder, batches: list[dict], **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    loader = torch.utils.data.DataLoader(BatchList(batches), batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def test_warmup_stable_decay_schedule():
    from mmret.training.schedule import warmup_stable_decay

    values = [warmup_stable_decay(step, 10, 100, 0.0, 0.2) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10:80] == [1.0] * 70  # stable: the peak holds until the last 20 steps
    assert values[90] == pytest.approx(0.5) and values[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[80:], values[81:]))  # decays monotonically
    assert warmup_stable_decay(100, 10, 100, 0.1, 0.2) == pytest.approx(0.1)
    assert warmup_stable_decay(5, 10, 12, 0.0, 0.9) == pytest.approx(0.6)  # decay never starts inside warmup


def test_lr_schedule_option_reaches_the_optimizer(tmp_path):
    """`model.lr_schedule: wsd` holds the peak lr through the stable phase of a real fit; cosine does not."""
    from tests.shard_fixtures import write_shards

    data_dir = write_shards(tmp_path / "toy", num_samples=48, samples_per_shard=48)
    lrs = {}
    for schedule in ("cosine", "wsd"):
        torch.manual_seed(0)
        model = DualEncoder(model="test-vit-micro", lr=1e-3, warmup_steps=2, lr_schedule=schedule)
        seen = []
        model.on_train_batch_start = lambda batch, idx, m=model, s=seen: s.append(
            m.optimizers().param_groups[0]["lr"]
        )
        trainer = L.Trainer(
            accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip
        data = RetrievalDataModule(train=str(data_dir), batch_size=4, num_workers=0, image_size=32)
        trainer.fit(model, datamodule=data)
        lrs[schedule] = seen
    assert lrs["wsd"][2:8] == pytest.approx([1e-3] * 6)
    assert lrs["cosine"][5] < 0.8e-3
    assert lrs["wsd"][8:] == pytest.approx([1e-3, 0.5e-3])  # the last 20 % of the steps decay
    with pytest.raises(UsageError, match="lr_schedule"):
        DualEncoder(model="test-vit-micro", lr_schedule="step")


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_locked_image_tower_is_bit_identical_after_a_step():
    torch.manual_seed(0)
    model = DualEncoder(model="test-vit-micro", lock_image=True, warmup_steps=1, lr=1e-2)
    before_visual = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    before_text = {k: v.clone() for k, v in model.model.transformer.state_dict().items()}
    fit_steps(model, [fixed_batch(model)] * 2)
    for name, value in model.model.visual.state_dict().items():
        assert torch.equal(value, before_visual[name]), name
    changed = [
        k for k, v in model.model.transformer.state_dict().items() if not torch.equal(v, before_text[k])
    ]
    assert changed, "the unlocked text tower did not train"
    optimized = {id(p) for group in model.optimizer_param_groups() for p in group["params"]}
    assert not any(id(p) in optimized for p in model.model.visual.parameters())


def test_logit_scale_is_clamped_after_every_step():
    model = DualEncoder(model="test-vit-micro", max_logit_scale=20.0, warmup_steps=1, lr=1e-8)
    with torch.no_grad():
        model.model.logit_scale.fill_(math.log(50.0))
    fit_steps(model, [fixed_batch(model)])
    assert model.model.logit_scale.exp().item() == pytest.approx(20.0, rel=1e-6)


class GradientRecorder(L.Callback):
    """Keeps a copy of every parameter gradient just before each optimizer step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def test_gradcache_step_equals_plain_step():
    batches, recorded = None, []
    for chunk in (None, 3):
        torch.manual_seed(0)
        model = DualEncoder(model="test-vit-micro", gradcache_chunk_size=chunk, warmup_steps=1, lr=1e-3)
        batches = batches or [fixed_batch(model, batch_size=10, seed=s) for s in range(2)]
        recorder = GradientRecorder()
        fit_steps(model, batches, callbacks=[recorder])
        recorded.append(recorder.steps)
    plain, cached = recorded
    assert len(plain) == len(cached) == 2
    for plain_step, cached_step in zip(plain, cached):
        assert plain_step.keys() == cached_step.keys()
        for name, grad in plain_step.items():
            torch.testing.assert_close(cached_step[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulate_grad_batches_is_a_clear_configuration_error(tmp_path, capsys):
    code = main(
        fit_argv(
            module=DUAL_ENCODER,
            dataset="digits",
            data_root=tmp_path / "data",
            batch_size=None,
            num_workers=None,
            trainer_args={"accumulate_grad_batches": 4},
            progress_bar=None,
            run_dir=tmp_path / "run",
        )
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "accumulate_grad_batches" in err[0] and "gradcache_chunk_size" in err[0]


def test_unknown_loss_is_rejected():

    with pytest.raises(UsageError, match="infonce"):
        DualEncoder(model="test-vit-micro", loss="triplet")


def test_siglip_model_gets_a_learnable_bias():
    model = DualEncoder(model="test-vit-micro", loss="siglip")
    assert model.model.logit_bias.item() == pytest.approx(-10.0)
    assert model.model.logit_scale.exp().item() == pytest.approx(10.0)
    trainer = fit_steps(model, [fixed_batch(model)])
    assert trainer.global_step == 1


def test_group_text_queries_merges_identical_captions_in_hash_order():
    text_hash = torch.tensor([7, 3, 7, 3, 5])
    text_emb = torch.arange(5.0)[:, None].repeat(1, 2)
    image_id = torch.tensor([10, 11, 12, 11, 13])
    unseen = torch.tensor([0, 0, 0, 0, 1])
    emb, relevant, unseen_mask = group_text_queries(text_hash, text_emb, image_id, unseen)
    assert relevant == [{11}, {13}, {10, 12}]
    assert emb[:, 0].tolist() == [1.0, 4.0, 0.0]
    assert unseen_mask.tolist() == [False, True, False]


@pytest.mark.slow
def test_fit_on_digits_logs_validation_metrics(tmp_path, digits_root):
    model = DualEncoder(model="test-vit-micro", warmup_steps=2, lr=1e-3)
    data = RetrievalDataModule(
        train=str(digits_root / "train"),
        val=str(digits_root / "val"),
        batch_size=32,
        num_workers=0,
        samples_per_epoch=128,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 4
    for key in (
        "val/image_retrieval_recall@1",
        "val/text_retrieval_recall@5",
        "val/acc1",
        "val/acc5",
        "val/image_retrieval_ndcg@10",
    ):
        assert key in metrics, sorted(metrics)
        assert 0.0 <= float(metrics[key]) <= 1.0
    assert int(metrics["val/num_images"]) == 200  # every val image exactly once


@pytest.mark.slow
def test_timm_image_tower_with_pretrained_minilm_text_tower_trains_with_locked_text():
    model = DualEncoder(model="test-timm-minilm", lock_text=True, warmup_steps=1, lr=1e-3)
    text_before = {k: v.clone() for k, v in model.model.text.state_dict().items()}
    batch = fixed_batch(model, batch_size=4)
    assert isinstance(batch["text"], torch.Tensor | dict)
    trainer = fit_steps(model, [batch])
    assert trainer.global_step == 1
    for name, value in model.model.text.state_dict().items():
        if "proj" not in name:  # the new projection head stays trainable, as in open_clip's LiT
            assert torch.equal(value, text_before[name]), name
