"""Turn failed downloads (no network, `HF_HUB_OFFLINE=1`, unknown hub repo) into one clear `UsageError` line.

open_clip, timm and transformers fetch weights, configs and tokenizers from the Hugging Face hub (or a URL)
and, when that fails, raise a chain of 3-6 wrapped exceptions (RuntimeError -> FileNotFoundError ->
LocalEntryNotFoundError -> ConnectError -> socket.gaierror ...). `explain_download_errors` walks that chain,
and if a network/hub error is in it, replaces the whole chain with a single sentence that says what could
not be downloaded and how to get it onto an offline machine. Every other error passes through untouched.

    with explain_download_errors("pretrained weights 'openai' for 'ViT-B-32'", hint=...):
        open_clip.create_model("ViT-B-32", pretrained="openai")
"""

from __future__ import annotations

import socket
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import errors as hub_errors

from mmret.errors import UsageError

# Errors that mean "the hub/URL could not be reached or does not have it" (not a bug in the model code).
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    hub_errors.OfflineModeIsEnabled,
    hub_errors.LocalEntryNotFoundError,
    hub_errors.HfHubHTTPError,
    urllib.error.URLError,
    socket.gaierror,
    ConnectionError,
    TimeoutError,
)
# HTTP client libraries whose own exception classes do not derive from the builtins above (httpx, requests).
_HTTP_CLIENT_MODULES = ("httpx", "httpcore", "requests", "urllib3")

DEFAULT_HINT = (
    "download it on a machine with internet (open_clip/huggingface_hub cache it under $HF_HOME) and either "
    "pass the local file or directory instead, or copy that cache here and set HF_HOME"
)


def _exception_chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        # open_clip re-raises inside `except` without `from`, so the cause is often only in __context__.
        current = current.__cause__ or current.__context__


def _is_network_error(err: BaseException) -> bool:
    if isinstance(err, _NETWORK_ERRORS):
        return True
    return any(
        cls.__module__.split(".")[0].rstrip("0123456789") in _HTTP_CLIENT_MODULES for cls in type(err).__mro__
    )


def network_cause(err: BaseException) -> BaseException | None:
    """The innermost-but-most-informative hub/network error in `err`'s chain, or None if there is none."""
    found = [e for e in _exception_chain(err) if _is_network_error(e)]
    if not found:
        return None
    # Prefer the hub's own explanation (it says "offline mode is enabled" / "not in the local cache").
    for e in found:
        if isinstance(e, hub_errors.OfflineModeIsEnabled):
            return e
    return found[0]


def _one_line(text: str, limit: int = 240) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def explain_download_errors(what: str, hint: str = DEFAULT_HINT) -> Iterator[None]:
    """Re-raise download failures inside the block as `UsageError("could not download WHAT (...); HINT")`.

    Args:
        what: What was being fetched, e.g. "pretrained weights 'openai' for model 'ViT-B-32'".
        hint: What the user can do about it.
    """
    try:
        yield
    except UsageError:
        raise
    except Exception as err:
        cause = network_cause(err)
        if cause is None:
            raise
        # `from None`: the point is to replace a 40-line chained traceback with this one sentence.
        raise UsageError(f"could not download {what} ({_one_line(cause)}); {hint}") from None
