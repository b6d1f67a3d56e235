"""Benchmark: training-step time and model FLOP utilisation of mmret's DualEncoder vs open_clip_train, one GPU.

    python experiments/benchmarks/gpu_step.py --output gpu_step.json               # ViT-B-32, batch 256, bf16
    python experiments/benchmarks/gpu_step.py --cpu-smoke --output smoke.json      # tiny model on CPU, ~30 s

Both trainers train the same randomly initialised open_clip model (default ViT-B-32) with the same batch,
precision, optimizer (AdamW, lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 off norms and biases),
warmup schedule and number of steps, one after the other on the same card:

- ours: `mmret.training.DualEncoder` (InfoNCE) under a Lightning `Trainer` (1 device, `--precision`, default
  bf16-mixed), in this process;
- open_clip_train: `open_clip_train.main` with `--dataset-type synthetic` in a subprocess (this file, run with
  a private first argument, imports `mmret.models` so our `test-*` configs exist, then calls its `main`).

Data loading is kept out of the measured time on both sides: two batches of random images (N(0, 1), already
"normalised") and random token ids are made once on the device and replayed every step (ours as the batch
dicts our data module yields, open_clip_train by replacing its synthetic dataset with the same tensors; pass
`--openclip-loader synthetic` to keep its real DataLoader, whose PIL transforms then count in its step time).

What still differs is each trainer's own code, which is what is measured: ours masks same-sample-id pairs
and computes the InfoNCE loss in float32 outside autocast, open_clip's ClipLoss runs under autocast; both get
TF32 matmuls and cuDNN benchmark mode (open_clip_train's main turns them on; here they are set for ours too).

Step time: wall time between the ends of consecutive steps, after the first `--warmup-steps`. Both trainers wait
for the GPU once per step — open_clip_train through the `.item()` of its per-step log line (parsed from its
"Batch (t)" log, as batch_size / samples-per-second, which has more digits), ours through a Callback that calls
`torch.cuda.synchronize()` in `on_train_batch_end` — so each figure includes the trainer's own per-step
overhead (Lightning's loop and hooks; open_clip's logging). samples/s and MFU use the mean step time.

MFU = FLOPs per step / mean step time / the card's peak dense bf16 FLOP/s (H100 SXM and H200 989 TFLOP/s, H100
PCIe 756, A100 312; others: pass --peak-tflops, else "n/a"). FLOPs per step are counted with
`torch.utils.flop_counter.FlopCounterMode` on one forward + backward of the model and loss at the benchmark
batch size, under the benchmark's autocast (model FLOPs: matmuls, convolutions and, on CUDA, attention; no
elementwise ops). The analytic count of a ViT CLIP's matmuls and attention (3 × forward) is printed beside it
as a check, and used for MFU when there is no count (ours not run).

Expected on one H100: ViT-B-32 at batch 256 is ~11.5 TFLOP per step, so ~0.03-0.06 s per step at 20-40% MFU;
the whole script (20 + 100 steps per trainer, start-up of both) in 1-2 minutes. Prints a markdown table and
progress lines as it goes; `--output` gets a JSON, rewritten after each trainer, and open_clip_train's full log
beside it (`OUTPUT.open_clip_train.log`).

Needs torch, torchvision, lightning, open_clip_torch (with open_clip_train), webdataset and braceexpand; a
missing one is named in one line before anything runs. pandas, which open_clip_train imports only for CSV
data, is stubbed in its subprocess when missing.
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

try:
    import torch
except ModuleNotFoundError as error:  # the GPU machine may miss packages: say which in one line
    print(
        f"gpu_step: missing package {error.name!r}; install it into this Python ({sys.executable})",
        file=sys.stderr,
    )
    sys.exit(2)

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing mmret

# What each trainer imports (checked by importing them, so a missing dependency of theirs is named too); a
# missing package ends the run before anything starts. open_clip_train's own modules import pandas, which its
# synthetic data never uses: the subprocess stubs it when missing, so its modules are not imported here.
REQUIRED = {
    "ours": ("lightning", "open_clip", "mmret.training.dual_encoder"),
    "open_clip_train": (
        "open_clip_train",
        "open_clip",
        "mmret.models",
        "webdataset",
        "braceexpand",
        "torchvision",
    ),
}
OPENCLIP_CHILD = "--_openclip-child"  # first argument of the subprocess that runs open_clip_train
RESULT_MARKER = "GPU_STEP_CHILD_RESULT "
OPENCLIP_PRECISION = {"bf16-mixed": "amp_bf16", "16-mixed": "amp", "32": "fp32", "32-true": "fp32"}
# Peak dense (no sparsity) bf16 tensor-core TFLOP/s, matched against torch.cuda.get_device_name in order.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
)
SMOKE = dict(model="test-vit-micro", batch_size=8, precision="32", steps=3, warmup_steps=1, device="cpu")
DEFAULTS = dict(
    model="ViT-B-32", batch_size=256, precision="bf16-mixed", steps=100, warmup_steps=20, device="cuda"
)
CONFIG_KEYS = (*DEFAULTS, "compile", "openclip_loader")
LR, WEIGHT_DECAY = 5e-4, 0.2
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_step {time.perf_counter() - START:6.1f}s] {message}", flush=True)


def missing_package(trainers: list[str]) -> str | None:
    """The first package that one of `trainers` cannot import, or None."""
    for trainer in trainers:
        for module in REQUIRED[trainer]:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as error:
                return f"{error.name!r} (needed by {module}, for {trainer})"
    return None


def stub_pandas_if_missing() -> None:
    """open_clip_train.data imports pandas at the top but uses it only for CSV datasets, never for synthetic data."""
    if importlib.util.find_spec("pandas") is not None:
        return
    stub = types.ModuleType("pandas")
    # importlib.util.find_spec("pandas") (torch._dynamo calls it) raises on a module without a spec.
    stub.__spec__ = importlib.machinery.ModuleSpec("pandas", loader=None)

    def __getattr__(name: str):
        raise AttributeError(
            f"pandas.{name}: pandas is not installed (stubbed by gpu_step for open_clip_train)"
        )

    stub.__getattr__ = __getattr__
    sys.modules["pandas"] = stub
    print(
        "gpu_step: pandas is not installed; stubbed (open_clip_train uses it only for CSV data)", flush=True
    )


# ---- data: made once on the device, replayed every step ---------------------------------------------------
def synthetic_tensors(
    batch_size: int,
    image_size: tuple[int, int],
    context_length: int,
    vocab_size: int,
    device: torch.device,
    num_batches: int = 2,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`num_batches` pairs of random images [B, 3, H, W] (float32) and random token ids [B, L] (int64)."""
    generator = torch.Generator(device).manual_seed(seed)
    height, width = image_size
    return [
        (
            torch.randn(batch_size, 3, height, width, generator=generator, device=device),
            torch.randint(0, vocab_size, (batch_size, context_length), generator=generator, device=device),
        )
        for _ in range(num_batches)
    ]


