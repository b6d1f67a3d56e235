"""Tests for `mmret serve` (mmret/serving/app.py, mmret/cli/serve.py): the real service in a subprocess.

A session fixture writes the built-in shapes dataset (32 px), trains a tiny dual encoder and a reranker for two
steps each with `mmret fit`, indexes the first test images with `build_index`, and starts
`python -m mmret serve INDEX --reranker CKPT` on a free localhost port; the tests talk HTTP to it and compare
with a `Retriever` opened in this process. Cases that need another service set-up (no reranker, a failing
model) use `create_app` in-process through starlette's TestClient. The `slow` test renders the page in
headless Chromium (installed with apt when missing and possible, else skipped).

Run: .venv/bin/pytest tests/test_serve.py            (-m "not slow" skips the Chromium test)
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from mmret.cli import main
from mmret.serving.retriever import MAX_QUERY_CHARS, Retriever
from tests.fit_args import CROSS_ENCODER, DUAL_ENCODER, fit_argv

NUM_IMAGES = 96
STARTUP_TIMEOUT_S = 90
QUERIES = ("a red circle", "a large blue square", "a green triangle above a yellow circle")


@dataclass
class Served:
    """The running service and what it serves."""

    url: str
    index: Path
    dual: Path
    reranker: Path
    retriever: Retriever  # the same index and models, opened in this process
    process: subprocess.Popen
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_samples(source: Path, target: Path, count: int) -> Path:
    """A shard with the first `count` samples of `source` (members of a sample are adjacent in a shard)."""
    keys: list[str] = []
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for member in src:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == count:
                    break
                keys.append(key)
            dst.addfile(member, src.extractfile(member))
    return target


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    from mmret.data.builtin import build_dataset
    from mmret.serving.index import build_index

    root = tmp_path_factory.mktemp("serve")
    data = build_dataset("shapes", root / "shapes", seed=0, image_size=32, progress=False)
    common = dict(train=data / "train", samples_per_epoch=32, max_epochs=1, limit_val_batches=0)
    assert (
        main(fit_argv(module=DUAL_ENCODER, model_args={"warmup_steps": 1}, run_dir=root / "dual", **common))
        == 0
    )
    dual = root / "dual" / "checkpoints" / "last.ckpt"
    reranker_args = {"dual_encoder": dual, "fusion_width": 32, "fusion_layers": 1, "fusion_heads": 2,
                     "num_negatives": 3, "warmup_steps": 1}  # fmt: skip
    assert main(fit_argv(module=CROSS_ENCODER, model=None, model_args=reranker_args, run_dir=root / "rr",
                         **common)) == 0  # fmt: skip
    reranker = root / "rr" / "checkpoints" / "last.ckpt"
    shard = first_samples(data / "test" / "00000.tar", root / "test-head.tar", NUM_IMAGES)
    index = root / "index"
    build_index(dual, [str(shard)], index, progress=False)

    port, log = free_port(), root / "serve.log"
    command = [sys.executable, "-m", "mmret", "serve", str(index), "--reranker", str(reranker),
               "--port", str(port), "--device", "cpu"]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    try:
        retriever = Retriever.open(index, reranker=reranker, device="cpu")  # while the service starts
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mmret serve exited with {process.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mmret serve did not answer /health within {STARTUP_TIMEOUT_S} s: {log.read_text()}"
                )
            time.sleep(0.2)
        yield Served(url, index, dual, reranker, retriever, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (so the exit status says SIGTERM)
    assert process.returncode in (0, -signal.SIGTERM), (
        f"mmret serve did not stop on SIGTERM: {log.read_text()}"
    )


def assert_one_line_error(response: httpx.Response, statuses: tuple[int, ...]) -> str:
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.strip() and "\n" not in detail and "Traceback" not in detail
    assert len(detail) < 400, detail
    return detail


# ---- the service ------------------------------------------------------------------------------------------
def test_the_service_prints_its_url_and_reports_health(served):
    assert f"at {served.url}/" in served.log.read_text()
    with served.client() as client:
        health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "images": NUM_IMAGES,
        "captions": 0,
        "model": "test-vit-micro",
        "dim": 32,
        "reranker": True,
    }


@pytest.mark.parametrize("query", QUERIES)
def test_text_search_equals_the_retriever_in_process(served, query):
    with served.client() as client:
        response = client.post("/search", json={"text": query, "k": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == query and body["mode"] == "text" and body["k"] == 7
    assert "first_stage" not in body and "rag_messages" not in body and body["timing_ms"]["total"] >= 0
    expected = served.retriever.search(texts=[query], k=7)[0]
    assert [r["key"] for r in body["results"]] == [r.key for r in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([r.score for r in expected], abs=1e-5)
    assert [r["rank"] for r in body["results"]] == list(range(1, 8))
    for record, result in zip(body["results"], expected):
        assert record["image_url"] == f"/images/{result.key}"
        assert record["caption"] == result.caption and record["reranker_score"] is None


def test_reranked_search_returns_both_lists(served):
    query = QUERIES[2]
    with served.client() as client:
        body = client.post("/search", json={"text": query, "k": 5, "rerank": True, "rerank_top": 12}).json()
    first, reranked = body["first_stage"], body["results"]
    assert len(first) == len(reranked) == 5 and body["rerank_top"] == 12
    assert set(body["timing_ms"]) >= {"first_stage", "rerank", "total"}
    plain = served.retriever.search(texts=[query], k=5)[0]
    assert [r["key"] for r in first] == [r.key for r in plain]
    assert all(r["reranker_score"] is None and r["rank"] == r["first_stage_rank"] for r in first)
    expected = served.retriever.search(texts=[query], k=5, rerank_top=12)[0]
    assert [r["key"] for r in reranked] == [r.key for r in expected]
    assert [r["reranker_score"] for r in reranked] == pytest.approx(
        [r.reranker_score for r in expected], abs=1e-4
    )
    scores = [r["reranker_score"] for r in reranked]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in reranked] == [1, 2, 3, 4, 5]
    assert all(1 <= r["first_stage_rank"] <= 12 for r in reranked)
    # without rerank_top the service default (20) applies
    with served.client() as client:
        default = client.post("/search", json={"text": query, "k": 5, "rerank": True}).json()
    assert default["rerank_top"] == 20 and len(default["results"]) == 5


def test_image_upload_finds_the_same_image_first(served):
    key = served.retriever.search(texts=[QUERIES[0]], k=3)[0][2].key
    data = served.retriever.image_bytes(key)
    with served.client() as client:
        response = client.post("/search", files={"image": ("query.jpg", data, "image/jpeg")}, data={"k": "4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "image" and body["query"] == "query.jpg" and len(body["results"]) == 4
    assert body["results"][0]["key"] == key and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    expected = served.retriever.search(images=[data], k=4)[0]
    assert [r["key"] for r in body["results"]] == [r.key for r in expected]


def test_images_endpoint_serves_the_stored_bytes(served):
    result = served.retriever.search(texts=[QUERIES[1]], k=1)[0][0]
    with served.client() as client:
        response = client.get(f"/images/{result.key}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == served.retriever.image_bytes(result.key)
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.size == (32, 32)


def test_rag_messages_are_valid_openai_chat_messages(served):
    import openai.types.chat
    import pydantic

    with served.client() as client:
        body = client.post(
            "/search", json={"text": "which image shows a red circle?", "k": 3, "rag": True}
        ).json()
    messages = body["rag_messages"]
    pydantic.TypeAdapter(list[openai.types.chat.ChatCompletionMessageParam]).validate_python(messages)
    assert [m["role"] for m in messages] == ["system", "user"]
    parts = messages[-1]["content"]
    urls = [part["image_url"]["url"] for part in parts if part["type"] == "image_url"]
    assert len(urls) == 3
    for url, result in zip(urls, body["results"]):
        prefix = "data:image/jpeg;base64,"
        assert url.startswith(prefix)
        assert base64.b64decode(url[len(prefix) :]) == served.retriever.image_bytes(result["key"])
        assert any(part["type"] == "text" and result["key"] in part["text"] for part in parts)


def test_concurrent_clients_get_the_sequential_answers(served):
    expected = {query: [r.key for r in served.retriever.search(texts=[query], k=5)[0]] for query in QUERIES}
    failures: list[str] = []

    def client_thread(offset: int) -> None:
        with served.client() as client:
            for step in range(6):
                query = QUERIES[(offset + step) % len(QUERIES)]
                response = client.post("/search", json={"text": query, "k": 5, "rerank": step % 2 == 1})
                if response.status_code != 200:
                    failures.append(response.text)
                elif step % 2 == 0 and [r["key"] for r in response.json()["results"]] != expected[query]:
                    failures.append(f"{query}: {response.json()['results']}")

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures


def test_kept_alive_connections_answer_without_nagle_delays(served):
    # Nagle's algorithm against the client's delayed ACK costs >= 40 ms per response on Linux when the
    # service's sockets lack TCP_NODELAY; the health answer itself takes a few milliseconds
    with served.client() as client:
        client.get("/health")
        times = []
        for _ in range(9):
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            times.append(time.perf_counter() - start)
    assert sorted(times)[4] < 0.030, times


def _chunks(size: int):
    chunk = b"\0" * 2**20
    for _ in range(size // len(chunk)):
        yield chunk


BAD_REQUESTS = {
    "empty text": (dict(json={"text": "", "k": 3}), (400,), "empty"),
    "blank text": (dict(json={"text": "   \n ", "k": 3}), (400,), "empty"),
    "100 kB text": (dict(json={"text": "a red circle " * 8000, "k": 3}), (400,), str(MAX_QUERY_CHARS)),
    "k = 0": (dict(json={"text": "a red circle", "k": 0}), (400, 422), "k"),
    "k < 0": (dict(json={"text": "a red circle", "k": -2}), (400, 422), "k"),
    "k > corpus": (dict(json={"text": "a red circle", "k": NUM_IMAGES + 1}), (400, 422), str(NUM_IMAGES)),
    "k not a number": (dict(json={"text": "a red circle", "k": "five"}), (400, 422), "k"),
    "k a boolean": (dict(json={"text": "a red circle", "k": True}), (400, 422), "k"),
    "k a JSON string": (dict(json={"text": "a red circle", "k": "5"}), (400, 422), "k"),
    "k a long string": (dict(json={"text": "a red circle", "k": "9" * 10_000}), (400, 422), "characters"),
    "rerank_top < k": (
        dict(json={"text": "a circle", "k": 5, "rerank": True, "rerank_top": 3}),
        (400,),
        "rerank_top",
    ),
    "rerank_top > corpus": (
        dict(json={"text": "a circle", "rerank": True, "rerank_top": 10**6}),
        (400,),
        "rerank_top",
    ),
    "rerank not a boolean": (dict(json={"text": "a circle", "rerank": "yes"}), (400, 422), "rerank"),
    "no text field": (dict(json={"k": 3}), (400, 422), "text"),
    "text not a string": (dict(json={"text": ["a", "b"]}), (400, 422), "text"),
    "unknown field": (dict(json={"text": "a circle", "top_k": 3}), (400, 422), "top_k"),
    "JSON array": (dict(json=["a red circle"]), (400, 422), "object"),
    "body not JSON": (
        dict(content=b"{text: a red circle", headers={"content-type": "application/json"}),
        (400, 422),
        "JSON",
    ),
    "empty body": (dict(content=b""), (400, 422), "JSON"),
    "upload not an image": (
        dict(files={"image": ("notes.txt", b"just some text", "text/plain")}),
        (400, 415),
        "notes.txt",
    ),
    "empty upload": (dict(files={"image": ("empty.png", b"", "image/png")}), (400, 415), "image"),
    "form without image": (dict(files={"picture": ("a.jpg", b"xx", "image/jpeg")}), (400,), "picture"),
    "image with rerank": (
        dict(files={"image": ("a.jpg", b"xx", "image/jpeg")}, data={"rerank": "1"}),
        (400,),
        "rerank",
    ),
    "image with bad k": (
        dict(files={"image": ("a.jpg", b"xx", "image/jpeg")}, data={"k": "many"}),
        (400,),
        "k",
    ),
    "broken multipart": (
        dict(content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data"}),
        (400,),
        "",
    ),
    "11 MB upload": (
        dict(files={"image": ("big.jpg", b"\xff" * (11 * 2**20), "image/jpeg")}),
        (413,),
        "bytes",
    ),
    "11 MB streamed": (
        dict(content=_chunks(11 * 2**20), headers={"content-type": "application/json"}),
        (413,),
        "bytes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_search_requests_get_one_line_4xx_and_the_service_keeps_serving(served, case):
    request, statuses, word = BAD_REQUESTS[case]
    with served.client() as client:
        detail = assert_one_line_error(client.post("/search", **request), statuses)
        assert word.lower() in detail.lower()
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/images/no-such-key", 404), ("GET", "/nope", 404),
                                                         ("DELETE", "/health", 405), ("GET", "/search", 405)])  # fmt: skip
def test_unknown_keys_and_routes_get_one_line_errors(served, method, path, status):
    with served.client() as client:
        assert_one_line_error(client.request(method, path), (status,))
        assert client.get("/health").status_code == 200


def test_the_page_is_served_and_self_contained(served):
    with served.client() as client:
        response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for needle in (
        'id="q"',
        'id="k"',
        'id="rerank"',
        'type="file"',
        'id="results"',
        "result-image",
        "/search",
    ):
        assert needle in page
    # offline: nothing is fetched from another host
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", page)


# ---- in-process: set-ups the subprocess does not have ----------------------------------------------------
def test_a_service_without_reranker_refuses_rerank(served):
    from fastapi.testclient import TestClient

    from mmret.serving.app import create_app

    plain = Retriever(served.retriever.index, served.retriever.dual_encoder)
    with TestClient(create_app(plain)) as client:
        assert client.get("/health").json()["reranker"] is False
        detail = assert_one_line_error(
            client.post("/search", json={"text": "a circle", "rerank": True}), (400,)
        )
        assert "reranker" in detail
        assert client.post("/search", json={"text": "a circle", "k": 2}).status_code == 200


def test_an_unexpected_failure_is_a_one_line_500_and_the_service_keeps_serving(served):
    from fastapi.testclient import TestClient

    from mmret.serving.app import create_app

    broken = Retriever(served.retriever.index, served.retriever.dual_encoder)

    def fail(*args, **kwargs):
        raise RuntimeError("the model fell over\nwith a second line")

    broken.search = fail
    with TestClient(create_app(broken), raise_server_exceptions=False) as client:
        detail = assert_one_line_error(client.post("/search", json={"text": "a circle"}), (500,))
        assert "RuntimeError" in detail and "fell over" in detail
        assert client.get("/health").status_code == 200


def test_create_app_refuses_a_bad_rerank_default(served):
    from mmret.errors import UsageError
    from mmret.serving.app import create_app

    with pytest.raises(UsageError, match="rerank_top_default"):
        create_app(served.retriever, rerank_top_default=0)


# ---- the command's own errors -------------------------------------------------------------------------------
def test_serve_refuses_a_port_in_use_in_one_line(served, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(served.index), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port}" in err[0] and "in use" in err[0]


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--rerank-top", "0"], "--rerank-top"),
        (["--port", "70000"], "--port"),
        (["--host", "no.such.host.invalid"], "--host"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(served, capsys, argv, word):
    assert main(["serve", str(served.index), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]


def test_serve_refuses_a_missing_index_and_frees_its_port(tmp_path, capsys):
    port = free_port()
    assert main(["serve", str(tmp_path / "missing.index"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.index" in err[0]
    with socket.socket() as again:  # the socket bound before the failure was closed
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


# ---- the page in a real browser --------------------------------------------------------------------------
def ensure_chromium() -> str:
    """The chromium binary; apt-get installs Debian's `chromium` when it is missing (needs root), else skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    return shutil.which("chromium")


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               "--window-size=1200,900", "--virtual-time-budget=10000", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, timeout=120)


