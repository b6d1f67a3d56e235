"""`mmret index` / `mmret search` and the Retriever: exact search equals `mmret eval`'s ranking, incremental and
resumable builds, the embedding-space check, reranking, and one-line errors.

.venv/bin/pytest tests/test_index.py -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmret.cli import main
from mmret.data.builtin import build_dataset
from mmret.errors import UsageError
from mmret.serving import index as index_module
from mmret.serving.index import SearchIndex, build_index
from mmret.serving.retriever import Retriever, SearchResult
from tests.test_cross_encoder import trained_pair  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def shapes_test(tmp_path_factory) -> Path:
    root = build_dataset("shapes", tmp_path_factory.mktemp("shapes") / "shapes", seed=0, progress=False)
    return root / "test"


@pytest.fixture(scope="module")
def shapes_index(tmp_path_factory, shapes_test, trained_checkpoint) -> Path:
    index = tmp_path_factory.mktemp("index") / "shapes.index"
    assert main(["index", "--model", str(trained_checkpoint), "--data", str(shapes_test), "--output", str(index),
                 "--captions", "--device", "cpu"]) == 0  # fmt: skip
    return index


def shard_copies(source: Path, target: Path, count: int) -> list[Path]:
    """`count` shards: the source shard's samples split round-robin (keys kept unique), as separate tars."""
    import tarfile

    target.mkdir(parents=True)
    with tarfile.open(next(source.glob("*.tar"))) as archive:
        members = [member for member in archive.getmembers() if member.isreg()]
        keys = sorted({member.name.split(".", 1)[0] for member in members})[: 12 * count]
        shards = []
        for number in range(count):
            path = target / f"{number:05d}.tar"
            mine = set(keys[number::count])
            with tarfile.open(path, "w") as out:
                for member in members:
                    if member.name.split(".", 1)[0] in mine:
                        out.addfile(member, archive.extractfile(member))
            shards.append(path)
    return shards


def test_exact_search_returns_the_eval_ranking_for_every_query(
    shapes_index, shapes_test, trained_checkpoint, tmp_path
):
    """Every unique caption of the shapes test set: the index's top-10 is the dense top-10 of `mmret eval`'s
    embeddings, and R@1 / R@10 computed from the index's lists equal the results JSON."""
    from mmret.data.datamodule import RetrievalDataModule
    from mmret.evaluation.shard_set import embed_data

    results_path = tmp_path / "results.json"
    assert main(["eval", "--model", str(trained_checkpoint), "--data", str(shapes_test), "--task", "retrieval",
                 "--output", str(results_path), "--device", "cpu", "--num-examples", "1"]) == 0  # fmt: skip
    metrics = json.loads(results_path.read_text())["metrics"]
    retriever = Retriever.open(shapes_index, device="cpu")
    assert retriever.index.num_images == 1000 and retriever.index.exact("images")
    data = RetrievalDataModule(test=str(shapes_test), eval_batch_size=128)
    eval_set, key_of_id = embed_data(retriever.dual_encoder, data, torch.device("cpu"), 128, "embedding")
    queries = list(eval_set.captions)
    results = retriever.search(texts=queries, k=10)
    dense = (eval_set.text_emb @ eval_set.image_emb.T).topk(10, dim=1)
    keys = [key_of_id[int(image_id)] for image_id in eval_set.image_ids]
    for query, found, scores, indices in zip(queries, results, dense.values, dense.indices):
        expected = [keys[i] for i in indices]
        got = [result.key for result in found]
        np.testing.assert_allclose([result.score for result in found], scores.numpy(), atol=1e-5)
        if got != expected:  # only a swap of equal scores (within float error) is allowed
            for position, (a, b) in enumerate(zip(got, expected)):
                if a != b:
                    assert abs(float(scores[position]) - found[position].score) < 1e-5, query
    hits = {k: np.mean([any(query in result.captions for result in found[:k]) for query, found in
                        zip(queries, results)]) for k in (1, 10)}  # fmt: skip
    assert hits[1] == pytest.approx(metrics["image_retrieval_recall@1"], abs=1e-9)
    assert hits[10] == pytest.approx(metrics["image_retrieval_recall@10"], abs=1e-9)
    assert len(queries) == json.loads(results_path.read_text())["num_texts"]