class ReplayBatches(torch.utils.data.IterableDataset):
    """Yields the given ready batches in turn, `num_steps` times (use with `DataLoader(batch_size=None)`)."""

    def __init__(self, batches: list, num_steps: int) -> None:
        self.batches = batches
        self.num_steps = num_steps

    def __iter__(self):
        for step in range(self.num_steps):
            yield self.batches[step % len(self.batches)]


class ReplayLoader:
    """Stands in for open_clip_train's synthetic DataLoader: the same (images, texts) tuples, already on device."""

    def __init__(self, batches: list, num_batches: int, batch_size: int) -> None:
        self.batches = batches
        self.num_batches = num_batches
        self.num_samples = num_batches * batch_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for step in range(self.num_batches):
            yield self.batches[step % len(self.batches)]


def image_hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ---- FLOPs -----------------------------------------------------------------------------------------------
def autocast_for(precision: str, device: torch.device):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def counted_step_flops(module, batch: dict, precision: str, device: torch.device) -> tuple[int, bool]:
    """FLOPs of one forward + backward of the model and InfoNCE loss, counted by FlopCounterMode.

    Returns:
        The FLOPs, and whether attention was among them (FlopCounterMode knows the CUDA SDPA kernels, not the
        CPU one, so on CPU attention is missing from the count).
    """
    from torch.utils.flop_counter import FlopCounterMode

    module.train()
    with FlopCounterMode(display=False) as counter:
        with autocast_for(precision, device):
            image_emb = module.encode_image(batch["image"])  # [B, D]
            text_emb = module.encode_text(batch["text"])  # [B, D]
        loss = module.loss_fn(
            image_emb, text_emb, module.model.logit_scale.exp(), sample_ids=batch["sample_id"]
        )
        loss.backward()
    module.zero_grad(set_to_none=True)
    attention = any("attention" in str(op) for op in counter.get_flop_counts().get("Global", {}))
    return int(counter.get_total_flops()), attention


