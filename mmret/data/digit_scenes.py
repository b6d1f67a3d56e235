"""The built-in `digit_scenes` dataset: `shapes`' compositional scenes made of real handwritten digit scans.

    mmret datasets digit_scenes --output data/digit_scenes   # or build_dataset("digit_scenes", ...)

Why it exists. `shapes` shows that word order and colour binding matter, but its objects are perfect
polygons. Here every object is a real scan from scikit-learn's `load_digits` (1,797 handwritten 8x8 scans,
bundled, no download), tinted in one of 5 ink colours, so recognising the objects is itself a learned,
noisy task and test images are scans no model trained on this data has seen.

Scenes and captions are exactly shapes' (see `mmret.data.shapes`; planned by its `plan_split` with this
module's `VOCABULARY`), with digit words for shape names:
- vocabulary: 5 colours (red, green, blue, yellow, purple) x 10 digits (zero ... nine);
- `single`: "a small green two", "a single small green two";
- `pair`: "a red seven left of a blue three", "a blue three to the right of a red seven",
  "a red seven on the left and a blue three on the right" (vertical: above / below / at the top ...);
- `triple`: "a red seven, a blue three and a green zero from left to right" (and from right to left).
Images (image_size px, composed at >= 256 px and box-downsampled): each scan is upsampled bicubically and
used as the alpha of its ink colour (jittered ±12 per channel) over a light grey background (232-250,
tinted ±4). At 64 px a digit is ~16-20 px tall (a large single ~33 px), pairs sit >= 0.36·size apart,
triples never overlap.

Scans never cross splits: load_digits rows are split exactly as the `digits` dataset does
(`digits.split_indices`, stratified, seeded: 1,297 / 200 / 300 scans), and each object's scan is drawn from
its split's pool of that digit (two objects of one image never share a scan). Each scan appears in ~7
(train) / ~5 (val) / ~7 (test) objects; a scan's row in load_digits is the object's `source_index`.

Swap groups, parts and sizes are shapes': val and test pair groups of four (base / relation_swap /
binding_swap / both_swaps) and triple groups of three (base / order_swap / binding_rotation), with the
same caption words; train 5,000 / val 500 / test 1,000 scenes, test groups half from an unseen base.
Held-out compositions (fixed, dataset.json "held_out"), in neither train nor val:
- 5 of the 50 colour-digit bindings: red three, green seven, blue zero, yellow five, purple two (every
  colour and every digit still appears in train, in other bindings);
- 10 relation orders between seen bindings, e.g. "red seven left of blue three", "blue two above red
  eight"; train holds 6 pairs showing the reverse of each (60 of its 3,500 pairs), so the order is the
  only new thing.
Seed 0: test 350 unseen / 650 seen (exact counts in dataset.json "parts").
Image JSON: as shapes' with `objects` [{color, digit, label, source_index, size, rgb, x, y, r}] in caption
order. dataset.json: `vocabulary`, `held_out`, `split_plan`, `parts`, `scene_counts`, `num_swap_groups`,
`scan_pool_sizes`, `source` and the captions' `word_classes` (colour, digit, size, relation phrases).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from mmret.data import digits, shapes
from mmret.data.raw_sources import SourceSample
from mmret.data.shapes import Renderer, Scene, Vocabulary

# Ink colours: shapes' palette, with a deeper yellow so thin strokes stay visible on light grey.
COLORS: dict[str, tuple[int, int, int]] = {**shapes.COLORS, "yellow": (215, 170, 20)}
DIGITS = tuple(digits.CLASS_NAMES)
HELD_OUT_BINDINGS: tuple[shapes.Binding, ...] = (
    ("red", "three"),
    ("green", "seven"),
    ("blue", "zero"),
    ("yellow", "five"),
    ("purple", "two"),
)
HELD_OUT_ORDERS: tuple[tuple[shapes.Binding, str, shapes.Binding], ...] = (
    (("red", "seven"), "left of", ("blue", "three")),
    (("green", "one"), "left of", ("purple", "eight")),
    (("blue", "four"), "left of", ("yellow", "nine")),
    (("yellow", "six"), "left of", ("red", "zero")),
    (("purple", "five"), "left of", ("green", "two")),
    (("blue", "two"), "above", ("red", "eight")),
    (("red", "one"), "above", ("yellow", "four")),
    (("green", "nine"), "above", ("blue", "six")),
    (("purple", "zero"), "above", ("green", "three")),
    (("yellow", "seven"), "above", ("purple", "one")),
)
SPLIT_PLAN = shapes.SPLIT_PLAN
VOCABULARY = Vocabulary(
    "digit_scenes",
    tuple(COLORS),
    DIGITS,
    "digit",
    HELD_OUT_BINDINGS,
    HELD_OUT_ORDERS,
    SPLIT_PLAN,
    reverse_orders_in_train=6,
)
SINGLE_SIZES = {"small": 0.14, "large": 0.26}  # half-extent (half the digit's height), fraction of the side
SOURCE = (
    "sklearn.datasets.load_digits scans (UCI optical recognition of handwritten digits), tinted and placed "
    "by mmret.data.digit_scenes"
)


def layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Jittered (x, y, half-extent) of each digit, as fractions of the image side, in caption order."""
    uniform = rng.uniform
    if scene.kind == "single":
        radius = SINGLE_SIZES[scene.size] * uniform(0.92, 1.08)
        low, high = radius + 0.04, 1 - radius - 0.04
        return [(uniform(low, high), uniform(low, high), radius)]
    if scene.kind == "pair":
        along = (uniform(0.22, 0.32), uniform(0.68, 0.78))  # first digit left (or top)
        across = uniform(0.35, 0.65)
        positions = [(a, across + uniform(-0.04, 0.04)) for a in along]
        if scene.relation == "above":
            positions = [(x, y) for y, x in positions]
        return [(x, y, 0.145 * uniform(0.92, 1.08)) for x, y in positions]
    across = uniform(0.35, 0.65)  # boxes at most 0.284 wide, centres at least 0.29 apart: no overlap
    return [
        (x + uniform(-0.015, 0.015), across + uniform(-0.03, 0.03), 0.135 * uniform(0.95, 1.05))
        for x in (0.18, 0.5, 0.82)
    ]


