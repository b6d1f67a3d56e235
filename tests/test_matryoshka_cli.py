"""Matryoshka prefixes outside training: `mmret eval --dim`, the per-dim report of a Matryoshka checkpoint,
`mmret index --dim` / `mmret search` (and `serve`) at the index's dim, `model.embed_dim`, the export's card.

`eval --dim D` must give the metrics computed by hand on embeddings cut to their first D coordinates and
re-normalised; without --dim a Matryoshka checkpoint reports every trained dim (`dim<d>/...`) with the same
numbers, the full-width metrics unchanged; an index of D-dim vectors is searched at D; a bad or mismatching
--dim is one line, exit 2, nothing written.

    .venv/bin/pytest tests/test_matryoshka_cli.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmret.cli import main
from mmret.errors import UsageError
from mmret.evaluation.matryoshka import (
    PrefixEncoder,
    check_dim,
    embedding_width,
    prefix_encoder,
    trained_dims,
    truncate_eval_set,
)
from mmret.evaluation.metrics import (
    build_text_queries,
    build_zeroshot_classifier,
    retrieval_metrics,
    zeroshot_metrics,
)
from mmret.training import DualEncoder
from tests.fit_args import DUAL_ENCODER, fit_argv

WIDTH, DIMS = 32, [32, 16, 8]  # test-vit-micro embeds into 32 dims


# ---- fast: the pieces --------------------------------------------------------------------------------------
def test_prefix_encoder_cuts_and_renormalises_every_embedding():
    torch.manual_seed(0)
    module = DualEncoder(model="test-vit-micro", matryoshka_dims=[16, 8]).eval()
    assert embedding_width(module) == WIDTH and trained_dims(module) == [16, 8]
    assert prefix_encoder(module, None) is module and prefix_encoder(module, WIDTH) is module
    small = prefix_encoder(module, 8)
    assert (
        isinstance(small, PrefixEncoder) and small.model is module.model and embedding_width(small) == WIDTH
    )
    images, texts = torch.randn(3, 3, 32, 32), ["a one", "a two"]
    with torch.no_grad():
        image_by_hand = F.normalize(module.encode_image(images)[:, :8], dim=-1)
        text_by_hand = F.normalize(module.encode_texts(texts)[:, :8], dim=-1)
        torch.testing.assert_close(small.encode_image(images), image_by_hand)
        torch.testing.assert_close(small.encode_texts(texts), text_by_hand)
        torch.testing.assert_close(small.encode_text(module.tokenizer(texts)), text_by_hand)
    assert trained_dims(DualEncoder(model="test-vit-micro")) == []


@pytest.mark.parametrize("dim", [0, -1, WIDTH + 1, 2.5, True])
def test_check_dim_refuses_in_one_line(dim):
    module = DualEncoder(model="test-vit-micro")
    with pytest.raises(UsageError, match=rf"--dim is {dim}; expected an integer in \[1, 32\]") as error:
        check_dim(dim, module, "--model M")
    assert "\n" not in str(error.value) and "--model M" in str(error.value)


def test_truncate_eval_set_cuts_both_sides_only():
    from mmret.evaluation.retrieval import EmbeddedEvalSet

    generator = torch.Generator().manual_seed(0)
    eval_set = EmbeddedEvalSet(
        image_emb=F.normalize(torch.randn(4, 6, generator=generator), dim=-1),
        image_ids=torch.arange(4),
        labels=torch.tensor([0, 1, 0, 1]),
        image_unseen=torch.zeros(4, dtype=torch.bool),
        text_emb=F.normalize(torch.randn(3, 6, generator=generator), dim=-1),
        text_relevant=[{0}, {1}, {2, 3}],
        text_unseen=torch.zeros(3, dtype=torch.bool),
        captions=["a", "b", "c"],
    )
    cut = truncate_eval_set(eval_set, 2)
    torch.testing.assert_close(cut.image_emb, F.normalize(eval_set.image_emb[:, :2], dim=-1))
    torch.testing.assert_close(cut.text_emb, F.normalize(eval_set.text_emb[:, :2], dim=-1))
    assert cut.text_relevant == eval_set.text_relevant and cut.captions == eval_set.captions


def test_embed_dim_sets_the_width_that_matryoshka_dims_are_checked_against():
    module = DualEncoder(model="test-vit-micro", embed_dim=8)
    with torch.no_grad():
        assert module.encode_texts(["a one"]).shape == (1, 8)
        assert module.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 8)
    assert embedding_width(module) == 8
    with pytest.raises(UsageError, match="embedding width is 8"):
        DualEncoder(model="test-vit-micro", embed_dim=8, matryoshka_dims=[16, 4])
    for bad in (0, -4, 2.5):
        with pytest.raises(UsageError, match=f"model.embed_dim is {bad}; expected a positive integer"):
            DualEncoder(model="test-vit-micro", embed_dim=bad)


def test_model_card_names_the_trained_dims(tmp_path):
    from mmret.models.model_card import CardInfo, write_model_card

    card = write_model_card(
        tmp_path, CardInfo(model_name="m", matryoshka_dims=DIMS), "sentence-transformers", "clip"
    )
    text = card.read_text()
    assert "- matryoshka" in text and "dims 32, 16, 8" in text and "truncate_dim=8" in text
    plain = write_model_card(tmp_path, CardInfo(model_name="m"), "open_clip", "clip").read_text()
    assert "matryoshka" not in plain.lower()


# ---- end to end with a tiny Matryoshka checkpoint ----------------------------------------------------------------
@pytest.fixture(scope="module")
def matryoshka_checkpoint(tmp_path_factory, digits_root):
    """test-vit-micro trained 2 steps on digits with matryoshka_dims [16, 8] (trained dims 32, 16, 8)."""
    run_dir = tmp_path_factory.mktemp("matryoshka_run")
    code = main(
        fit_argv(
            module=DUAL_ENCODER,
            model_args={"warmup_steps": 1, "matryoshka_dims": "[16, 8]"},
            train=digits_root / "train",
            samples_per_epoch=32,
            max_epochs=1,
            run_dir=run_dir,
        )
    )
    assert code == 0
    return run_dir / "checkpoints" / "last.ckpt"


def run_eval(checkpoint, data, output, *extra: str) -> dict:
    argv = ["eval", "--model", str(checkpoint), "--data", str(data), "--output", str(output)]
    assert main([*argv, "--device", "cpu", "--num-workers", "0", "--num-examples", "1", *extra]) == 0
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def every_dim_results(matryoshka_checkpoint, digits_root, tmp_path_factory):
    return run_eval(matryoshka_checkpoint, digits_root, tmp_path_factory.mktemp("eval") / "every_dim.json")


def by_hand_metrics(checkpoint, digits_root, dim: int) -> dict:
    """Retrieval and zero-shot metrics of digits test from the checkpoint's embeddings, cut by hand."""
    from mmret.data.samples import SkipCounter, decode_sample, iter_shard
    from mmret.models import create_transforms

    model = DualEncoder.from_checkpoint(checkpoint)
    transform = create_transforms(model.model, train=False)
    info = json.loads((digits_root / "test" / "dataset.json").read_text())
    samples = [
        decode_sample(raw)
        for shard in info["shards"]
        for raw in iter_shard(str(digits_root / "test" / shard), SkipCounter())
    ]
    ids = [sample["sample_id"] for sample in samples]
    queries, relevant = build_text_queries([sample["captions"] for sample in samples], ids)

    def cut(emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb[:, :dim], dim=-1)

    with torch.no_grad():
        images = torch.stack([transform(sample["image"]) for sample in samples])  # [300, 3, H, W]
        image_emb = cut(torch.cat([model.encode_image(chunk) for chunk in images.split(100)]))
        text_emb = cut(model.encode_text(model.tokenizer(queries)))
        classifier = build_zeroshot_classifier(
            lambda texts: cut(model.encode_text(model.tokenizer(texts))),
            info["class_names"],
            info["templates"],
        )
    direct = retrieval_metrics(image_emb, ids, text_emb, relevant, ks=(1, 5, 10), ranking_k=10)
    direct.update(zeroshot_metrics(image_emb, torch.tensor([s["label"] for s in samples]), classifier))
    return {key: value for key, value in direct.items() if "num_" not in key}


