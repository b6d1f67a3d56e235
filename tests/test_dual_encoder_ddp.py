"""The effective batch grows with DDP: 2 gloo ranks × B train digits with the same loss curve as one process
on the 2B batch (the design card's promise, issue "DualEncoder").

    .venv/bin/pytest tests/test_dual_encoder_ddp.py -q
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from mmret.data.datamodule import RetrievalDataModule
from mmret.data.perturb import caption_key_rows, caption_keys_of
from mmret.training import DualEncoder
from tests.ddp_helpers import LeaveTogether

TRAIN_KEYS = ("image", "text", "sample_id", "label")


class RankSlices(L.LightningDataModule):
    """Serves fixed global batches; each rank gets its contiguous slice of every batch (rank order)."""

    def __init__(self, global_batches: list[dict]):
        super().__init__()
        self.global_batches = global_batches

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        local = []
        for batch in self.global_batches:
            rows = batch["image"].shape[0] // world
            local.append({key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()})
        return torch.utils.data.DataLoader(local, batch_size=None)


class LossRecorder(L.Callback):
    """Writes this rank's per-step training loss to DIR/loss_rank{R}.json at the end of fit."""

    def __init__(self, directory: str):
        self.directory = directory
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module):
        with open(f"{self.directory}/loss_rank{trainer.global_rank}.json", "w") as handle:
            json.dump(self.losses, handle)


def digits_batches(
    root, model: DualEncoder, batch_size: int, count: int, caption_keys: bool = False
) -> list[dict]:
    """Global batches of digits train images; with `caption_keys` they carry `text_key` / `caption_keys`
    (digits of one class share caption templates, so many rows describe each other's images)."""
    data = RetrievalDataModule(test=str(root / "train"), eval_batch_size=batch_size, num_workers=0)
    data.set_preprocess(_eval_transform(model), model.tokenizer)
    data.setup("test")
    batches = []
    for batch in data.test_dataloader():
        kept = {key: batch[key] for key in TRAIN_KEYS}
        if caption_keys:
            kept["text_key"] = caption_keys_of([[caption] for caption in batch["caption"]])[:, 0]
            kept["caption_keys"] = caption_key_rows(batch["captions"])
        batches.append(kept)
        if len(batches) == count:
            break
    return batches


def _eval_transform(model: DualEncoder):
    from mmret.models import create_transforms

    return create_transforms(model.model, train=False)


def train(batches: list[dict], devices: int, out_dir, loss: str) -> list[float]:
    torch.manual_seed(0)
    model = DualEncoder(model="test-vit-micro", loss=loss, warmup_steps=2, lr=2e-3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[LossRecorder(str(out_dir)), LeaveTogether()],
        deterministic=True,
        use_distributed_sampler=False,  # RankSlices already gives each rank its slice
    )
    trainer.fit(model, datamodule=RankSlices(batches))
    per_rank = [json.loads((out_dir / f"loss_rank{r}.json").read_text()) for r in range(devices)]
    return torch.tensor(per_rank, dtype=torch.float64).mean(0).tolist()


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["infonce", "siglip", "infonce+caption_keys"])
def test_two_ranks_follow_the_single_process_loss_curve_with_twice_the_batch(tmp_path, digits_root, loss):
    model = DualEncoder(model="test-vit-micro")
    keys = loss.endswith("+caption_keys")
    loss = loss.removesuffix("+caption_keys")
    # 4 steps of a global batch of 16
    batches = digits_batches(digits_root, model, batch_size=16, count=4, caption_keys=keys)
    assert all(b["image"].shape[0] == 16 for b in batches)
    if keys:  # the masking is not vacuous: some rows' captions describe another row's image
        first = batches[0]
        shared = (first["text_key"][:, None, None] == first["caption_keys"][None]).any(-1)
        assert int(shared.sum()) > 16
    (tmp_path / "single").mkdir()
    (tmp_path / "ddp").mkdir()
    single = train(batches, 1, tmp_path / "single", loss)
    ddp = train(batches, 2, tmp_path / "ddp", loss)
    assert len(single) == len(ddp) == 4
    assert single[0] != pytest.approx(single[-1], abs=1e-3), (
        "the loss did not move: the check would be vacuous"
    )
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=0, atol=1e-5)
