"""A small photo set for "bring your own data" tests, built from real photographs that ship inside scikit-image
and scikit-learn (no download), with captions written by hand for this project.

    write_photo_set(root)   # root/my_photos/ (crops + .txt captions), root/my_test.csv (+ root/my_test/ images)

Each photo gives five crops (fixed seed): four go to my_photos/ with the photo's three training captions, the
fifth is held back in my_test.csv with a caption worded differently from any training caption (a paraphrase:
what a user would type as a query), so retrieval on it needs both the picture and the meaning of the words.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (where it comes from, three training captions, one held-back query)
PHOTOS: dict[str, tuple[str, list[str], str]] = {
    "astronaut": (
        "skimage",
        [
            "an astronaut in a white spacesuit in front of a flag",
            "portrait of a smiling astronaut",
            "a woman in a space suit posing for nasa",
        ],
        "a space traveller in uniform",
    ),
    "brick": (
        "skimage",
        ["a grey brick wall", "close up of bricks and mortar", "texture of a wall built from bricks"],
        "masonry blocks stacked in rows",
    ),
    "camera": (
        "skimage",
        [
            "a man with a camera on a tripod",
            "black and white photo of a cameraman",
            "a photographer in a dark coat on a lawn",
        ],
        "someone taking pictures outdoors",
    ),
    "cell": (
        "skimage",
        [
            "cells seen under a microscope",
            "a microscopy image of a cell culture",
            "grey blobs of living cells",
        ],
        "biology slide magnified",
    ),
    "chelsea": (
        "skimage",
        ["a ginger cat", "close up of a tabby cat's face", "an orange cat looking to the side"],
        "a kitten with whiskers",
    ),
    "coffee": (
        "skimage",
        [
            "a cup of coffee on a saucer",
            "a red mug of coffee seen from above",
            "coffee with a spoon on a plate",
        ],
        "a hot drink in a cup",
    ),
    "coins": (
        "skimage",
        ["old coins on a table", "a grey photo of many coins", "rows of metal coins"],
        "money made of metal",
    ),
    "color": (
        "skimage",
        ["a colour chart with coloured squares", "a grid of colour patches", "printed colour samples"],
        "a palette of different hues",
    ),
    "grass": (
        "skimage",
        ["blades of grass", "close up of a lawn", "a texture of green grass"],
        "a meadow seen from very close",
    ),
    "gravel": (
        "skimage",
        ["a gravel path", "small stones on the ground", "texture of pebbles"],
        "a road covered with little rocks",
    ),
    "hubble": (
        "skimage",
        ["galaxies in deep space", "the hubble deep field", "stars and galaxies on a black sky"],
        "a telescope view of the universe",
    ),
    "ihc": (
        "skimage",
        [
            "a stained tissue sample",
            "brown and blue stained cells in a microscope image",
            "immunohistochemistry of tissue",
        ],
        "a pathology slide with dye",
    ),
    "moon": (
        "skimage",
        ["the surface of the moon", "craters on the moon", "a grey lunar landscape"],
        "a crater field on a natural satellite",
    ),
    "motorcycle": (
        "skimage",
        ["a motorcycle in a garage", "a motorbike parked indoors", "a red motorbike next to a wall"],
        "a two wheeled motor vehicle",
    ),
    "page": (
        "skimage",
        ["a page of printed text", "a scanned book page", "black letters on a white page"],
        "a document with lines of writing",
    ),
    "retina": (
        "skimage",
        [
            "the retina of an eye",
            "a fundus photo with blood vessels",
            "an orange image of the back of the eye",
        ],
        "an ophthalmology scan",
    ),
    "rocket": (
        "skimage",
        ["a rocket on the launch pad", "a space rocket before lift off", "a tall rocket under a blue sky"],
        "a spacecraft ready for launch",
    ),
    "text": (
        "skimage",
        ["handwritten text on paper", "a photo of written words", "letters drawn on a sheet"],
        "a note with handwriting",
    ),
    "clock": (
        "skimage",
        ["a blurred clock", "a clock face with motion blur", "a wall clock shaken while photographed"],
        "a blurry timepiece",
    ),
    "chessboard": (
        "skimage",
        ["a chessboard pattern", "black and white squares of a chess board", "a checker pattern"],
        "a board for playing chess",
    ),
    "phantom": (
        "skimage",
        ["a medical imaging phantom", "ellipses of a shepp logan phantom", "a grey tomography test image"],
        "a ct scan test object",
    ),
    "china": (
        "sklearn",
        ["a chinese temple with a curved roof", "a pagoda among trees", "an old temple under a blue sky"],
        "traditional asian architecture",
    ),
    "flower": (
        "sklearn",
        ["a pink flower", "a flower with pink petals and a yellow centre", "a bee near a flower"],
        "a blossom in bloom",
    ),
}
_SKIMAGE_FILES = {"hubble": "hubble_deep_field", "motorcycle": "motorcycle_left", "clock": "clock_motion",
                  "chessboard": "chessboard_RGB"}  # fmt: skip
CROPS_PER_PHOTO = 5


def load_photo(name: str) -> Image.Image:
    """The full photograph, RGB."""
    source = PHOTOS[name][0]
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        array = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data
        import skimage.io

        folder = Path(skimage.data.__file__).parent
        file = _SKIMAGE_FILES.get(name, name)
        path = next(folder.glob(f"{file}.*"))
        array = skimage.io.imread(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(1e-9, float(array.max() - array.min()))).astype(np.uint8)
    image = Image.fromarray(array)
    return image.convert("RGB")


def _crops(image: Image.Image, rng: random.Random) -> list[Image.Image]:
    width, height = image.size
    crops = []
    for _ in range(CROPS_PER_PHOTO):
        scale = rng.uniform(0.55, 0.9)
        w, h = int(width * scale), int(height * scale)
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        crop = image.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(crop.resize((96, 96)))
    return crops


def write_photo_set(root: Path, seed: int = 0) -> dict[str, Path]:
    """my_photos/NAME_i.jpg + NAME_i.txt (training pairs) and my_test.csv (filepath,title) with my_test/ images."""
    rng = random.Random(seed)
    photos, held = root / "my_photos", root / "my_test"
    photos.mkdir(parents=True)
    held.mkdir()
    rows = []
    for name, (_, captions, query) in PHOTOS.items():
        crops = _crops(load_photo(name), rng)
        for index, crop in enumerate(crops[:-1]):
            crop.save(photos / f"{name}_{index}.jpg", quality=92)
            (photos / f"{name}_{index}.txt").write_text("\n".join(captions) + "\n")
        crops[-1].save(held / f"{name}.jpg", quality=92)
        rows.append({"file": f"my_test/{name}.jpg", "text": query})
    with open(root / "my_test.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return {"photos": photos, "csv": root / "my_test.csv"}