@pytest.mark.slow
def test_eval_dim_equals_the_metrics_of_embeddings_cut_by_hand(matryoshka_checkpoint, digits_root, tmp_path):
    results = run_eval(matryoshka_checkpoint, digits_root, tmp_path / "dim8.json", "--dim", "8")
    direct = by_hand_metrics(matryoshka_checkpoint, digits_root, 8)
    assert set(results["metrics"]) == set(direct)  # one dim asked for: no dim<d>/ report
    for key, value in direct.items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert results["dim"] == 8 and results["config"]["eval"]["dim"] == 8
    assert "matryoshka_dims" not in results


@pytest.mark.slow
def test_eval_without_dim_reports_every_trained_dim(
    every_dim_results, matryoshka_checkpoint, digits_root, tmp_path
):
    results = every_dim_results
    metrics = results["metrics"]
    assert results["dim"] == WIDTH and results["matryoshka_dims"] == DIMS
    assert "dim" not in results["config"]["eval"]  # full width: the config of any plain evaluation
    full = {key: value for key, value in metrics.items() if not key.startswith("dim")}
    for dim in DIMS[1:]:
        prefixed = {
            key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith(f"dim{dim}/")
        }
        assert set(prefixed) == set(full), dim
        alone = run_eval(matryoshka_checkpoint, digits_root, tmp_path / f"d{dim}.json", "--dim", str(dim))
        assert prefixed == pytest.approx(alone["metrics"], abs=1e-9), dim  # one computation, two ways
    assert not any(key.startswith("dim") for key in results["counts"])
    # the full-width numbers are where they always were: equal to a plain --dim 32 evaluation
    assert full == pytest.approx(run_eval(matryoshka_checkpoint, digits_root, tmp_path / "d32.json", "--dim", "32")["metrics"], abs=1e-9)  # fmt: skip
    assert by_hand_metrics(matryoshka_checkpoint, digits_root, 16)["acc1"] == pytest.approx(
        metrics["dim16/acc1"]
    )


