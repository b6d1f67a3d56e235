"""Hard-negative mining (`mmret mine`): positives never returned, rank range and margins respected, the file.

.venv/bin/pytest tests/test_mining.py -q             # default tier: the mining function, CLI refusals
.venv/bin/pytest tests/test_mining.py -q -m slow     # `mmret mine` on a checkpoint trained for 2 steps
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmret.cli import main
from mmret.data.mined_negatives import read_mined_negatives
from mmret.mining.offline import mine_hard_negatives


def random_problem(num_queries=40, num_candidates=60, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(num_queries, dim, generator=generator), dim=1)
    candidates = F.normalize(torch.randn(num_candidates, dim, generator=generator), dim=1)
    positives = [
        torch.randperm(num_candidates, generator=generator)[: 1 + q % 3].tolist() for q in range(num_queries)
    ]
    candidates[positives[0][0]] = queries[0]  # query 0's positive is also its most similar candidate
    return queries, candidates, positives


def ranked_non_positives(queries, candidates, positives, query):
    scores = queries[query] @ candidates.t()
    order = scores.argsort(descending=True).tolist()
    return [c for c in order if c not in positives[query]], scores


@pytest.mark.parametrize("sampling", ["top", "random"])
def test_mining_never_returns_a_positive_and_respects_the_rank_range(sampling):
    queries, candidates, positives = random_problem()
    mined = mine_hard_negatives(queries, candidates, positives, 5, range_min=3, range_max=12,
                                sampling=sampling, chunk_size=7)  # fmt: skip
    assert len(mined) == len(positives)
    for query, result in enumerate(mined):
        assert not set(result.indices) & set(positives[query])
        ranked, scores = ranked_non_positives(queries, candidates, positives, query)
        assert set(result.indices) <= set(ranked[3:12])
        assert len(result.indices) == 5 and len(set(result.indices)) == 5
        if sampling == "top":
            assert result.indices == ranked[3:8]
        assert result.scores == sorted(result.scores, reverse=True)
        assert result.positive_score == pytest.approx(
            max(scores[p].item() for p in positives[query]), abs=1e-6
        )


def test_margins_drop_candidates_too_close_to_the_positive():
    queries, candidates, positives = random_problem(seed=1)
    margin, relative = 0.1, 0.2
    absolute = mine_hard_negatives(queries, candidates, positives, 60, range_max=60, margin=margin)
    relative_run = mine_hard_negatives(
        queries, candidates, positives, 60, range_max=60, relative_margin=relative
    )
    for query in range(len(positives)):
        ranked, scores = ranked_non_positives(queries, candidates, positives, query)
        positive = absolute[query].positive_score
        expected = [c for c in ranked if scores[c] <= positive - margin]
        assert absolute[query].indices == expected
        assert all(s <= positive * (1 - relative) + 1e-6 for s in relative_run[query].scores)
        assert set(relative_run[query].indices) == {
            c for c in ranked if scores[c] <= positive * (1 - relative)
        }


def test_random_sampling_is_seeded_and_chunking_changes_nothing():
    queries, candidates, positives = random_problem(seed=2)
    one = mine_hard_negatives(queries, candidates, positives, 4, range_max=20, sampling="random", seed=3)
    two = mine_hard_negatives(queries, candidates, positives, 4, range_max=20, sampling="random", seed=3)
    assert [r.indices for r in one] == [r.indices for r in two]
    whole = mine_hard_negatives(queries, candidates, positives, 4, range_max=20, chunk_size=1000)
    chunked = mine_hard_negatives(queries, candidates, positives, 4, range_max=20, chunk_size=3)
    assert [r.indices for r in whole] == [r.indices for r in chunked]


def test_mine_refuses_bad_arguments_with_one_line(tmp_path, capsys):
    output = tmp_path / "mined.jsonl"
    base = ["mine", "--model", str(tmp_path / "none.ckpt"), "--data", str(tmp_path), "--output", str(output)]
    for extra, word in [(["--range-min", "5", "--range-max", "5"], "--range-min"),
                        (["--num-negatives", "0"], "--num-negatives"),
                        (["--relative-margin", "1.5"], "--relative-margin"), ([], "does not exist")]:  # fmt: skip
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0]
    assert not output.exists()


@pytest.mark.slow
def test_mine_cli_writes_negatives_that_are_never_positives(trained_checkpoint, digits_root, tmp_path):
    output = tmp_path / "mined.jsonl"
    assert main(["mine", "--model", str(trained_checkpoint), "--data", str(digits_root), "--split", "val",
                 "--output", str(output), "--num-negatives", "3", "--range-max", "20", "--device", "cpu",
                 "--num-workers", "0"]) == 0  # fmt: skip
    header, records = read_mined_negatives(output)
    assert header["options"]["num_negatives"] == 3 and header["counts"]["queries"] == len(records)
    directions = {r["direction"] for r in records}
    assert directions == {"text_to_image", "image_to_text"}
    for record in records:
        if record["direction"] == "text_to_image":
            assert not set(record["negative_ids"]) & set(record["positive_ids"])
            assert len(record["negative_ids"]) <= 3
        else:
            assert not set(record["negative_captions"]) & set(record["positive_captions"])
    # a reranker checkpoint is refused as --model
    assert (
        main(["mine", "--model", str(output), "--data", str(digits_root), "--output", str(tmp_path / "x")])
        == 2
    )
