"""What `--model` accepts in `mmret eval`, `mine` and `index` (issue 18): a training checkpoint, a folder written
by `mmret export` (moved anywhere), or an open_clip / mmret model name with `--pretrained` (a tag or a weights
file): the zero-shot baseline a researcher measures before finetuning. All three give the same numbers when they
hold the same weights.

    .venv/bin/pytest tests/test_model_sources.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmret.cli import main
from mmret.errors import UsageError
from mmret.training import DualEncoder
from mmret.training.dual_encoder import check_model_spec


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory):
    """The session's trained checkpoint exported, then moved to a folder of another name."""
    first = tmp_path_factory.mktemp("export") / "first"
    assert main(["export", str(trained_checkpoint), "--output", str(first)]) == 0
    moved = first.parent / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    return moved


def test_checkpoint_exported_folder_and_name_with_weights_file_load_the_same_model(
    trained_checkpoint, exported
):
    texts = ["a photo of the digit three", "a seven", "zero"]
    reference = DualEncoder.load(trained_checkpoint)
    size = reference.model.visual.image_size
    images = torch.randn(3, 3, *(size if isinstance(size, (tuple, list)) else (size, size)))
    architecture = reference.hparams.model
    for other in (
        DualEncoder.load(exported),
        DualEncoder.load(architecture, pretrained=str(exported / "open_clip_model.safetensors")),
    ):
        torch.testing.assert_close(
            other.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            other.encode_texts(texts), reference.encode_texts(texts), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize(
    "model, pretrained, fragment",
    [
        ("runs/none/last.ckpt", None, "does not exist"),
        ("test-vit-micro", None, "model name without weights; add --pretrained"),
        ("{ckpt}", "openai", "applies to a model name"),
    ],
)
def test_model_specs_that_cannot_load_are_refused_before_any_work(
    model, pretrained, fragment, trained_checkpoint
):
    with pytest.raises(UsageError, match=fragment):
        check_model_spec(model.format(ckpt=trained_checkpoint), pretrained)


@pytest.mark.slow
def test_eval_mine_and_index_of_an_exported_folder_equal_those_of_its_checkpoint(
    trained_checkpoint, exported, digits_root, tmp_path
):
    for name, model in (("ckpt", trained_checkpoint), ("export", exported)):
        out = tmp_path / name
        out.mkdir()
        assert main(["eval", "--model", str(model), "--data", str(digits_root), "--device", "cpu",
                     "--num-workers", "0", "--output", str(out / "results.json")]) == 0  # fmt: skip
        assert main(["mine", "--model", str(model), "--data", str(digits_root), "--split", "test",
                     "--device", "cpu", "--num-workers", "0", "--output", str(out / "mined.jsonl")]) == 0  # fmt: skip
        assert main(["index", "--model", str(model), "--data", str(digits_root / "test"), "--device", "cpu",
                     "--output", str(out / "digits.index")]) == 0  # fmt: skip
    ckpt, export = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("ckpt", "export"))
    assert export["num_images"] == ckpt["num_images"] > 0
    assert export["metrics"] == pytest.approx(ckpt["metrics"], abs=1e-6)
    mined = [(tmp_path / n / "mined.jsonl").read_text().splitlines() for n in ("ckpt", "export")]
    assert json.loads(mined[1][0])["model"] == str(exported)  # the header names the model it was mined with
    assert mined[1][1:] == mined[0][1:] and len(mined[0]) > 1  # the same negatives for every query
    from mmret.serving import Retriever

    hits = [
        Retriever.open(tmp_path / n / "digits.index").search(texts=["a seven"], k=5)
        for n in ("ckpt", "export")
    ]
    assert [h.key for h in hits[0][0]] == [h.key for h in hits[1][0]]
