"""The CrossEncoder reranker: the online hard-negative sampler, the listwise loss, order invariance, training.

.venv/bin/pytest tests/test_cross_encoder.py -q            # default tier (tiny towers, fake batches)
.venv/bin/pytest tests/test_cross_encoder.py -q -m slow    # `mmret fit` of a reranker from a dual encoder
"""

from __future__ import annotations

import json

import pytest
import torch

from mmret.cli import main
from mmret.losses import listwise_infonce_loss
from mmret.training import CrossEncoder
from mmret.training.checkpoint_io import read_checkpoint
from mmret.training.cross_encoder import sample_hard_negatives
from tests.fit_args import CROSS_ENCODER, DUAL_ENCODER, fit_argv


# ---- the online sampler ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["similarity", "hardest", "uniform"])
def test_sampler_never_picks_a_same_id_pair(mode):
    generator = torch.Generator().manual_seed(0)
    candidate_ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # several captions / crops of one sample
    query_ids = torch.tensor([0, 1, 2, 3])
    for _ in range(50):
        similarity = torch.randn(4, 8, generator=generator)
        similarity[:, :2] += (
            5.0  # the same-id candidates of query 0 are the most similar: must still be skipped
        )
        indices, valid = sample_hard_negatives(
            similarity, query_ids, candidate_ids, 4, mode, generator=generator
        )
        picked = candidate_ids[indices]  # [Q, K]
        assert not bool(((picked == query_ids[:, None]) & valid).any())
        assert bool(valid.all())  # every query has >= 4 allowed candidates here
        for row in indices.tolist():
            assert len(set(row)) == len(row)  # without replacement


def test_sampler_pads_when_too_few_candidates_and_hardest_is_top_k():
    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.3, 0.4, 0.1]])
    ids = torch.tensor([0, 1, 1, 1])
    indices, valid = sample_hard_negatives(similarity, torch.tensor([1, 0]), ids, 3, "hardest")
    assert indices[0, 0].item() == 0 and valid[0].tolist() == [True, False, False]  # only id 0 is allowed
    assert sorted(indices[1].tolist()) == [1, 2, 3] and bool(valid[1].all())


def test_similarity_sampling_prefers_similar_candidates():
    generator = torch.Generator().manual_seed(1)
    similarity = torch.tensor([[0.0, 0.9, 0.1, 0.2, 0.05]])
    counts = torch.zeros(5)
    for _ in range(300):
        indices, _ = sample_hard_negatives(
            similarity, torch.tensor([0]), torch.arange(5), 1, "similarity", 0.1, generator
        )
        counts[indices[0, 0]] += 1
    assert counts[0] == 0 and counts.argmax().item() == 1 and counts[1] > 200


# ---- the listwise loss with several positives ----------------------------------------------------------------
def reference_listwise(scores, positive_mask, candidate_mask, temperature):
    """Per query: mean over positives p of -log(e^s_p / (e^s_p + sum over negatives e^s_n)), by loops."""
    losses = []
    for row in range(scores.shape[0]):
        logits = [s / temperature for s in scores[row].tolist()]
        positives = [c for c in range(len(logits)) if positive_mask[row, c] and candidate_mask[row, c]]
        negatives = [c for c in range(len(logits)) if candidate_mask[row, c] and not positive_mask[row, c]]
        if not positives:
            continue
        terms = []
        for p in positives:
            denominator = torch.tensor([logits[p]] + [logits[n] for n in negatives], dtype=torch.float64)
            terms.append(-(logits[p] - torch.logsumexp(denominator, 0).item()))
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def test_listwise_loss_matches_the_reference_with_several_positives():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    positive_mask = torch.zeros(6, 5, dtype=torch.bool)
    positive_mask[:, 0] = True
    positive_mask[1, 3] = positive_mask[4, 2] = positive_mask[4, 4] = True
    candidate_mask = torch.ones(6, 5, dtype=torch.bool)
    candidate_mask[2, 4] = candidate_mask[5, 1] = False
    ours = listwise_infonce_loss(scores, positive_mask, 0.5, candidate_mask)
    assert ours.item() == pytest.approx(
        reference_listwise(scores, positive_mask, candidate_mask, 0.5), abs=1e-9
    )


# ---- the module ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reranker():
    torch.manual_seed(0)
    return CrossEncoder(
        model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2, num_negatives=3
    )


