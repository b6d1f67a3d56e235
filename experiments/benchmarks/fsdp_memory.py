"""Benchmark: memory per rank of FSDP2 (mmret.training.fsdp.shard_dual_encoder) vs DDP for one dual encoder.

    python experiments/benchmarks/fsdp_memory.py --output fsdp_memory.json            # every GPU, ViT-L-14
    python experiments/benchmarks/fsdp_memory.py --device cpu --ranks 2 --model ViT-B-16 --batch 2

The same randomly initialised open_clip model trains for `--steps` AdamW steps (InfoNCE over negatives gathered
from every rank, `--batch` pairs per rank of random 224 px images and token ids) under each setting, one after
the other, in `--ranks` processes (nccl on GPUs, one per GPU; gloo on the CPU):

- ddp: torch's DistributedDataParallel, float32 (the baseline);
- fsdp2: every tower block and the root sharded over the ranks, float32;
- fsdp2_bf16 (GPU only): the same with FSDP2's bf16 mixed precision (bf16 parameters in compute, float32
  gradient reduction, float32 sharded weights and optimizer state), what `--trainer.strategy fsdp2
  --trainer.strategy.mixed_precision bf16` does.

Per rank it reports the bytes of the model state it holds after the steps (its parameters, gradients and AdamW
moments: local shards under FSDP2, full copies under DDP), the peak memory of the step (GPU:
torch.cuda.max_memory_allocated; CPU: the process's peak resident set size, which includes the interpreter and
libraries, so the CPU ratio understates the saving), and the mean step time after the first step. Ratios are
FSDP2 / DDP measured in the same run. With N ranks the sharded state is about 1/N of DDP's; activations are not
sharded, so the peak saving depends on the batch.

Measured (2026-12-08, 2 CPU cores, `--device cpu --ranks 2 --model ViT-B-16 --batch 2 --steps 3`; the GPU run
was not made: no device was lent to this task): see the README's "FSDP2" section.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    total = 0
    for param in model.parameters():
        total += local(param).numel() * local(param).element_size()
        if param.grad is not None:
            total += local(param.grad).numel() * local(param.grad).element_size()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += local(value).numel() * local(value).element_size()
    return total


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    from mmret.distributed import mixed_precision_policy
    from mmret.losses import InfoNCELoss
    from mmret.models import create_model
    from mmret.training.fsdp import average_replicated_gradients, shard_dual_encoder

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = create_model(args.model).to(device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    else:
        policy = None
        if mode == "fsdp2_bf16":
            policy = mixed_precision_policy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        wrapped = shard_dual_encoder(model, mixed_precision=policy)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    loss_fn = InfoNCELoss(gather=True, local_loss=True)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    context = model.context_length if hasattr(model, "context_length") else 77
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, size, size, generator=generator).to(device)
    texts = torch.randint(1, 49000, (args.batch, context), generator=generator).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        image_emb, text_emb, scale = wrapped(image=images, text=texts)[:3]
        loss_fn(image_emb.float(), text_emb.float(), scale.float()).backward()
        if mode != "ddp":
            average_replicated_gradients(model)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    )
    record = {
        "rank": rank,
        "state_bytes": _state_bytes(wrapped, optimizer),
        "peak_bytes": int(peak),
        "step_seconds": sum(times[1:]) / max(1, len(times) - 1),
        "loss": float(loss_fn(image_emb.float(), text_emb.float(), scale.float()).detach()),
    }
    Path(out, f"{mode}_rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict:
    import tempfile

    modes = ["ddp", "fsdp2"] + (["fsdp2_bf16"] if args.device == "cuda" else [])
    results: dict = {
        "model": args.model,
        "device": args.device,
        "ranks": args.ranks,
        "batch_per_rank": args.batch,
    }
    if args.device == "cuda":
        results["card"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as out:
        for mode in modes:
            mp.start_processes(
                _worker,
                args=(args.ranks, _free_port(), args, mode, out),
                nprocs=args.ranks,
                start_method="spawn",
            )
            ranks = [json.loads(Path(out, f"{mode}_rank{r}.json").read_text()) for r in range(args.ranks)]
            results[mode] = {
                "state_MiB_per_rank": max(r["state_bytes"] for r in ranks) / 2**20,
                "peak_MiB_per_rank": max(r["peak_bytes"] for r in ranks) / 2**20,
                "step_seconds": max(r["step_seconds"] for r in ranks),
            }
    for mode in modes[1:]:
        for key in ("state_MiB_per_rank", "peak_MiB_per_rank", "step_seconds"):
            results[mode][f"{key}_vs_ddp"] = results[mode][key] / results["ddp"][key]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-L-14", help="an open_clip / mmret architecture (random init)")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--ranks", type=int, default=None, help="processes (default: every GPU; 2 on the CPU)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="pairs per rank (default 32 on GPUs, 2 on CPU)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; pass --device cpu")
    args.ranks = args.ranks or (torch.cuda.device_count() if args.device == "cuda" else 2)
    args.batch = args.batch or (32 if args.device == "cuda" else 2)
    results = run(args)
    print(f"{args.model}, {args.ranks} ranks on {results.get('card', 'cpu')}, batch {args.batch} per rank")
    print(
        f"{'setting':<12}{'state MiB/rank':>16}{'peak MiB/rank':>15}{'step s':>9}{'state/ddp':>11}{'peak/ddp':>10}"
    )
    for mode in [m for m in ("ddp", "fsdp2", "fsdp2_bf16") if m in results]:
        row = results[mode]
        state, peak = (
            f"{row.get(key + '_vs_ddp', 1.0):.2f}" for key in ("state_MiB_per_rank", "peak_MiB_per_rank")
        )
        print(
            f"{mode:<12}{row['state_MiB_per_rank']:>16.1f}{row['peak_MiB_per_rank']:>15.1f}"
            f"{row['step_seconds']:>9.3f}{state:>11}{peak:>10}"
        )
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
