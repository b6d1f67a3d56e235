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
`swap_variant`, `description` (the first caption). Ids are unique across the three splits. dataset.json
also declares the captions' `word_classes` (colour, shape, size, relation phrases) for `mmret.data.perturb`.

`mmret.data.digit_scenes` is the same design with real handwritten digit scans for shapes: it plans its
scenes with this module's planner (`Vocabulary`, `plan_split`, `build_scene_splits`) and its own renderer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

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
# The relation phrases of Scene.captions, by the word class dataset.json declares them in (`word_classes`).
RELATION_WORD_CLASSES = {
    "relation": ("left of", "to the right of", "above", "below"),
    "side": ("on the left", "on the right"),
    "vertical_side": ("at the top", "at the bottom"),
    "direction": ("from left to right", "from right to left"),
}


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """What a compositional scene dataset is made of: colours x object names, what it holds out, split sizes.

    `shapes` uses SHAPES_VOCABULARY; `mmret.data.digit_scenes` plans its scenes with its own (digit words).
    `reverse_orders_in_train`: train pairs showing the reverse of each held-out order, added before the
    sampled ones so the order is the only new thing at test time (0: left to chance, as for shapes).
    """

    name: str
    colors: tuple[str, ...]
    objects: tuple[str, ...]
    object_class: str  # the word class of the object names in dataset.json ("shape", "digit")
    held_out_bindings: tuple[Binding, ...]
    held_out_orders: tuple[tuple[Binding, str, Binding], ...]
    split_plan: Mapping[str, Mapping[str, int]]
    sizes: tuple[str, ...] = tuple(SINGLE_SIZES)
    relations: tuple[str, ...] = RELATIONS
    reverse_orders_in_train: int = 0

    def word_classes(self) -> dict[str, dict]:
        """The dataset.json `word_classes` of its captions (see `mmret.data.perturb`)."""
        classes = {
            "color": {"role": "attribute", "words": list(self.colors)},
            self.object_class: {"role": "object", "words": list(self.objects)},
            "size": {"role": "attribute", "words": list(self.sizes)},
        }
        relations = {
            name: {"role": "relation", "words": list(w)} for name, w in RELATION_WORD_CLASSES.items()
        }
        return {**classes, **relations}

    def held_out_info(self) -> dict[str, list[str]]:
        return {
            "bindings": [_name(b) for b in self.held_out_bindings],
            "orders": [f"{_name(x)} {rel} {_name(y)}" for x, rel, y in self.held_out_orders],
        }


SHAPES_VOCABULARY = Vocabulary(
    "shapes", tuple(COLORS), SHAPES, "shape", HELD_OUT_BINDINGS, HELD_OUT_ORDERS, SPLIT_PLAN
)


def _name(binding: Binding) -> str:
    return f"{binding[0]} {binding[1]}"


@dataclass(frozen=True)
class Scene:
    """What an image shows, before jitter: objects in caption order, the pair relation, the single's size."""

    objects: tuple[Binding, ...]
    relation: str | None = None
    size: str | None = None
    vocabulary: Vocabulary = field(default=SHAPES_VOCABULARY, compare=False, repr=False)

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
        held_bindings, held_orders = self.vocabulary.held_out_bindings, self.vocabulary.held_out_orders
        reasons = [f"binding: {_name(b)}" for b in dict.fromkeys(self.objects) if b in held_bindings]
        ordered = [(self.objects[0], self.relation, self.objects[1])] if self.kind == "pair" else []
        if self.kind == "triple":  # a row holds every left-of order among its members
            ordered = [
                (self.objects[i], "left of", self.objects[j]) for i in range(3) for j in range(i + 1, 3)
            ]
        reasons += [
            f"order: {_name(x)} {rel} {_name(y)}" for x, rel, y in ordered if (x, rel, y) in held_orders
        ]
        return reasons


# -- which scenes each split holds ---------------------------------------------------------------------


def _pick(rng: np.random.Generator, options) -> object:
    return options[int(rng.integers(len(options)))]


def _seen_binding(rng: np.random.Generator, vocabulary: Vocabulary) -> Binding:
    while True:
        binding = (_pick(rng, vocabulary.colors), _pick(rng, vocabulary.objects))
        if binding not in vocabulary.held_out_bindings:
            return binding


