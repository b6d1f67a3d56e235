"""The pictures `mmret eval` draws tell the truth (issue 20): a reranked evaluation shows the first-stage and the
reranked lists and curves (not a copy of the first-stage pictures), and a zero-shot one frames images by label.

.venv/bin/pytest tests/test_pictures.py -q            # default tier: fake embeddings, the real digits images
.venv/bin/pytest tests/test_pictures.py -q -m slow    # `mmret eval` with and without --reranker, tiny models
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmret.cli import main
from mmret.evaluation.metrics import IMAGE_RETRIEVAL, TEXT_RETRIEVAL, build_text_queries
from mmret.evaluation.plots import (
    CORRECT,
    FIRST_STAGE,
    RERANKED,
    WRONG,
    examples_layout,
    recall_series,
)
from mmret.evaluation.rerank import rerank_lists, reranked_recall_curves, two_stage_summary
from mmret.evaluation.results import EvalOptions, retrieval_examples, write_pictures
from mmret.evaluation.retrieval import EmbeddedEvalSet, caption_hash, recall_curves
from tests.test_cross_encoder import trained_pair  # noqa: F401  (fixture)
from tests.test_rerank_eval import fake_eval_set, oracle_for

TOP_K = 10  # rerank depth of the fake runs


def no_images(image_ids: set[int]) -> dict:
    return {}  # every image drawn as a blank square: the frames are what is checked


@pytest.fixture
def reranked_run():
    """A fake eval set whose first stage is imperfect, reranked by an oracle over its top 10."""
    eval_set = fake_eval_set()
    return eval_set, rerank_lists(eval_set, oracle_for(eval_set), TOP_K)


def test_rerank_examples_show_both_rankings_labelled_and_framed(reranked_run):
    eval_set, lists = reranked_run
    examples = retrieval_examples(eval_set, no_images, num_examples=6, top_k=8, reranked=lists)
    rows = examples_layout(examples)
    assert [(row.example, row.label) for row in rows] == [
        (example, label) for example in range(6) for label in (FIRST_STAGE, RERANKED)
    ]
    image_ids = eval_set.image_ids.tolist()
    reranked_ids, _, positions = lists[IMAGE_RETRIEVAL].ranked(range(6))
    moved = 0
    for query, example in enumerate(examples):
        first, reranked = example.rankings
        relevant = eval_set.text_relevant[query]
        ids = [image_ids[index] for index in reranked_ids[query, :8].tolist()]
        # frames follow relevance; the oracle puts every relevant image of the top 10 first
        assert reranked.correct == [image_id in relevant for image_id in ids]
        found = sum(reranked.correct)
        assert reranked.correct == [True] * found + [False] * (8 - found)
        assert found >= sum(first.correct)
        assert rows[2 * query + 1].frames == tuple(CORRECT if flag else WRONG for flag in reranked.correct)
        # a moved image says where the first stage had it
        for rank, position in enumerate(positions[query, :8].tolist()):
            if position != rank:
                moved += 1
                assert reranked.notes[rank] == f"was #{position + 1}"
                assert rows[2 * query + 1].captions[rank].endswith(f"was #{position + 1}")
    assert moved > 0
    assert any(e.rankings[1].correct[0] and not e.rankings[0].correct[0] for e in examples)  # fixed at #1


def test_first_stage_examples_keep_one_unlabelled_row_per_query():
    eval_set = fake_eval_set()
    examples = retrieval_examples(eval_set, no_images, num_examples=4, top_k=5)
    rows = examples_layout(examples)
    assert [(row.example, row.label, len(row.frames)) for row in rows] == [(q, "", 5) for q in range(4)]
    assert all(len(example.rankings) == 1 for example in examples)


def test_reranked_row_continues_with_the_first_stage_past_the_rerank_depth():
    eval_set = fake_eval_set()
    lists = rerank_lists(eval_set, oracle_for(eval_set), 3)
    examples = retrieval_examples(eval_set, no_images, num_examples=3, top_k=6, reranked=lists)
    for example in examples:
        first, reranked = example.rankings
        assert len(reranked.images) == 6
        assert list(reranked.notes[3:]) == ["not reranked"] * 3
        assert list(reranked.scores[3:]) == list(first.scores[3:])  # the first stage's ranks 4-6, in order


def test_reranked_recall_curves_stop_at_the_depth_and_meet_the_first_stage(reranked_run):
    eval_set, lists = reranked_run
    curves = recall_curves(eval_set, 50)
    reranked = reranked_recall_curves(eval_set, lists)
    metrics, ceiling = two_stage_summary(eval_set, lists, TOP_K)
    for direction in (IMAGE_RETRIEVAL, TEXT_RETRIEVAL):
        assert len(reranked[direction]) == TOP_K
        assert reranked[direction][0] == pytest.approx(metrics[f"{direction}_recall@1"])
        assert reranked[direction][-1] == pytest.approx(ceiling[f"{direction}_recall@{TOP_K}"])
        assert reranked[direction][-1] == pytest.approx(curves[direction][TOP_K - 1])
    series = recall_series(curves, reranked, TOP_K)
    assert [(line.direction, line.stage) for line in series] == [
        (IMAGE_RETRIEVAL, FIRST_STAGE),
        (IMAGE_RETRIEVAL, RERANKED),
        (TEXT_RETRIEVAL, FIRST_STAGE),
        (TEXT_RETRIEVAL, RERANKED),
    ]
    for line in series:
        expected = reranked if line.stage == RERANKED else curves
        assert line.values == pytest.approx(expected[line.direction])
        assert line.ks == tuple(range(1, len(expected[line.direction]) + 1))
        assert line.stage in line.label and (line.stage == FIRST_STAGE or f"top {TOP_K}" in line.label)
    # without a reranker: the first-stage lines alone, labelled as before
    alone = recall_series(curves)
    assert [line.stage for line in alone] == [FIRST_STAGE, FIRST_STAGE]
    assert alone[0].label.startswith("image retrieval (text query → images): R@1 ")


def test_rerank_pictures_differ_from_the_first_stage_pictures(reranked_run, tmp_path):
    """Issue 20: shapes_rerank_examples.png and _recall.png were byte-identical to the first stage's."""
    eval_set, lists = reranked_run
    options = EvalOptions(model="m.ckpt", output=str(tmp_path / "r.json"))
    title = "m.ckpt on data"  # the same title: the difference must come from the content
    first = write_pictures(eval_set, [], {}, tmp_path / "first", options, title=title)
    reranked = write_pictures(eval_set, [], {}, tmp_path / "rerank", options, title=title, reranked=lists)
    assert [path.name for path in reranked] == ["rerank_examples.png", "rerank_recall.png"]
    for before, after in zip(first, reranked):
        assert before.read_bytes() != after.read_bytes()
    with Image.open(first[0]) as one_row, Image.open(reranked[0]) as two_rows:
        assert two_rows.size[1] > 1.6 * one_row.size[1]  # a second row of images per query
    again = write_pictures(eval_set, [], {}, tmp_path / "again", options, title=title)
    assert [path.read_bytes() for path in again] == [path.read_bytes() for path in first]  # deterministic


