"""The built-in `shapes` dataset: rendered scenes of coloured shapes where word order and binding matter.

    mmret datasets shapes --output data/shapes            # or build_dataset("shapes", "data/shapes")

Why it exists. A dual encoder compresses a caption into one vector and is known to behave much like a bag
of words: it ranks "a red circle left of a blue square" and "a blue square left of a red circle" alike.
A cross-encoder reranker reads caption and image together and can, in principle, check who is where and
which colour belongs to which shape. This dataset makes that difference measurable, and measurable on
compositions the models never saw in training.

Scenes (image_size px, drawn with PIL at >= 256 px and box-downsampled, so edges are anti-aliased):
- vocabulary: 5 colours (red, green, blue, yellow, purple), 4 shapes (circle, square, triangle, diamond);
- `single`: one shape, small or large, anywhere: "a small green triangle", "a single small green triangle";
- `pair`: two shapes side by side or one above the other, 3 paraphrases of the one relation:
  "a red circle left of a blue square", "a blue square to the right of a red circle",
  "a red circle on the left and a blue square on the right" (vertical: above / below / at the top ...);
- `triple`: three shapes in a row: "a red circle, a blue square and a green triangle from left to right",
  "a green triangle, a blue square and a red circle from right to left".
Every caption describes the whole scene (a pair caption means exactly those two shapes). Position, size,
colour shade and background grey are jittered, so no two images are equal. Relations are unambiguous by
construction: "left of" objects are >= 0.32·size apart horizontally and <= 0.08·size apart vertically.

Bag-of-words is not enough. In val and test, pair scenes come in *swap groups* of four images whose
captions use exactly the same words: the base "a red circle left of a blue square", the relation swap
"a blue square left of a red circle", the binding swap "a blue circle left of a red square" and both swaps
"a red square left of a blue circle". Triples come in groups of three (base; order swap = reversed row;
binding rotation = colours moved one shape along). Members share `swap_group` (an int; `swap_variant` names
the member); ~90% of test images have swap partners (singles do not).

Held-out compositions (fixed, listed in dataset.json "held_out", independent of the seed):
- 4 colour–shape bindings never drawn in train or val: purple triangle, yellow circle, green square,
  red diamond (every colour and every shape still appears in train, in other bindings);
- 10 relation orders between seen bindings, e.g. "red circle left of blue square" (the reverse, "blue square
  left of red circle", is in train) or "blue circle above red square"; a triple containing a held-out left-of
  order counts too.
Train and val contain none of them. Test images containing any are `"part": "unseen"` (their
`unseen_reasons` say which), the rest `"seen"`. Test swap groups are built half from an unseen base (a
held-out binding or a held-out order) and half from a seen base, so the natural confuser of an unseen image
is often a seen one, which is exactly what a bag-of-words model prefers.

Sizes (scenes: single / pair / triple):
- train 5,000 = 750 / 3,500 / 750, sampled independently, seen compositions only;
- val 500 = 52 / 400 (100 groups) / 48 (16 groups), seen only (every group member seen);
- test 1,000 = 104 / 800 (200 groups) / 96 (32 groups); about 40% unseen (exact counts in dataset.json
  "parts"; 422 unseen / 578 seen for seed 0).
Image JSON: `kind`, `relation`, `objects` ([{color, shape, size, x, y, r, rgb}] in caption order, pixel
coordinates of the centre and half-extent in the stored image), `part`, `unseen_reasons`, `swap_group`,
`swap_variant`, `description` (the first caption). Ids are unique across the three splits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mmret.data.raw_sources import SourceSample
from mmret.errors import UsageError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SINGLE_SIZES = {"small": 0.12, "large": 0.28}  # half-extent as a fraction of the image side
RELATIONS = ("left of", "above")  # "right of" / "below" are paraphrases of the same two layouts

Binding = tuple[str, str]  # (colour, shape)
HELD_OUT_BINDINGS: tuple[Binding, ...] = (
    ("purple", "triangle"),
    ("yellow", "circle"),
    ("green", "square"),
    ("red", "diamond"),
)
HELD_OUT_ORDERS: tuple[tuple[Binding, str, Binding], ...] = (
    (("red", "circle"), "left of", ("blue", "square")),
    (("blue", "triangle"), "left of", ("yellow", "square")),
    (("green", "circle"), "left of", ("purple", "diamond")),
    (("yellow", "diamond"), "left of", ("red", "triangle")),
    (("purple", "square"), "left of", ("green", "triangle")),
    (("blue", "circle"), "above", ("red", "square")),
    (("yellow", "triangle"), "above", ("green", "diamond")),
    (("purple", "circle"), "above", ("blue", "triangle")),
    (("red", "square"), "above", ("yellow", "diamond")),
    (("green", "triangle"), "above", ("purple", "square")),
)
SPLIT_PLAN = {
    "train": {"singles": 750, "pairs": 3500, "triples": 750},
    "val": {"singles": 52, "pair_groups": 100, "triple_groups": 16},
    "test": {"singles": 104, "pair_groups": 200, "triple_groups": 32},
}
SOURCE = "mmret.data.shapes (procedurally rendered coloured shapes, see its docstring)"


def _name(binding: Binding) -> str:
    return f"{binding[0]} {binding[1]}"


@dataclass(frozen=True)
class Scene:
    """What an image shows, before jitter: objects in caption order, the pair relation, the single's size."""

    objects: tuple[Binding, ...]
    relation: str | None = None
    size: str | None = None

    @property
    def kind(self) -> str:
        return ("single", "pair", "triple")[len(self.objects) - 1]

    def captions(self) -> list[str]:
        """The scene's paraphrases, canonical first; swap-group members use exactly the same words."""
        names = [_name(binding) for binding in self.objects]
        if self.kind == "single":
            return [f"a {self.size} {names[0]}", f"a single {self.size} {names[0]}"]
        if self.kind == "pair":
            first, second = names
            if self.relation == "left of":
                return [
                    f"a {first} left of a {second}",
                    f"a {second} to the right of a {first}",
                    f"a {first} on the left and a {second} on the right",
                ]
            return [
                f"a {first} above a {second}",
                f"a {second} below a {first}",
                f"a {first} at the top and a {second} at the bottom",
            ]
        a, b, c = names
        return [f"a {a}, a {b} and a {c} from left to right", f"a {c}, a {b} and a {a} from right to left"]

    def unseen_reasons(self) -> list[str]:
        """Why the scene is a held-out composition (empty when it is seen)."""
        reasons = [f"binding: {_name(b)}" for b in dict.fromkeys(self.objects) if b in HELD_OUT_BINDINGS]
        ordered = [(self.objects[0], self.relation, self.objects[1])] if self.kind == "pair" else []
        if self.kind == "triple":  # a row holds every left-of order among its members
            ordered = [
                (self.objects[i], "left of", self.objects[j]) for i in range(3) for j in range(i + 1, 3)
            ]
        reasons += [
            f"order: {_name(x)} {rel} {_name(y)}" for x, rel, y in ordered if (x, rel, y) in HELD_OUT_ORDERS
        ]
        return reasons


