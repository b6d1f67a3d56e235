"""`mmret export --format transformers|sentence-transformers` and the model card every export writes.

Round trips against mmret's own evaluation path (DualEncoder.encode_image on the model's eval transform,
DualEncoder.encode_texts) on the digits test images and captions, offline:
  - a digits checkpoint trained by `mmret fit` (test-vit-micro, 150 steps) -> transformers.CLIPModel + CLIPProcessor
    and -> SentenceTransformer; a random test-vit-tiny -> CLIPModel;
  - a random SigLIP (test-siglip-vit-tiny) -> transformers.SiglipModel and -> SentenceTransformer;
  - zero-shot accuracy of transformers' zero-shot-image-classification pipeline == `mmret eval`'s acc1, both
    with the pipeline's one prompt template (the data's dataset.json is cut to that template for mmret eval);
  - the README.md of every format parses with huggingface_hub and carries the eval metrics;
  - refusals (towers without a transformers counterpart, a reranker, bad options) are one line, exit 2.

Run: .venv/bin/pytest tests/test_hf_export.py   (~1.5 min on 2 CPU cores; `-m "not slow"` skips the MiniLM case)
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmret import models
from mmret.cli import main
from mmret.models import hf_export
from mmret.training import DualEncoder
from tests.fit_args import DUAL_ENCODER, fit_argv

# Unit-norm embeddings of the export and of mmret's path agree to this (float32 rounding is ~1e-7).
ATOL = 1e-5
LIBRARIES = {
    "open_clip": ("open_clip", "zero-shot-image-classification"),
    "transformers": ("transformers", "zero-shot-image-classification"),
    "sentence-transformers": ("sentence-transformers", "sentence-similarity"),
}


def _read_split(split_dir: Path) -> tuple[list[Image.Image], list[int], list[str]]:
    """A shard folder's images (decoded as mmret decodes them: PIL, RGB), labels and unique captions."""
    images, labels, captions = [], [], set()
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as archive:
            members = {member.name: member for member in archive.getmembers()}
            for key in sorted({name.rsplit(".", 1)[0] for name in members}):
                data = archive.extractfile(members[f"{key}.jpg"]).read()
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                labels.append(int(archive.extractfile(members[f"{key}.cls"]).read()))
                captions.update(archive.extractfile(members[f"{key}.txt"]).read().decode().splitlines())
    return images, labels, sorted(captions)