@pytest.mark.slow
def test_plain_checkpoint_reports_no_dims(trained_checkpoint, digits_root, tmp_path):
    results = run_eval(trained_checkpoint, digits_root, tmp_path / "plain.json")
    assert results["dim"] == WIDTH and "matryoshka_dims" not in results
    assert not any(key.startswith("dim") for key in results["metrics"])


def assert_refused(argv: list[str], capsys, *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "dim, expected",
    [("0", "expected an integer >= 1"), ("-3", "expected an integer >= 1"), ("33", "[1, 32]")],
)
def test_eval_refuses_a_bad_dim(dim, expected, matryoshka_checkpoint, digits_root, tmp_path, capsys):
    output = tmp_path / "out" / "r.json"
    argv = [
        "eval",
        "--model",
        str(matryoshka_checkpoint),
        "--data",
        str(digits_root),
        "--output",
        str(output),
    ]
    assert_refused([*argv, "--dim", dim, "--num-workers", "0"], capsys, f"--dim is {dim}", expected)
    assert not output.exists() and not list(output.parent.glob("*.png"))


@pytest.fixture(scope="module")
def dim8_index(matryoshka_checkpoint, digits_root, tmp_path_factory):
    index = tmp_path_factory.mktemp("index") / "digits8.index"
    argv = ["index", "--model", str(matryoshka_checkpoint), "--data", str(digits_root / "test")]
    assert main([*argv, "--output", str(index), "--dim", "8", "--device", "cpu", "--quiet"]) == 0
    return index