def fake_batch(module, captions, ids):
    size = module.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    generator = torch.Generator().manual_seed(len(captions))
    return {
        "image": torch.randn(len(captions), 3, *size, generator=generator),
        "text": module.tokenizer(captions),
        "sample_id": torch.tensor(ids),
        "caption": captions,
    }


def test_scores_are_invariant_to_candidate_order_and_batch(reranker):
    reranker.eval()
    batch = fake_batch(
        reranker, ["a red circle", "a blue square left of a red circle", "x", "a green one"], [1, 2, 3, 4]
    )
    with torch.no_grad():
        scores = reranker.score(batch["caption"], batch["image"])  # [4]
        order = torch.tensor([2, 0, 3, 1])
        shuffled = reranker.score([batch["caption"][i] for i in order], batch["image"][order])
        single = torch.stack(
            [reranker.score([batch["caption"][i]], batch["image"][i : i + 1])[0] for i in range(4)]
        )
    torch.testing.assert_close(shuffled, scores[order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, scores, rtol=1e-5, atol=1e-5)


def test_training_step_gives_a_finite_loss_and_gradients(reranker):
    reranker.train()
    captions = ["a red circle", "a blue square", "a red circle", "a green diamond", "a big purple square"]
    loss = reranker.training_step(fake_batch(reranker, captions, [0, 1, 2, 3, 4]), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert reranker.fusion.head.weight.grad is not None
    assert reranker.model.visual.conv1.weight.grad is not None
    reranker.zero_grad(set_to_none=True)


def test_locked_towers_get_no_gradient():
    module = CrossEncoder(model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2,
                          num_negatives=2, lock_image=True, lock_text=True)  # fmt: skip
    loss = module.training_step(fake_batch(module, ["a", "b", "c"], [0, 1, 2]), 0)
    loss.backward()
    assert all(p.grad is None for p in module.model.parameters())
    assert module.fusion.head.weight.grad is not None


def test_contrastive_weight_adds_open_clips_clip_loss_and_trains_the_logit_scale():
    from open_clip.loss import ClipLoss

    options = dict(model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2, num_negatives=2)
    torch.manual_seed(0)
    joint = CrossEncoder(**options, contrastive_weight=0.5).train()
    plain = CrossEncoder(**options).train()
    plain.load_state_dict(joint.state_dict())
    captions = ["a red circle", "a blue square", "a green diamond", "a big purple square"]
    batch = fake_batch(joint, captions, [0, 1, 2, 3])
    torch.manual_seed(1)
    loss_joint = joint.training_step(batch, 0)
    torch.manual_seed(1)
    loss_plain = plain.training_step(batch, 0)
    with torch.no_grad():
        image_emb, _ = joint.encode_images(batch["image"])
        text_emb = joint.encode_texts(batch["text"])[0]
        reference = ClipLoss()(image_emb, text_emb, joint.model.logit_scale.exp())
    torch.testing.assert_close(
        loss_joint.detach() - loss_plain.detach(), 0.5 * reference, rtol=1e-4, atol=1e-5
    )
    loss_joint.backward()
    assert joint.model.logit_scale.grad is not None and joint.model.logit_scale.grad.abs() > 0
    loss_plain.backward()
    assert plain.model.logit_scale.grad is None  # without the term nothing reads the tower's temperature


def test_bad_options_are_refused():
    from mmret.errors import UsageError

    with pytest.raises(UsageError, match="model.loss"):
        CrossEncoder(model="test-vit-micro", loss="hinge")
    with pytest.raises(UsageError, match="num_negatives"):
        CrossEncoder(model="test-vit-micro", num_negatives=0)
    with pytest.raises(UsageError, match="contrastive_weight"):
        CrossEncoder(model="test-vit-micro", contrastive_weight=1.0, lock_image=True, lock_text=True)
    with pytest.raises(UsageError, match="contrastive_weight"):
        CrossEncoder(model="test-vit-micro", contrastive_weight=-1.0)


# ---- end to end: a dual encoder, then a reranker initialised from it ----------------------------------------
@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, digits_root):
    common = dict(train=digits_root / "train", samples_per_epoch=32, max_epochs=1, limit_val_batches=0)
    dual_dir = tmp_path_factory.mktemp("dual_run")
    assert (
        main(fit_argv(module=DUAL_ENCODER, model_args={"warmup_steps": 1}, run_dir=dual_dir, **common)) == 0
    )
    dual = dual_dir / "checkpoints" / "last.ckpt"
    reranker_dir = tmp_path_factory.mktemp("reranker_run")
    reranker_args = {"dual_encoder": dual, "fusion_width": 32, "fusion_layers": 1, "fusion_heads": 2,
                     "num_negatives": 3, "lock_image": True, "warmup_steps": 1}  # fmt: skip
    assert main(fit_argv(module=CROSS_ENCODER, model=None, model_args=reranker_args, run_dir=reranker_dir,
                         **common)) == 0  # fmt: skip
    return dual, reranker_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_fit_writes_a_cross_encoder_checkpoint_that_loads_alone(trained_pair):
    dual, reranker_ckpt = trained_pair
    checkpoint = read_checkpoint(reranker_ckpt, "cross_encoder")
    assert checkpoint["mmret"]["model"] == "test-vit-micro"
    module = CrossEncoder.from_checkpoint(reranker_ckpt)
    dual_weights = torch.load(dual, map_location="cpu", weights_only=False)["state_dict"]
    # the image tower was locked: it still holds the dual encoder's trained weights
    torch.testing.assert_close(module.model.visual.conv1.weight, dual_weights["model.visual.conv1.weight"])
    images = torch.randn(2, 3, 32, 32)
    again = CrossEncoder.from_checkpoint(reranker_ckpt)
    with torch.no_grad():
        torch.testing.assert_close(module.score(["a 1", "a 2"], images), again.score(["a 1", "a 2"], images))
    exported = reranker_ckpt.parent / "exported"
    assert main(["export", str(reranker_ckpt), "--output", str(exported)]) == 0
    from safetensors.torch import load_file

    state = load_file(str(exported / "reranker_model.safetensors"))
    torch.testing.assert_close(state["fusion.head.weight"], module.fusion.head.weight)
    config = json.loads((exported / "reranker_config.json").read_text())
    rebuilt = CrossEncoder(**config["init_args"])
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt.eval().score(["a 1"], images[:1]), module.score(["a 1"], images[:1])
        )
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")  # every export has a model card, the reranker's too
    assert {"mmret", "reranker"} <= set(card.data.tags)
    assert "CrossEncoder.load" in card.text and "test-vit-micro" in card.text


