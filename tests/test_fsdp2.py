"""FSDP2 (`fully_shard`) on the dual encoder: 2 gloo ranks on CPU, each tower block and the root a unit, follow
the single-process loss curve on the concatenated batch (the same reference the DDP tests compare to), for
plain steps and for GradCache steps, through Lightning (ModelParallelStrategy, mmret's FSDP2Strategy), with LoRA
adapters, and for the reranker; evaluation while sharded, gradient clipping over shards, bf16 mixed precision
and the memory benchmark on the CPU (issue #19). `mmret fit` itself: tests/test_fsdp2_fit.py; GPUs:
tests/test_fsdp2_gpu.py.

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

    return L, DualEncoder, Slices, Losses


def _lightning_fit(world_size: int, chunk: int | None) -> list[float]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from mmret.training import FSDP2Strategy

    L, DualEncoder, Slices, Losses = _lightning_classes()
    torch.manual_seed(0)
    model = DualEncoder(
        model="test-vit-micro", loss="infonce", warmup_steps=2, lr=2e-3, gradcache_chunk_size=chunk
    )
    recorder = Losses()
    if world_size == 1:
        strategy = "auto"
    elif (
        chunk is None
    ):  # Lightning's own strategy: DualEncoder.configure_model shards over its data-parallel mesh
        strategy = ModelParallelStrategy(
            data_parallel_size=world_size, tensor_parallel_size=1, process_group_backend="gloo"
        )
    else:  # mmret's (`--trainer.strategy fsdp2`)
        strategy = FSDP2Strategy(process_group_backend="gloo")
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


# --- evaluation while sharded, gradient clipping, mixed precision ----------------------------------------------


def _gathered_worker(rank: int, world_size: int, out_dir: Path) -> None:
    from mmret.training.fsdp import gathered

    reference = _model().eval()
    model = shard_dual_encoder(_model()).eval()
    encode_image, _ = fsdp_encoders(model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad(), gathered(model):
        # rank 0 embeds three batches, rank 1 one: with a collective per forward this would hang
        embedded = [encode_image(images[i : i + 1]) for i in range(3 if rank == 0 else 1)]
        expected = [reference.encode_image(images[i : i + 1], normalize=True) for i in range(len(embedded))]
    for ours, theirs in zip(embedded, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    weight = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    assert weight.to_local().numel() < weight.numel(), "not resharded after the block"
    (out_dir / f"gathered{rank}.ok").write_text("")


@pytest.mark.ddp
def test_gathered_lets_ranks_embed_different_numbers_of_batches(tmp_path):
    run_ddp(_gathered_worker, world_size=2, args=(tmp_path,))
    assert (tmp_path / "gathered0.ok").exists() and (tmp_path / "gathered1.ok").exists()


def _clip_worker(rank: int, world_size: int, out_dir: Path) -> None:
    from mmret.training.fsdp import clip_grad_norm, clip_grad_value

    images, texts = _batches()[0]
    loss_module = InfoNCELoss(gather=True, local_loss=True)
    results = {}
    for algorithm in ("norm", "value"):
        model = shard_dual_encoder(_model())
        rows = GLOBAL_BATCH // world_size
        image_emb, text_emb, scale = model(
            image=images[rank * rows : (rank + 1) * rows], text=texts[rank * rows : (rank + 1) * rows]
        )
        loss_module(image_emb, text_emb, scale).backward()
        average_replicated_gradients(model)
        if algorithm == "norm":
            results["norm"] = float(clip_grad_norm(model.parameters(), 0.5))
        else:
            clip_grad_value(model.parameters(), 1e-3)
        results[algorithm + "_grads"] = {
            name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).tolist()
            for name, p in model.named_parameters()
            if name in ("logit_scale", "visual.conv1.weight", "transformer.resblocks.0.mlp.c_fc.weight")
        }
    if rank == 0:
        (out_dir / "clip.json").write_text(json.dumps(results))


@pytest.mark.ddp
def test_gradient_clipping_over_shards_equals_torch_on_the_full_gradient(tmp_path):
    """clip_grad_norm / clip_grad_value on 2 ranks' shards + the replicated logit_scale equal torch's
    clip_grad_norm_ / clip_grad_value_ on one process's full-batch gradient."""
    run_ddp(_clip_worker, world_size=2, args=(tmp_path,))
    sharded = json.loads((tmp_path / "clip.json").read_text())
    images, texts = _batches()[0]
    for algorithm in ("norm", "value"):
        model = _model()
        image_emb, text_emb, scale = model(image=images, text=texts)
        InfoNCELoss()(image_emb, text_emb, scale).backward()
        if algorithm == "norm":
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
            assert norm > 0.5, "the gradient was not clipped: the check would be vacuous"
            assert sharded["norm"] == pytest.approx(norm, rel=1e-5)
        else:
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        for name, values in sharded[algorithm + "_grads"].items():
            expected = dict(model.named_parameters())[name].grad
            torch.testing.assert_close(torch.tensor(values), expected, rtol=1e-4, atol=1e-7, msg=name)


def _bf16_worker(rank: int, world_size: int, out_dir: Path) -> None:
    from mmret.distributed import mixed_precision_policy

    policy = mixed_precision_policy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard_dual_encoder(_model(), mixed_precision=policy)
    losses = _train(model, "plain", rank, world_size)
    weight = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    assert weight.dtype == torch.float32, "the sharded master weights stay float32"
    if rank == 0:
        (out_dir / "bf16.json").write_text(json.dumps(losses))