def _colourful_pixels(path: Path, top: int) -> int:
    """Pixels below `top` whose channels spread by more than 60 (the shapes' colours, not text or chrome)."""
    image = Image.open(path).convert("RGB")
    assert image.size == (1200, 900)
    region = image.crop((0, top, image.width, image.height))
    return sum(1 for r, g, b in region.getdata() if max(r, g, b) - min(r, g, b) > 60)


@pytest.mark.slow
def test_the_page_renders_reranked_result_images_in_chromium(served, tmp_path):
    chromium = ensure_chromium()
    k = 6
    url = f"{served.url}/?q=a+red+circle&k={k}&rerank=1"
    dom = _chromium(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    html = dom.stdout.decode()
    container = re.search(r'<div id="results"[^>]*>', html)
    assert container, html[-3000:]
    attributes = dict(re.findall(r'data-([a-z]+)="([^"]*)"', container.group(0)))
    assert attributes.get("ready") == "1" and "error" not in attributes, html[-3000:]
    assert attributes.get("expected") == attributes.get("loaded") == str(2 * k) and "failed" not in attributes
    shown = html[container.start() :]
    assert len(re.findall(r'<img[^>]*class="result-image"', shown)) == 2 * k
    assert "first stage (dual encoder)" in html and "reranked" in html

    # a screenshot for humans, and a check that the images are on it: the shapes' colours fill the grid
    shot = tmp_path / "serve_page.png"
    done = _chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr.decode(errors="replace")[-2000:]
    blank = tmp_path / "serve_page_blank.png"
    assert (
        _chromium(chromium, tmp_path / "profile-blank", f"--screenshot={blank}", served.url + "/").returncode
        == 0
    )
    with_results, without = _colourful_pixels(shot, top=180), _colourful_pixels(blank, top=180)
    assert without < 500, without  # the empty page: grey text and white panels only
    assert with_results > without + 5000, (with_results, without)  # 12 shape images of ~130 x 130 px