def _distinct_attributes(rng: np.random.Generator, count: int, vocabulary: Vocabulary) -> tuple[Binding, ...]:
    """`count` bindings with all colours different and all objects different (so swaps change the scene)."""
    colors = rng.choice(vocabulary.colors, size=count, replace=False)
    objects = rng.choice(vocabulary.objects, size=count, replace=False)
    return tuple((str(c), str(s)) for c, s in zip(colors, objects))


def pair_variants(
    first: Binding, second: Binding, relation: str, vocabulary: Vocabulary = SHAPES_VOCABULARY
) -> list[tuple[str, Scene]]:
    """A pair swap group: base, relation swap, binding swap and both, all with the same caption words."""
    (c1, s1), (c2, s2) = first, second
    return [
        ("base", Scene((first, second), relation, vocabulary=vocabulary)),
        ("relation_swap", Scene((second, first), relation, vocabulary=vocabulary)),
        ("binding_swap", Scene(((c2, s1), (c1, s2)), relation, vocabulary=vocabulary)),
        ("both_swaps", Scene(((c1, s2), (c2, s1)), relation, vocabulary=vocabulary)),
    ]


def triple_variants(
    objects: tuple[Binding, ...], vocabulary: Vocabulary = SHAPES_VOCABULARY
) -> list[tuple[str, Scene]]:
    """A triple swap group: base, reversed row, colours rotated one object along."""
    colors, names = [c for c, _ in objects], [s for _, s in objects]
    rotated = tuple(zip(colors[1:] + colors[:1], names))
    return [
        ("base", Scene(objects, vocabulary=vocabulary)),
        ("order_swap", Scene(objects[::-1], vocabulary=vocabulary)),
        ("binding_rotation", Scene(rotated, vocabulary=vocabulary)),
    ]


def _train_scenes(
    rng: np.random.Generator, plan: Mapping[str, int], vocabulary: Vocabulary
) -> list[tuple[Scene, int | None, str | None]]:
    scenes = [
        Scene((_seen_binding(rng, vocabulary),), size=_pick(rng, vocabulary.sizes), vocabulary=vocabulary)
        for _ in range(plan["singles"])
    ]
    reversed_orders = [
        Scene((y, x), rel, vocabulary=vocabulary)
        for x, rel, y in vocabulary.held_out_orders * vocabulary.reverse_orders_in_train
    ]
    scenes += reversed_orders
    for kind, count in (("pairs", plan["pairs"] - len(reversed_orders)), ("triples", plan["triples"])):
        number = 2 if kind == "pairs" else 3
        while count:
            objects = tuple(_seen_binding(rng, vocabulary) for _ in range(number))
            relation = _pick(rng, vocabulary.relations) if number == 2 else None
            scene = Scene(objects, relation, vocabulary=vocabulary)
            if len(set(objects)) == number and not scene.unseen_reasons():
                scenes.append(scene)
                count -= 1
    return [(scene, None, None) for scene in scenes]


def _grouped_scenes(
    rng: np.random.Generator, plan: Mapping[str, int], with_unseen: bool, vocabulary: Vocabulary
) -> list[tuple[Scene, int | None, str | None]]:
    """Val (every member seen) or test (half the groups from an unseen base) scenes, grouped by swaps."""
    held_bindings, held_orders = vocabulary.held_out_bindings, vocabulary.held_out_orders
    scenes: list[tuple[Scene, int | None, str | None]] = []
    for index in range(plan["singles"]):
        if with_unseen and index % 2 == 0:
            binding = _pick(rng, held_bindings)
        else:
            binding = _seen_binding(rng, vocabulary)
        scene = Scene((binding,), size=_pick(rng, vocabulary.sizes), vocabulary=vocabulary)
        scenes.append((scene, None, None))
    group = 0
    for index in range(plan["pair_groups"]):
        mode = (
            ("held_out_binding", "held_out_order", "seen", "seen")[index % 4] if with_unseen else "all_seen"
        )
        while True:
            if mode == "held_out_order":
                first, relation, second = _pick(rng, held_orders)
            elif mode == "held_out_binding":
                held = _pick(rng, held_bindings)
                other = (_pick(rng, vocabulary.colors), _pick(rng, vocabulary.objects))
                if other[0] == held[0] or other[1] == held[1]:
                    continue
                first, second = (held, other) if rng.integers(2) else (other, held)
                relation = _pick(rng, vocabulary.relations)
            else:
                (first, second) = _distinct_attributes(rng, 2, vocabulary)
                relation = _pick(rng, vocabulary.relations)
            variants = pair_variants(first, second, relation, vocabulary)
            if mode == "seen" and variants[0][1].unseen_reasons():
                continue
            if mode == "all_seen" and any(scene.unseen_reasons() for _, scene in variants):
                continue
            break
        scenes += [(scene, group, name) for name, scene in variants]
        group += 1
    for index in range(plan["triple_groups"]):
        while True:
            variants = triple_variants(_distinct_attributes(rng, 3, vocabulary), vocabulary)
            base_unseen = bool(variants[0][1].unseen_reasons())
            if with_unseen and base_unseen == (index % 2 == 0):
                break
            if not with_unseen and not any(scene.unseen_reasons() for _, scene in variants):
                break
        scenes += [(scene, group, name) for name, scene in variants]
        group += 1
    order = rng.permutation(len(scenes))  # groups not contiguous, so any prefix is a fair sample
    return [scenes[i] for i in order]