def analytic_step_flops(model_name: str, batch_size: int) -> int | None:
    """3 × forward FLOPs of a ViT CLIP's matmuls and attention (backward = 2 × forward); None if not a ViT CLIP."""
    import open_clip

    import mmret.models  # noqa: F401  (registers the test-* configs with open_clip)

    config = open_clip.get_model_config(model_name)
    if not config:
        return None
    vision, text, embed_dim = config.get("vision_cfg", {}), config.get("text_cfg", {}), config["embed_dim"]
    if not isinstance(vision.get("layers"), int) or "timm_model_name" in vision or "hf_model_name" in text:
        return None

    def transformer(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
        mlp = int(width * mlp_ratio)
        # qkv + out projections and the MLP, then QK^T and attention @ V.
        return layers * (2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width)

    grid = vision["image_size"] // vision["patch_size"]
    patch_embed = 2 * grid * grid * 3 * vision["patch_size"] ** 2 * vision["width"]
    image = (
        patch_embed
        + transformer(grid * grid + 1, vision["width"], vision["layers"], vision.get("mlp_ratio", 4.0))
        + 2 * vision["width"] * embed_dim
    )
    text_tokens = text.get("context_length", 77)
    text_flops = (
        transformer(text_tokens, text["width"], text["layers"], text.get("mlp_ratio", 4.0))
        + 2 * text["width"] * embed_dim
    )
    logits = 2 * batch_size * batch_size * embed_dim
    return int(3 * (batch_size * (image + text_flops) + logits))


def peak_tflops_for(device_name: str) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in device_name:
            return tflops
    return None


# ---- summaries -------------------------------------------------------------------------------------------
def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def flops_text(flops: float | None) -> str:
    if not flops:
        return "n/a"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops / 1e6:.3f} MFLOP"


def summarise(step_seconds: list[float], batch_size: int) -> dict:
    mean = statistics.fmean(step_seconds)
    return {
        "timed_steps": len(step_seconds),
        "step_seconds": step_seconds,
        "step_time_median_s": statistics.median(step_seconds),
        "step_time_p90_s": percentile(step_seconds, 0.9),
        "step_time_mean_s": mean,
        "samples_per_s": batch_size / mean,
    }


def add_mfu(results: dict) -> None:
    """MFU of every finished trainer: FLOPs per step / mean step time / peak; counted FLOPs, else analytic."""
    flops = results["flops_per_step"]
    flops["used_for_mfu"] = "counted" if flops["counted"] else "analytic" if flops["analytic"] else None
    per_step = flops[flops["used_for_mfu"]] if flops["used_for_mfu"] else None
    for result in results["trainers"].values():
        if "step_time_mean_s" in result:
            peak = results["peak_tflops"]
            result["mfu"] = (
                per_step / result["step_time_mean_s"] / (peak * 1e12) if per_step and peak else None
            )


