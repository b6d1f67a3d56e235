"""The hand-off to a vision-capable LLM: the query and the best retrieved images as the `messages` of an
OpenAI-compatible chat request (OpenAI, vLLM, llama.cpp's server, Ollama, LiteLLM all read this shape).

    results = retriever.search(texts=[question], k=3, rerank_top=20)[0]
    messages = rag_messages(question, results, retriever.image_bytes)
    # client.chat.completions.create(model="...", messages=messages)   <- yours to send; mmret sends nothing

Each image becomes an `image_url` content part: a `data:` URL of the stored image bytes (default), or a
`file://` URL of the image's original path when the caller asks for `image_urls="file"` and the shard recorded
one. Text parts say which candidate each image is (rank, key, caption), so the model can cite them.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from pathlib import Path

from mmret.errors import UsageError

DEFAULT_SYSTEM = (
    "You answer questions about images retrieved for the user's query. The images are the best matches of a "
    "search, best first; refer to them by their number, and say so when none of them answers the question."
)


def _media_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return "image/jpeg"


def data_url(data: bytes) -> str:
    """A `data:` URL of image bytes (media type from the bytes' signature)."""
    return f"data:{_media_type(data)};base64,{base64.b64encode(data).decode('ascii')}"


def rag_messages(
    query: str,
    results: Sequence,
    image_bytes: Callable | None = None,
    max_images: int = 4,
    system: str | None = DEFAULT_SYSTEM,
    image_urls: str = "data",
    detail: str = "auto",
) -> list[dict]:
    """Chat messages for the query and the top `max_images` results.

    Args:
        query: the user's question (also the search query, usually).
        results: `SearchResult`s (or their `to_dict()` records), best first.
        image_bytes: result -> the image's bytes (e.g. `Retriever.image_bytes`); needed for `image_urls="data"`.
        max_images: how many results are passed on.
        system: the system message (None: none).
        image_urls: "data" (the image inline as base64) or "file" (its original path as a file:// URL).
        detail: the image parts' `detail` ("auto", "low" or "high").

    Returns:
        `[{"role": "system", ...}, {"role": "user", "content": [text part, (text, image_url) per image ...]}]`.
    """
    if not isinstance(query, str) or not query.strip():
        raise UsageError("the RAG query is empty; expected the user's question")
    if image_urls not in ("data", "file"):
        raise UsageError(f"image_urls is {image_urls!r}; expected 'data' or 'file'")
    if detail not in ("auto", "low", "high"):
        raise UsageError(f"detail is {detail!r}; expected auto, low or high")
    if max_images < 1:
        raise UsageError(f"max_images is {max_images}; expected at least 1")
    chosen = list(results)[:max_images]
    content: list[dict] = [
        {
            "type": "text",
            "text": f"{query.strip()}\n\n{len(chosen)} retrieved images follow, best match first.",
        }
    ]
    for number, result in enumerate(chosen, 1):
        record = result if isinstance(result, dict) else result.to_dict()
        caption = f' — stored caption: "{record["caption"]}"' if record.get("caption") else ""
        content.append({"type": "text", "text": f"Image {number} (key {record['key']}){caption}"})
        if image_urls == "file":
            path = record.get("image_path") or ""
            if not path or "://" in path:
                raise UsageError(
                    f"result {record['key']} has no local original path; use image_urls='data' (inline bytes)"
                )
            url = Path(path).resolve().as_uri()
        else:
            if image_bytes is None:
                raise UsageError("image_urls='data' needs image_bytes (e.g. Retriever.image_bytes)")
            url = data_url(image_bytes(result))
        content.append({"type": "image_url", "image_url": {"url": url, "detail": detail}})
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return messages
