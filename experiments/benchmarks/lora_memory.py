"""Benchmark: LoRA (mmret.models.lora) vs full finetuning — trainable parameters and peak training memory.

    .venv/bin/python experiments/benchmarks/lora_memory.py          # test-vit-tiny and test-timm-minilm, CPU
    .venv/bin/python experiments/benchmarks/lora_memory.py --model ViT-B-32 --batch-size 64 --device cuda

Each configuration runs in a fresh process (so peaks do not mix): the model is built, LoRA applied (or not),
then `--steps` AdamW steps of CLIP's loss on random images and captions. Reported per configuration:
trainable parameters, the bytes of gradients + AdamW state they imply (3 × 4 bytes each in fp32), and the
peak memory of the steps: on CUDA `torch.cuda.max_memory_allocated` minus the memory held before the first
step; on CPU the growth of the process's peak RSS (`ru_maxrss`) over the steps (activations, gradients and
optimizer state; coarse — the allocator keeps freed pages — but comparable between configurations). Each
number is also printed as a ratio to full finetuning of the same model in the same run.

Models: `test-vit-tiny` (open_clip ViT and text transformer: LoRA on nn.MultiheadAttention and the MLPs) and
`test-timm-minilm` (a timm ResNet image tower, which has no attention or MLP layers and so stays frozen, and the
real pretrained MiniLM-L6 text tower from Hugging Face: LoRA on its query/key/value/output and MLP Linears).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys

CONFIGS = {
    "full": None,
    "lora attn+mlp r8": {"rank": 8, "alpha": 16, "targets": ["attn", "mlp"], "unlock": ["logit_scale"]},
    "lora attn r8": {"rank": 8, "alpha": 16, "targets": ["attn"], "unlock": ["logit_scale"]},
    "lora text-only r8": {"rank": 8, "alpha": 16, "targets": ["text"], "unlock": ["logit_scale"]},
}


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _run(name: str, model_name: str, args: argparse.Namespace, queue) -> None:
    import torch

    from mmret import models
    from mmret.losses import InfoNCELoss
    from mmret.models.lora import apply_lora, parameter_counts

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = models.create_model(model_name)
    if CONFIGS[name] is not None:
        apply_lora(model, CONFIGS[name])
    model.to(device).train()
    counts = parameter_counts(model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    texts = models.get_tokenizer(model)([f"caption number {i}" for i in range(args.batch_size)])
    texts = (
        texts.to(device) if isinstance(texts, torch.Tensor) else {k: v.to(device) for k, v in texts.items()}
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = InfoNCELoss(gather=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = _peak_rss_bytes()
    for _ in range(args.steps):
        loss = loss_fn(
            models.encode_image(model, images), models.encode_text(model, texts), model.logit_scale.exp()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = _peak_rss_bytes() - start
    queue.put(
        {
            "config": name,
            "trainable": counts["trainable"],
            "total": counts["total"],
            "grad_and_adam_mib": counts["trainable"] * 12 / 2**20,
            "peak_mib": peak / 2**20,
        }
    )


def _measure(model_name: str, args: argparse.Namespace) -> list[dict]:
    """One row per configuration of `model_name`, each measured in its own process."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for name in CONFIGS:
        queue = context.Queue()
        process = context.Process(target=_run, args=(name, model_name, args, queue))
        process.start()
        row = queue.get()
        process.join()
        rows.append({"model": model_name, **row})
    full = rows[0]  # "full" comes first
    for row in rows:
        row["trainable_ratio"] = row["trainable"] / full["trainable"]
        row["peak_ratio"] = row["peak_mib"] / full["peak_mib"] if full["peak_mib"] > 0 else float("nan")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        nargs="+",
        default=["test-vit-tiny", "test-timm-minilm"],
        help="open_clip / mmret model names (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON line per configuration")
    args = parser.parse_args(argv)
    for model_name in args.model:
        rows = _measure(model_name, args)
        if args.json:
            for row in rows:
                print(json.dumps(row), flush=True)
            continue
        print(f"\n{model_name}, batch {args.batch_size}, {args.steps} AdamW steps on {args.device}")
        print(
            f"{'config':<20} {'trainable':>12} {'% of full':>10} {'grad+AdamW MiB':>15} {'peak MiB':>10} "
            f"{'peak / full':>12}"
        )
        for row in rows:
            print(
                f"{row['config']:<20} {row['trainable']:>12,} {100 * row['trainable_ratio']:>9.2f}% "
                f"{row['grad_and_adam_mib']:>15.2f} {row['peak_mib']:>10.1f} {row['peak_ratio']:>11.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
