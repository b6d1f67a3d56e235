"""FSDP2 (`fully_shard`) on the dual encoder: 2 gloo ranks on CPU, each tower block and the root a unit, follow
the single-process loss curve on the concatenated batch (the same reference the DDP tests compare to), for
plain steps and for GradCache steps (issue #19).

    .venv/bin/pytest tests/test_fsdp2.py -m ddp
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmret import distributed
from mmret.losses import InfoNCELoss
from mmret.models import create_model
from mmret.training.fsdp import (
    average_replicated_gradients,
    fsdp_encoders,
    gradcache_no_sync,
    residual_blocks,
    shard_dual_encoder,
)
from mmret.training.gradcache import gradcache_backward
from tests.ddp_helpers import run_ddp

STEPS, GLOBAL_BATCH, CHUNK = 4, 16, 3
TOL = {"rtol": 0, "atol": 1e-5}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator),
            torch.randint(1, 400, (GLOBAL_BATCH, 16), generator=generator),
        )
        for _ in range(STEPS)
    ]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("test-vit-micro")


def _train(model, mode: str, rank: int, world_size: int, no_sync=None) -> list[float]:
    """STEPS AdamW steps on this rank's slice of each global batch; the rank-mean loss of every step."""
    loss_module = InfoNCELoss(gather=True, local_loss=True)
    encode_image, encode_text = fsdp_encoders(model)
    network = getattr(model, "module", model)  # under DDP, the wrapped model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    losses = []
    for images, texts in _batches():
        rows = GLOBAL_BATCH // world_size
        images, texts = images[rank * rows : (rank + 1) * rows], texts[rank * rows : (rank + 1) * rows]
        optimizer.zero_grad(set_to_none=True)
        if mode == "plain":
            image_emb, text_emb, logit_scale = model(image=images, text=texts)
            loss = loss_module(image_emb, text_emb, logit_scale)
            loss.backward()
        else:
            loss = gradcache_backward(
                encode_image,
                encode_text,
                images,
                texts,
                loss_fn=lambda i, t: loss_module(i, t, network.logit_scale.exp()),
                chunk_size=CHUNK,
                no_sync=no_sync,
            ).loss
        average_replicated_gradients(network)  # a no-op for DDP, which averaged them already
        optimizer.step()
        losses.append(float(distributed.all_reduce_sum(loss.detach().clone())) / world_size)
    return losses


def _fsdp_worker(rank: int, world_size: int, out_dir: Path, mode: str) -> None:
    if mode.startswith("ddp"):  # the DDP curve, for the report's FSDP2-vs-DDP number
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(_model())
        losses = _train(model, mode.removeprefix("ddp_"), rank, world_size, model.no_sync)
    else:
        # gradcache_keep_gathered: blocks stay gathered from forward to backward (reshard_after_forward=False)
        model = shard_dual_encoder(_model(), reshard_after_forward=mode != "gradcache_keep_gathered")
        block = model.visual.transformer.resblocks[0].mlp.c_fc.weight
        assert block.to_local().numel() < block.numel(), "the block's weight is not sharded"
        no_sync = None if mode == "gradcache_sync_every_chunk" else gradcache_no_sync(model)
        losses = _train(model, "plain" if mode == "plain" else "gradcache", rank, world_size, no_sync)
    if rank == 0:
        (out_dir / f"{mode}.json").write_text(json.dumps(losses))


def test_units_are_the_tower_blocks():
    model = _model()
    assert len(residual_blocks(model.visual)) == len(model.visual.transformer.resblocks) > 0
    assert len(residual_blocks(model.transformer)) == len(model.transformer.resblocks) > 0


@pytest.fixture(scope="module")
def single_process_curve() -> list[float]:
    """One process, the full global batch, plain steps: the curve DDP and FSDP2 must follow."""
    return _train(_model(), "plain", rank=0, world_size=1)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", ["plain", "gradcache", "gradcache_sync_every_chunk", "gradcache_keep_gathered"]
)
def test_fsdp2_two_ranks_follow_the_ddp_and_single_process_loss_curves(tmp_path, single_process_curve, mode):
    ddp_mode = "ddp_plain" if mode == "plain" else "ddp_gradcache"
    run_ddp(_fsdp_worker, world_size=2, args=(tmp_path, mode))
    run_ddp(_fsdp_worker, world_size=2, args=(tmp_path, ddp_mode))
    fsdp = torch.tensor(json.loads((tmp_path / f"{mode}.json").read_text()))
    ddp = torch.tensor(json.loads((tmp_path / f"{ddp_mode}.json").read_text()))
    single = torch.tensor(single_process_curve)
    assert abs(float(single[0] - single[-1])) > 1e-3, "the loss did not move: the check would be vacuous"
    print(
        f"{mode}: max |fsdp2 - ddp| = {(fsdp - ddp).abs().max():.3g}, "
        f"max |fsdp2 - single| = {(fsdp - single).abs().max():.3g}"
    )
    torch.testing.assert_close(fsdp, ddp, **TOL)
    torch.testing.assert_close(fsdp, single, **TOL)


