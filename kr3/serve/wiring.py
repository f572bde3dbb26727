"""What stage=serve needs around the app: the API key (and keeping it out of the run folder), the listening socket,
uvicorn."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from fastapi import FastAPI

from kr3.errors import UserError


def api_key(s) -> str | None:
    """serve.api_key, else the KR3_API_KEY environment variable — read here, not interpolated into the config, where
    a stage that saves its resolved config (a checkpoint, W&B) would write it down."""
    key = os.environ.get("KR3_API_KEY") if s.api_key is None else str(s.api_key)
    if key is not None and not key.strip():
        raise UserError("the API key is empty (serve.api_key or KR3_API_KEY) — give a key, or unset it to serve without one")
    return key


def redact(folder: Path, key: str) -> None:
    """A key given as serve.api_key=… is in Hydra's copy of the command (overrides.yaml, config.yaml): blank it
    there, so the run folder never holds it. KR3_API_KEY is not copied at all."""
    for path in folder.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        if key in text:
            path.write_text(text.replace(key, "<redacted>"), encoding="utf-8")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or one line saying why it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on such sockets' connections; with it
        # on, each kept-alive response waited ~40 ms for the client's delayed ACK (bench/serve_load.py found it)
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"serve.host={host} is not an address here ({e.strerror}) — use 127.0.0.1, or 0.0.0.0 for every "
                        "interface") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}) — pick another port, e.g. serve.port={port + 1}, "
                        "or serve.port=0 for any free one") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(asgi: FastAPI, sock: socket.socket) -> None:
    """Serve `asgi` on the bound socket until Ctrl-C or SIGTERM (uvicorn; streams still open get 5 s to end)."""
    import uvicorn

    config = uvicorn.Config(asgi, log_level="info", timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