def markdown_table(results: dict) -> str:
    lines = [
        "| trainer | step time median (s) | p90 (s) | mean (s) | samples/s | MFU | peak GPU memory (GiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results["trainers"].items():
        if "step_time_mean_s" not in result:
            lines.append(f"| {name} | failed: {result.get('error', '?')} | | | | | |")
            continue
        mfu = f"{100 * result['mfu']:.1f}%" if result.get("mfu") is not None else "n/a"
        memory = result.get("peak_memory_bytes")
        memory = f"{memory / 2**30:.2f}" if memory else "n/a"
        lines.append(
            f"| {name} | {result['step_time_median_s']:.4f} | {result['step_time_p90_s']:.4f} | "
            f"{result['step_time_mean_s']:.4f} | {result['samples_per_s']:.1f} | {mfu} | {memory} |"
        )
    return "\n".join(lines)


def print_report(results: dict) -> None:
    config, flops = results["config"], results["flops_per_step"]
    data = "Data is made once on the device, outside the step time."
    if config["openclip_loader"] == "synthetic":
        data += " Except open_clip_train's: its own synthetic DataLoader, inside its step time."
    print(
        f"\n## Training step: {config['model']}, batch {config['batch_size']}, {config['precision']}, "
        f"{config['warmup_steps']} warmup + {config['steps']} timed steps, {results['card']}\n",
        flush=True,
    )
    print(markdown_table(results), flush=True)
    print(
        f"\nFLOPs per step: {flops_text(flops['counted'])} counted (FlopCounterMode), "
        f"{flops_text(flops['analytic'])} analytic; MFU from the {flops.get('used_for_mfu') or 'n/a'} FLOPs and "
        f"a peak of {results['peak_tflops'] or 'n/a'} TFLOP/s (dense bf16). {data}",
        flush=True,
    )
    ours = results["trainers"].get("ours", {})
    if "in_step_time_median_s" in ours:
        print(
            f"ours without Lightning's loop (on_train_batch_start -> end): median "
            f"{ours['in_step_time_median_s']:.4f} s",
            flush=True,
        )
    if "ratio_ours_over_open_clip" in results:
        ratio = results["ratio_ours_over_open_clip"]
        print(
            f"ours / open_clip_train step time: {ratio['step_time_mean']:.3f} (mean), "
            f"{ratio['step_time_median']:.3f} (median); below 1 = ours faster",
            flush=True,
        )


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for distribution in ("lightning", "open_clip_torch"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:  # importable from a path, not installed
            versions[distribution] = None
    return versions


def write_json(path: str | None, results: dict) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(path)


# ---- ours: DualEncoder under a Lightning Trainer ---------------------------------------------------------
def run_ours(args: argparse.Namespace, device: torch.device, results: dict) -> dict:
    import warnings

    import lightning as L

    from mmret.models import get_tokenizer
    from mmret.training.dual_encoder import DualEncoder

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    total_steps = args.warmup_steps + args.steps

    class StepTimer(L.Callback):
        """Waits for the device at each step's start and end and records when."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def _now(self) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(self._now())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(self._now())
            step = len(self.ends)
            if step > 1 and (step % 10 == 0 or step == total_steps):
                log(f"ours step {step}/{total_steps}: {self.ends[-1] - self.ends[-2]:.4f} s")

    torch.manual_seed(0)
    module = DualEncoder(
        model=args.model,
        pretrained=None,
        loss="infonce",
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        betas=(0.9, 0.98),
        eps=1e-6,
        warmup_steps=args.warmup_steps,
        compile=args.compile,
    )
    module.to(device)
    tokenizer = get_tokenizer(module.model)
    tensors = synthetic_tensors(
        args.batch_size,
        image_hw(module.model.visual.image_size),
        tokenizer.context_length,
        tokenizer.vocab_size,
        device,
    )
    batches = [
        {
            "image": images,  # [B, 3, H, W]
            "text": tokens,  # [B, L]
            "sample_id": torch.arange(args.batch_size, device=device) + index * args.batch_size,  # [B]
            "label": torch.full((args.batch_size,), -1, dtype=torch.long, device=device),  # [B]
            "caption": ["a synthetic caption"] * args.batch_size,
        }
        for index, (images, tokens) in enumerate(tensors)
    ]
    log(f"ours: {args.model} built ({sum(p.numel() for p in module.parameters()) / 1e6:.1f} M params)")

    flops, attention = counted_step_flops(module, batches[0], args.precision, device)
    results["flops_per_step"].update(counted=flops, counted_includes_attention=attention)
    log(
        f"FLOPs per step (FlopCounterMode, fwd+bwd, batch {args.batch_size}): {flops_text(flops)}"
        f"{'' if attention else ' (attention not counted on this device)'}; "
        f"analytic {flops_text(results['flops_per_step']['analytic'])}"
    )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=total_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        benchmark=True,
        callbacks=[timer],
        default_root_dir=args.workdir,
    )
    loader = torch.utils.data.DataLoader(ReplayBatches(batches, total_steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    if len(timer.ends) != total_steps:
        raise RuntimeError(f"Lightning ran {len(timer.ends)} steps, expected {total_steps}")
    step_seconds = [timer.ends[i] - timer.ends[i - 1] for i in range(args.warmup_steps, total_steps)]
    in_step = [timer.ends[i] - timer.starts[i] for i in range(args.warmup_steps, total_steps)]
    result = summarise(step_seconds, args.batch_size)
    # From each step's start to its end: training_step, backward and optimizer, without Lightning's loop.
    result["in_step_time_median_s"] = statistics.median(in_step)
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del trainer, module, batches, tensors, loader
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the card to the open_clip_train subprocess
    return result


# ---- open_clip_train in a subprocess ---------------------------------------------------------------------
def open_clip_argv(args: argparse.Namespace) -> list[str]:
    precision = OPENCLIP_PRECISION.get(args.precision)
    if precision is None:
        raise ValueError(
            f"--precision {args.precision!r} has no open_clip_train equivalent; "
            f"use one of {sorted(OPENCLIP_PRECISION)}"
        )
    options = {
        "--dataset-type": "synthetic",
        "--train-num-samples": str(args.batch_size * (args.warmup_steps + args.steps)),
        "--model": args.model,
        "--batch-size": str(args.batch_size),
        "--precision": precision,
        "--epochs": "1",
        "--lr": str(LR),
        "--beta1": "0.9",
        "--beta2": "0.98",
        "--eps": "1e-6",
        "--wd": str(WEIGHT_DECAY),
        "--warmup": str(args.warmup_steps),
        "--workers": str(args.workers),
        "--log-every-n-steps": "1",
        "--report-to": "",
        "--save-frequency": "0",
        "--zeroshot-frequency": "0",
        "--val-frequency": "0",
        "--device": args.device,
        "--seed": "0",
        "--name": "gpu_step",
        "--logs": "none",  # "none": no checkpoint is written (its log still goes to ./none/gpu_step/out.log)
    }
    argv = [item for option in options.items() for item in option]
    return argv + (["--torchcompile"] if args.compile else [])


BATCH_LINE = re.compile(r"Batch \(t\): (?P<avg>[0-9.]+), (?P<samples_per_s>[0-9.eE+-]+)/s")


def parse_open_clip_steps(lines: list[str], batch_size: int) -> list[float]:
    """Per-step seconds from open_clip_train's log lines (`--log-every-n-steps 1`: one line per step)."""
    steps = []
    for line in lines:
        match = BATCH_LINE.search(line)
        if match:
            samples_per_s = float(match["samples_per_s"])
            steps.append(batch_size / samples_per_s if samples_per_s > 0 else float(match["avg"]))
    return steps


def run_open_clip(args: argparse.Namespace, results: dict) -> dict:
    total_steps = args.warmup_steps + args.steps
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        OPENCLIP_CHILD,
        args.openclip_loader,
        *open_clip_argv(args),
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    workdir = Path(args.workdir) / "open_clip_train"
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"open_clip_train: {' '.join(command[2:])}")
    lines: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=40)
    child_result: dict = {}
    done = 0
    with subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        killed = threading.Event()

        def kill() -> None:  # also ends a child that hangs without printing
            killed.set()
            process.kill()

        watchdog = threading.Timer(args.child_timeout, kill)
        watchdog.start()
        try:
            for line in process.stdout:
                lines.append(line)
                tail.append(line.rstrip())
                if line.startswith(RESULT_MARKER):
                    child_result = json.loads(line[len(RESULT_MARKER) :])
                elif step := parse_open_clip_steps([line], args.batch_size):
                    done += 1
                    if done > 1 and (done % 10 == 0 or done == total_steps):
                        log(f"open_clip_train step {done}/{total_steps}: {step[0]:.4f} s")
            returncode = process.wait()
        finally:
            watchdog.cancel()
    log_path = Path(f"{args.output}.open_clip_train.log") if args.output else workdir / "stdout.log"
    log_path.write_text("".join(lines))
    steps = parse_open_clip_steps(lines, args.batch_size)
    if killed.is_set():
        raise TimeoutError(
            f"open_clip_train ran past --child-timeout {args.child_timeout:g} s ({len(steps)} steps)"
        )
    if returncode != 0 or len(steps) != total_steps:
        print("\n".join(tail), flush=True)
        raise RuntimeError(
            f"open_clip_train exited with {returncode} after {len(steps)}/{total_steps} logged steps "
            f"(its log: {log_path})"
        )
    result = summarise(steps[args.warmup_steps :], args.batch_size)
    result["peak_memory_bytes"] = child_result.get("peak_memory_bytes")
    result["argv"] = open_clip_argv(args)
    return result