def test_search_cli_formats_and_contact_sheet(shapes_index, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["search", str(shapes_index), "a red circle left of a blue square", "--k", "4", "--format", "jsonl",
                 "--sheet", str(sheet), "--device", "cpu"]) == 0  # fmt: skip
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["rank"] for record in records] == [1, 2, 3, 4]
    assert all(records[i]["score"] >= records[i + 1]["score"] for i in range(3))
    assert {"key", "score", "reranker_score", "caption", "image_path", "shard", "member"} <= set(records[0])
    with Image.open(sheet) as picture:
        assert picture.format == "PNG" and picture.width > 400
    assert main(["search", str(shapes_index), "a red circle", "--k", "3", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["rank", "score", "key"] and len(table) == 4


def test_image_queries_find_the_image_itself_and_distinct_captions(shapes_index, tmp_path):
    retriever = Retriever.open(shapes_index, device="cpu")
    first = retriever.search(texts=["a green square"], k=1)[0][0]
    image = retriever.load_image(first)
    path = tmp_path / "query.png"
    image.save(path)
    same = retriever.search(images=[path], k=3)[0]
    assert same[0].key == first.key and same[0].score == pytest.approx(
        1.0, abs=1e-4
    )  # PNG round trip is lossless
    captions = retriever.search(images=[image], k=5, table="captions")[0]
    texts = [result.caption for result in captions]
    assert len(set(texts)) == 5  # a caption shared by several images is one result


def test_incremental_build_embeds_only_new_shards_and_an_interrupted_build_resumes(
    shapes_test, trained_checkpoint, tmp_path, monkeypatch
):
    shards = shard_copies(shapes_test, tmp_path / "shards", 3)
    output = tmp_path / "index"
    report = build_index(trained_checkpoint, shards[:1], output, progress=False)
    assert (report.shards_added, report.images) == (1, 12)
    # the build of shards 2 and 3 dies after writing shard 2's rows, before recording it in the manifest
    real_write = index_module.VectorStore.write_manifest

    def dies(self, document):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module.VectorStore, "write_manifest", dies)
    with pytest.raises(KeyboardInterrupt):
        build_index(trained_checkpoint, shards, output, progress=False)
    monkeypatch.setattr(index_module.VectorStore, "write_manifest", real_write)
    assert SearchIndex.open(output).num_images == 24  # shard 2's rows are in, unrecorded
    embedded = []
    real_embed = index_module._embed_shard
    monkeypatch.setattr(index_module, "_embed_shard", lambda module, shard, *rest: embedded.append(shard) or
                        real_embed(module, shard, *rest))  # fmt: skip
    report = build_index(trained_checkpoint, shards, output, progress=False)
    assert [Path(shard).name for shard in embedded] == ["00001.tar", "00002.tar"]
    assert (report.shards_added, report.shards_skipped, report.images) == (2, 1, 36)
    rows = SearchIndex.open(output).store.db.open_table("images").to_arrow().column("key").to_pylist()
    assert len(rows) == len(set(rows)) == 36  # no duplicate left by the interrupted build
    embedded.clear()
    assert build_index(trained_checkpoint, shards, output, progress=False).shards_added == 0 and not embedded


def test_index_refuses_another_model_and_a_changed_shard(shapes_test, trained_checkpoint, tmp_path, capsys):
    from mmret.training import DualEncoder

    shards = shard_copies(shapes_test, tmp_path / "shards", 2)
    output = tmp_path / "index"
    build_index(trained_checkpoint, shards[:1], output, progress=False)
    other = DualEncoder.from_checkpoint(trained_checkpoint)
    with torch.no_grad():
        other.model.visual.conv1.weight.mul_(1.5)
    with pytest.raises(UsageError, match="does not embed into the space of index"):
        build_index(trained_checkpoint, shards, output, progress=False, module=other)
    with pytest.raises(UsageError, match="does not embed into the space of index"):
        Retriever(SearchIndex.open(output), other)
    with open(shards[0], "ab") as handle:
        handle.write(b"\0" * 1024)
    assert (
        main(["index", "--model", str(trained_checkpoint), "--data", str(shards[0]), "--output", str(output)])
        == 2
    )
    assert "changed since index" in capsys.readouterr().err


def test_approximate_index_above_the_threshold(shapes_test, trained_checkpoint, tmp_path):
    from mmret.serving.store import AnnSettings

    output = tmp_path / "index"
    report = build_index(trained_checkpoint, [next(shapes_test.glob("*.tar"))], output, progress=False,
                         approximate_above=500, ann=AnnSettings(partitions=4, sub_vectors=8))  # fmt: skip
    assert report.approximate["images"]["type"] == "IVF_PQ"
    # every partition probed and refine_factor x k above the row count: all rows are re-scored exactly
    index = SearchIndex.open(output, AnnSettings(nprobes=4, refine_factor=1000))
    assert not index.exact("images")
    retriever = Retriever(index, Retriever.open(output, device="cpu").dual_encoder)
    queries = ["a red circle left of a blue square", "a yellow diamond above a green triangle"]
    approximate = retriever.search(texts=queries, k=5)
    exact = retriever.search(texts=queries, k=5, exact=True)
    # all lists probed and every candidate re-scored exactly: the approximate index finds the exact top-5
    assert [[r.key for r in row] for row in approximate] == [[r.key for r in row] for row in exact]


@pytest.fixture(scope="module")
def digits_pair_index(tmp_path_factory, trained_pair, digits_root):  # noqa: F811
    """The tiny dual encoder and reranker of tests/test_cross_encoder.py, and an index of the digits test split."""
    dual, reranker = trained_pair
    index = tmp_path_factory.mktemp("digits_index") / "index"
    build_index(dual, [str(p) for p in sorted((digits_root / "test").glob("*.tar"))], index, progress=False)
    return dual, reranker, index


@pytest.mark.slow
def test_reranker_through_the_retriever(digits_pair_index, tmp_path, capsys):
    from mmret.training import CrossEncoder

    dual, reranker_path, index = digits_pair_index
    retriever = Retriever.open(index, reranker=reranker_path, device="cpu")
    query = "a photo of the digit 3"
    first = retriever.search(texts=[query], k=8)[0]
    reranked = retriever.search(texts=[query], k=4, rerank_top=8)[0]
    reranker = CrossEncoder.from_checkpoint(reranker_path)
    from mmret.models import create_transforms

    transform = create_transforms(reranker.model, train=False)
    pixels = torch.stack([transform(retriever.load_image(result)) for result in first])
    with torch.no_grad():
        expected = reranker.score([query] * len(first), pixels).tolist()
    order = sorted(range(len(first)), key=lambda i: -expected[i])[:4]
    assert [r.key for r in reranked] == [first[i].key for i in order]
    assert [r.first_stage_rank for r in reranked] == [i + 1 for i in order]
    np.testing.assert_allclose(
        [r.reranker_score for r in reranked], [expected[i] for i in order], rtol=1e-4, atol=1e-4
    )
    # candidates from elsewhere: images reordered the same way
    again = retriever.rerank(query, [retriever.load_image(result) for result in first])
    assert [int(r.key.split("-")[1]) for r in again[:4]] == order
    # the exported reranker folder gives the same scores
    exported = tmp_path / "exported"
    assert main(["export", str(reranker_path), "--output", str(exported)]) == 0
    from_folder = Retriever.open(index, reranker=exported, device="cpu").search(
        texts=[query], k=4, rerank_top=8
    )[0]
    assert [r.key for r in from_folder] == [r.key for r in reranked]
    assert (
        main(["search", str(index), query, "--k", "3", "--reranker", str(reranker_path), "--device", "cpu"])
        == 0
    )
    assert "rerank" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "{index}", ""], "the text query is empty"),
        (["search", "{index}", "x" * 100_000], "characters; expected at most"),
        (["search", "{index}", "a red circle", "--k", "0"], "k is 0; expected an integer >= 1"),
        (["search", "{index}", "a red circle", "--k", "1001"], "holds 1000 entries"),
        (
            ["search", "{missing}", "a red circle"],
            "does not exist; expected a folder written by `mmret index`",
        ),
        (["search", "{index}", "--image", "{not_image}"], "is not a readable image"),
        (["search", "{index}", "a red circle", "--rerank-top", "5"], "--rerank-top needs --reranker"),
        (["search", "{index}", "a red circle", "--reranker", "{missing}"], "reranker"),
        (["search", "{index}"], "give a text QUERY or --image PATH"),
        (["index", "--model", "{missing}", "--data", "{index}", "--output", "{out}"], "--model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, shapes_index, tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    names = {"index": str(shapes_index), "missing": str(tmp_path / "missing"), "not_image": str(not_image),
             "out": str(tmp_path / "out")}  # fmt: skip
    assert main([part.format(**names) for part in argv]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "out").exists()