# ---- zero-shot: framed by label --------------------------------------------------------------------------------
def digits_eval_set(test_dir: Path):
    """The digits test split with embeddings that know the class (images: the label's axis plus noise; captions:
    their digit's axis), so each query's top images are its class, most of them not captioned with it."""
    from mmret.data.samples import SkipCounter, decode_sample, iter_shard

    shards = sorted(str(path) for path in test_dir.glob("*.tar"))
    samples = sorted(
        (decode_sample(raw) for shard in shards for raw in iter_shard(shard, SkipCounter())),
        key=lambda sample: sample["sample_id"],
    )
    ids = [sample["sample_id"] for sample in samples]
    labels = torch.tensor([sample["label"] for sample in samples])
    captions, relevant = build_text_queries([sample["captions"] for sample in samples], ids)
    order = sorted(range(len(captions)), key=lambda q: caption_hash(captions[q]))
    label_of_id = dict(zip(ids, labels.tolist()))
    generator = torch.Generator().manual_seed(0)
    image_emb = F.normalize(
        F.one_hot(labels, 16).float() + 0.3 * torch.rand(len(ids), 16, generator=generator)
    )
    text_emb = F.one_hot(torch.tensor([label_of_id[relevant[q][0]] for q in order]), 16).float()
    eval_set = EmbeddedEvalSet(
        image_emb=image_emb, image_ids=torch.tensor(ids), labels=labels,
        image_unseen=torch.zeros(len(ids), dtype=torch.bool), text_emb=text_emb,
        text_relevant=[set(relevant[q]) for q in order], text_unseen=torch.zeros(len(order), dtype=torch.bool),
        captions=[captions[q] for q in order],
    )  # fmt: skip
    return eval_set, [SimpleNamespace(shards=shards)], {s["sample_id"]: s["key"] for s in samples}