def openclip_child(argv: list[str]) -> int:
    """Runs open_clip_train.main(argv[1:]) with our test-* configs registered; argv[0] is the loader mode."""
    loader_mode, train_argv = argv[0], argv[1:]
    import mmret.models  # noqa: F401  (registers the test-* configs with open_clip)

    stub_pandas_if_missing()
    from open_clip_train import data as open_clip_data
    from open_clip_train.main import main as open_clip_main

    if loader_mode == "memory":

        def replayed_synthetic_dataset(args, preprocess_fn, is_train, epoch=0, tokenizer=None):
            tensors = synthetic_tensors(
                args.batch_size,
                image_hw(preprocess_fn.transforms[0].size),
                tokenizer.context_length,
                tokenizer.vocab_size,
                torch.device(args.device),
            )
            num_batches = args.train_num_samples // args.batch_size
            return open_clip_data.DataInfo(ReplayLoader(tensors, num_batches, args.batch_size))

        open_clip_data.get_synthetic_dataset = replayed_synthetic_dataset
    code = open_clip_main(train_argv)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(RESULT_MARKER + json.dumps({"peak_memory_bytes": peak, "exit": code}), flush=True)
    return 1 if code == -1 else 0


# ---- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help=f"open_clip model name (default {DEFAULTS['model']})")
    parser.add_argument("--batch-size", type=int, help=f"default {DEFAULTS['batch_size']}")
    parser.add_argument(
        "--precision",
        choices=sorted(OPENCLIP_PRECISION),
        help=f"Lightning precision; open_clip_train gets the same (default {DEFAULTS['precision']})",
    )
    parser.add_argument("--steps", type=int, help=f"timed steps per trainer (default {DEFAULTS['steps']})")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=f"untimed steps first, also the LR warmup (default {DEFAULTS['warmup_steps']})",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), help=f"default {DEFAULTS['device']}")
    parser.add_argument(
        "--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the card (default: by name)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile in both trainers (slower start)"
    )
    parser.add_argument(
        "--openclip-loader",
        choices=("memory", "synthetic"),
        default="memory",
        help="memory: replay device tensors (default); synthetic: its own DataLoader",
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="open_clip_train DataLoader workers (synthetic)"
    )
    parser.add_argument("--trainers", default="ours,open_clip_train", help="comma-separated subset to run")
    parser.add_argument(
        "--child-timeout", type=float, default=240.0, help="seconds for the open_clip_train run"
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="test-vit-micro, batch 8, precision 32, 1 + 3 steps on CPU: checks the code paths",
    )
    parser.add_argument("--output", help="write the results here as JSON (rewritten after each trainer)")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.cpu_smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error(
            "--warmup-steps and --steps must be at least 1 (a step time runs from the previous step's end)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible (use --cpu-smoke or --device cpu)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == OPENCLIP_CHILD:
        return openclip_child(argv[1:])
    args = parse_args(argv)
    trainers = [name.strip() for name in args.trainers.split(",") if name.strip()]
    unknown = sorted(set(trainers) - set(REQUIRED))
    if unknown:
        print(
            f"gpu_step: unknown trainer(s) {unknown} in --trainers; expected {sorted(REQUIRED)}",
            file=sys.stderr,
        )
        return 2
    missing = missing_package(trainers)
    if missing:
        print(
            f"gpu_step: missing package {missing}; install it into this Python ({sys.executable})",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    if device.type == "cuda":
        # open_clip_train's main sets these; ours gets the same so only the trainers differ.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        card = torch.cuda.get_device_name(0)
    else:
        card = f"CPU ({os.cpu_count()} cores visible)"
    peak_tflops = args.peak_tflops or (peak_tflops_for(card) if device.type == "cuda" else None)
    results = {
        "card": card,
        "versions": package_versions(),
        "cuda": torch.version.cuda,
        "config": {key: getattr(args, key) for key in CONFIG_KEYS},
        "optimizer": {
            "name": "AdamW",
            "lr": LR,
            "betas": [0.9, 0.98],
            "eps": 1e-6,
            "weight_decay": WEIGHT_DECAY,
        },
        "peak_tflops": peak_tflops,
        "flops_per_step": {
            "counted": None,
            "analytic": analytic_step_flops(args.model, args.batch_size),
            "method": "torch.utils.flop_counter.FlopCounterMode, one forward+backward",
        },
        "step_time": "wall time between consecutive step ends, device synchronised once per step, after warmup",
        "trainers": {},
    }
    log(
        f"card: {card}; peak bf16 {peak_tflops or 'unknown'} TFLOP/s; torch {torch.__version__}; "
        f"{args.model} batch {args.batch_size} {args.precision}, {args.warmup_steps} warmup + {args.steps} steps"
    )
    with tempfile.TemporaryDirectory(prefix="gpu_step_") as workdir:
        args.workdir = workdir
        for name in trainers:
            runner = {
                "ours": lambda: run_ours(args, device, results),
                "open_clip_train": lambda: run_open_clip(args, results),
            }[name]
            log(f"running {name}")
            try:
                results["trainers"][name] = runner()
            except Exception as error:  # keep the other trainer's numbers
                log(f"{name} failed: {type(error).__name__}: {error}")
                results["trainers"][name] = {"error": f"{type(error).__name__}: {error}"}
            else:
                add_mfu(results)
                done = results["trainers"][name]
                log(
                    f"{name}: median {done['step_time_median_s']:.4f} s/step, {done['samples_per_s']:.1f} samples/s"
                )
            write_json(args.output, results)

    ours, theirs = results["trainers"].get("ours", {}), results["trainers"].get("open_clip_train", {})
    if "step_time_mean_s" in ours and "step_time_mean_s" in theirs:
        results["ratio_ours_over_open_clip"] = {
            "step_time_mean": ours["step_time_mean_s"] / theirs["step_time_mean_s"],
            "step_time_median": ours["step_time_median_s"] / theirs["step_time_median_s"],
        }
    write_json(args.output, results)
    print_report(results)
    failed = [name for name, result in results["trainers"].items() if "error" in result]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
