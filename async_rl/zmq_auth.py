"""Socket security: loopback unless told otherwise, CURVE for anything wider.

Key files are zmq's own certificate format (`zmq.auth.create_certificates`),
so `generate_keys` output can be copied between nodes as-is.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator


@dataclass(frozen=True)
class CurveServer:
    """Server keys; `authorized_clients`: folder of client `.key` files (None = any client knowing the server key)."""

    public: bytes
    secret: bytes
    authorized_clients: Path | None = None


@dataclass(frozen=True)
class CurveClient:
    public: bytes
    secret: bytes
    server_public: bytes


def generate_keys(directory: Path, name: str) -> Path:
    """Write NAME.key (public) and NAME.key_secret; return the secret file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    _, secret_file = zmq.auth.create_certificates(directory, name)
    return Path(secret_file)


def load_server(secret_file: Path, authorized_clients: Path | None = None) -> CurveServer:
    public, secret = _load_secret_certificate(secret_file)
    return CurveServer(public=public, secret=secret, authorized_clients=authorized_clients)


def load_client(secret_file: Path, server_public_file: Path) -> CurveClient:
    public, secret = _load_secret_certificate(secret_file)
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    return CurveClient(public=public, secret=secret, server_public=server_public)


def _load_secret_certificate(secret_file: Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (pass the NAME.key_secret file)")
    return public, secret


def check_bind(endpoint: str, secured: bool, allow_insecure: bool = False) -> None:
    """Refuse to expose an unauthenticated socket beyond this host by accident."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or secured or allow_insecure:
        return
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{endpoint} is not loopback: configure CURVE keys or allow insecure binding explicitly")


def secure_server(socket: zmq.Socket, keys: CurveServer) -> None:
    socket.curve_server = True
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret


def secure_client(socket: zmq.Socket, keys: CurveClient) -> None:
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
    socket.curve_serverkey = keys.server_public


def start_authenticator(context: zmq.Context, keys: CurveServer) -> AsyncioAuthenticator | None:
    """ZAP handler that admits only the authorized client keys; stop() it when done."""
    if keys.authorized_clients is None:
        return None
    authenticator = AsyncioAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(keys.authorized_clients))
    return authenticator