@torch.no_grad()
def _mmret_embeddings(
    module: DualEncoder, images, captions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmret's eval path: (pixels [N, 3, H, W], image embeddings [N, D], caption embeddings [M, D])."""
    transform = models.create_transforms(module.model, train=False)
    pixels = torch.stack([transform(image) for image in images])
    return pixels, module.encode_image(pixels), module.encode_texts(captions)


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def digits_test(digits_root):
    return _read_split(digits_root / "test")


@pytest.fixture(scope="module")
def digits_checkpoint(digits_root, tmp_path_factory):
    """test-vit-micro trained by `mmret fit` on digits for 150 steps (~20 s): zero-shot top-1 ~0.55 on the test
    split, so its predictions spread over the classes (the session's 2-step `trained_checkpoint` predicts almost
    one class for every image, which would make comparing zero-shot accuracies trivial)."""
    run_dir = tmp_path_factory.mktemp("digits_run")
    argv = fit_argv(
        module=DUAL_ENCODER,
        model_args={"warmup_steps": 10, "lr": 1e-3, "init_logit_scale": 3.5},
        train=digits_root / "train",
        samples_per_epoch=150 * 64,
        batch_size=64,
        max_epochs=1,
        run_dir=run_dir,
    )
    assert main(argv) == 0
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained_module(digits_checkpoint):
    return DualEncoder.from_checkpoint(digits_checkpoint)


@pytest.fixture(scope="module")
def one_template_eval(digits_checkpoint, digits_root, tmp_path_factory):
    """The digits test split with its dataset.json cut to the first prompt template, and `mmret eval`'s results
    on it: (data folder, template, results path, results)."""
    root = tmp_path_factory.mktemp("one_template")
    data = root / "digits_test"
    shutil.copytree(digits_root / "test", data)
    info = json.loads((data / "dataset.json").read_text())
    template = info["templates"][0]
    info["templates"] = [template]
    (data / "dataset.json").write_text(json.dumps(info))
    results_path = root / "results.json"
    argv = ["eval", "--model", str(digits_checkpoint), "--data", str(data), "--task", "zeroshot"]
    assert main([*argv, "--device", "cpu", "--output", str(results_path)]) == 0
    return data, template, results_path, json.loads(results_path.read_text())


@pytest.fixture(scope="module")
def exports(digits_checkpoint, one_template_eval, tmp_path_factory):
    """The trained checkpoint exported by `mmret export` in every format, with the eval results: {format: dir}."""
    root = tmp_path_factory.mktemp("exports")
    results_path = one_template_eval[2]
    written = {}
    for export_format in LIBRARIES:
        out = root / export_format
        argv = ["export", str(digits_checkpoint), "--format", export_format, "--output", str(out)]
        assert main([*argv, "--results", str(results_path)]) == 0
        written[export_format] = out
    return written


# ---- transformers: CLIP ---------------------------------------------------------------------------------
def test_clip_export_equals_mmret_on_digits(exports, trained_module, digits_test):
    from transformers import CLIPModel, CLIPProcessor

    images, _, captions = digits_test
    pixels, image_emb, text_emb = _mmret_embeddings(trained_module, images, captions)
    directory = exports["transformers"]
    hf_model = CLIPModel.from_pretrained(directory).eval()
    processor = CLIPProcessor.from_pretrained(directory, backend="pil")
    inputs = processor(images=images, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], pixels)  # open_clip's eval transform, exactly
    tokens = processor(text=captions, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(tokens["input_ids"], trained_module.tokenizer(captions))  # open_clip's token ids
    longest = processor(text=captions, padding=True, return_tensors="pt")  # what the pipeline sends
    with torch.no_grad():
        hf_image = F.normalize(hf_model.get_image_features(**inputs).pooler_output, dim=-1)
        hf_text = F.normalize(hf_model.get_text_features(**tokens).pooler_output, dim=-1)
        hf_text_longest = F.normalize(hf_model.get_text_features(**longest).pooler_output, dim=-1)
    differences = {
        "image": _max_difference(hf_image, image_emb),
        "text": _max_difference(hf_text, text_emb),
        "text (padded to the longest)": _max_difference(hf_text_longest, text_emb),
    }
    print(f"CLIPModel vs mmret on {len(images)} digits images, {len(captions)} captions: {differences}")
    assert max(differences.values()) <= ATOL
    assert torch.equal(hf_model.logit_scale.detach(), trained_module.model.logit_scale.detach())


def test_default_image_processor_is_within_one_grey_level(exports, trained_module, digits_test):
    """transformers' default (torchvision) backend resizes with its own antialiasing: not open_clip's pixels
    exactly, but within one grey level (the README and the card say to pass backend="pil")."""
    from transformers import CLIPProcessor

    images = digits_test[0][:50]
    pixels, _, _ = _mmret_embeddings(trained_module, images, ["x"])
    default = CLIPProcessor.from_pretrained(exports["transformers"])(images=images, return_tensors="pt")
    std = min(trained_module.model.visual.preprocess_cfg["std"])
    assert _max_difference(default["pixel_values"], pixels) <= 1 / 255 / std + 1e-6


def test_vit_tiny_random_init_round_trip(digits_test, tmp_path):
    from transformers import AutoModel, AutoProcessor

    torch.manual_seed(0)
    module = DualEncoder(model="test-vit-tiny").eval()
    out = hf_export.export_transformers(module.model, tmp_path / "vit_tiny")
    images, _, captions = digits_test
    images = images[:64]
    pixels, image_emb, text_emb = _mmret_embeddings(module, images, captions)
    hf_model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    assert type(hf_model).__name__ == "CLIPModel"
    assert hf_model.config.text_config.hidden_act == hf_model.config.vision_config.hidden_act == "gelu"
    assert hf_model.config.text_config.eos_token_id == 49407  # pooled at the first end-of-text token
    inputs = processor(images=images, text=captions, padding=True, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], pixels)
    with torch.no_grad():
        output = hf_model(**inputs)
    differences = (
        _max_difference(output.image_embeds, image_emb),
        _max_difference(output.text_embeds, text_emb),
    )
    print(f"test-vit-tiny (random) -> CLIPModel, max |difference| image, text: {differences}")
    assert max(differences) <= ATOL