def plan_split(
    split: str, seed: int, vocabulary: Vocabulary = SHAPES_VOCABULARY
) -> list[tuple[Scene, int | None, str | None]]:
    """The (scene, swap group, swap variant) list of one split, deterministic in (seed, split)."""
    plan = vocabulary.split_plan
    rng = np.random.default_rng([seed, list(plan).index(split)])
    if split == "train":
        return _train_scenes(rng, plan[split], vocabulary)
    return _grouped_scenes(rng, plan[split], with_unseen=split == "test", vocabulary=vocabulary)


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


Renderer = Callable[[Scene, int, np.random.Generator], tuple[Image.Image, list[dict]]]


def check_image_size(image_size: int, name: str) -> None:
    if image_size < 16:
        raise UsageError(f"--image-size {image_size} is too small for {name}; expected at least 16 pixels")


def build_splits(seed: int, image_size: int) -> dict[str, tuple[int, Iterator[SourceSample], dict]]:
    """The three splits as (number of samples, lazily rendered samples, extra dataset.json fields)."""
    check_image_size(image_size, "shapes")
    vocabulary = {
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SINGLE_SIZES),
        "relations": ["left of", "right of", "above", "below"],
    }
    info = {"source": SOURCE, "vocabulary": vocabulary}
    return build_scene_splits(
        seed, image_size, SHAPES_VOCABULARY, info, {split: render for split in SPLIT_PLAN}
    )


def build_scene_splits(
    seed: int, image_size: int, vocabulary: Vocabulary, info: dict, renderers: Mapping[str, Renderer]
) -> dict[str, tuple[int, Iterator[SourceSample], dict]]:
    """`build_splits` of a scene dataset: plans, dataset.json fields (`info` first) and a renderer per split."""
    plans = {split: plan_split(split, seed, vocabulary) for split in vocabulary.split_plan}
    common = {
        **info,
        "held_out": vocabulary.held_out_info(),
        "split_plan": vocabulary.split_plan,
        "word_classes": vocabulary.word_classes(),
    }
    splits = {}
    first_id = 0
    for split, plan in plans.items():
        parts = Counter("unseen" if scene.unseen_reasons() else "seen" for scene, _, _ in plan)
        split_info = {
            **common,
            "split": split,
            "parts": {"seen": parts["seen"], "unseen": parts["unseen"]},
            "scene_counts": dict(Counter(scene.kind for scene, _, _ in plan)),
            "num_swap_groups": len({group for _, group, _ in plan if group is not None}),
        }
        samples = render_split(plan, split, seed, image_size, first_id, vocabulary, renderers[split])
        splits[split] = (len(plan), samples, split_info)
        first_id += len(plan)
    return splits


def render_split(
    plan: list[tuple[Scene, int | None, str | None]],
    split: str,
    seed: int,
    image_size: int,
    first_id: int,
    vocabulary: Vocabulary = SHAPES_VOCABULARY,
    renderer: Renderer = render,
) -> Iterator[SourceSample]:
    """Render a split's planned scenes lazily, as samples with their metadata; ids start at `first_id`."""
    split_index = list(vocabulary.split_plan).index(split)
    for index, (scene, group, variant) in enumerate(plan):
        # A generator per image: its jitter does not depend on how many draws earlier images took.
        image, objects = renderer(scene, image_size, np.random.default_rng([seed, split_index, index]))
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
        yield SourceSample(image, captions, f"{vocabulary.name}/{split}[{index}]", metadata=metadata)
