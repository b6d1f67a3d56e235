"""The CrossEncoder under 2-process DDP (gloo, CPU): negatives come from every rank, never with the query's
id, and the gradients (listwise loss plus the towers' contrastive term) equal one process on the concatenated
batch.

    .venv/bin/pytest tests/test_cross_encoder_ddp.py -q -m ddp
"""

from __future__ import annotations

import pytest
import torch

from tests.ddp_helpers import run_ddp

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red circle", "two shapes", "a big one"]
IDS = [0, 1, 2, 3, 1, 5]  # id 1 on both ranks: a sample seen twice must never be its own negative


def _module(gather: bool):
    from mmret.training import CrossEncoder

    torch.manual_seed(0)
    return CrossEncoder(model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2,
                        num_negatives=3, negative_sampling="hardest", gather=gather,
                        contrastive_weight=0.5)  # fmt: skip


def _batch(module, rows):
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=generator)[rows]
    captions = [CAPTIONS[r] for r in rows]
    return {"image": images, "text": module.tokenizer(captions), "caption": captions,
            "sample_id": torch.tensor([IDS[r] for r in rows])}  # fmt: skip


def _worker(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from mmret.training import cross_encoder

    picks = []
    original = cross_encoder.sample_hard_negatives

    def recording(similarity, query_ids, candidate_ids, *args, **kwargs):
        indices, valid = original(similarity, query_ids, candidate_ids, *args, **kwargs)
        picks.append((indices, valid, query_ids, candidate_ids))
        return indices, valid

    cross_encoder.sample_hard_negatives = recording
    half = len(CAPTIONS) // world_size
    module = _module(gather=True)
    loss = module.training_step(_batch(module, list(range(rank * half, (rank + 1) * half))), 0)
    loss.backward()
    for indices, valid, query_ids, candidate_ids in picks:
        assert candidate_ids.numel() == len(CAPTIONS)  # the candidates of every rank
        assert not bool(((candidate_ids[indices] == query_ids[:, None]) & valid).any())
    other_rank_rows = set(range(len(CAPTIONS))) - set(range(rank * half, (rank + 1) * half))
    assert any(set(indices[valid].tolist()) & other_rank_rows for indices, valid, _, _ in picks)

    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    for grad in grads.values():
        dist.all_reduce(grad)  # what DDP's averaging does, times world_size
    reference = _module(gather=False)
    cross_encoder.sample_hard_negatives = original
    reference.training_step(_batch(reference, list(range(len(CAPTIONS)))), 0).backward()
    for name, param in reference.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name] / world_size, param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.ddp
def test_two_ranks_draw_negatives_from_both_and_match_one_process():
    run_ddp(_worker, world_size=2)