def test_quick_gelu_and_a_clip_with_a_sigmoid_bias(tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    quick = models.create_model("test-vit-micro", force_quick_gelu=True).eval()
    hf_model, processor = hf_export.to_transformers(quick), hf_export.processor_for(quick)
    assert hf_model.config.text_config.hidden_act == hf_model.config.vision_config.hidden_act == "quick_gelu"
    assert hf_export.embedding_difference(quick, hf_model, processor) <= ATOL
    # CLIP towers trained with the SigLIP loss: a CLIPModel, the bias kept in its config.
    biased = DualEncoder(model="test-vit-micro", loss="siglip").model.eval()
    out = hf_export.export_transformers(biased, tmp_path / "biased")
    assert AutoModel.from_pretrained(out).config.mmret_logit_bias == pytest.approx(-10.0)


def test_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_export, "write_model_card", interrupt)  # the last file written
    model = models.create_model("test-vit-micro").eval()
    for export in (hf_export.export_transformers, hf_export.export_sentence_transformers):
        with pytest.raises(KeyboardInterrupt):
            export(model, tmp_path / "export")
        assert list(tmp_path.iterdir()) == []


# ---- transformers: SigLIP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A random test-siglip-vit-tiny DualEncoder (SigLIP loss) exported as transformers and sentence-transformers."""
    torch.manual_seed(0)
    module = DualEncoder(model="test-siglip-vit-tiny", loss="siglip").eval()
    with torch.no_grad():  # off their init values, so the test sees them travel
        module.model.logit_scale.add_(0.25)
        module.model.logit_bias.add_(1.5)
    root = tmp_path_factory.mktemp("siglip")
    return (
        module,
        hf_export.export_transformers(module.model, root / "hf"),
        hf_export.export_sentence_transformers(module.model, root / "st"),
    )


def test_siglip_export_equals_mmret_on_digits(siglip, digits_test):
    from transformers import AutoProcessor, SiglipModel

    module, directory, _ = siglip
    images, _, captions = digits_test
    pixels, image_emb, text_emb = _mmret_embeddings(module, images, captions)
    hf_model = SiglipModel.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory, backend="pil")
    inputs = processor(images=images, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], pixels)
    tokens = processor(text=captions, padding="max_length", return_tensors="pt")
    assert set(tokens) == {"input_ids"}  # no attention mask: the SigLIP text tower attends to padding too
    assert torch.equal(tokens["input_ids"], module.tokenizer(captions))
    with torch.no_grad():
        hf_image = F.normalize(hf_model.get_image_features(**inputs).pooler_output, dim=-1)
        hf_text = F.normalize(hf_model.get_text_features(**tokens).pooler_output, dim=-1)
    differences = (_max_difference(hf_image, image_emb), _max_difference(hf_text, text_emb))
    print(f"test-siglip-vit-tiny -> SiglipModel, max |difference| image, text: {differences}")
    assert max(differences) <= ATOL
    torch.testing.assert_close(hf_model.logit_scale.detach().reshape(()), module.model.logit_scale.detach())
    torch.testing.assert_close(hf_model.logit_bias.detach().reshape(()), module.model.logit_bias.detach())