def test_trailing_padding_does_not_change_fusion_scores():
    from mmret.models.fusion import FusionScorer

    torch.manual_seed(0)
    fusion = FusionScorer(text_width=8, image_width=6, width=16, layers=2, heads=2).eval()
    states, patches = torch.randn(3, 5, 8), torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    padded_states = torch.cat([states, torch.randn(3, 20, 8)], dim=1)  # 20 more padding columns
    padded_mask = torch.cat([mask, torch.zeros(3, 20, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(fusion(padded_states, padded_mask, patches), fusion(states, mask, patches))
        # and the real tokens' states matter: changing one changes the score
        changed = states.clone()
        changed[0, 1] += 1.0
        assert not torch.allclose(fusion(changed, mask, patches)[0], fusion(states, mask, patches)[0])


def test_fusion_image_positions_make_patch_order_matter():
    from mmret.models.fusion import FusionScorer

    torch.manual_seed(0)
    states, mask, patches = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 4, 6)
    shuffled = patches[:, torch.tensor([2, 0, 3, 1])]
    plain = FusionScorer(text_width=8, image_width=6, width=16, layers=2, heads=2).eval()
    placed = FusionScorer(text_width=8, image_width=6, width=16, layers=2, heads=2, image_positions=4).eval()
    with torch.no_grad():
        # attention over patches is a set operation: without positions where a patch is cannot matter
        torch.testing.assert_close(plain(states, mask, shuffled), plain(states, mask, patches))
        assert not torch.allclose(placed(states, mask, shuffled), placed(states, mask, patches))
        with pytest.raises(ValueError, match="4 image tokens, got 3"):
            placed(states, mask, patches[:, :3])


def test_grid_position_features_tell_rows_and_columns_apart():
    from mmret.models.fusion import FusionScorer, grid_position_features

    features = grid_position_features(3, 4, 16)  # row-major 3 x 4 grid
    assert features.shape == (12, 16) and features.abs().max() <= 1.0
    assert torch.cdist(features, features).add(torch.eye(12)).min() > 0.1  # every patch has its own code
    columns, rows = features[:, :8], features[:, 8:]
    torch.testing.assert_close(columns[1], columns[5])  # same column, other row: the column half agrees
    torch.testing.assert_close(rows[4], rows[7])  # same row, other column: the row half agrees
    assert not torch.allclose(columns[1], columns[2]) and not torch.allclose(rows[0], rows[4])
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_position_features(2, 2, 10)

    torch.manual_seed(0)
    states, mask, patches = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 4, 6)
    placed = FusionScorer(text_width=8, image_width=6, width=16, layers=2, heads=2, image_grid=(2, 2)).eval()
    assert not any("grid" in name for name in placed.state_dict())  # fixed: recomputed, never stored
    with torch.no_grad():
        assert not torch.allclose(
            placed(states, mask, patches[:, [2, 0, 3, 1]]), placed(states, mask, patches)
        )
        with pytest.raises(ValueError, match="grid positions for 4 image tokens, got 3"):
            placed(states, mask, patches[:, :3])


def test_patch_embeddings_are_the_towers_input_tokens_beside_its_final_ones():
    from mmret.models.fusion import image_tokens

    module = CrossEncoder(model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2,
                          fusion_patch_embeddings=True, fusion_grid_positions=True)  # fmt: skip
    module.eval()
    visual = module.model.visual
    images = fake_batch(module, ["a", "b"], [0, 1])["image"]
    with torch.no_grad():
        pooled, final = image_tokens(module.model, images)
        pooled_both, both = module.encode_images(images)
        # the tower's input tokens, computed by hand: patchify, class token, positions, ln_pre
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = (
            torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
            + visual.positional_embedding
        )
        inputs = visual.ln_pre(x)[:, 1:]
        width = final.shape[-1]
        assert both.shape == (2, final.shape[1], 2 * width)
        torch.testing.assert_close(both[..., :width], final)
        torch.testing.assert_close(both[..., width:], inputs)
        torch.testing.assert_close(pooled_both, pooled)
        assert not visual.ln_pre._forward_hooks  # the hook is gone afterwards
        assert module.fusion.image_proj.in_features == 2 * width
        scores = module.score(["a red circle", "a blue square"], images)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_pixel_stem_tokens_and_every_trainable_parameter_is_optimised():
    module = CrossEncoder(model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2,
                          fusion_pixel_stem=True, lock_image=True, lock_text=True)  # fmt: skip
    images = fake_batch(module, ["a", "b"], [0, 1])["image"]
    _, final = module.encode_images(images)
    grid = module.model.visual.grid_size
    assert final.shape[1] == grid[0] * grid[1] and final.shape[-1] == module.fusion.image_proj.in_features
    # the stem's token of a patch sees that patch's pixels: change the top-left corner, token 0 moves, not the last
    changed = images.clone()
    changed[:, :, :2, :2] += 1.0
    with torch.no_grad():
        before, after = module.pixel_stem(images), module.pixel_stem(changed)
    assert not torch.allclose(before[:, 0], after[:, 0]) and torch.allclose(before[:, -1], after[:, -1])
    # the optimizer sees the fusion, the stem and the first-stage scale; the locked towers stay out
    optimised = {id(p) for group in module.optimizer_groups() for p in group["params"]}
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert {name for name, p in module.named_parameters() if id(p) in optimised} == trainable
    assert "first_stage_scale" in trainable and any(name.startswith("pixel_stem.") for name in trainable)
    module.training_step(fake_batch(module, ["a", "b", "c"], [0, 1, 2]), 0).backward()
    assert module.pixel_stem.convs[0].weight.grad is not None
    with pytest.raises(Exception, match="power-of-two patch size"):
        from mmret.models.fusion import PixelStem

        PixelStem(14, 32)


def test_augment_false_trains_on_the_evaluation_transform():
    from types import SimpleNamespace

    seen = {}

    class Recorder:
        def set_preprocess(self, image_transform, tokenizer, eval_image_transform):
            seen.update(train=repr(image_transform), eval=repr(eval_image_transform))

    for augment in (True, False):
        module = CrossEncoder(model="test-vit-micro", fusion_width=32, fusion_layers=1, fusion_heads=2,
                              augment=augment)  # fmt: skip
        module._trainer = SimpleNamespace(datamodule=Recorder())
        module.setup("fit")
        assert "RandomResizedCrop" not in seen["eval"]
        if augment:
            assert "RandomResizedCrop" in seen["train"]
        else:
            assert seen["train"] == seen["eval"]
