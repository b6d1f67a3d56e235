"""`mmret eval` and the evaluation path it shares with validation (`mmret.evaluation.retrieval`).

A tiny dual encoder is trained once (2 steps on digits); `mmret eval` on digits test must write the Results
contract with numbers equal to a direct computation (our own embeddings + `scoring.retrieval_metrics`), valid
PNGs beside it, and refuse bad input with one stderr line, exit 2 and no results file.

    .venv/bin/pytest tests/test_evaluate_cli.py -q              # default tier: library + bad-input checks
    .venv/bin/pytest tests/test_evaluate_cli.py -q -m slow      # the trained-checkpoint end-to-end runs
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from PIL import Image

from mmret.cli import main
from mmret.evaluation.metrics import build_text_queries, retrieval_metrics
from mmret.evaluation.ranking import compute_retrieval_metrics, embedding_scores
from mmret.evaluation.retrieval import (
    EvalSetEmbedder,
    candidate_score_fn,
    evaluation_metrics,
    recall_curves,
    top_k_candidates,
)
from tests.shard_fixtures import write_img2dataset_shards, write_shards

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTRACT_KEYS = {"task", "model", "data", "num_images", "num_texts", "metrics", "top_k", "config"}


# ---- the shared evaluation path, with fake encoders (fast) ---------------------------------------------------
def text_vector(text: str, dim: int = 8) -> torch.Tensor:
    """A fixed pseudo-random unit vector per string."""
    generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)


def encode_texts(texts: list[str]) -> torch.Tensor:
    return torch.stack([text_vector(text) for text in texts])  # [n, D]


def fake_batches() -> list[dict]:
    """Images are their own embeddings; captions are shared between images; image 3 repeats (padding)."""
    generator = torch.Generator().manual_seed(0)
    captions = [["a cat", "a small cat"], ["a dog"], ["a cat", "a red car"], ["a car"], ["a boat", "a dog"]]
    parts = ["seen", "seen", "unseen", "seen", "unseen"]
    emb = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=1)
    rows = [[0, 1, 2], [3, 4, 3]]
    return (
        [
            {
                "image": emb[r],
                "sample_id": torch.tensor([10 + i for i in r]),
                "label": torch.tensor([i % 2 for i in r]),
                "captions": [captions[i] for i in r],
                "metadata": [{"part": parts[i]} for i in r],
            }
            for r in rows
        ],
        emb,
        captions,
    )


def test_embedder_embeds_each_image_and_unique_caption_once_and_matches_direct_metrics():
    batches, emb, captions = fake_batches()
    text_calls: list[list[str]] = []

    def counting_encode_texts(texts):
        text_calls.append(list(texts))
        return encode_texts(texts)

    embedder = EvalSetEmbedder(lambda images: images, counting_encode_texts, text_batch_size=3)
    for batch in batches:
        embedder.add_batch(batch)
    eval_set = embedder.finish()

    unique = sorted({c for image_captions in captions for c in image_captions})
    assert sorted(c for call in text_calls for c in call) == unique  # each unique caption embedded once
    assert eval_set.image_ids.tolist() == [10, 11, 12, 13, 14]  # the repeated image 13 is kept once
    assert sorted(eval_set.captions) == unique and eval_set.num_texts == len(unique)
    relevant = dict(zip(eval_set.captions, eval_set.text_relevant))
    assert relevant["a cat"] == {10, 12} and relevant["a dog"] == {11, 14}
    unseen = dict(zip(eval_set.captions, eval_set.text_unseen.tolist()))
    assert unseen == {
        "a cat": True,
        "a small cat": False,
        "a dog": True,
        "a red car": True,
        "a car": False,
        "a boat": True,
    }

    metrics = evaluation_metrics(eval_set)
    queries, query_images = build_text_queries(captions, [10, 11, 12, 13, 14])
    direct = retrieval_metrics(emb, [10, 11, 12, 13, 14], encode_texts(queries), query_images)
    for key, value in direct.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert (
        metrics["unseen/image_retrieval_num_queries"] == 4
        and metrics["seen/image_retrieval_num_queries"] == 2
    )
    assert (
        metrics["unseen/text_retrieval_num_queries"] == 2 and metrics["seen/text_retrieval_num_queries"] == 3
    )


def test_recall_curves_are_monotone_and_end_at_the_corpus_size():
    batches, _, _ = fake_batches()
    embedder = EvalSetEmbedder(lambda images: images, encode_texts)
    for batch in batches:
        embedder.add_batch(batch)
    curves = recall_curves(embedder.finish(), max_k=50)
    assert len(curves["image_retrieval"]) == 5 and len(curves["text_retrieval"]) == 6
    for values in curves.values():
        assert all(a <= b for a, b in zip(values, values[1:])) and values[-1] == 1.0


def test_top_k_candidates_rescored_with_first_stage_scores_keep_recall_up_to_k():
    generator = torch.Generator().manual_seed(1)
    query_emb, candidate_emb = (
        torch.randn(40, 16, generator=generator),
        torch.randn(30, 16, generator=generator),
    )
    query_emb = torch.nn.functional.normalize(query_emb, dim=1)
    candidate_emb = torch.nn.functional.normalize(candidate_emb, dim=1)
    from mmret.evaluation.ranking import Relevance

    relevance = Relevance.from_lists([[q % 30, (q + 11) % 30] if q % 2 else [q % 30] for q in range(40)], 30)
    full = compute_retrieval_metrics(embedding_scores(query_emb, candidate_emb), relevance, ks=(1, 5, 10))
    candidates = top_k_candidates(query_emb, candidate_emb, k=10, chunk_size=7)
    assert candidates.indices.shape == (40, 10)
    two_stage = compute_retrieval_metrics(candidate_score_fn(candidates), relevance, ks=(1, 5, 10))
    for key in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
        assert two_stage[key] == pytest.approx(full[key], abs=1e-12), key
    reversed_scores = candidate_score_fn(candidates, -candidates.scores)  # a "reranker" that inverts the list
    assert compute_retrieval_metrics(reversed_scores, relevance, ks=(10,))["recall@10"] == full["recall@10"]


# ---- bad input: one line, exit 2, nothing written (no trained checkpoint needed) ------------------------------
def assert_refused(args: list[str], capsys, output, *fragments: str) -> str:
    assert main(["eval", *args, "--output", str(output), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not output.exists()
    assert not list(output.parent.glob("*.png")) and not list(output.parent.glob(".*tmp*"))
    return err[0]


@pytest.mark.parametrize("kind", ["torch_file", "text_file", "missing"])
def test_eval_refuses_a_checkpoint_that_is_not_a_dual_encoder(kind, digits_root, tmp_path, capsys):
    checkpoint = tmp_path / "model.ckpt"
    expected = {
        "torch_file": "not an mmret checkpoint",
        "text_file": "not a readable checkpoint",
        "missing": "does not exist",
    }[kind]
    if kind == "torch_file":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint)
    elif kind == "text_file":
        checkpoint.write_text("hello, I am not a checkpoint\n")
    out = tmp_path / "out" / "results.json"
    assert_refused(
        ["--model", str(checkpoint), "--data", str(digits_root)], capsys, out, expected, str(checkpoint)
    )


def test_eval_refuses_a_missing_data_directory(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert_refused(
        ["--model", "x.ckpt", "--data", str(missing)],
        capsys,
        tmp_path / "r.json",
        str(missing),
        "does not exist",
    )


def test_eval_refuses_an_output_that_is_a_directory(digits_root, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert (
        main(["eval", "--model", "x.ckpt", "--data", str(digits_root), "--output", str(tmp_path / "taken")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory" in err[0]


# ---- end to end with a trained checkpoint -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_results(trained_checkpoint, digits_root, tmp_path_factory):
    """`mmret eval` on the digits root (default split test, task auto), with one loader worker."""
    output = tmp_path_factory.mktemp("eval_out") / "digits.json"
    code = main(
        [
            "eval",
            "--model",
            str(trained_checkpoint),
            "--data",
            str(digits_root),
            "--output",
            str(output),
            "--batch-size",
            "64",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return output, json.loads(output.read_text())


@pytest.mark.slow
def test_eval_writes_the_results_contract(digits_results, trained_checkpoint, digits_root):
    output, results = digits_results
    assert set(results) >= CONTRACT_KEYS
    assert results["task"] == "zeroshot"  # auto: digits has class names and labels
    assert results["model"] == str(trained_checkpoint) and results["data"] == str(digits_root / "test")
    assert results["num_images"] == 300 and results["num_texts"] == 70  # 7 caption templates x 10 digits
    assert results["top_k"] is None and "reranked_metrics" not in results
    metrics = results["metrics"]
    for direction in ("image_retrieval", "text_retrieval"):
        for name in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "map@10"):
            assert f"{direction}_{name}" in metrics
    assert {"acc1", "acc5", "mean_per_class_recall"} <= set(metrics)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert results["counts"]["text_retrieval_num_queries"] == 300
    assert results["config"]["model"]["model"] == "test-vit-micro"
    assert results["config"]["eval"]["split"] == "test"


@pytest.mark.slow
def test_eval_pictures_are_valid_pngs(digits_results):
    output, results = digits_results
    pictures = [output.with_name("digits_examples.png"), output.with_name("digits_recall.png")]
    assert results["pictures"] == [str(path) for path in pictures]
    for path in pictures:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400


@pytest.mark.slow
def test_eval_metrics_equal_a_direct_computation(digits_results, trained_checkpoint, digits_root):
    from mmret.data.samples import SkipCounter, decode_sample, iter_shard
    from mmret.evaluation.metrics import build_zeroshot_classifier, zeroshot_metrics
    from mmret.models import create_transforms
    from mmret.training import DualEncoder

    _, results = digits_results
    model = DualEncoder.from_checkpoint(trained_checkpoint)
    transform = create_transforms(model.model, train=False)
    info = json.loads((digits_root / "test" / "dataset.json").read_text())
    samples = [
        decode_sample(raw)
        for shard in info["shards"]
        for raw in iter_shard(str(digits_root / "test" / shard), SkipCounter())
    ]
    ids = [sample["sample_id"] for sample in samples]
    queries, relevant = build_text_queries([sample["captions"] for sample in samples], ids)
    with torch.no_grad():
        images = torch.stack([transform(sample["image"]) for sample in samples])  # [300, 3, H, W]
        image_emb = torch.cat([model.encode_image(chunk) for chunk in images.split(100)])
        text_emb = model.encode_text(model.tokenizer(queries))
        classifier = build_zeroshot_classifier(
            lambda texts: model.encode_text(model.tokenizer(texts)), info["class_names"], info["templates"]
        )
    direct = retrieval_metrics(image_emb, ids, text_emb, relevant, ks=(1, 5, 10), ranking_k=10)
    direct.update(zeroshot_metrics(image_emb, torch.tensor([s["label"] for s in samples]), classifier))
    direct_metrics = {key: value for key, value in direct.items() if "num_" not in key}
    assert set(direct_metrics) == set(results["metrics"])
    for key, value in direct_metrics.items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert direct["num_texts"] == results["num_texts"] and direct["num_images"] == results["num_images"]


@pytest.mark.slow
def test_eval_retrieval_task_on_a_split_overwrites_existing_results(
    trained_checkpoint, digits_root, tmp_path
):
    output = tmp_path / "val.json"
    output.write_text("old results")
    code = main(
        [
            "eval",
            "--model",
            str(trained_checkpoint),
            "--data",
            str(digits_root),
            "--split",
            "val",
            "--task",
            "retrieval",
            "--num-workers",
            "0",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    results = json.loads(output.read_text())
    assert results["task"] == "retrieval" and results["num_images"] == 200
    assert "acc1" not in results["metrics"] and "image_retrieval_recall@1" in results["metrics"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.json", "val_examples.png", "val_recall.png"]


@pytest.mark.slow
def test_eval_refuses_data_without_captions(trained_checkpoint, tmp_path, capsys):
    data = write_shards(
        tmp_path / "bare",
        num_samples=6,
        samples_per_shard=3,
        corrupt=dict.fromkeys(range(6), "missing_caption"),
    )
    output = tmp_path / "out" / "results.json"
    message = assert_refused(
        ["--model", str(trained_checkpoint), "--data", str(data)], capsys, output, "no captions", str(data)
    )
    assert "6 samples" in message


@pytest.mark.slow
def test_eval_zeroshot_needs_class_names(trained_checkpoint, tmp_path, capsys):
    data = write_img2dataset_shards(tmp_path / "web", num_samples=6, samples_per_shard=6)
    output = tmp_path / "results.json"
    assert_refused(
        ["--model", str(trained_checkpoint), "--data", str(data), "--task", "zeroshot"],
        capsys,
        output,
        "class_names",
        "--task retrieval",
    )
    # auto on the same data: retrieval only, and it works on img2dataset shards as they are
    assert (
        main(
            [
                "eval",
                "--model",
                str(trained_checkpoint),
                "--data",
                str(data),
                "--num-workers",
                "0",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    results = json.loads(output.read_text())
    assert results["task"] == "retrieval" and results["num_images"] == 6 and "acc1" not in results["metrics"]