# --- Lightning: ModelParallelStrategy, sharding in configure_model -------------------------------------------


def _lightning_classes():
    import lightning as L

    from mmret.training import DualEncoder

    class ShardedDualEncoder(DualEncoder):
        """What DualEncoder needs under ModelParallelStrategy: shard in configure_model, encode through the
        root forward, average the replicated logit_scale gradient (once per backward: exact, it is linear)."""

        def configure_model(self) -> None:
            if not getattr(self, "_sharded", False):
                shard_dual_encoder(self.model, mesh=self.device_mesh["data_parallel"])
                self._sharded = True

        def encode_image(self, images):
            return fsdp_encoders(self.model)[0](images)

        def encode_text(self, text):
            return fsdp_encoders(self.model)[1](text)

        def on_after_backward(self) -> None:
            average_replicated_gradients(self.model)

    class Slices(L.LightningDataModule):
        def train_dataloader(self):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            rows = GLOBAL_BATCH // world
            local = [
                {
                    "image": images[rank * rows : (rank + 1) * rows],
                    "text": texts[rank * rows : (rank + 1) * rows],
                    "sample_id": torch.arange(GLOBAL_BATCH)[rank * rows : (rank + 1) * rows] + 100 * step,
                }
                for step, (images, texts) in enumerate(_batches())
            ]
            return torch.utils.data.DataLoader(local, batch_size=None)

    class Losses(L.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    return L, DualEncoder, ShardedDualEncoder, Slices, Losses


def _lightning_fit(world_size: int, chunk: int | None) -> list[float]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    L, DualEncoder, ShardedDualEncoder, Slices, Losses = _lightning_classes()
    torch.manual_seed(0)
    cls = ShardedDualEncoder if world_size > 1 else DualEncoder
    model = cls(model="test-vit-micro", loss="infonce", warmup_steps=2, lr=2e-3, gradcache_chunk_size=chunk)
    recorder = Losses()
    strategy = (
        ModelParallelStrategy(
            data_parallel_size=world_size, tensor_parallel_size=1, process_group_backend="gloo"
        )
        if world_size > 1
        else "auto"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=Slices())
    if world_size > 1:
        weight = model.model.visual.transformer.resblocks[0].mlp.c_fc.weight
        assert weight.to_local().numel() < weight.numel(), "configure_model did not shard the blocks"
        from mmret.training.gradcache import lightning_no_sync

        # GradCache skips the reduce-scatter of all chunks but the last (ModelParallelStrategy's own
        # block_backward_sync is a no-op for FSDP2)
        assert lightning_no_sync(model).__qualname__.startswith("gradcache_no_sync")
    return [float(distributed.all_reduce_sum(torch.tensor(v))) / world_size for v in recorder.losses]


def _lightning_worker(rank: int, world_size: int, out_dir: Path, chunk: int | None) -> None:
    import os

    os.environ["LOCAL_RANK"] = str(rank)  # the process group exists: Lightning takes these ranks as given
    losses = _lightning_fit(world_size, chunk)
    if rank == 0:
        (out_dir / "lightning.json").write_text(json.dumps(losses))


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, CHUNK], ids=["plain", "gradcache"])
def test_lightning_model_parallel_strategy_follows_the_single_process_curve(tmp_path, chunk):
    run_ddp(_lightning_worker, world_size=2, args=(tmp_path, chunk))
    sharded = torch.tensor(json.loads((tmp_path / "lightning.json").read_text()))
    single = torch.tensor(_lightning_fit(1, None))
    print(f"lightning {chunk=}: max |fsdp2 - single| = {(sharded - single).abs().max():.3g}")
    assert abs(float(single[0] - single[-1])) > 1e-3
    torch.testing.assert_close(sharded, single, **TOL)
