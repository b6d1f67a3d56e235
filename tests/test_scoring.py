"""Tests of mmret.evaluation.metrics: retrieval metrics from embeddings, text-query dedupe, zero-shot, dedupe_by_id."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DistributedSampler
from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG

from mmret.evaluation.metrics import (
    build_text_queries,
    build_zeroshot_classifier,
    dedupe_by_id,
    retrieval_metrics,
    zeroshot_metrics,
)

# Three images along the axes; "a vehicle" was written for both a and b.
IMAGE_IDS = ["a", "b", "c"]
IMAGE_EMB = torch.eye(3)
CAPTIONS = [["red car", "a vehicle"], ["blue car", "a vehicle", "blue car"], ["a tree"]]
# Unnormalised on purpose: retrieval_metrics uses cosine similarity.
TEXT_EMB = {
    "red car": [2.0, 1.0, 0.0],  # a first
    "a vehicle": [0.0, 1.0, 1.0],  # b ties with the irrelevant c, so b ranks 2nd and a 3rd
    "blue car": [1.0, 0.0, 1.0],  # b last
    "a tree": [0.0, 0.0, 3.0],  # c first
}


def tiny_retrieval(**kwargs):
    captions, relevant = build_text_queries(CAPTIONS, IMAGE_IDS)
    text_emb = torch.tensor([TEXT_EMB[caption] for caption in captions])
    return retrieval_metrics(IMAGE_EMB, IMAGE_IDS, text_emb, relevant, ks=(1, 2), ranking_k=3, **kwargs)


def test_build_text_queries_dedupes_captions_across_and_within_images():
    captions, relevant = build_text_queries(CAPTIONS, IMAGE_IDS)
    assert captions == ["red car", "a vehicle", "blue car", "a tree"]
    assert relevant == [["a"], ["a", "b"], ["b"], ["c"]]


def test_retrieval_metrics_on_hand_made_embeddings():
    result = tiny_retrieval()
    ideal_two = 1 + 1 / math.log2(3)  # ideal DCG@3 of a query with two relevant items
    expected = {
        "num_images": 3,
        "num_texts": 4,
        # text -> image; best relevant ranks per query: 1, 2 (and 3), 3, 1
        "image_retrieval_recall@1": 2 / 4,
        "image_retrieval_recall@2": 3 / 4,
        "image_retrieval_mrr@3": (1 + 1 / 2 + 1 / 3 + 1) / 4,
        "image_retrieval_ndcg@3": (1 + (1 / math.log2(3) + 1 / 2) / ideal_two + 1 / 2 + 1) / 4,
        "image_retrieval_map@3": (1 + (1 / 2 + 2 / 3) / 2 + 1 / 3 + 1) / 4,
        "image_retrieval_num_queries": 4,
        "image_retrieval_num_queries_without_relevant": 0,
        # image -> text; a: "red car" 1st, "a vehicle" tied at 0 with "a tree" -> 4th; b likewise; c: 1st
        "text_retrieval_recall@1": 1.0,
        "text_retrieval_recall@2": 1.0,
        "text_retrieval_mrr@3": 1.0,
        "text_retrieval_ndcg@3": (1 / ideal_two + 1 / ideal_two + 1) / 3,
        "text_retrieval_map@3": (1 / 2 + 1 / 2 + 1) / 3,
        "text_retrieval_num_queries": 3,
        "text_retrieval_num_queries_without_relevant": 0,
    }
    assert result == pytest.approx(expected)


def test_query_groups_report_prefixed_subsets():
    result = tiny_retrieval(
        text_query_groups={"unseen": torch.tensor([1, 2])},
        image_query_groups={"unseen": torch.tensor([False, False, True]), "seen": torch.tensor([0, 1])},
    )
    assert result["unseen/image_retrieval_recall@1"] == 0.0
    assert result["unseen/image_retrieval_mrr@3"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result["unseen/image_retrieval_num_queries"] == 2
    assert result["unseen/text_retrieval_map@3"] == 1.0
    assert result["seen/text_retrieval_map@3"] == pytest.approx(1 / 2)
    assert "seen/image_retrieval_recall@1" not in result


def test_image_without_captions_is_a_counted_excluded_query():
    image_emb = torch.cat([IMAGE_EMB, torch.tensor([[-1.0, -1.0, -1.0]])])  # far from every caption
    captions, relevant = build_text_queries([*CAPTIONS, []], [*IMAGE_IDS, "d"])
    text_emb = torch.tensor([TEXT_EMB[caption] for caption in captions])
    with_d = retrieval_metrics(image_emb, [*IMAGE_IDS, "d"], text_emb, relevant, ks=(1, 2), ranking_k=3)
    assert with_d["text_retrieval_num_queries"] == 3
    assert with_d["text_retrieval_num_queries_without_relevant"] == 1
    without_d = tiny_retrieval()
    assert with_d["text_retrieval_ndcg@3"] == pytest.approx(without_d["text_retrieval_ndcg@3"])


def test_single_image_id_per_text_equals_sets():
    generator = torch.Generator().manual_seed(0)
    image_emb = torch.randn(6, 4, generator=generator)
    text_emb = torch.randn(12, 4, generator=generator)
    owner = torch.arange(12) % 6
    from_tensor = retrieval_metrics(image_emb, torch.arange(6) + 100, text_emb, owner + 100)
    from_sets = retrieval_metrics(image_emb, list(range(100, 106)), text_emb, [{int(i) + 100} for i in owner])
    assert from_tensor == pytest.approx(from_sets)


def test_retrieval_metrics_match_torchmetrics_in_both_directions():
    generator = torch.Generator().manual_seed(1)
    image_emb = F.normalize(torch.randn(20, 8, generator=generator, dtype=torch.float64), dim=1)
    owner = torch.arange(60) % 20  # three captions per image
    text_emb = F.normalize(
        image_emb[owner] + 0.9 * torch.randn(60, 8, generator=generator, dtype=torch.float64)
    )
    result = retrieval_metrics(image_emb, torch.arange(20), text_emb, owner, ks=(1, 5), ranking_k=5)
    relevant = owner[:, None] == torch.arange(20)[None, :]  # [60 texts, 20 images]
    scores = text_emb @ image_emb.T
    for direction, preds, target in (("image", scores, relevant), ("text", scores.T, relevant.T)):
        indexes = torch.arange(preds.shape[0]).repeat_interleave(preds.shape[1])
        for name, metric_cls, k in (("recall@1", RetrievalHitRate, 1), ("recall@5", RetrievalHitRate, 5)) + (
            ("ndcg@5", RetrievalNormalizedDCG, 5),
        ):
            expected = float(metric_cls(top_k=k)(preds.reshape(-1), target.reshape(-1), indexes=indexes))
            assert result[f"{direction}_retrieval_{name}"] == pytest.approx(expected, abs=1e-6), (
                direction,
                name,
            )


def test_retrieval_metrics_reject_bad_ids():
    with pytest.raises(ValueError, match="duplicates"):
        retrieval_metrics(torch.eye(2), [1, 1], torch.eye(2), [1, 1])
    with pytest.raises(ValueError, match="not in image_ids"):
        retrieval_metrics(torch.eye(2), [1, 2], torch.eye(2), [1, 3])


def fake_text_encoder(calls):
    """Prompt -> fixed vector: the class word picks the axis, the template adds a tilt."""
    axis = {"cat": 0, "dog": 1, "car": 2}

    def encode_text(texts):
        calls.append(len(texts))
        rows = []
        for text in texts:
            vector = torch.zeros(4)
            vector[axis[text.split()[-1].rstrip(".")]] = 2.0
            vector[3] = 1.0 if text.startswith("a photo") else -1.0
            rows.append(vector)
        return torch.stack(rows)

    return encode_text


def test_zeroshot_classifier_averages_normalised_templates():
    calls = []
    templates = ["a photo of a {}.", lambda name: f"a drawing of a {name}."]
    classifier = build_zeroshot_classifier(fake_text_encoder(calls), ["cat", "dog", "car"], templates, 2)
    # Per class: normalise (2, ±1) templates, average -> (2/sqrt5, 0) on the class axis, renormalise -> 1.
    assert torch.allclose(classifier, torch.eye(3, 4), atol=1e-6)
    assert calls == [4, 2]  # two classes x two templates, then the last class


def test_zeroshot_metrics_on_hand_made_case():
    classifier = torch.eye(3)
    image_emb = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # label 0: correct
            [0.2, 0.1, 0.7],  # label 0: 2nd
            [0.0, 1.0, 0.0],  # label 1: correct
            [0.6, 0.4, 0.0],  # label 1: 2nd
            [0.5, 0.0, 0.5],  # label 2: tied with class 0 -> counted 2nd (pessimistic)
        ]
    )
    labels = torch.tensor([0, 0, 1, 1, 2])
    result = zeroshot_metrics(image_emb, labels, classifier, ks=(1, 2))
    assert result == pytest.approx(
        {"acc1": 2 / 5, "acc2": 5 / 5, "mean_per_class_recall": (1 / 2 + 1 / 2 + 0) / 3}
    )


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_zeroshot_mean_per_class_recall_matches_sklearn():
    generator = torch.Generator().manual_seed(2)
    image_emb = torch.randn(200, 16, generator=generator)
    classifier = F.normalize(torch.randn(7, 16, generator=generator), dim=1)
    labels = torch.randint(0, 6, (200,), generator=generator)  # class 6 never occurs
    result = zeroshot_metrics(image_emb, labels, classifier, ks=(1, 5), chunk_size=17)
    logits = image_emb @ classifier.T
    predictions = logits.argmax(dim=1)
    assert result["acc1"] == pytest.approx(float((predictions == labels).float().mean()))
    top5 = logits.topk(5, dim=1).indices
    assert result["acc5"] == pytest.approx(float((top5 == labels[:, None]).any(dim=1).float().mean()))
    expected = balanced_accuracy_score(labels.numpy(), predictions.numpy())
    assert result["mean_per_class_recall"] == pytest.approx(expected)


def test_dedupe_by_id_keeps_first_occurrence_sorted_by_id():
    ids = torch.tensor([3, 1, 2, 1, 3])
    emb = torch.arange(10.0).reshape(5, 2)
    unique_ids, unique_emb = dedupe_by_id(ids, emb)
    assert unique_ids.tolist() == [1, 2, 3]
    assert unique_emb.tolist() == [[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]]
    keys, labels = dedupe_by_id(["b", "a", "b"], torch.tensor([7, 8, 9]))
    assert keys == ["a", "b"] and labels.tolist() == [8, 7]


def test_dedupe_makes_padded_ddp_gather_equal_single_process():
    """DistributedSampler pads 7 samples to 2 x 4 by repeating some; dedupe restores the exact 7."""
    generator = torch.Generator().manual_seed(3)
    image_emb = torch.randn(7, 5, generator=generator)
    text_emb = image_emb + 0.5 * torch.randn(7, 5, generator=generator)
    sample_ids = torch.arange(7)
    per_rank = [
        list(DistributedSampler(range(7), num_replicas=2, rank=rank, shuffle=False)) for rank in range(2)
    ]
    gathered = torch.tensor(per_rank[0] + per_rank[1])  # what an all_gather would concatenate
    assert gathered.numel() == 8
    ids, images, texts = dedupe_by_id(sample_ids[gathered], image_emb[gathered], text_emb[gathered])
    assert torch.equal(ids, sample_ids)
    assert retrieval_metrics(images, ids, texts, ids) == retrieval_metrics(
        image_emb, sample_ids, text_emb, sample_ids
    )


@pytest.mark.gpu
def test_cuda_embeddings_give_the_cpu_result():
    generator = torch.Generator().manual_seed(4)
    image_emb = torch.randn(300, 32, generator=generator)
    text_emb = image_emb.repeat_interleave(2, dim=0) + torch.randn(600, 32, generator=generator)
    owner = torch.arange(300).repeat_interleave(2)
    on_cpu = retrieval_metrics(image_emb, torch.arange(300), text_emb, owner)
    on_gpu = retrieval_metrics(image_emb.cuda(), torch.arange(300), text_emb.cuda(), owner)
    assert on_gpu == pytest.approx(on_cpu, abs=1e-6)  # matmul rounding may differ; rankings here do not
    classifier = F.normalize(torch.randn(10, 32, generator=generator), dim=1)
    labels = torch.arange(300) % 10
    assert zeroshot_metrics(image_emb.cuda(), labels, classifier.cuda()) == pytest.approx(
        zeroshot_metrics(image_emb, labels, classifier)
    )