@pytest.mark.ddp
@pytest.mark.slow
def test_bf16_mixed_precision_runs_on_cpu_and_stays_near_the_float32_curve(tmp_path, single_process_curve):
    """The policy FSDP2Strategy(mixed_precision="bf16") applies, on CPU (the GPU check is tests/test_gpu_step.py)."""
    run_ddp(_bf16_worker, world_size=2, args=(tmp_path,))
    bf16 = torch.tensor(json.loads((tmp_path / "bf16.json").read_text()))
    single = torch.tensor(single_process_curve)
    print(f"bf16: max |bf16 - float32| = {(bf16 - single).abs().max():.3g}")
    assert not torch.equal(bf16, single), "bf16 gave float32's exact curve: the policy was not applied"
    torch.testing.assert_close(bf16, single, rtol=0, atol=5e-2)


# --- the reranker -------------------------------------------------------------------------------------------

RERANK_CAPTIONS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "two shapes",
    "a big one",
    "a 7",
    "a 3",
    "0",
]


def _reranker(gather: bool):
    from mmret.training import CrossEncoder

    torch.manual_seed(0)
    return CrossEncoder(model="test-vit-micro", fusion_width=32, fusion_layers=2, fusion_heads=2,
                        num_negatives=3, negative_sampling="hardest", gather=gather,
                        contrastive_weight=0.5, first_stage_residual=True)  # fmt: skip


def _rerank_curve(module, rank: int, world_size: int) -> list[float]:
    """3 AdamW steps on this rank's slice of 8 pairs; the rank-mean loss of each step."""
    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    rows = len(RERANK_CAPTIONS) // world_size
    losses = []
    for step in range(3):
        images = torch.randn(len(RERANK_CAPTIONS), 3, 32, 32, generator=generator)
        mine = slice(rank * rows, (rank + 1) * rows)
        captions = RERANK_CAPTIONS[mine]
        batch = {"image": images[mine], "text": module.tokenizer(captions), "caption": captions,
                 "sample_id": torch.arange(len(RERANK_CAPTIONS))[mine] + 10 * step}  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(batch, 0)
        loss.backward()
        module.on_after_backward()
        optimizer.step()
        losses.append(float(distributed.all_reduce_sum(loss.detach().clone())) / world_size)
    return losses


def _rerank_worker(rank: int, world_size: int, out_dir: Path) -> None:
    module = _reranker(gather=True)
    module.log = lambda *args, **kwargs: None  # no Trainer here
    module.shard()
    layer = module.fusion.layers[0].mlp[0].weight
    assert layer.to_local().numel() < layer.numel(), "the fusion layer is not sharded"
    losses = _rerank_curve(module, rank, world_size)
    if rank == 0:
        (out_dir / "rerank.json").write_text(json.dumps(losses))


@pytest.mark.ddp
@pytest.mark.slow
def test_reranker_under_fsdp2_follows_the_single_process_curve(tmp_path):
    """CrossEncoder.shard (what configure_model does under strategy fsdp2) on 2 ranks: listwise loss over gathered
    candidates, the towers' contrastive term and the replicated scales follow one process on the whole batch."""
    run_ddp(_rerank_worker, world_size=2, args=(tmp_path,))
    sharded = torch.tensor(json.loads((tmp_path / "rerank.json").read_text()))
    module = _reranker(gather=False)
    module.log = lambda *args, **kwargs: None
    single = torch.tensor(_rerank_curve(module, 0, 1))
    print(f"reranker: max |fsdp2 - single| = {(sharded - single).abs().max():.3g}")
    assert abs(float(single[0] - single[-1])) > 1e-3, "the loss did not move: the check would be vacuous"
    torch.testing.assert_close(sharded, single, **TOL)


@pytest.mark.ddp
@pytest.mark.slow
def test_memory_benchmark_on_cpu_halves_the_state_per_rank(tmp_path):
    """experiments/benchmarks/fsdp_memory.py on 2 gloo ranks: FSDP2 holds half of DDP's parameters, gradients and
    AdamW moments per rank (the replicated logit scale aside)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "fsdp_memory.py"
    out = tmp_path / "fsdp_memory.json"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--ranks", "2", "--model", "test-vit-micro",
         "--batch", "4", "--steps", "2", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "state/ddp" in done.stdout
    results = json.loads(out.read_text())
    assert results["fsdp2"]["state_MiB_per_rank_vs_ddp"] == pytest.approx(0.5, abs=0.01)


def _lora_model() -> torch.nn.Module:
    from mmret.models.lora import LoraSettings, apply_lora

    model = _model()
    apply_lora(model, LoraSettings(rank=4, alpha=8, targets=["attn", "mlp"], unlock=["logit_scale"]))
    with torch.no_grad():  # B starts at zero: give the adapters a start that moves the loss from step 0
        for name, param in model.named_parameters():
            if "lora_" in name and "_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def _lora_worker(rank: int, world_size: int, out_dir: Path) -> None:
    model = shard_dual_encoder(_lora_model())
    base = model.visual.transformer.resblocks[0].mlp.c_fc.base_layer.weight
    before = base.to_local().clone()
    losses = _train(model, "plain", rank, world_size)
    assert torch.equal(base.to_local(), before), "a frozen base weight changed under FSDP2"
    if rank == 0:
        (out_dir / "lora.json").write_text(json.dumps(losses))


@pytest.mark.ddp
@pytest.mark.slow
def test_lora_under_fsdp2_follows_the_single_process_curve(tmp_path):
    """LoRA's frozen base weights and trained adapters in the same FSDP2 units: the adapters' curve is one
    process's on the whole batch, the base weights stay bit-identical."""
    run_ddp(_lora_worker, world_size=2, args=(tmp_path,))
    sharded = torch.tensor(json.loads((tmp_path / "lora.json").read_text()))
    single = torch.tensor(_train(_lora_model(), "plain", rank=0, world_size=1))
    assert abs(float(single[0] - single[-1])) > 1e-3
    torch.testing.assert_close(sharded, single, **TOL)
