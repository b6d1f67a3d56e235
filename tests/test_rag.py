"""`rag_messages`: the hand-off of the best images to a vision LLM, checked against the OpenAI SDK's own types.

.venv/bin/pytest tests/test_rag.py -q
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from mmret.errors import UsageError
from mmret.serving.rag import data_url, rag_messages
from mmret.serving.retriever import SearchResult


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RESULTS = [
    SearchResult(
        rank=i + 1, key=f"k{i}", score=0.9 - i / 10, caption=f"caption {i}", image_path=f"/data/{i}.png"
    )
    for i in range(5)
]
IMAGES = {f"k{i}": png_bytes((40 * i, 0, 0)) for i in range(5)}


def test_messages_validate_against_the_openai_chat_schema_and_carry_the_images():
    from openai.types.chat import ChatCompletionMessageParam
    from pydantic import TypeAdapter

    messages = rag_messages("Which one is red?", RESULTS, lambda result: IMAGES[result.key], max_images=3)
    TypeAdapter(list[ChatCompletionMessageParam]).validate_python(messages)
    assert [message["role"] for message in messages] == ["system", "user"]
    parts = messages[1]["content"]
    images = [part["image_url"]["url"] for part in parts if part["type"] == "image_url"]
    assert len(images) == 3
    for url, key in zip(images, ("k0", "k1", "k2")):
        header, payload = url.split(",", 1)
        assert header == "data:image/png;base64" and base64.b64decode(payload) == IMAGES[key]
    assert parts[0]["text"].startswith("Which one is red?")
    assert "caption 0" in parts[1]["text"]
    # dict records (the service's JSON) and file URLs work too
    records = [result.to_dict() for result in RESULTS]
    as_files = rag_messages("q", records, image_urls="file", system=None, max_images=2)
    TypeAdapter(list[ChatCompletionMessageParam]).validate_python(as_files)
    assert [p["image_url"]["url"] for p in as_files[0]["content"] if p["type"] == "image_url"] == [
        "file:///data/0.png", "file:///data/1.png"
    ]  # fmt: skip


def test_data_url_media_types():
    assert data_url(png_bytes("red")).startswith("data:image/png;base64,")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    assert data_url(buffer.getvalue()).startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"query": " "}, "query is empty"),
        ({"image_urls": "http"}, "expected 'data' or 'file'"),
        ({"max_images": 0}, "max_images is 0"),
        ({"image_bytes": None}, "needs image_bytes"),
        ({"detail": "huge"}, "detail is 'huge'"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs, message):
    arguments = {"query": "q", "results": RESULTS, "image_bytes": lambda result: IMAGES[result.key], **kwargs}
    with pytest.raises(UsageError, match=message):
        rag_messages(**arguments)
