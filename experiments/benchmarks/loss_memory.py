"""Benchmark: peak memory and time of the contrastive losses per rank, and of a GradCache step.

    .venv/bin/python experiments/benchmarks/loss_memory.py            # B_local 256/1024/4096, ~3 min on 2 cores
    .venv/bin/python experiments/benchmarks/loss_memory.py --quick    # B_local 256/1024, smaller GradCache, ~1 min

Part 1 — losses. Two gloo ranks (spawned, one CPU thread each) run loss forward + backward on random unit
embeddings (D=512, float32, gather_with_grad=True) for B_local in {256, 1024, 4096}, local_loss on and off:
mmret's `InfoNCELoss` beside open_clip's `ClipLoss`, same inputs, same run. Reported per rank (max over ranks).

Part 2 — GradCache. One process, a small dual encoder whose towers keep a lot of activations per sample but
cost few FLOPs (wide GELU/LayerNorm/Dropout blocks) — the regime of real ViT/BERT towers, where activations
rather than the `[B, B]` logits fill memory. Compared: the plain step at the effective batch (encode all rows
with a graph, loss, backward), GradCache at the same batch in chunks, and the plain step of one chunk.

What "peak" measures: the highest number of bytes held by PyTorch's CPU allocator during the measured call,
above what was held when it started (inputs and parameters are already allocated), read from the allocation
and free events of `torch.profiler` (profile_memory=True). It counts every tensor (logits, saved activations,
gradients, communication buffers), not Python objects or the allocator's cached-but-free pages. Time is the
median wall time of separate, unprofiled runs (ranks synchronised by a barrier, communication included). With
CUDA present, part 2 also runs on the GPU and reports `torch.cuda.max_memory_allocated` above the start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter on stderr

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402  (the benchmark launches its own process group)
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
from mmret.losses import InfoNCELoss  # noqa: E402
from mmret.training.gradcache import gradcache_backward  # noqa: E402

DIM = 512
MIB = 2**20


def peak_cpu_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes held by torch's CPU allocator while `fn` runs, above the level at its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


def peak_cuda_bytes(fn: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def median_seconds(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- part 1: losses on 2 gloo ranks -------------------------------------------------------------------------


def _loss_step(loss_module: nn.Module, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor):
    def step() -> None:
        image_leaf = image.detach().requires_grad_()
        text_leaf = text.detach().requires_grad_()
        scale_leaf = scale.detach().requires_grad_()
        loss_module(image_leaf, text_leaf, scale_leaf).backward()

    return step


def _loss_worker(rank: int, world_size: int, port: int, sizes: list[int], out_file: str) -> None:
    from open_clip.loss import ClipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    rows = []
    for batch in sizes:
        generator = torch.Generator().manual_seed(rank)
        image = F.normalize(torch.randn(batch, DIM, generator=generator), dim=-1)
        text = F.normalize(torch.randn(batch, DIM, generator=generator), dim=-1)
        scale = torch.tensor(100.0)
        for local_loss in (True, False):
            for impl in ("mmret", "open_clip"):
                if impl == "mmret":
                    module = InfoNCELoss(local_loss=local_loss, gather_with_grad=True)
                else:
                    module = ClipLoss(
                        local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world_size
                    )
                step = _loss_step(module, image, text, scale)
                repeats = 1 if batch >= 4096 else 3
                if batch < 4096:
                    step()  # warm-up; at 4096 the profiled run is the warm-up
                peak = peak_cpu_bytes(step)
                seconds = median_seconds(step, repeats, dist.barrier)
                stats = torch.tensor([peak, seconds], dtype=torch.float64)
                dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # report the worse rank
                rows.append(
                    {
                        "impl": impl,
                        "batch_local": batch,
                        "batch_global": batch * world_size,
                        "local_loss": local_loss,
                        "peak_bytes": stats[0].item(),
                        "seconds": stats[1].item(),
                    }
                )
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_loss_sweep(sizes: list[int], world_size: int = 2) -> list[dict]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "rows.json")
        mp.spawn(_loss_worker, args=(world_size, port, sizes, out_file), nprocs=world_size, join=True)
        return json.loads(Path(out_file).read_text())


def loss_table(rows: list[dict]) -> str:
    lines = [
        "| B_local | B_global | local_loss | logits per rank | mmret peak MiB | open_clip peak MiB | mmret / open_clip "
        "| mmret bytes per logit | mmret ms | open_clip ms |",
        "|---:|---:|:---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    keyed = {(r["impl"], r["batch_local"], r["local_loss"]): r for r in rows}
    for (impl, batch, local_loss), ours in keyed.items():
        if impl != "mmret":
            continue
        theirs = keyed[("open_clip", batch, local_loss)]
        logit_rows = batch if local_loss else ours["batch_global"]
        logits = logit_rows * ours["batch_global"]
        lines.append(
            f"| {batch} | {ours['batch_global']} | {'on' if local_loss else 'off'} "
            f"| {logit_rows}x{ours['batch_global']} "
            f"| {ours['peak_bytes'] / MIB:.1f} | {theirs['peak_bytes'] / MIB:.1f} "
            f"| {ours['peak_bytes'] / theirs['peak_bytes']:.2f} | {ours['peak_bytes'] / logits:.1f} "
            f"| {ours['seconds'] * 1e3:.0f} | {theirs['seconds'] * 1e3:.0f} |"
        )
    return "\n".join(lines)


# --- part 2: GradCache ----------------------------------------------------------------------------------------


class ActivationHeavyTowers(nn.Module):
    """Image MLP and embedding-bag text tower with wide elementwise blocks: many saved activations, few FLOPs."""

    def __init__(
        self, width: int = 2048, blocks: int = 6, image_features: int = 768, vocab: int = 1000
    ) -> None:
        super().__init__()

        def block_stack() -> nn.Sequential:
            # One dropout per tower exercises GradCache's RNG replay; more would only add bernoulli time.
            layers: list[nn.Module] = [nn.Dropout(0.1)]
            for _ in range(blocks):
                layers += [nn.GELU(), nn.LayerNorm(width)]
            return nn.Sequential(*layers)

        self.image_tower = nn.Sequential(
            nn.Linear(image_features, width), block_stack(), nn.Linear(width, DIM)
        )
        self.token_bag = nn.EmbeddingBag(vocab, width, mode="mean")
        self.text_tower = nn.Sequential(block_stack(), nn.Linear(width, DIM))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(images), dim=-1)

    def encode_text(self, texts: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_tower(self.token_bag(texts["input_ids"])), dim=-1)


def run_gradcache(batch: int, chunk: int, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = ActivationHeavyTowers().to(device)
    images = torch.randn(batch, 768, device=device)
    texts = {"input_ids": torch.randint(0, 1000, (batch, 16), device=device)}
    loss = InfoNCELoss()

    def loss_fn(image_emb, text_emb):
        return loss(image_emb, text_emb, model.logit_scale.exp())

    def plain_step(rows: int) -> Callable[[], None]:
        def step() -> None:
            chunk_texts = {"input_ids": texts["input_ids"][:rows]}
            loss_fn(model.encode_image(images[:rows]), model.encode_text(chunk_texts)).backward()
            model.zero_grad(set_to_none=True)

        return step

    def gradcache_step() -> None:
        gradcache_backward(model.encode_image, model.encode_text, images, texts, loss_fn, chunk_size=chunk)
        model.zero_grad(set_to_none=True)

    def loss_only() -> None:  # the full-batch loss on embeddings: GradCache's floor
        image_emb = torch.randn(batch, DIM, device=device).requires_grad_()
        text_emb = torch.randn(batch, DIM, device=device).requires_grad_()
        loss_fn(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)).backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        measure, sync = peak_cuda_bytes, torch.cuda.synchronize
    else:
        measure, sync = peak_cpu_bytes, lambda: None
    cases = [
        (f"plain step, batch {batch}", plain_step(batch)),
        (f"GradCache, batch {batch}, chunks of {chunk}", gradcache_step),
        (f"plain step, one chunk ({chunk})", plain_step(chunk)),
        (f"loss alone (fwd+bwd), batch {batch}", loss_only),
    ]
    rows = []
    for name, fn in cases:
        peak = measure(fn)  # the measured run doubles as warm-up for the timed ones
        rows.append({"case": name, "peak_bytes": peak, "seconds": median_seconds(fn, 2, sync)})
    return rows


def gradcache_table(rows: list[dict], device: torch.device) -> str:
    gradcache = rows[1]["peak_bytes"]
    lines = [
        f"| step ({device.type}) | peak MiB | GradCache / this | ms |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['peak_bytes'] / MIB:.1f} | {gradcache / row['peak_bytes']:.2f} "
            f"| {row['seconds'] * 1e3:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B_local 256/1024 and GradCache at batch 1024")
    parser.add_argument("--skip-losses", action="store_true", help="only the GradCache part")
    parser.add_argument("--skip-gradcache", action="store_true", help="only the loss part")
    args = parser.parse_args(argv)

    if not args.skip_losses:
        sizes = [256, 1024] if args.quick else [256, 1024, 4096]
        start = time.perf_counter()
        rows = run_loss_sweep(sizes)
        print(f"## Loss forward+backward per rank (world 2, gloo, CPU, D={DIM}, float32, gather_with_grad)\n")
        print(loss_table(rows))
        print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)

    if args.skip_gradcache:
        return 0
    torch.set_num_threads(2)
    batch, chunk = (1024, 256) if args.quick else (4096, 1024)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        start = time.perf_counter()
        rows = run_gradcache(batch, chunk, device)
        print(f"## GradCache vs plain steps (single process, {device.type})\n")
        print(gradcache_table(rows, device))
        print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
