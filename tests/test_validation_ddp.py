"""Validation under DDP is exact: 2 gloo ranks (Lightning ddp_spawn, CPU) log the same `val/*` metrics as one
process on the same digits val data and weights, and each rank's loader really reads only its share.

Lightning's `use_distributed_sampler` does nothing for our iterable eval loaders; the split comes from
`RetrievalDataModule` passing the trainer's rank and world size to `EvalStream`, and the metrics are made exact
by `EvalSetEmbedder.finish()` (gather, dedupe by sample id, one query per unique caption).

    .venv/bin/pytest tests/test_validation_ddp.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from mmret.data.datamodule import RetrievalDataModule
from mmret.training import DualEncoder
from tests.ddp_helpers import LeaveTogether


class ValidationRecorder(L.Callback):
    """Writes DIR/rank{R}.json: the sample ids this rank validated on and the val/* metrics it logged."""

    def __init__(self, directory: str):
        self.directory = directory
        self.sample_ids: list[int] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.sample_ids += batch["sample_id"].tolist()

    def on_validation_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        record = {"sample_ids": self.sample_ids, "metrics": metrics, "world_size": trainer.world_size}
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def validate(model: L.LightningModule, val_dir: Path, devices: int, out_dir: Path) -> list[dict]:
    """Run `trainer.validate` on `devices` CPU processes; returns each rank's record."""
    out_dir.mkdir()
    data = RetrievalDataModule(val=str(val_dir), eval_batch_size=32, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ValidationRecorder(str(out_dir)), LeaveTogether()],
    )
    trainer.validate(model, datamodule=data)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(devices)]


@pytest.mark.ddp
@pytest.mark.slow
def test_two_rank_validation_metrics_equal_single_process(digits_root, tmp_path):
    torch.manual_seed(0)
    # the same initial weights go to every rank (pickled by spawn); the compositional pairs are built from the
    # captions and metadata every rank gathered
    model = DualEncoder(model="test-vit-micro", compositional_val=True)
    [single] = validate(model, digits_root / "val", 1, tmp_path / "single")
    ranks = validate(model, digits_root / "val", 2, tmp_path / "ddp")

    assert [record["world_size"] for record in ranks] == [2, 2]
    ids = [set(record["sample_ids"]) for record in ranks]
    assert all(ids) and not ids[0] & ids[1], "each rank must validate its own, disjoint share"
    assert sum(len(record["sample_ids"]) for record in ranks) == 200
    assert ids[0] | ids[1] == set(single["sample_ids"]) and len(single["sample_ids"]) == 200

    expected = single["metrics"]
    assert (
        expected["val/num_images"] == 200
        and "val/acc1" in expected
        and "val/image_retrieval_recall@1" in expected
        and "val/compositional_text_acc" in expected
    )
    for record in ranks:
        assert set(record["metrics"]) == set(expected)
        for key, value in expected.items():
            assert record["metrics"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.ddp
@pytest.mark.slow
def test_two_rank_reranker_validation_equals_single_process(digits_root, tmp_path):
    """The CrossEncoder reranks the whole val set on every rank: patches and captions of the other rank are
    gathered, so the reranked metrics (not only the first stage) equal one process's."""
    from mmret.training import CrossEncoder

    torch.manual_seed(0)
    model = CrossEncoder(
        model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2, val_top_k=5
    )
    [single] = validate(model, digits_root / "val", 1, tmp_path / "single")
    ranks = validate(model, digits_root / "val", 2, tmp_path / "ddp")
    expected = single["metrics"]
    assert (
        "val/image_retrieval_recall@1" in expected and "val/first_stage/image_retrieval_recall@1" in expected
    )
    assert "val/ceiling/image_retrieval_recall@5" in expected
    for record in ranks:
        assert set(record["metrics"]) == set(expected)
        for key, value in expected.items():
            assert record["metrics"][key] == pytest.approx(value, abs=1e-5), key
