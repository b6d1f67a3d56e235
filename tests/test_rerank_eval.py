"""Retrieve-then-rerank evaluation (`mmret eval --reranker CKPT --top-k K`).

.venv/bin/pytest tests/test_rerank_eval.py -q            # default tier: oracle / identity rerankers, fusion
.venv/bin/pytest tests/test_rerank_eval.py -q -m slow    # `mmret eval --reranker` on tiny trained models
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmret.cli import main
from mmret.evaluation.rerank import fuse_scores, rerank_lists, two_stage_metrics, two_stage_summary
from mmret.evaluation.retrieval import EmbeddedEvalSet, evaluation_metrics
from tests.fit_args import CROSS_ENCODER, DUAL_ENCODER, fit_argv


def fake_eval_set(num_images=30, num_texts=24, seed=0) -> EmbeddedEvalSet:
    """Noisy embeddings: the first stage is imperfect; some captions are relevant to two images."""
    generator = torch.Generator().manual_seed(seed)
    image_emb = F.normalize(torch.randn(num_images, 16, generator=generator), dim=1)
    relevant = [
        {t % num_images} | ({(t + 7) % num_images} if t % 4 == 0 else set()) for t in range(num_texts)
    ]
    text_emb = torch.stack([image_emb[sorted(r)].mean(0) for r in relevant])
    text_emb = F.normalize(text_emb + 0.5 * torch.randn(text_emb.shape, generator=generator), dim=1)
    image_unseen = torch.arange(num_images) % 3 == 0
    text_unseen = torch.tensor([any(bool(image_unseen[i]) for i in r) for r in relevant])
    return EmbeddedEvalSet(
        image_emb=image_emb, image_ids=torch.arange(num_images) * 10, labels=torch.full((num_images,), -1),
        image_unseen=image_unseen, text_emb=text_emb, text_relevant=[{i * 10 for i in r} for r in relevant],
        text_unseen=text_unseen, captions=[f"caption {t}" for t in range(num_texts)],
    )  # fmt: skip


def oracle_for(eval_set: EmbeddedEvalSet):
    """A perfect reranker: 1 for a relevant (text, image) pair, 0 otherwise."""
    ids = eval_set.image_ids.tolist()

    def score(text_index, image_index):
        return torch.tensor(
            [
                float(ids[i] in eval_set.text_relevant[t])
                for t, i in zip(text_index.tolist(), image_index.tolist())
            ]
        )

    return score


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_oracle_reranker_reaches_the_first_stage_recall_at_k_ceiling(top_k):
    eval_set = fake_eval_set()
    first_stage = evaluation_metrics(eval_set, ks=(1, top_k))
    reranked, ceiling = two_stage_metrics(eval_set, oracle_for(eval_set), top_k, ks=(1, top_k))
    for direction in ("image_retrieval", "text_retrieval"):
        for prefix in ("", "seen/", "unseen/"):
            name = f"{prefix}{direction}_recall@{top_k}"
            assert ceiling[name] == pytest.approx(
                first_stage[name]
            )  # the lists hold what the first stage had
            assert reranked[f"{prefix}{direction}_recall@1"] == pytest.approx(ceiling[name])
    assert (
        first_stage["image_retrieval_recall@1"] < first_stage[f"image_retrieval_recall@{top_k}"] or top_k == 1
    )


def test_first_stage_scores_as_the_reranker_reproduce_the_first_stage_metrics():
    eval_set = fake_eval_set(seed=1)
    first_stage = evaluation_metrics(eval_set, ks=(1, 5))

    def cosine(text_index, image_index):
        return (eval_set.text_emb[text_index] * eval_set.image_emb[image_index]).sum(1)

    reranked, _ = two_stage_metrics(eval_set, cosine, 10, ks=(1, 5))
    for name in ("image_retrieval_recall@1", "text_retrieval_recall@5", "unseen/image_retrieval_ndcg@10"):
        assert reranked[name] == pytest.approx(first_stage[name])
    # fusion weight 1 ignores the reranker altogether (here: the oracle)
    fused, _ = two_stage_metrics(eval_set, oracle_for(eval_set), 10, ks=(1, 5), fusion_weight=1.0)
    assert fused["image_retrieval_recall@1"] == pytest.approx(first_stage["image_retrieval_recall@1"])


def test_reranked_lists_keep_what_the_metrics_were_computed_on():
    """`rerank_lists` + `two_stage_summary` (what `mmret eval` runs, to draw the lists too) equal
    `two_stage_metrics`, and `ranked()` orders each list by the reranker, remembering first-stage positions."""
    eval_set = fake_eval_set(seed=2)
    oracle = oracle_for(eval_set)
    lists = rerank_lists(eval_set, oracle, 5)
    assert two_stage_summary(eval_set, lists, 5, ks=(1, 5)) == two_stage_metrics(
        eval_set, oracle, 5, ks=(1, 5)
    )
    image_lists = lists["image_retrieval"]
    assert image_lists.depth == 5 and lists["text_retrieval"].depth == 5
    indices, scores, positions = image_lists.ranked([0, 3])
    for row, query in enumerate([0, 3]):
        assert scores[row].tolist() == sorted(scores[row].tolist(), reverse=True)
        first_stage = image_lists.candidates.indices[query]
        assert indices[row].tolist() == first_stage[positions[row]].tolist()
        relevant = {
            index
            for index in range(eval_set.num_images)
            if int(eval_set.image_ids[index]) in eval_set.text_relevant[query]
        }
        flags = [index in relevant for index in indices[row].tolist()]
        assert flags == sorted(flags, reverse=True)  # the oracle's relevant candidates first
        unmoved = [position for rank, position in enumerate(positions[row].tolist()) if not flags[rank]]
        assert unmoved == sorted(unmoved)  # equal scores keep the first-stage order


def test_fuse_scores_standardises_each_list():
    first = torch.tensor([[10.0, 20.0, 30.0]])
    second = torch.tensor([[3.0, 2.0, 1.0]])
    assert torch.equal(fuse_scores(first, second, 0.0), second)
    assert fuse_scores(first, second, 0.5).abs().max() < 1e-6  # opposite orders cancel out


def test_eval_refuses_a_bad_top_k_and_fusion(tmp_path, capsys):
    output = tmp_path / "r.json"
    base = ["eval", "--model", str(tmp_path / "m.ckpt"), "--data", str(tmp_path), "--output", str(output)]
    for extra, word in [(["--top-k", "0"], "--top-k"), (["--fusion", "2"], "--fusion"),
                        (["--reranker", str(tmp_path / "nope.ckpt")], "--reranker")]:  # fmt: skip
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0]
    assert not output.exists()


@pytest.mark.slow
def test_eval_with_a_reranker_writes_reranked_metrics_and_the_ceiling(tmp_path_factory, digits_root):
    common = dict(train=digits_root / "train", samples_per_epoch=32, max_epochs=1, limit_val_batches=0)
    dual_dir, reranker_dir = tmp_path_factory.mktemp("dual"), tmp_path_factory.mktemp("reranker")
    assert (
        main(fit_argv(module=DUAL_ENCODER, model_args={"warmup_steps": 1}, run_dir=dual_dir, **common)) == 0
    )
    dual = dual_dir / "checkpoints" / "last.ckpt"
    reranker_args = {"dual_encoder": dual, "fusion_width": 32, "fusion_layers": 1, "fusion_heads": 2,
                     "num_negatives": 3, "warmup_steps": 1}  # fmt: skip
    assert main(fit_argv(module=CROSS_ENCODER, model=None, model_args=reranker_args, run_dir=reranker_dir,
                         **common)) == 0  # fmt: skip
    reranker = reranker_dir / "checkpoints" / "last.ckpt"
    output = tmp_path_factory.mktemp("eval") / "r.json"
    assert main(["eval", "--model", str(dual), "--reranker", str(reranker), "--top-k", "5", "--data",
                 str(digits_root), "--output", str(output), "--device", "cpu", "--num-workers", "0",
                 "--task", "retrieval"]) == 0  # fmt: skip
    results = json.loads(output.read_text())
    assert results["top_k"] == 5
    assert set(results["reranked_metrics"]) >= {"image_retrieval_recall@1", "text_retrieval_ndcg@10"}
    ceiling = results["first_stage_ceiling"]["image_retrieval_recall@5"]
    assert ceiling == pytest.approx(results["metrics"]["image_retrieval_recall@5"])
    assert results["reranked_metrics"]["image_retrieval_recall@1"] <= ceiling + 1e-9
    # the models' places are checked: a dual encoder as --reranker is refused
    assert main(["eval", "--model", str(dual), "--reranker", str(dual), "--data", str(digits_root),
                 "--output", str(output.with_name("bad.json")), "--device", "cpu"]) == 2  # fmt: skip