@pytest.mark.slow
def test_index_dim_search_round_trip(dim8_index, matryoshka_checkpoint, digits_root, capsys):
    from mmret.data.samples import SkipCounter, decode_sample, iter_shard
    from mmret.models import create_transforms
    from mmret.serving.index import SearchIndex

    index = SearchIndex.open(dim8_index)
    assert index.dim == 8 and index.manifest["model"]["embed_dim"] == WIDTH and index.num_images == 300
    assert len(index.manifest["model"]["fingerprint"][0]) == 8
    query = "a photo of the digit seven"
    capsys.readouterr()
    assert main(["search", str(dim8_index), query, "--k", "5", "--format", "jsonl", "--device", "cpu"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # by hand: every test image and the query, cut to 8 coordinates and re-normalised, ranked by cosine
    model = DualEncoder.from_checkpoint(matryoshka_checkpoint)
    transform = create_transforms(model.model, train=False)
    info = json.loads((digits_root / "test" / "dataset.json").read_text())
    samples = [
        decode_sample(raw)
        for shard in info["shards"]
        for raw in iter_shard(str(digits_root / "test" / shard), SkipCounter())
    ]
    with torch.no_grad():
        images = torch.stack([transform(sample["image"]) for sample in samples])
        image_emb = F.normalize(torch.cat([model.encode_image(c) for c in images.split(100)])[:, :8], dim=-1)
        text_emb = F.normalize(model.encode_texts([query])[:, :8], dim=-1)
    scores = (text_emb @ image_emb.T)[0]  # [300]
    best = scores.topk(5)
    assert [record["score"] for record in found] == pytest.approx(best.values.tolist(), abs=1e-5)
    by_key = {sample["key"]: float(scores[i]) for i, sample in enumerate(samples)}
    for record in found:  # the keys the index returned have the scores computed by hand (ties may reorder)
        assert by_key[record["key"]] == pytest.approx(record["score"], abs=1e-5)
    # the same search through the library, with --dim given: the index's own is accepted
    assert main(["search", str(dim8_index), query, "--k", "5", "--dim", "8", "--format", "jsonl"]) == 0
    assert [json.loads(line)["key"] for line in capsys.readouterr().out.splitlines()] == [
        r["key"] for r in found
    ]


@pytest.mark.slow
def test_index_and_search_refuse_other_dims(dim8_index, matryoshka_checkpoint, digits_root, tmp_path, capsys):
    from mmret.serving.index import SearchIndex

    before = SearchIndex.open(dim8_index).manifest
    assert_refused(
        ["search", str(dim8_index), "a seven", "--dim", "16"], capsys, "--dim 16", "8-d", "--dim 8"
    )
    assert_refused(["search", str(dim8_index), "a seven", "--dim", "0"], capsys, "--dim is 0")
    assert_refused(["serve", str(dim8_index), "--dim", "32", "--port", "0"], capsys, "--dim 32", "8-d")
    data = ["--model", str(matryoshka_checkpoint), "--data", str(digits_root / "test"), "--device", "cpu"]
    assert_refused(["index", *data, "--output", str(dim8_index), "--dim", "16"], capsys, "--dim 16", "8-d")
    # adding to the index without --dim keeps its dim (nothing new to embed here)
    assert main(["index", *data, "--output", str(dim8_index), "--quiet"]) == 0
    assert "0 new shards" in capsys.readouterr().out
    assert SearchIndex.open(dim8_index).manifest == before
    for dim, expected in (("64", "[1, 32]"), ("0", "expected an integer >= 1")):
        fresh = tmp_path / f"fresh{dim}.index"
        assert_refused(
            ["index", *data, "--output", str(fresh), "--dim", dim], capsys, f"--dim is {dim}", expected
        )
        assert not fresh.exists()


@pytest.mark.slow
def test_sentence_transformers_export_records_the_dims_and_truncates_like_eval(
    matryoshka_checkpoint, tmp_path, capsys
):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    output = tmp_path / "st"
    argv = [
        "export",
        str(matryoshka_checkpoint),
        "--format",
        "sentence-transformers",
        "--output",
        str(output),
    ]
    assert main(argv) == 0
    card = (output / "README.md").read_text()
    assert "- matryoshka" in card and "dims 32, 16, 8" in card
    texts = ["a photo of the digit seven", "a scan of a handwritten 3"]
    encoder = SentenceTransformer(str(output), device="cpu", truncate_dim=8)
    got = encoder.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    with torch.no_grad():
        want = prefix_encoder(DualEncoder.from_checkpoint(matryoshka_checkpoint), 8).encode_texts(texts)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=0)
