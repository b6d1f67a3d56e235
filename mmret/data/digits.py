"""The built-in `digits` dataset: scikit-learn's 1,797 real 8×8 handwritten-digit scans as image–caption pairs.

    mmret datasets digits --output data/digits            # or build_dataset("digits", "data/digits")

Source: `sklearn.datasets.load_digits` (the UCI "optical recognition of handwritten digits" test set,
bundled with scikit-learn, so no download). Each scan (16 grey levels) is drawn as dark ink on white,
upsampled bicubically to `image_size` and stored as RGB.

Split (stratified by class, seeded): train 1,297 / val 200 / test 300 images (about 20 / 30 per class in
val / test). Each image gets 2–4 captions drawn (seeded, per image) from `CAPTION_TEMPLATES`, e.g.
"a photo of the digit seven", "a handwritten 7", "the number seven"; its `.cls` is the digit and its JSON
holds `label`, `class_name` and `source_index` (the row in load_digits, also used as the `id`, so ids are
unique across the three splits). dataset.json lists `class_names` ("zero" … "nine"), the zero-shot prompt
`templates` ("a photo of the digit {}.", ...) that zero-shot evaluation fills with the class names, and the
captions' `word_classes` (digit words and numerals, for `mmret.data.perturb`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from mmret.data.raw_sources import SourceSample

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Zero-shot prompts, filled with a class name.
TEMPLATES = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a scan of the handwritten digit {}.",
]
# Training captions: {word} is the class name, {numeral} the digit itself.
CAPTION_TEMPLATES = [
    "a photo of the digit {word}",
    "a handwritten {numeral}",
    "the number {word}",
    "the digit {numeral} written by hand",
    "a scan of the handwritten number {word}",
    "a low-resolution image of a handwritten {word}",
    "a grainy scan of the numeral {numeral}",
]
# The captions' interchangeable words, for compositional negatives (`mmret.data.perturb`).
WORD_CLASSES = {
    "digit_word": {"role": "object", "words": CLASS_NAMES},
    "numeral": {"role": "object", "words": [str(label) for label in range(10)]},
}
SPLIT_SIZES = {"train": 1297, "val": 200, "test": 300}
SOURCE = "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 1,797 8x8 scans)"


def split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/val/test row indices of load_digits (sizes in SPLIT_SIZES)."""
    from sklearn.model_selection import train_test_split

    all_indices = np.arange(len(labels))
    rest, test = train_test_split(
        all_indices, test_size=SPLIT_SIZES["test"], stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest, test_size=SPLIT_SIZES["val"], stratify=labels[rest], random_state=seed
    )
    return {"train": train, "val": val, "test": test}


def captions_for(index: int, label: int, seed: int) -> list[str]:
    """2–4 distinct captions for one image, chosen by (seed, index) so they do not depend on the split."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(2, 5))
    chosen = rng.choice(len(CAPTION_TEMPLATES), size=count, replace=False)
    return [CAPTION_TEMPLATES[i].format(word=CLASS_NAMES[label], numeral=label) for i in chosen]


def render(scan: np.ndarray, image_size: int) -> Image.Image:
    """One 8×8 scan (values 0..16, high = ink) as an `image_size`² RGB image of dark ink on white."""
    grey = np.round(255.0 - scan * (255.0 / 16.0)).astype(np.uint8)  # [8, 8]
    return Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")


def build_splits(seed: int, image_size: int) -> dict[str, tuple[int, Iterator[SourceSample], dict]]:
    """The three splits as (number of samples, lazily rendered samples, extra dataset.json fields)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans, labels = digits.images, digits.target.astype(int)  # [1797, 8, 8], [1797]

    def samples(indices: np.ndarray) -> Iterator[SourceSample]:
        for index in indices:
            index, label = int(index), int(labels[index])
            metadata = {"id": index, "source_index": index, "label": label, "class_name": CLASS_NAMES[label]}
            yield SourceSample(
                render(scans[index], image_size),
                captions_for(index, label, seed),
                f"load_digits[{index}]",
                label,
                metadata,
            )

    info = {
        "class_names": CLASS_NAMES,
        "templates": TEMPLATES,
        "source": SOURCE,
        "split_sizes": SPLIT_SIZES,
        "word_classes": WORD_CLASSES,
    }
    return {
        split: (len(indices), samples(indices), {**info, "split": split})
        for split, indices in split_indices(labels, seed).items()
    }