def test_zeroshot_examples_frame_digits_by_label_not_by_caption(digits_root, tmp_path):
    """Issue 20: in digits_zeroshot_examples.png a 3 retrieved for "a handwritten 3" was framed wrong when that
    scan's captions happened to be others ("the number three", ...)."""
    from mmret.data.digits import CLASS_NAMES

    eval_set, sources, keys = digits_eval_set(digits_root / "test")
    every = eval_set.num_texts
    by_label = retrieval_examples(eval_set, no_images, every, 8, class_names=CLASS_NAMES)
    by_caption = retrieval_examples(eval_set, no_images, every, 8)
    image_ids, labels = eval_set.image_ids.tolist(), eval_set.labels.tolist()
    label_of_id = dict(zip(image_ids, labels))
    query = next(q for q, example in enumerate(by_label) if example.note == "class three")
    assert "3" in eval_set.captions[query] or "three" in eval_set.captions[query]
    assert by_label[query].num_correct == labels.count(3)  # every 3 of the set, not the caption's images
    # the top 8 are all 3s (the embeddings know the class): all framed correct by label ...
    ranking = by_label[query].rankings[0]
    assert all(ranking.correct) and examples_layout([by_label[query]])[0].frames == (CORRECT,) * 8
    # ... while by caption the 3s whose captions differ were framed wrong
    top = by_caption[query].rankings[0]
    top_ids = [
        image_ids[index] for index in torch.topk(eval_set.image_emb @ eval_set.text_emb[query], 8).indices
    ]
    assert [label_of_id[image_id] for image_id in top_ids] == [3] * 8
    captioned_otherwise = [image_id not in eval_set.text_relevant[query] for image_id in top_ids]
    assert any(captioned_otherwise)
    assert list(top.correct) == [not flag for flag in captioned_otherwise]
    assert by_caption[query].num_correct == len(eval_set.text_relevant[query]) < labels.count(3)
    for example in by_label:  # every query is a digit: a class, and only images of it are correct
        assert example.note.startswith("class ")
    # the picture itself, with the real scans
    options = EvalOptions(model="m.ckpt", output=str(tmp_path / "digits.json"))
    pictures = write_pictures(eval_set, sources, keys, tmp_path / "digits_zeroshot", options, title="zero-shot",
                              class_names=CLASS_NAMES)  # fmt: skip
    by_caption_pictures = write_pictures(
        eval_set, sources, keys, tmp_path / "by_caption", options, title="zero-shot"
    )
    assert pictures[0].read_bytes() != by_caption_pictures[0].read_bytes()


def test_a_query_without_a_single_class_is_framed_by_caption():
    eval_set = fake_eval_set(num_images=12, num_texts=12)
    eval_set.labels = torch.arange(12) % 3
    examples = retrieval_examples(eval_set, no_images, 12, 4, class_names=["a", "b", "c"])
    for query, example in enumerate(examples):
        relevant_labels = {int(eval_set.labels[image_id // 10]) for image_id in eval_set.text_relevant[query]}
        if len(relevant_labels) == 1:
            assert example.note.endswith(f"class {'abc'[relevant_labels.pop()]}")
        else:  # two images of different classes: no class to frame by
            assert "class" not in example.note
            assert example.num_correct == len(eval_set.text_relevant[query])


# ---- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_with_a_reranker_draws_the_reranked_lists_and_curves(trained_pair, digits_root, tmp_path):  # noqa: F811
    dual, reranker = trained_pair
    common = ["--model", str(dual), "--data", str(digits_root), "--device", "cpu", "--num-workers", "0",
              "--task", "retrieval"]  # fmt: skip
    assert main(["eval", *common, "--output", str(tmp_path / "first.json")]) == 0
    output = tmp_path / "rerank.json"
    assert main(["eval", *common, "--reranker", str(reranker), "--top-k", "5", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["pictures"] == [str(tmp_path / "rerank_examples.png"), str(tmp_path / "rerank_recall.png")]
    for name in ("examples", "recall"):
        assert (tmp_path / f"rerank_{name}.png").read_bytes() != (tmp_path / f"first_{name}.png").read_bytes()
    with (
        Image.open(tmp_path / "first_examples.png") as one,
        Image.open(tmp_path / "rerank_examples.png") as two,
    ):
        assert two.size[1] > 1.6 * one.size[1]