def test_siglip_pipeline_ranks_labels_as_mmret(siglip, digits_test):
    from transformers import AutoImageProcessor, pipeline

    module, directory, _ = siglip
    class_names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    template = "a photo of the digit {}."
    images = digits_test[0][:20]
    _, image_emb, class_emb = _mmret_embeddings(module, images, [template.format(n) for n in class_names])
    classify = pipeline(
        "zero-shot-image-classification",
        model=str(directory),
        image_processor=AutoImageProcessor.from_pretrained(directory, backend="pil"),
    )
    outputs = classify(images, candidate_labels=class_names, hypothesis_template=template)
    expected = (image_emb @ class_emb.T).argmax(dim=1).tolist()
    assert [class_names.index(output[0]["label"]) for output in outputs] == expected


# ---- sentence-transformers ----------------------------------------------------------------------------------
def test_sentence_transformers_export_equals_mmret(exports, trained_module, siglip, digits_test):
    from sentence_transformers import SentenceTransformer

    images, _, captions = digits_test
    cases = {"clip (trained)": (trained_module, exports["sentence-transformers"]), "siglip": siglip[::2]}
    for name, (module, directory) in cases.items():
        _, image_emb, text_emb = _mmret_embeddings(module, images, captions)
        encoder = SentenceTransformer(str(directory), device="cpu")
        st_image = encoder.encode(images, convert_to_tensor=True, batch_size=64)
        st_text = encoder.encode(captions, convert_to_tensor=True, batch_size=64)
        differences = (_max_difference(st_image, image_emb), _max_difference(st_text, text_emb))
        print(f"SentenceTransformer ({name}) vs mmret, max |difference| image, text: {differences}")
        assert max(differences) <= ATOL


# ---- zero-shot accuracy: transformers' pipeline vs mmret eval ------------------------------------------------
def test_zero_shot_pipeline_accuracy_equals_mmret_eval(exports, one_template_eval, trained_module):
    from transformers import AutoImageProcessor, pipeline

    from mmret.evaluation.metrics import build_zeroshot_classifier

    data, template, _, results = one_template_eval
    class_names = json.loads((data / "dataset.json").read_text())["class_names"]
    images, labels, _ = _read_split(data)
    # mmret's per-image predictions, the way `mmret eval` classifies (its classifier, its image path).
    _, image_emb, _ = _mmret_embeddings(trained_module, images, ["x"])
    with torch.no_grad():
        classifier = build_zeroshot_classifier(trained_module.encode_texts, class_names, [template])
    expected = (image_emb @ classifier.T).argmax(dim=1).tolist()
    assert len(set(expected)) >= 3  # a model that predicts more than one class: the comparison is not trivial
    directory = exports["transformers"]
    accuracies = {}
    for backend in ("pil", None):  # open_clip's pixels exactly; transformers' default (torchvision) backend
        kwargs = {"backend": backend} if backend else {}
        classify = pipeline(
            "zero-shot-image-classification",
            model=str(directory),
            image_processor=AutoImageProcessor.from_pretrained(directory, **kwargs),
        )
        outputs = classify(images, candidate_labels=class_names, hypothesis_template=template)
        predicted = [class_names.index(output[0]["label"]) for output in outputs]
        accuracies[backend or "default"] = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
        if backend == "pil":
            assert predicted == expected  # image by image
    print(
        f"zero-shot acc1 on {len(labels)} digits: mmret eval {results['metrics']['acc1']}, pipeline {accuracies}"
    )
    assert accuracies["pil"] == pytest.approx(results["metrics"]["acc1"], abs=1e-9)


