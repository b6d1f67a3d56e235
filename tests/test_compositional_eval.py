"""The compositional evaluation (`mmret eval --task compositional`): SugarCrepe-style pairs on a shard set and
on files in SugarCrepe's / ARO's released formats, checked against scores computed here pair by pair.

.venv/bin/pytest tests/test_compositional_eval.py
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmret.cli import main
from mmret.data.perturb import PERTURBATION_TYPES, CaptionPerturber, normalize
from mmret.evaluation.compositional import (
    ImageRecord,
    build_pairs,
    compositional_metrics,
    embedding_scorer,
)

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}
SHAPES = ("circle", "square")
WORD_CLASSES = {
    "color": {"role": "attribute", "words": list(COLORS)},
    "shape": {"role": "object", "words": list(SHAPES)},
    "relation": {"role": "relation", "words": ["left of", "above"]},
}


def scene(objects: list[tuple[str, str]], size: int = 48) -> Image.Image:
    """Objects (colour, shape) drawn left to right."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for i, (color, shape) in enumerate(objects):
        x0, y0 = 4 + i * size // 2, size // 3
        box = (x0, y0, x0 + size // 3, y0 + size // 3)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image


def two_object_caption(a: tuple[str, str], b: tuple[str, str]) -> str:
    return f"a {a[0]} {a[1]} left of a {b[0]} {b[1]}"


def scene_records() -> list[dict]:
    """Swap groups of two-object scenes: the scene, the colours swapped, the objects swapped around."""
    records = []
    groups = [(("red", "circle"), ("blue", "square")), (("green", "square"), ("red", "circle")),
              (("blue", "circle"), ("green", "square"))]  # fmt: skip
    for group, (a, b) in enumerate(groups):
        variants = {
            "original": (a, b),
            "swap_attribute": ((b[0], a[1]), (a[0], b[1])),
            "swap_order": (b, a),
        }
        for variant, (left, right) in variants.items():
            records.append({
                "id": len(records), "objects": [left, right], "swap_group": group, "swap_variant": variant,
                "part": "unseen" if group == 2 else "seen",
                "captions": [two_object_caption(left, right), f"{two_object_caption(left, right)}."],
            })  # fmt: skip
    records.append({"id": len(records), "objects": [("red", "square")], "swap_group": None,
                    "swap_variant": None, "part": "seen", "captions": ["a red square"]})  # fmt: skip
    return records


def write_scene_shards(directory: Path) -> list[dict]:
    directory.mkdir(parents=True)
    records = scene_records()
    with wds.TarWriter(str(directory / "00000.tar")) as writer:
        for record in records:
            buffer = io.BytesIO()
            scene(record["objects"]).save(buffer, format="JPEG", quality=95)
            meta = {k: v for k, v in record.items() if k != "objects"}
            writer.write({"__key__": f"{record['id']:06d}", "jpg": buffer.getvalue(),
                          "txt": "\n".join(record["captions"]), "json": json.dumps(meta)})  # fmt: skip
    info = {"name": "scenes", "num_samples": len(records), "image_size": 48, "shards": ["00000.tar"],
            "shard_sizes": [len(records)], "skipped": {}, "word_classes": WORD_CLASSES}  # fmt: skip
    (directory / "dataset.json").write_text(json.dumps(info))
    return records


def image_records(records: list[dict]) -> list[ImageRecord]:
    return [
        ImageRecord(r["id"], r["captions"], {k: v for k, v in r.items() if k != "objects"}) for r in records
    ]


# ---- pairs and metrics (no model) ------------------------------------------------------------------------------
def test_pairs_never_use_a_positive_as_negative_and_twins_are_real_negatives():
    records = image_records(scene_records())
    pairs = build_pairs(records, CaptionPerturber(WORD_CLASSES), seed=0)
    positives = [{normalize(c) for c in r.captions} for r in records]
    assert pairs.text_pairs and pairs.image_pairs
    for pair in pairs.text_pairs:
        assert normalize(pairs.texts[pair.negative]) not in positives[pair.image]
        assert normalize(pairs.texts[pair.positive]) in positives[pair.image]
        assert pair.type in PERTURBATION_TYPES
    # the two captions of an image differ only by a full stop: one caption, so one set of pairs, per image
    per_image = {(p.image, p.type) for p in pairs.text_pairs}
    assert len(per_image) == len(pairs.text_pairs)
    for pair in pairs.image_pairs:
        caption = normalize(pairs.texts[pair.text])
        assert caption in positives[pair.positive] and caption not in positives[pair.negative]
        assert records[pair.positive].metadata["swap_group"] == records[pair.negative].metadata["swap_group"]
    # 3 groups x 3 images x 2 twins each; the single-object image has none
    assert len(pairs.image_pairs) == 18
    assert {p.part for p in pairs.image_pairs} == {"seen", "unseen"}
    # the same seed gives the same pairs, another seed may draw other negatives but the same counts per type
    assert build_pairs(records, CaptionPerturber(WORD_CLASSES), seed=0) == pairs


def oracle(pairs, records, sign: float = 1.0):
    """Scores 1 for a caption of the image, 0 otherwise (times `sign`)."""
    positives = [{normalize(c) for c in r.captions} for r in records]

    def score(text_index: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        return torch.tensor([
            sign * float(normalize(pairs.texts[t]) in positives[i])
            for t, i in zip(text_index.tolist(), image_index.tolist())
        ])  # fmt: skip

    return score


def test_metrics_of_an_oracle_a_reversed_oracle_and_ties():
    records = image_records(scene_records())
    pairs = build_pairs(records, CaptionPerturber(WORD_CLASSES), seed=0)
    right, counts = compositional_metrics(pairs, oracle(pairs, records))
    assert right and all(value == 1.0 for value in right.values())
    wrong, _ = compositional_metrics(pairs, oracle(pairs, records, sign=-1.0))
    assert all(value == 0.0 for value in wrong.values())
    tied, _ = compositional_metrics(pairs, lambda t, i: torch.zeros(len(t)))
    assert all(value == 0.0 for value in tied.values())  # a tie is not a win
    types = {p.type for p in pairs.text_pairs}
    assert {f"compositional_text_acc/{t}" for t in types} <= set(right)
    assert counts["compositional_text_n"] == len(pairs.text_pairs)
    assert counts["compositional_image_n"] == 18
    assert counts["compositional_image_n/seen"] + counts["compositional_image_n/unseen"] == 18
    assert counts["compositional_image_n/swap_order"] == 6
    assert sum(counts[f"compositional_text_n/{t}"] for t in types) == len(pairs.text_pairs)


def test_metrics_equal_a_direct_count_on_random_embeddings():
    records = image_records(scene_records())
    pairs = build_pairs(records, CaptionPerturber(WORD_CLASSES), seed=3)
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(len(pairs.texts), 8, generator=generator), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(len(records), 8, generator=generator), dim=-1)
    metrics, _ = compositional_metrics(pairs, embedding_scorer(text, image), batch_size=7)
    sim = (text @ image.T).numpy()
    by_type: dict[str, list[bool]] = {}
    for p in pairs.text_pairs:
        by_type.setdefault(p.type, []).append(bool(sim[p.positive, p.image] > sim[p.negative, p.image]))
    for kind, outcomes in by_type.items():
        assert metrics[f"compositional_text_acc/{kind}"] == pytest.approx(np.mean(outcomes))
    assert metrics["compositional_text_acc"] == pytest.approx(np.mean([np.mean(v) for v in by_type.values()]))
    unseen = [
        sim[p.text, p.positive] > sim[p.text, p.negative] for p in pairs.image_pairs if p.part == "unseen"
    ]
    assert metrics["compositional_image_acc/unseen"] == pytest.approx(np.mean(unseen))


# ---- mmret eval --task compositional ---------------------------------------------------------------------------
def direct_scores(checkpoint: Path, images: list[Image.Image], captions: list[str]) -> np.ndarray:
    """[T, N] cosine similarities computed here from the checkpoint, one image and caption at a time."""
    from mmret.models import create_transforms
    from mmret.training import DualEncoder

    module = DualEncoder.from_checkpoint(checkpoint, "cpu")
    transform = create_transforms(module.model, train=False)
    with torch.no_grad():
        image_emb = torch.cat([module.encode_image(transform(im).unsqueeze(0)) for im in images])
        text_emb = torch.cat([module.encode_texts([c]) for c in captions])
    return (text_emb.float() @ image_emb.float().T).numpy()


def test_eval_on_a_shard_set_matches_scores_computed_here(tmp_path, trained_checkpoint):
    records = write_scene_shards(tmp_path / "scenes")
    output = tmp_path / "out" / "comp.json"
    argv = ["eval", "--task", "compositional", "--model", str(trained_checkpoint), "--data",
            str(tmp_path / "scenes"), "--output", str(output), "--device", "cpu", "--num-workers", "0"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(output.read_text())
    assert results["task"] == "compositional" and results["num_images"] == len(records)
    assert Path(results["pictures"][0]).is_file()
    pairs = build_pairs(image_records(records), CaptionPerturber(WORD_CLASSES), seed=0)
    images = [Image.open(io.BytesIO(_jpeg(scene(r["objects"])))).convert("RGB") for r in records]
    sim = direct_scores(trained_checkpoint, images, pairs.texts)
    for kind in {p.type for p in pairs.text_pairs}:
        outcomes = [
            sim[p.positive, p.image] > sim[p.negative, p.image] for p in pairs.text_pairs if p.type == kind
        ]
        assert results["metrics"][f"compositional_text_acc/{kind}"] == pytest.approx(
            np.mean(outcomes), abs=1e-9
        )
    twins = [sim[p.text, p.positive] > sim[p.text, p.negative] for p in pairs.image_pairs]
    assert results["metrics"]["compositional_image_acc"] == pytest.approx(np.mean(twins))
    assert results["counts"]["compositional_image_n"] == 18
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_benchmarks(folder: Path) -> tuple[Path, Path, list[tuple[str, str, str]]]:
    """A SugarCrepe-format file and an ARO-format file over PNG images in `folder/images`."""
    (folder / "images").mkdir(parents=True)
    triples, swapped = [], []
    for index, (a, b) in enumerate(
        [(("red", "circle"), ("blue", "square")), (("green", "square"), ("red", "circle"))]
    ):
        name = f"{index:03d}.png"
        scene([a, b]).save(folder / "images" / name)
        triples.append((name, two_object_caption(a, b), two_object_caption((b[0], a[1]), (a[0], b[1]))))
        swapped.append(two_object_caption(b, a))  # ARO's VG-Relation: the objects around the relation swapped
    sugar = {str(i): {"filename": f"images/{n}", "caption": p, "negative_caption": q} for i, (n, p, q) in
             enumerate(triples)}  # fmt: skip
    aro = [{"image_path": f"images/{n}", "true_caption": p, "false_caption": q, "relation_name": "left of"}
           for (n, p, _), q in zip(triples, swapped)]  # fmt: skip
    (folder / "swap_att.json").write_text(json.dumps(sugar))
    (folder / "vg_relation.json").write_text(json.dumps(aro))
    return folder / "swap_att.json", folder / "vg_relation.json", triples


def test_eval_reads_sugarcrepe_and_aro_files(tmp_path, trained_checkpoint):
    sugar, aro, triples = write_benchmarks(tmp_path / "bench")
    output = tmp_path / "bench.json"
    assert main(["eval", "--task", "compositional", "--model", str(trained_checkpoint), "--benchmark", str(sugar),
                 str(aro), "--output", str(output), "--device", "cpu"]) == 0  # fmt: skip
    results = json.loads(output.read_text())
    assert results["counts"]["compositional_text_n/swap_att"] == 2
    assert results["counts"]["compositional_text_n/vg_relation"] == 2
    aro_items = json.loads(aro.read_text())
    images = [Image.open(tmp_path / "bench" / "images" / name).convert("RGB") for name, _, _ in triples]
    for kind, items in [("swap_att", [(p, q) for _, p, q in triples]),
                        ("vg_relation", [(d["true_caption"], d["false_caption"]) for d in aro_items])]:  # fmt: skip
        captions = [c for pair in items for c in pair]
        sim = direct_scores(trained_checkpoint, images, captions)
        outcomes = [sim[2 * i, i] > sim[2 * i + 1, i] for i in range(len(items))]
        assert results["metrics"][f"compositional_text_acc/{kind}"] == pytest.approx(np.mean(outcomes))


@pytest.mark.parametrize(
    "content, word",
    [
        ("not json", "not valid JSON"),
        ('{"0": {"filename": "images/000.png", "caption": "a red circle"}}', "'negative_caption'"),
        ('{"0": {"filename": "missing.png", "caption": "a", "negative_caption": "b"}}', "not found"),
        ('[{"image_path": "images/000.png", "true_caption": "a"}]', "'false_caption'"),
        ("42", "holds a JSON int"),
        ("{}", "no entries"),
    ],
)
def test_bad_benchmark_files_are_one_line_usage_errors(tmp_path, capsys, content, word):
    write_benchmarks(tmp_path / "bench")
    bad = tmp_path / "bench" / "bad.json"
    bad.write_text(content)
    output = tmp_path / "never.json"
    # the checkpoint is not even read: a bad file is refused before any model loads
    code = main(["eval", "--task", "compositional", "--model", str(tmp_path / "no.ckpt"), "--benchmark", str(bad),
                 "--output", str(output), "--device", "cpu"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and word in err[0] and str(bad) in err[0]
    assert not output.exists()


def test_eval_refuses_mixed_inputs(tmp_path, capsys):
    sugar, _, _ = write_benchmarks(tmp_path / "bench")
    output = tmp_path / "never.json"
    cases = [
        (["--task", "retrieval", "--benchmark", str(sugar)], "--benchmark needs --task compositional"),
        (["--task", "compositional", "--benchmark", str(sugar), "--data", str(tmp_path)], "both given"),
        (["--task", "compositional"], "--data is required"),
        (["--task", "compositional", "--data", str(tmp_path), "--image-root", str(tmp_path)], "--image-root"),
    ]
    for extra, word in cases:
        code = main(["eval", "--model", "x.ckpt", "--output", str(output), *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and word in err[0], (extra, err)
    assert not output.exists()


def test_validation_logs_compositional_accuracies_equal_to_eval(tmp_path):
    """`compositional_val: true` logs the same accuracies `mmret eval --task compositional` writes."""
    import csv

    from tests.fit_args import DUAL_ENCODER, fit_argv

    records = write_scene_shards(tmp_path / "scenes")
    run_dir = tmp_path / "run"
    argv = fit_argv(module=DUAL_ENCODER, model_args={"warmup_steps": 1, "compositional_val": True},
                    train=tmp_path / "scenes", val=tmp_path / "scenes", samples_per_epoch=len(records), batch_size=5,
                    max_epochs=1, run_dir=run_dir)  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    logged = {
        k[4:]: float(v) for row in rows for k, v in row.items() if k.startswith("val/compositional") and v
    }
    assert {"compositional_text_acc", "compositional_image_acc", "compositional_image_acc/unseen"} <= set(
        logged
    )
    output = tmp_path / "comp.json"
    assert main(["eval", "--task", "compositional", "--model", str(run_dir / "checkpoints" / "last.ckpt"),
                 "--data", str(tmp_path / "scenes"), "--output", str(output), "--device", "cpu",
                 "--num-workers", "0"]) == 0  # fmt: skip
    written = json.loads(output.read_text())["metrics"]
    assert written.keys() == logged.keys()
    for name, value in logged.items():
        assert value == pytest.approx(written[name], abs=1e-6), name


@pytest.mark.slow
def test_eval_with_a_reranker_scores_the_same_pairs_with_the_cross_encoder(
    tmp_path, trained_checkpoint, digits_root
):
    from mmret.models import create_transforms
    from mmret.training import CrossEncoder
    from tests.fit_args import CROSS_ENCODER, fit_argv

    reranker_dir = tmp_path / "reranker"
    reranker_args = {"dual_encoder": trained_checkpoint, "fusion_width": 32, "fusion_layers": 1, "fusion_heads": 2,
                     "num_negatives": 3, "warmup_steps": 1}  # fmt: skip
    assert main(fit_argv(module=CROSS_ENCODER, model=None, model_args=reranker_args, run_dir=reranker_dir,
                         train=digits_root / "train", samples_per_epoch=32, max_epochs=1,
                         limit_val_batches=0)) == 0  # fmt: skip
    checkpoint = reranker_dir / "checkpoints" / "last.ckpt"
    records = write_scene_shards(tmp_path / "scenes")
    output = tmp_path / "comp.json"
    assert main(["eval", "--task", "compositional", "--model", str(trained_checkpoint), "--reranker",
                 str(checkpoint), "--data", str(tmp_path / "scenes"), "--output", str(output), "--device", "cpu",
                 "--num-workers", "0"]) == 0  # fmt: skip
    results = json.loads(output.read_text())
    assert results["reranked_metrics"].keys() == results["metrics"].keys()
    reranker = CrossEncoder.from_checkpoint(checkpoint, "cpu")
    transform = create_transforms(reranker.model, train=False)
    images = torch.stack(
        [transform(Image.open(io.BytesIO(_jpeg(scene(r["objects"])))).convert("RGB")) for r in records]
    )
    pairs = build_pairs(image_records(records), CaptionPerturber(WORD_CLASSES), seed=0)

    def score(text: int, image: int) -> float:
        with torch.no_grad():
            return float(reranker.score([pairs.texts[text]], images[image : image + 1])[0])

    for kind in {p.type for p in pairs.text_pairs}:
        outcomes = [
            score(p.positive, p.image) > score(p.negative, p.image)
            for p in pairs.text_pairs
            if p.type == kind
        ]
        assert results["reranked_metrics"][f"compositional_text_acc/{kind}"] == pytest.approx(
            np.mean(outcomes)
        )
    twins = [score(p.text, p.positive) > score(p.text, p.negative) for p in pairs.image_pairs]
    assert results["reranked_metrics"]["compositional_image_acc"] == pytest.approx(np.mean(twins))
