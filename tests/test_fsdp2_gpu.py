"""FSDP2 on CUDA (issue #19's GPU checks): bf16 mixed precision follows the float32 curve and keeps float32 master
weights; the memory benchmark runs and shards the state. Every GPU of the machine is a rank (nccl).

    make test-gpu          # or: .venv/bin/pytest -m gpu tests/test_fsdp2_gpu.py
    python experiments/benchmarks/fsdp_memory.py --output fsdp_memory.json     # ViT-L-14, the numbers

CPU counterparts (gloo): tests/test_fsdp2.py (bf16 on CPU included) and tests/test_fsdp2_fit.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH = 4, 16


def _curve(rank: int, world_size: int, mixed: bool) -> tuple[list[float], dict]:
    from mmret import distributed
    from mmret.distributed import mixed_precision_policy
    from mmret.losses import InfoNCELoss
    from mmret.models import create_model
    from mmret.training.fsdp import average_replicated_gradients, shard_dual_encoder

    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    model = create_model("test-vit-tiny").to(device)
    policy = mixed_precision_policy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    model = shard_dual_encoder(model, mixed_precision=policy)
    seen = {}
    block = model.visual.transformer.resblocks[0]
    block.register_forward_hook(lambda module, args, output: seen.setdefault("dtype", str(output.dtype)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = InfoNCELoss(gather=True, local_loss=True)
    generator = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(STEPS):
        images = torch.randn(BATCH * world_size, 3, 64, 64, generator=generator)
        texts = torch.randint(1, 49000, (BATCH * world_size, 16), generator=generator)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        optimizer.zero_grad()
        image_emb, text_emb, scale = model(image=images[mine].to(device), text=texts[mine].to(device))
        loss = loss_fn(image_emb.float(), text_emb.float(), scale.float())
        loss.backward()
        average_replicated_gradients(model)
        optimizer.step()
        losses.append(float(distributed.all_reduce_sum(loss.detach().clone())) / world_size)
    seen["master_dtype"] = str(block.mlp.c_fc.weight.dtype)
    return losses, seen


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    record = {}
    for mixed in (False, True):
        record["bf16" if mixed else "fp32"] = _curve(rank, world_size, mixed)
    if rank == 0:
        Path(out, "curves.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def test_bf16_mixed_precision_under_fsdp2_on_every_gpu(tmp_path):
    import torch.multiprocessing as mp

    from tests.ddp_helpers import free_port

    world_size = torch.cuda.device_count()
    mp.start_processes(_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size,
                       start_method="spawn")  # fmt: skip
    record = json.loads((tmp_path / "curves.json").read_text())
    (fp32, fp32_seen), (bf16, bf16_seen) = record["fp32"], record["bf16"]
    print(f"{world_size} GPU(s): fp32 {fp32}\nbf16 {bf16}")
    assert fp32_seen["dtype"] == "torch.float32" and bf16_seen["dtype"] == "torch.bfloat16"
    assert bf16_seen["master_dtype"] == "torch.float32", "the sharded master weights must stay float32"
    assert abs(fp32[0] - fp32[-1]) > 1e-3
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=0, atol=5e-2)


def test_memory_benchmark_runs_and_shards_the_state(tmp_path):
    out = tmp_path / "fsdp_memory.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "benchmarks" / "fsdp_memory.py"), "--model", "test-vit-tiny",
         "--batch", "8", "--steps", "3", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    results = json.loads(out.read_text())
    ranks = torch.cuda.device_count()
    assert results["fsdp2"]["state_MiB_per_rank_vs_ddp"] == pytest.approx(1 / ranks, rel=0.1)
    assert results["fsdp2_bf16"]["state_MiB_per_rank"] > 0