# ---- model cards ------------------------------------------------------------------------------------------
def test_every_format_writes_a_model_card_with_the_metrics(exports, one_template_eval, digits_checkpoint):
    from huggingface_hub import ModelCard, metadata_load

    results = one_template_eval[3]
    run_dir = digits_checkpoint.parent.parent
    trained_commit = json.loads((run_dir / "run_info.json").read_text()).get("git_commit")
    for export_format, directory in exports.items():
        card_path = directory / "README.md"
        metadata = metadata_load(card_path)
        card = ModelCard.load(card_path)
        library, pipeline_tag = LIBRARIES[export_format]
        assert metadata["library_name"] == card.data.library_name == library
        assert metadata["pipeline_tag"] == pipeline_tag
        assert {"mmret", "clip", "image-text-retrieval"} <= set(metadata["tags"])
        assert metadata["datasets"] == ["digits"]
        metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
        assert metrics == results["metrics"]
        task_of = {result.metric_type: result.task_type for result in card.data.eval_results}
        assert task_of["acc1"] == "zero-shot-image-classification"
        assert task_of["image_retrieval_recall@1"] == "image-text-retrieval"
        assert all(result.dataset_name == "digits" for result in card.data.eval_results)
        text = card.text
        assert "model: test-vit-micro" in text and "lr: 0.001" in text  # the checkpoint's hyperparameters
        assert "class_path: mmret.training.DualEncoder" in text  # the run's config.yaml
        assert trained_commit is None or trained_commit in text


def test_card_without_results_still_parses(tmp_path):
    from huggingface_hub import ModelCard

    out = models.export_open_clip(models.create_model("test-vit-micro"), None, tmp_path / "plain")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "open_clip" and not card.data.eval_results


# ---- refusals ---------------------------------------------------------------------------------------------
def _handmade_checkpoint(path: Path, name: str, loss: str = "infonce", kind: str = "dual_encoder") -> Path:
    """An mmret checkpoint of a randomly initialised DualEncoder (what `mmret fit` saves, without training)."""
    module = DualEncoder(model=name, loss=loss)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "mmret": {"kind": kind, "model": name},
        },
        path,
    )
    return path


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("export_format", ["transformers", "sentence-transformers"])
def test_average_pooled_vit_is_refused_in_one_line(export_format, tmp_path, capsys):
    checkpoint = _handmade_checkpoint(tmp_path / "siglip_tiny.ckpt", "test-siglip-tiny", loss="siglip")
    out = tmp_path / "out"
    line = _refused(["export", str(checkpoint), "--format", export_format, "--output", str(out)], capsys)
    assert "image tower" in line and "pool_type 'avg'" in line and "test-siglip-vit-tiny" in line
    assert not out.exists()


@pytest.mark.slow
def test_timm_resnet_and_hf_text_tower_are_refused_in_one_line(tmp_path, capsys):
    checkpoint = _handmade_checkpoint(tmp_path / "minilm.ckpt", "test-timm-minilm")
    out = tmp_path / "out"
    line = _refused(["export", str(checkpoint), "--format", "transformers", "--output", str(out)], capsys)
    assert "image tower is timm 'test_resnet'" in line and "no transformers counterpart" in line
    assert not out.exists()
    # With an exportable image tower, the Hugging Face text tower is what is named.
    model = models.create_model("test-timm-minilm")
    model.visual = models.create_model("test-vit-micro").visual
    with pytest.raises(Exception, match="text tower is the Hugging Face model"):
        hf_export.transformers_family(model)


def test_reranker_and_bad_options_are_refused_in_one_line(digits_checkpoint, tmp_path, capsys):
    reranker = tmp_path / "reranker.ckpt"
    torch.save({"state_dict": {}, "mmret": {"kind": "cross_encoder", "model": "test-vit-micro"}}, reranker)
    out = tmp_path / "out"
    line = _refused(["export", str(reranker), "--format", "transformers", "--output", str(out)], capsys)
    assert "reranker" in line and "--format open_clip" in line
    argv = ["export", str(digits_checkpoint), "--format", "transformers", "--output", str(out)]
    assert "--hf-model-name" in _refused([*argv, "--hf-model-name", "org/model"], capsys)
    not_results = tmp_path / "results.json"
    not_results.write_text(json.dumps({"task": "zeroshot"}))
    assert "no 'metrics' object" in _refused([*argv, "--results", str(not_results)], capsys)
    not_results.write_text("{")
    assert "not JSON" in _refused([*argv, "--results", str(not_results)], capsys)
    assert not out.exists()
