"""`mmret export`: a trained dual-encoder checkpoint -> open_clip hub layout that open_clip alone loads with the
same embeddings; bad inputs are one line and exit 2.

    .venv/bin/pytest tests/test_export_cli.py -q
"""

from __future__ import annotations

import open_clip
import torch

from mmret.cli import main
from mmret.training import DualEncoder


def test_export_round_trip_through_open_clip(trained_checkpoint, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(trained_checkpoint), "--output", str(out)]) == 0
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_model.safetensors").is_file()
    theirs, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(out))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(out))
    ours = DualEncoder.from_checkpoint(trained_checkpoint)
    theirs.eval()
    size = ours.model.visual.image_size[0]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(["a photo of the digit one", "the number seven", "a handwritten 3"])
    with torch.no_grad():
        torch.testing.assert_close(
            theirs.encode_image(images, normalize=True), ours.encode_image(images), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            theirs.encode_text(tokens, normalize=True), ours.encode_text(tokens), atol=1e-6, rtol=0
        )
        assert torch.equal(theirs.logit_scale, ours.model.logit_scale)


def test_export_refuses_a_file_that_is_not_an_mmret_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, bogus)
    assert main(["export", str(bogus), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an mmret checkpoint" in err[0] and str(bogus) in err[0]
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(trained_checkpoint), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
