"""The HTTP service of `mmret serve`: search an index over HTTP, and one web page to do it by hand.

    app = create_app(Retriever.open("runs/shapes.index", reranker="runs/shapes_reranker/checkpoints/last.ckpt"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints:
- `GET /health`: `{"status": "ok", "images": N, "captions": M, "model": architecture, "dim": D,
  "reranker": bool}` (D: the index's vector width).
- `POST /search` with a JSON body `{"text": str, "k": 10, "rerank": false, "rerank_top": null, "rag": false}`
  (text -> images), or a multipart form with a file field `image` and optional fields `k` (image -> nearest
  images; an image query cannot be reranked or handed to an LLM: both need a text). The answer:
  `{"query", "mode", "k", "results": [...], "timing_ms": {...}}`; each result is `SearchResult.to_dict()` plus
  `image_url`. With `rerank` the dual encoder's top `rerank_top` (default: the service's `rerank_top_default`,
  at least k, at most the index) are rescored by the reranker and `results` is its top k, while
  `first_stage` holds the dual encoder's own top k so both lists can be compared. With `rag` the answer
  also carries `rag_messages`: the OpenAI-compatible chat messages of `mmret.serving.rag.rag_messages`.
- `GET /images/{key}`: the stored (pre-resized) image bytes of a result, with their media type.
- `GET /`: the page (`page.html` beside this module), which calls `/search` with fetch. URL parameters fill
  its form and run the search on load: `/?q=a+red+circle&k=6&rerank=1`.

Every bad request is answered with a 4xx status and `{"detail": "one line: what, where, what was expected"}`:
400 for bad values (a `UsageError` of the retriever keeps its message), 404 for an unknown image key or
route, 413 for a body over `MAX_BODY_BYTES`, 415 for an upload that is not a readable image. Anything
unexpected is a 500 with a one-line detail (the traceback goes to the server's log); the service keeps
serving in every case.

Model calls run in FastAPI's thread pool; the `Retriever` serialises its forward passes with its own lock, so
concurrent requests are safe and the index search, image reads and JSON work of one request overlap with the
model calls of another.
"""

from __future__ import annotations

import io
import json
import logging
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from mmret.errors import UsageError
from mmret.serving.rag import rag_messages
from mmret.serving.retriever import Retriever, SearchResult, check_k, check_text_query, open_query_image