# -- which scenes each split holds ---------------------------------------------------------------------


def _pick(rng: np.random.Generator, options) -> object:
    return options[int(rng.integers(len(options)))]


def _seen_binding(rng: np.random.Generator) -> Binding:
    while True:
        binding = (_pick(rng, list(COLORS)), _pick(rng, SHAPES))
        if binding not in HELD_OUT_BINDINGS:
            return binding


def _distinct_attributes(rng: np.random.Generator, count: int) -> tuple[Binding, ...]:
    """`count` bindings with all colours different and all shapes different (so swaps change the scene)."""
    colors = rng.choice(list(COLORS), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count, replace=False)
    return tuple((str(c), str(s)) for c, s in zip(colors, shapes))


def pair_variants(first: Binding, second: Binding, relation: str) -> list[tuple[str, Scene]]:
    """A pair swap group: base, relation swap, binding swap and both, all with the same caption words."""
    (c1, s1), (c2, s2) = first, second
    return [
        ("base", Scene((first, second), relation)),
        ("relation_swap", Scene((second, first), relation)),
        ("binding_swap", Scene(((c2, s1), (c1, s2)), relation)),
        ("both_swaps", Scene(((c1, s2), (c2, s1)), relation)),
    ]


def triple_variants(objects: tuple[Binding, ...]) -> list[tuple[str, Scene]]:
    """A triple swap group: base, reversed row, colours rotated one shape along."""
    colors, shapes = [c for c, _ in objects], [s for _, s in objects]
    rotated = tuple(zip(colors[1:] + colors[:1], shapes))
    return [
        ("base", Scene(objects)),
        ("order_swap", Scene(objects[::-1])),
        ("binding_rotation", Scene(rotated)),
    ]


