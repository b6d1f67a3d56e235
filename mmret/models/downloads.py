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

from huggingface_hub import constants as hub_constants
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


_REACHABLE: dict[str, bool] = {}  # hub host -> could this process connect to it (probed once)
PROBE_TIMEOUT_S = 3.0


def hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(hub_constants.ENDPOINT).hostname or "huggingface.co"


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (asked once per process)."""
    host = hub_host()
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:  # no DNS, no route, refused, timed out
            _REACHABLE[host] = False
    return _REACHABLE[host]


def offline_unless_reachable() -> bool:
    """Switch huggingface_hub (and transformers, open_clip and timm through it) to offline mode for this process
    when the hub cannot be reached, so files already in the cache still load and a missing one fails at once,
    instead of after huggingface_hub's retries (~50 s of warnings). Returns True when it switched."""
    if hub_constants.HF_HUB_OFFLINE or hub_reachable():
        return False
    hub_constants.HF_HUB_OFFLINE = True
    return True


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
    unreachable = offline_unless_reachable() or _REACHABLE.get(hub_host()) is False
    try:
        yield
    except UsageError:
        raise
    except Exception as err:
        cause = network_cause(err)
        if cause is None:
            raise
        reason = f"{hub_host()} cannot be reached from this machine" if unreachable else _one_line(cause)
        # `from None`: the point is to replace a 40-line chained traceback with this one sentence.
        raise UsageError(f"could not download {what} ({reason}); {hint}") from None
