"""The caption perturber on the built-in datasets' own captions: never a positive, the targeted swaps exact.

.venv/bin/pytest tests/test_perturb_captions.py
"""

from __future__ import annotations

import numpy as np
import pytest

from mmret.data import digit_scenes, digits, shapes
from mmret.data.perturb import PERTURBATION_TYPES, CaptionPerturber, normalize
from mmret.errors import UsageError

SPLITS = ("train", "val", "test")


def scene_caption_lists(vocabulary: shapes.Vocabulary) -> list[list[str]]:
    return [scene.captions() for split in SPLITS for scene, _, _ in shapes.plan_split(split, 0, vocabulary)]


def digit_caption_lists() -> list[list[str]]:
    from sklearn.datasets import load_digits

    labels = load_digits().target.astype(int)
    return [digits.captions_for(index, int(label), seed=0) for index, label in enumerate(labels)]


CASES = {
    "shapes": (
        shapes.SHAPES_VOCABULARY.word_classes(),
        lambda: scene_caption_lists(shapes.SHAPES_VOCABULARY),
    ),
    "digit_scenes": (
        digit_scenes.VOCABULARY.word_classes(),
        lambda: scene_caption_lists(digit_scenes.VOCABULARY),
    ),
    "digits": (digits.WORD_CLASSES, digit_caption_lists),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("shapes", marks=pytest.mark.slow),
        pytest.param("digit_scenes", marks=pytest.mark.slow),
        "digits",
    ],
)
def test_never_emits_the_caption_or_another_positive_of_its_image(name):
    word_classes, caption_lists = CASES[name]
    perturber = CaptionPerturber(word_classes)
    rng = np.random.default_rng(0)
    lists = caption_lists()
    assert len(lists) == {"shapes": 6500, "digit_scenes": 6500, "digits": 1797}[name]
    emitted, types = 0, set()
    for captions in lists:
        positives = {normalize(c) for c in captions}
        for caption in captions:
            negatives = perturber.sample(caption, captions, rng, k=4) + perturber.one_per_type(
                caption, captions
            )
            assert negatives, caption  # every caption of these datasets can be perturbed
            for negative in negatives:
                assert normalize(negative.text) not in positives, (caption, negative)
            emitted += len(negatives)
            types.update(n.type for n in negatives)
    assert emitted > 4 * sum(map(len, lists))
    expected = {"shapes": 8, "digit_scenes": 8, "digits": 3}[name]  # digits: one object word, no relation
    assert len(types) == expected, sorted(types)


def test_targeted_swaps_on_a_shapes_pair_are_the_swap_group_twins():
    perturber = CaptionPerturber(shapes.SHAPES_VOCABULARY.word_classes())
    caption = "a red circle left of a blue square"
    assert perturber.candidates(caption, "swap_attribute") == ["a blue circle left of a red square"]
    assert perturber.candidates(caption, "swap_object") == ["a red square left of a blue circle"]
    assert perturber.candidates(caption, "swap_around_relation") == ["a blue square left of a red circle"]
    # The twins the dataset renders for this caption (shapes.pair_variants) are exactly these three.
    twins = [
        scene.captions()[0]
        for _, scene in shapes.pair_variants(("red", "circle"), ("blue", "square"), "left of")
    ]
    swaps = {
        perturber.candidates(caption, k)[0] for k in ("swap_attribute", "swap_object", "swap_around_relation")
    }
    assert swaps == set(twins[1:])
    replaced = perturber.candidates(caption, "replace_relation")
    assert replaced == ["a red circle to the right of a blue square", "a red circle above a blue square",
                        "a red circle below a blue square"]  # fmt: skip
    colours = perturber.candidates(caption, "replace_attribute")
    assert (
        "a green circle left of a blue square" in colours
        and "a red circle left of a red square" not in colours
    )


def test_one_per_type_is_deterministic_and_keeps_case():
    perturber = CaptionPerturber(shapes.SHAPES_VOCABULARY.word_classes())
    caption = "A Red circle left of a blue square"
    first = perturber.one_per_type(caption, [caption], seed=3)
    assert first == perturber.one_per_type(caption, [caption], seed=3)
    assert [p.type for p in first] == list(PERTURBATION_TYPES)
    swapped = next(p.text for p in first if p.type == "swap_around_relation")
    assert swapped == "a blue square left of A Red circle"
    # The other seed draws other replacements for at least one type.
    assert any(perturber.one_per_type(caption, [caption], seed=s) != first for s in range(4, 8))


def test_generic_strategies_need_no_declaration():
    perturber = CaptionPerturber()
    caption = "a dog riding a skateboard"
    assert perturber.applicable_types(caption) == ["swap_around_relation", "swap_words", "shuffle"]
    assert perturber.candidates(caption, "swap_around_relation") == ["a skateboard riding a dog"]
    assert "a skateboard riding a dog" in perturber.candidates(caption, "swap_words")
    negatives = perturber.sample(caption, [caption], np.random.default_rng(0), k=3)
    assert len(negatives) == 3 and len({n.text for n in negatives}) == 3
    # Nothing to perturb: one content word.
    assert perturber.sample("a dog", ["a dog"], np.random.default_rng(0), k=3) == []


def test_bad_declarations_are_usage_errors():
    with pytest.raises(UsageError, match="role"):
        CaptionPerturber({"color": {"role": "adjective", "words": ["red", "blue"]}})
    with pytest.raises(UsageError, match="perturbation types"):
        CaptionPerturber(types=["swap_everything"])