def _train_scenes(rng: np.random.Generator, plan: dict) -> list[tuple[Scene, int | None, str | None]]:
    scenes = [
        Scene((_seen_binding(rng),), size=_pick(rng, list(SINGLE_SIZES))) for _ in range(plan["singles"])
    ]
    for kind, count in (("pairs", plan["pairs"]), ("triples", plan["triples"])):
        number = 2 if kind == "pairs" else 3
        while count:
            objects = tuple(_seen_binding(rng) for _ in range(number))
            scene = Scene(objects, _pick(rng, RELATIONS) if number == 2 else None)
            if len(set(objects)) == number and not scene.unseen_reasons():
                scenes.append(scene)
                count -= 1
    return [(scene, None, None) for scene in scenes]


def _grouped_scenes(
    rng: np.random.Generator, plan: dict, with_unseen: bool
) -> list[tuple[Scene, int | None, str | None]]:
    """Val (every member seen) or test (half the groups from an unseen base) scenes, grouped by swaps."""
    scenes: list[tuple[Scene, int | None, str | None]] = []
    for index in range(plan["singles"]):
        binding = _pick(rng, HELD_OUT_BINDINGS) if with_unseen and index % 2 == 0 else _seen_binding(rng)
        scenes.append((Scene((binding,), size=_pick(rng, list(SINGLE_SIZES))), None, None))
    group = 0
    for index in range(plan["pair_groups"]):
        mode = (
            ("held_out_binding", "held_out_order", "seen", "seen")[index % 4] if with_unseen else "all_seen"
        )
        while True:
            if mode == "held_out_order":
                first, relation, second = _pick(rng, HELD_OUT_ORDERS)
            elif mode == "held_out_binding":
                held = _pick(rng, HELD_OUT_BINDINGS)
                other = (_pick(rng, list(COLORS)), _pick(rng, SHAPES))
                if other[0] == held[0] or other[1] == held[1]:
                    continue
                first, second = (held, other) if rng.integers(2) else (other, held)
                relation = _pick(rng, RELATIONS)
            else:
                (first, second), relation = _distinct_attributes(rng, 2), _pick(rng, RELATIONS)
            variants = pair_variants(first, second, relation)
            if mode == "seen" and variants[0][1].unseen_reasons():
                continue
            if mode == "all_seen" and any(scene.unseen_reasons() for _, scene in variants):
                continue
            break
        scenes += [(scene, group, name) for name, scene in variants]
        group += 1
    for index in range(plan["triple_groups"]):
        while True:
            variants = triple_variants(_distinct_attributes(rng, 3))
            base_unseen = bool(variants[0][1].unseen_reasons())
            if with_unseen and base_unseen == (index % 2 == 0):
                break
            if not with_unseen and not any(scene.unseen_reasons() for _, scene in variants):
                break
        scenes += [(scene, group, name) for name, scene in variants]
        group += 1
    order = rng.permutation(len(scenes))  # groups not contiguous, so any prefix is a fair sample
    return [scenes[i] for i in order]


def plan_split(split: str, seed: int) -> list[tuple[Scene, int | None, str | None]]:
    """The (scene, swap group, swap variant) list of one split, deterministic in (seed, split)."""
    rng = np.random.default_rng([seed, list(SPLIT_PLAN).index(split)])
    if split == "train":
        return _train_scenes(rng, SPLIT_PLAN[split])
    return _grouped_scenes(rng, SPLIT_PLAN[split], with_unseen=split == "test")


# -- drawing -------------------------------------------------------------------------------------------


def layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Jittered (x, y, half-extent) of each object, as fractions of the image side, in caption order."""
    uniform = rng.uniform
    if scene.kind == "single":
        radius = SINGLE_SIZES[scene.size] * uniform(0.9, 1.1)
        low, high = radius + 0.04, 1 - radius - 0.04
        return [(uniform(low, high), uniform(low, high), radius)]
    if scene.kind == "pair":
        along = (uniform(0.22, 0.34), uniform(0.66, 0.78))  # first object left (or top)
        across = uniform(0.35, 0.65)
        positions = [(a, across + uniform(-0.04, 0.04)) for a in along]
        if scene.relation == "above":
            positions = [(x, y) for y, x in positions]
        return [(x, y, 0.13 * uniform(0.85, 1.15)) for x, y in positions]
    across = uniform(0.35, 0.65)
    return [
        (x + uniform(-0.03, 0.03), across + uniform(-0.03, 0.03), 0.1 * uniform(0.9, 1.1))
        for x in (0.18, 0.5, 0.82)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """One filled shape centred at (cx, cy) with half-extent r; the centre is always inside it."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        half = 0.85 * r  # a square of half-side r looks much bigger than the circle of radius r
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """Draw a scene with jitter; returns the image and its objects' metadata (pixel coordinates)."""
    scale = max(1, -(-256 // image_size))  # supersample so the box-downsampled edges are anti-aliased
    side = image_size * scale
    grey = int(rng.integers(232, 251))
    background = tuple(int(v) for v in np.clip(grey + rng.integers(-4, 5, size=3), 0, 255))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for (color, shape), (x, y, r) in zip(scene.objects, layout(scene, rng)):
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, size=3), 0, 255))
        draw_shape(draw, shape, x * side, y * side, r * side, fill)
        objects.append(
            {
                "color": color,
                "shape": shape,
                "size": scene.size or "medium",
                "rgb": list(fill),
                "x": round(x * image_size, 2),
                "y": round(y * image_size, 2),
                "r": round(r * image_size, 2),
            }
        )
    return (image.reduce(scale) if scale > 1 else image), objects


def build_splits(seed: int, image_size: int) -> dict[str, tuple[int, Iterator[SourceSample], dict]]:
    """The three splits as (number of samples, lazily rendered samples, extra dataset.json fields)."""
    if image_size < 16:
        raise UsageError(f"--image-size {image_size} is too small for shapes; expected at least 16 pixels")
    plans = {split: plan_split(split, seed) for split in SPLIT_PLAN}
    common = {
        "source": SOURCE,
        "vocabulary": {
            "colors": {name: list(rgb) for name, rgb in COLORS.items()},
            "shapes": list(SHAPES),
            "sizes": list(SINGLE_SIZES),
            "relations": ["left of", "right of", "above", "below"],
        },
        "held_out": {
            "bindings": [_name(b) for b in HELD_OUT_BINDINGS],
            "orders": [f"{_name(x)} {rel} {_name(y)}" for x, rel, y in HELD_OUT_ORDERS],
        },
        "split_plan": SPLIT_PLAN,
    }
    splits = {}
    first_id = 0
    for split, plan in plans.items():
        parts = Counter("unseen" if scene.unseen_reasons() else "seen" for scene, _, _ in plan)
        info = {
            **common,
            "split": split,
            "parts": {"seen": parts["seen"], "unseen": parts["unseen"]},
            "scene_counts": dict(Counter(scene.kind for scene, _, _ in plan)),
            "num_swap_groups": len({group for _, group, _ in plan if group is not None}),
        }
        splits[split] = (len(plan), render_split(plan, split, seed, image_size, first_id), info)
        first_id += len(plan)
    return splits


def render_split(
    plan: list[tuple[Scene, int | None, str | None]], split: str, seed: int, image_size: int, first_id: int
) -> Iterator[SourceSample]:
    """Render a split's planned scenes lazily, as samples with their metadata; ids start at `first_id`."""
    split_index = list(SPLIT_PLAN).index(split)
    for index, (scene, group, variant) in enumerate(plan):
        # A generator per image: its jitter does not depend on how many draws earlier images took.
        image, objects = render(scene, image_size, np.random.default_rng([seed, split_index, index]))
        reasons = scene.unseen_reasons()
        captions = scene.captions()
        metadata = {
            "id": first_id + index,
            "kind": scene.kind,
            "relation": scene.relation,
            "objects": objects,
            "part": "unseen" if reasons else "seen",
            "unseen_reasons": reasons,
            "swap_group": group,
            "swap_variant": variant,
            "description": captions[0],
        }
        yield SourceSample(image, captions, f"shapes/{split}[{index}]", metadata=metadata)