def paint_scan(canvas: np.ndarray, scan: np.ndarray, cx: float, cy: float, r: float, ink: np.ndarray) -> None:
    """Paint an 8x8 scan (0..16, high = ink) into `canvas` [H, W, 3] float, in a 2r box centred at (cx, cy)."""
    side = max(2, round(2 * r))
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    mask = Image.fromarray((scan / 16.0).astype(np.float32))  # mode "F"
    alpha = np.clip(np.asarray(mask.resize((side, side), Image.Resampling.BICUBIC)), 0.0, 1.0)[..., None]
    window = canvas[y0 : y0 + side, x0 : x0 + side]
    window *= 1.0 - alpha
    window += alpha * ink


def scan_renderer(scans: np.ndarray, labels: np.ndarray, pool: np.ndarray) -> Renderer:
    """A scene renderer drawing each digit from the scans `pool` (rows of load_digits) of that label."""
    by_label = {label: np.sort(pool[labels[pool] == label]) for label in range(len(DIGITS))}

    def render(scene: Scene, image_size: int, rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
        scale = max(1, -(-256 // image_size))  # supersample so the box-downsampled edges are anti-aliased
        side = image_size * scale
        grey = int(rng.integers(232, 251))
        background = np.clip(grey + rng.integers(-4, 5, size=3), 0, 255)
        canvas = np.empty((side, side, 3), dtype=np.float32)
        canvas[:] = background
        used: set[int] = set()
        objects = []
        for (color, digit), (x, y, r) in zip(scene.objects, layout(scene, rng)):
            ink = np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, size=3), 0, 255)
            label = DIGITS.index(digit)
            candidates = by_label[label]
            while True:  # two objects of one image never show the same scan
                source_index = int(candidates[int(rng.integers(len(candidates)))])
                if source_index not in used:
                    break
            used.add(source_index)
            paint_scan(canvas, scans[source_index], x * side, y * side, r * side, ink.astype(np.float32))
            objects.append(
                {
                    "color": color,
                    "digit": digit,
                    "label": label,
                    "source_index": source_index,
                    "size": scene.size or "medium",
                    "rgb": [int(v) for v in ink],
                    "x": round(x * image_size, 2),
                    "y": round(y * image_size, 2),
                    "r": round(r * image_size, 2),
                }
            )
        image = Image.fromarray(np.round(canvas).astype(np.uint8))
        return (image.reduce(scale) if scale > 1 else image), objects

    return render


def build_splits(seed: int, image_size: int) -> dict[str, tuple[int, Iterator[SourceSample], dict]]:
    """The three splits as (number of samples, lazily rendered samples, extra dataset.json fields)."""
    from sklearn.datasets import load_digits

    shapes.check_image_size(image_size, "digit_scenes")
    data = load_digits()
    scans, labels = data.images, data.target.astype(int)  # [1797, 8, 8], [1797]
    pools = digits.split_indices(labels, seed)
    info = {
        "source": SOURCE,
        "vocabulary": {
            "colors": {name: list(rgb) for name, rgb in COLORS.items()},
            "digits": list(DIGITS),
            "sizes": list(SINGLE_SIZES),
            "relations": ["left of", "right of", "above", "below"],
        },
        "scan_pool_sizes": {split: len(pool) for split, pool in pools.items()},
    }
    renderers = {split: scan_renderer(scans, labels, pool) for split, pool in pools.items()}
    return shapes.build_scene_splits(seed, image_size, VOCABULARY, info, renderers)