MAX_BODY_BYTES = 10 * 1024 * 1024  # the largest request body (an uploaded image and its form) accepted
JSON_FIELDS = ("text", "k", "rerank", "rerank_top", "rag")
FORM_FIELDS = ("image", "k", "rerank", "rag")
DEFAULT_K = 10

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A bad request: answered with `status` and the one-line `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def one_line(text: object) -> str:
    """`text` as a single line (newlines and runs of blanks become one space)."""
    return " ".join(str(text).split())


def _error(status: int, detail: object) -> JSONResponse:
    return JSONResponse({"detail": one_line(detail)}, status_code=status)


def media_type_of(data: bytes) -> str:
    """The MIME type of image bytes from their content (what PIL recognises), else application/octet-stream."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError, ValueError):
        return "application/octet-stream"


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_large = (
        f"the request body is larger than {limit} bytes; expected an image of at most {limit // 2**20} MiB"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"{too_large} (Content-Length {declared})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _replayed(request: Request, body: bytes) -> Request:
    """A request over the same scope whose body is `body` (already read), for starlette's form parser."""

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters (error messages echo what was sent, not all of it)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _integer(value: object, name: str, where: str) -> int:
    """A JSON integer (`where` "JSON"), or the text of one in a form field (`where` "form")."""
    if isinstance(value, str) and where == "form":
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise RequestError(400, f"{where} field {name} is {shown(value)}; expected an integer >= 1")


def _boolean(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(400, f"JSON field {name} is {shown(value)}; expected true or false")
    return value


def parse_json_query(body: bytes) -> dict:
    """The search request of a JSON body: `text`, `k`, `rerank`, `rerank_top`, `rag` (checked types)."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(
            400,
            f'the request body is not JSON ({error}); expected {{"text": ..., "k": ...}} or a multipart '
            "form with an image file",
        ) from None
    if not isinstance(payload, dict):
        raise RequestError(
            400, f'the JSON body is a {type(payload).__name__}; expected an object {{"text": ...}}'
        )
    unknown = sorted(set(payload) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(
            400, f"unknown JSON field {shown(unknown[0])}; expected only {', '.join(JSON_FIELDS)}"
        )
    if "text" not in payload:
        raise RequestError(400, 'the JSON body has no field text; expected {"text": "a few words", ...}')
    if not isinstance(payload["text"], str):
        raise RequestError(400, f"JSON field text is a {type(payload['text']).__name__}; expected a string")
    rerank_top = payload.get("rerank_top")
    return {
        "text": payload["text"],
        "k": _integer(payload.get("k", DEFAULT_K), "k", "JSON"),
        "rerank": _boolean(payload.get("rerank", False), "rerank"),
        "rerank_top": None if rerank_top is None else _integer(rerank_top, "rerank_top", "JSON"),
        "rag": _boolean(payload.get("rag", False), "rag"),
    }


async def parse_form_query(request: Request, body: bytes) -> dict:
    """The search request of a multipart form: the uploaded `image` (bytes), `k`, and `rerank` / `rag`
    (accepted only as false: both need a text query)."""
    form = await _replayed(request, body).form(max_files=1, max_fields=len(FORM_FIELDS))
    try:
        unknown = sorted(set(form) - set(FORM_FIELDS))
        if unknown:
            raise RequestError(
                400, f"unknown form field {shown(unknown[0])}; expected only {', '.join(FORM_FIELDS)}"
            )
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "the form has no file field image; expected an uploaded image file")
        data = await upload.read()
        name = upload.filename or "upload"
    finally:
        await form.close()
    return {
        "image": data,
        "filename": name,
        "k": _integer(form.get("k", str(DEFAULT_K)), "k", "form"),
        "rerank": _form_boolean(form.get("rerank", ""), "rerank"),
        "rag": _form_boolean(form.get("rag", ""), "rag"),
    }


def _form_boolean(value: object, name: str) -> bool:
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("", "0", "false", "off", "no"):
        return False
    if text in ("1", "true", "on", "yes"):
        return True
    raise RequestError(400, f"form field {name} is {shown(value)}; expected true or false")


def _records(results: list[SearchResult]) -> list[dict]:
    return [{**result.to_dict(), "image_url": f"/images/{result.key}"} for result in results]


def _milliseconds(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


class SearchService:
    """What the endpoints do, without HTTP: a parsed query in, the response document out."""

    def __init__(self, retriever: Retriever, rerank_top_default: int) -> None:
        self.retriever, self.rerank_top_default = retriever, rerank_top_default

    def health(self) -> dict:
        index = self.retriever.index
        return {
            "status": "ok",
            "images": index.num_images,
            "captions": index.num_captions,
            "model": index.manifest["model"].get("architecture", ""),
            "dim": index.dim,  # the width of the stored vectors and of the query embeddings
            "reranker": self.retriever.reranker is not None,
        }

    def rerank_depth(self, k: int, rerank_top: int | None, available: int) -> int:
        """How many first-stage results the reranker rescores: the request's `rerank_top` (checked) or the
        service default, clipped to [k, available]."""
        if self.retriever.reranker is None:
            raise UsageError("reranking needs a reranker; this service was started without --reranker")
        if rerank_top is None:
            return max(k, min(self.rerank_top_default, available))
        check_k(rerank_top, available, "rerank_top")
        if rerank_top < k:
            raise UsageError(f"rerank_top is {rerank_top}, fewer than k={k}; expected rerank_top >= k")
        return rerank_top

    def search_text(self, text: str, k: int, rerank: bool, rerank_top: int | None, rag: bool) -> dict:
        retriever, start = self.retriever, time.perf_counter()
        text = check_text_query(text)
        available = retriever.index.num_images
        check_k(k, available)
        depth = self.rerank_depth(k, rerank_top, available) if rerank else k
        candidates = retriever.search(texts=[text], k=depth)[0]
        response = {"query": text, "mode": "text", "k": k, "timing_ms": {"first_stage": _milliseconds(start)}}
        if rerank:
            response["rerank_top"] = depth
            response["first_stage"] = _records(candidates[:k])  # before rerank() renumbers the records
            started = time.perf_counter()
            results = retriever.rerank(text, candidates)[:k]
            response["timing_ms"]["rerank"] = _milliseconds(started)
        else:
            results = candidates
        response["results"] = _records(results)
        if rag:
            started = time.perf_counter()
            response["rag_messages"] = rag_messages(text, results, retriever.image_bytes)
            response["timing_ms"]["rag"] = _milliseconds(started)
        response["timing_ms"]["total"] = _milliseconds(start)
        return response

    def search_image(
        self, image: bytes, filename: str, k: int, rerank: bool = False, rag: bool = False
    ) -> dict:
        start = time.perf_counter()
        if rerank:
            raise UsageError(
                "an image query cannot be reranked: the reranker scores a caption against an image; "
                "expected rerank false, or a text query"
            )
        if rag:
            raise UsageError(
                "rag needs a text query (the question for the LLM); expected rag false with an image"
            )
        try:
            picture = open_query_image(image)
        except UsageError as error:
            raise RequestError(415, f"{error} (file {shown(filename)})") from None
        results = self.retriever.search(images=[picture], k=k)[0]
        elapsed = _milliseconds(start)
        return {"query": filename, "mode": "image", "k": k, "results": _records(results),
                "timing_ms": {"first_stage": elapsed, "total": elapsed}}  # fmt: skip

    def image(self, key: str) -> Response:
        try:
            data = self.retriever.image_bytes(key)
        except KeyError:
            raise RequestError(
                404, f"no image with key {shown(key)} in the index; expected a key of a search result"
            ) from None
        return Response(
            data, media_type=media_type_of(data), headers={"Cache-Control": "public, max-age=3600"}
        )


def create_app(retriever: Retriever, rerank_top_default: int = 20) -> FastAPI:
    """The FastAPI application serving `retriever` (see the module docstring for the endpoints).

    Args:
        retriever: the opened index, its dual encoder and optionally a reranker.
        rerank_top_default: first-stage results rescored when a request asks for reranking without
            `rerank_top` (at least k, at most the index's size).
    """
    if (
        isinstance(rerank_top_default, bool)
        or not isinstance(rerank_top_default, int)
        or rerank_top_default < 1
    ):
        raise UsageError(f"rerank_top_default is {rerank_top_default!r}; expected an integer >= 1")
    service = SearchService(retriever, rerank_top_default)
    page = resources.files("mmret.serving").joinpath("page.html").read_text(encoding="utf-8")
    app = FastAPI(title="mmret search", summary="Search an mmret index by text or image.", docs_url="/docs")
    app.state.service = service

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, error.detail)

    @app.exception_handler(UsageError)
    async def usage_error(request: Request, error: UsageError) -> JSONResponse:
        return _error(400, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            detail = f"no route {request.method} {request.url.path}; expected GET /, GET /health, POST /search or GET /images/KEY"
        elif error.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        else:
            detail = error.detail
        return _error(error.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
        ]
        return _error(422, f"invalid request: {'; '.join(problems)}")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return _error(
            500, f"internal error while serving {request.url.path}: {type(error).__name__}: {error}"
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    def health() -> dict:
        return service.health()

    @app.post("/search")
    async def search(request: Request) -> dict:
        # async only to read the body (size-capped); the search itself runs in the thread pool
        body = await read_body(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            query = await parse_form_query(request, body)
            return await run_in_threadpool(lambda: service.search_image(**query))
        query = parse_json_query(body)
        return await run_in_threadpool(service.search_text, **query)

    @app.get("/images/{key:path}")
    def image(key: str) -> Response:
        return service.image(key)

    return app
