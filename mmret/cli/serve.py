"""`mmret serve`: an HTTP search service and web page over an index (text or image queries, optional reranking).

    mmret serve runs/shapes.index --reranker runs/shapes_reranker/checkpoints/last.ckpt --port 8000
    curl -s localhost:8000/search -H 'content-type: application/json' -d '{"text": "a red circle", "k": 5}'
    open http://127.0.0.1:8000/?q=a+red+circle&k=6&rerank=1

The endpoints, the answer's shape and the errors are `mmret.serving.app`'s. The port is bound and listening
before the models load: a port in use is a one-line error, not a traceback after loading, and a client that
connects while the models load (e.g. `mmret serve ... &` then `curl`) waits and is answered once the service
is up. `--port 0` takes any free port; the printed URL names it. Ctrl+C (or SIGTERM) stops the service after
the requests in flight. Queries are embedded at the index's dim (for an index of Matryoshka prefixes, `mmret
index --dim D`, their first D coordinates, re-normalised).
"""

from __future__ import annotations

import argparse
import socket
import sys

from mmret.cli import add_index_dim_argument
from mmret.errors import UsageError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmret serve`."""
    parser.add_argument("index", help="an index folder written by `mmret index` (or a LanceDB URI)")
    parser.add_argument(
        "--model", default=None, help="the dual-encoder .ckpt (default: the checkpoint recorded in the index)"
    )
    parser.add_argument(
        "--reranker",
        default=None,
        help="a reranker .ckpt or a folder written by `mmret export` (enables rerank; default: none)",
    )
    parser.add_argument(
        "--rerank-top",
        type=int,
        default=20,
        help="first-stage results the reranker rescores when a request gives none (default: %(default)s)",
    )
    add_index_dim_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8000, help="TCP port; 0: any free port (default: %(default)s)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available (default: %(default)s)",
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (the one uvicorn serves on); UsageError when it cannot be had."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port is {port}; expected a TCP port in 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise UsageError(
            f"--host {host} is not a usable address ({error.strerror}); expected e.g. 127.0.0.1"
        ) from None
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets that say so; without it every
    # response on a kept-alive connection waits for the client's delayed ACK (Nagle's algorithm)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses its port
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        reason = (
            "is already in use" if error.errno in (48, 98, 10048) else f"cannot be bound ({error.strerror})"
        )
        raise UsageError(f"port {port} on {host} {reason}; expected a free port (--port)") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(args: argparse.Namespace) -> int:
    """Run `mmret serve` with parsed arguments: bind, load the models, print the URL, serve until stopped."""
    if args.rerank_top < 1:
        raise UsageError(f"--rerank-top is {args.rerank_top}; expected an integer >= 1")
    if args.dim is not None and args.dim < 1:
        raise UsageError(f"--dim is {args.dim}; expected an integer >= 1 (a prefix of the embedding)")
    sock = bind_socket(args.host, args.port)
    try:
        import uvicorn

        from mmret.serving.app import create_app
        from mmret.serving.retriever import Retriever

        retriever = Retriever.open(
            args.index, model=args.model, reranker=args.reranker, device=args.device, dim=args.dim
        )
        app = create_app(retriever, rerank_top_default=args.rerank_top)
        health = app.state.service.health()
        reranker = f"reranker {args.reranker}" if args.reranker else "no reranker"
        print(f"serving {args.index} ({health['images']} images, {reranker}) at {url_of(sock)}", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        print("mmret serve: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0
