"""GradCache inside a LightningModule (manual optimisation) under DDP: 2 ranks train as one full batch.

    .venv/bin/pytest tests/test_gradcache_lightning.py -m ddp

`Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn"))` trains a tiny dual encoder
(dropout in both towers) for two SGD steps with `lightning_gradcache_backward`, chunks of 4. The weights must
equal one process taking the same two SGD steps on the concatenated batch of both ranks, and DDP must
all-reduce exactly once per step (the chunks but the last run in `trainer.strategy.block_backward_sync()`).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mmret.losses import InfoNCELoss
from mmret.training.gradcache import lightning_gradcache_backward
from tests.ddp_helpers import LeaveTogether
from tests.test_gradcache import (
    _ALLREDUCE_CALLS,
    CHUNK,
    TOL,
    TinyTowers,
    _counting_allreduce_hook,
    _data,
    _encode_chunkwise_with_graph,
    _reference_loss,
)

LR, PER_RANK, STEPS = 0.5, 10, 2


class _PairDataset(Dataset):
    def __init__(self, rows: int) -> None:
        self.images, self.texts, _ = _data(rows)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return {"image": self.images[index], "input_ids": self.texts["input_ids"][index], "index": index}


class _GradCacheModule(pl.LightningModule):
    """The minimal dual-encoder module: manual optimisation, one GradCache step per batch."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.towers = TinyTowers()
        self.loss = InfoNCELoss()
        self.out_dir = Path(out_dir)
        self.record: list[dict] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        torch.manual_seed(1000 * batch_idx + self.global_rank)  # so the test can replay the dropout masks
        calls_before = _ALLREDUCE_CALLS[0]
        out = lightning_gradcache_backward(
            self,
            self.towers.encode_image,
            self.towers.encode_text,
            batch["image"],
            {"input_ids": batch["input_ids"]},
            lambda i, t: self.loss(i, t, self.towers.logit_scale.exp()),
            chunk_size=CHUNK,
        )
        opt.step()
        self.record.append(
            {"indices": batch["index"].tolist(), "allreduces": _ALLREDUCE_CALLS[0] - calls_before}
        )
        self.log("train/loss", out.loss)

    def on_train_start(self) -> None:
        # Lightning registers DDP comm hooks only on CUDA, so the counting hook is put on the wrapper here.
        self.trainer.strategy.model.register_comm_hook(None, _counting_allreduce_hook)

    def on_train_end(self) -> None:
        (self.out_dir / f"rank{self.global_rank}.json").write_text(json.dumps(self.record))
        if self.global_rank == 0:
            torch.save(self.towers.state_dict(), self.out_dir / "weights.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return DataLoader(_PairDataset(2 * PER_RANK * STEPS), batch_size=PER_RANK)


@pytest.mark.ddp
@pytest.mark.slow
def test_gradcache_in_lightning_ddp_equals_full_batch_sgd(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn"),
        precision="64-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[LeaveTogether()],
    )
    trainer.fit(_GradCacheModule(str(tmp_path)))

    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["allreduces"] for rank in records for r in rank] == [1] * (2 * STEPS)  # once per step per rank

    # Reference: one process, SGD on the concatenated batch of both ranks, same dropout masks.
    images, texts, _ = _data(2 * PER_RANK * STEPS)
    reference = TinyTowers()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(STEPS):
        optimizer.zero_grad()
        image_parts, text_parts = [], []
        for rank in range(2):
            rows = torch.tensor(records[rank][step]["indices"])
            torch.manual_seed(1000 * step + rank)
            image_emb, text_emb = _encode_chunkwise_with_graph(
                reference, images[rows], {"input_ids": texts["input_ids"][rows]}, CHUNK
            )
            image_parts.append(image_emb)
            text_parts.append(text_emb)
        _reference_loss(reference, "infonce", torch.cat(image_parts), torch.cat(text_parts)).backward()
        optimizer.step()

    trained = torch.load(tmp_path / "weights.pt")
    initial = TinyTowers().state_dict()
    for name, weight in reference.state_dict().items():
        assert not torch.allclose(weight, initial[name]), f"{name} did not move: the test would prove nothing"
        torch.testing.assert_close(trained[name], weight, **TOL, msg=lambda m, n=name: f"{n}: {m}")