def test_rerank_needs_a_caption_and_a_reranker(shapes_index):
    retriever = Retriever.open(shapes_index, device="cpu")
    with pytest.raises(UsageError, match="needs a reranker"):
        retriever.search(texts=["a red circle"], k=2, rerank_top=4)
    with pytest.raises(UsageError, match="needs a reranker"):
        retriever.rerank("a red circle", [SearchResult(rank=1, key="x", score=0.0, caption="")])


def test_img2dataset_output_is_indexed_with_its_urls(trained_checkpoint, tmp_path, capsys):
    from tests.shard_fixtures import write_img2dataset_shards

    source = write_img2dataset_shards(tmp_path / "web", num_samples=10, samples_per_shard=4)
    output = tmp_path / "web.index"
    assert main(["index", "--model", str(trained_checkpoint), "--data", str(source), "--output", str(output),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert "indexed 3 new shards (0 already in): 10 images" in capsys.readouterr().out
    retriever = Retriever.open(output, device="cpu")
    results = retriever.search(texts=["a photo"], k=10)[0]
    assert sorted(result.image_path for result in results) == sorted(
        f"http://example.com/{i}.jpg" for i in range(10)
    )
    with Image.open(io.BytesIO(retriever.image_bytes(results[0]))) as image:  # read back by offset in its tar
        assert image.size == (32, 32)
