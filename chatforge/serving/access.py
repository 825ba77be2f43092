"""Who may use a local server (`chatforge serve`, `chatforge web`).

- Bound to a loopback address, a server answers only requests whose Host (and Origin, when sent)
  names this machine: a web page elsewhere, even one that rebinds its DNS name to 127.0.0.1, is refused.
- A server is never bound to another address without a secret (API key or password).
- Secrets come from the environment or a file, never from the command line, where `ps` shows them.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from chatforge.files import ChatforgeError


def is_loopback(host: str) -> bool:
    """`host` (a name or address, with or without a port, brackets or a scheme) is this machine's loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback  # a bare address (IPv6 without brackets too)
    except ValueError:
        pass
    try:
        name = urlsplit(host if "://" in host else f"//{host}").hostname
        return name == "localhost" or (name is not None and ipaddress.ip_address(name).is_loopback)
    except ValueError:
        return False


class LoopbackOnly:
    """ASGI middleware: refuse (403) a request whose Host or Origin is not a loopback name."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope["headers"])
            host, origin = headers.get(b"host", b"").decode("latin-1"), headers.get(b"origin")
            if not is_loopback(host) or (origin is not None and not is_loopback(origin.decode("latin-1"))):
                await _refuse(
                    scope,
                    send,
                    f"this server on a loopback address answers only local names, "
                    f"not Host {host!r}" + (f" from Origin {origin.decode('latin-1')!r}" if origin is not None else ""),
                )
                return
        await self.app(scope, receive, send)


async def _refuse(scope, send, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "host_not_allowed"}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def read_secret(file: str | os.PathLike | None, env: str) -> str | None:
    """The secret in `file` (its first line) if given, else in the environment variable `env`; None if neither.

    Raises:
        ChatforgeError: the file is missing, unreadable or empty.
    """
    if file is None:
        return os.environ.get(env) or None
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ChatforgeError(f"cannot read the secret file {file}: {e.strerror}") from None
    if not lines or not lines[0].strip():
        raise ChatforgeError(f"the secret file {file} is empty")
    return lines[0].strip()


def check_bind(host: str, secured: bool, command: str, secret: str, source: str) -> None:
    """Refuse to serve a non-loopback address without a secret.

    Raises:
        ChatforgeError: `host` is not loopback and `secured` is false.
    """
    if not secured and not is_loopback(host):
        raise ChatforgeError(
            f"{command} on {host} without {secret} would let anyone who reaches that address "
            f"use it: set one ({source}), or bind 127.0.0.1"
        )
