"""Benchmark: train-loader images/s from pre-resized shards vs full-size images resized on the fly.

    .venv/bin/python experiments/benchmarks/data_throughput.py             # 240 images, ~35 s on 2 idle cores
    .venv/bin/python experiments/benchmarks/data_throughput.py --quick     # 96 images, ~20 s

Data: synthetic 1024 px "photos" (smooth colour gradients, random shapes, sensor noise; JPEG quality 90,
~280 KiB each, like web photos of that size) written three ways as webdataset shards: full size, pre-resized to
224 px and to 64 px (resize shorter side + centre crop, as `mmret shards` does). Each configuration streams
`RetrievalDataModule`'s real train loader — shard resampling, shuffle buffer, JPEG decode, the default
transform (resize + centre crop to the target size, ToTensor, CLIP normalisation), open_clip tokenisation,
batching — with the same batch size and worker count. Throughput is measured after the first two batches
(worker start-up excluded) until the epoch ends. The ratio column is pre-resized over full-size at the same
output size: how much faster the loader gets by resizing once when writing the shards.

Expected (2 shared CPU cores, 2 workers): 224 px ~400-800 vs ~50-110 images/s (7-11x); 64 px ~1100-1800 vs
~110-140 images/s (8-16x). Absolute numbers swing with machine load; the ratio is the result.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageChops, ImageDraw

from mmret.data.datamodule import RetrievalDataModule


def synthetic_photo(index: int, size: int) -> Image.Image:
    """A size x size RGB image with photo-like statistics (smooth gradients, edges, sensor noise)."""
    rng = np.random.default_rng(index)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    pixels = start + (end - start) * ((ramp[:, None] + ramp[None, :]) / 2)[..., None]  # [H, W, 3]
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, size, size=2)
        width, height = rng.integers(size // 16, size // 3, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + width), int(y0 + height)], fill=colour)
    # Sensor-like noise gives the JPEG the entropy (and the decode cost) of a real photo.
    return ImageChops.add(image, noise_field(size), scale=1.0, offset=-128)


@functools.lru_cache(maxsize=2)
def noise_field(size: int) -> Image.Image:
    """Gaussian RGB noise centred on 128 (sigma 8); one field serves every image, as making it is slow."""
    return Image.merge("RGB", [Image.effect_noise((size, size), 8) for _ in range(3)])


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then a centre crop: what pre-resized shards hold."""
    scale = size / min(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_variants(root: Path, num_images: int, full_size: int, sizes: list[int], shard_size: int) -> dict:
    """Write shards of the same images at full size and pre-resized to each of `sizes`; returns dir -> bytes."""
    names = ["full", *[f"{size}px" for size in sizes]]
    writers, sizes_by_name = {}, {name: 0 for name in names}
    counts = {name: [] for name in names}
    for index in range(num_images):
        if index % shard_size == 0:
            for writer in writers.values():
                writer.close()
            shard = f"{index // shard_size:05d}.tar"
            writers = {}
            for name in names:
                (root / name).mkdir(parents=True, exist_ok=True)
                writers[name] = wds.TarWriter(str(root / name / shard))
                counts[name].append(0)
        photo = synthetic_photo(index, full_size)
        for name in names:
            data = jpeg(photo if name == "full" else resize_and_crop(photo, int(name[:-2])))
            sizes_by_name[name] += len(data)
            captions = f"synthetic photo {index}\na test image number {index}"
            writers[name].write(
                {
                    "__key__": f"{index:06d}",
                    "jpg": data,
                    "txt": captions,
                    "json": json.dumps({"id": index, "captions": captions.splitlines()}),
                }
            )
            counts[name][-1] += 1
    for writer in writers.values():
        writer.close()
    for name in names:
        info = {
            "name": f"synthetic-{name}",
            "num_samples": num_images,
            "image_size": None if name == "full" else int(name[:-2]),
            "shards": [f"{i:05d}.tar" for i in range(len(counts[name]))],
            "shard_sizes": counts[name],
            "class_names": None,
        }
        (root / name / "dataset.json").write_text(json.dumps(info))
    return sizes_by_name


def images_per_second(directory: Path, image_size: int, samples: int, batch_size: int, workers: int) -> float:
    """Stream one epoch of `samples` images through the train loader; images/s after the first two batches."""
    datamodule = RetrievalDataModule(
        train=str(directory),
        batch_size=batch_size,
        num_workers=workers,
        samples_per_epoch=samples,
        image_size=image_size,
        shuffle_buffer=64,
    )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    start, counted = None, 0
    for index, batch in enumerate(loader):
        assert batch["image"].shape[-1] == image_size
        if index == 1:
            start = time.perf_counter()
        elif index > 1:
            counted += len(batch["caption"])
    return counted / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=240, help="distinct images written (default 240)")
    parser.add_argument(
        "--full-size", type=int, default=1024, help="side of the full-size images (default 1024)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[224, 64], help="target sizes (default 224 64)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers in every run (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="96 images and shorter epochs")
    args = parser.parse_args()
    num_images = 96 if args.quick else args.num_images
    with tempfile.TemporaryDirectory(prefix="mmret-throughput-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        bytes_by_name = write_variants(root, num_images, args.full_size, args.sizes, shard_size=32)
        print(
            f"wrote {num_images} images x {1 + len(args.sizes)} variants in {time.perf_counter() - started:.0f} s; "
            f"mean JPEG size: "
            + ", ".join(f"{name} {size / num_images / 1024:.0f} KiB" for name, size in bytes_by_name.items())
        )
        # Full-size decoding is ~50x slower, so its epochs are shorter; resampling makes any length valid.
        full_samples = (4 if args.quick else 8) * args.batch_size
        resized_samples = (16 if args.quick else 40) * args.batch_size
        rows = []
        for size in args.sizes:
            pre = images_per_second(root / f"{size}px", size, resized_samples, args.batch_size, args.workers)
            full = images_per_second(root / "full", size, full_samples, args.batch_size, args.workers)
            rows.append((size, pre, full))
    print(
        f"\ntrain loader, {args.workers} workers, batch {args.batch_size}, images/s "
        f"(full-size = {args.full_size} px JPEGs resized on the fly)"
    )
    print("| output size | pre-resized shards | full-size shards | ratio |")
    print("| --- | --- | --- | --- |")
    for size, pre, full in rows:
        print(f"| {size} px | {pre:.0f} | {full:.1f} | {pre / full:.0f}x |")


if __name__ == "__main__":
    main()
