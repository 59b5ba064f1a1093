"""Socket security: loopback unless told otherwise, CURVE for anything wider.

Keys come two ways. Key files are zmq's own certificate format (`zmq.auth.create_certificates`),
so `generate_keys` output can be copied between nodes as-is. Per-run keys (`RunKeys`) are generated
once by the orchestrator and reach each component process in its environment: never argv, which
any local user can read in /proc.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

# What a component that binds reads: its key pair and the one client key it admits.
SERVER_PUBLIC_ENV = "ASYNC_RL_CURVE_SERVER_PUBLIC"
SERVER_SECRET_ENV = "ASYNC_RL_CURVE_SERVER_SECRET"
SERVER_ADMITS_ENV = "ASYNC_RL_CURVE_SERVER_ADMITS"
# What a component that connects reads: its key pair and the server key it trusts.
CLIENT_PUBLIC_ENV = "ASYNC_RL_CURVE_CLIENT_PUBLIC"
CLIENT_SECRET_ENV = "ASYNC_RL_CURVE_CLIENT_SECRET"
CLIENT_TRUSTS_ENV = "ASYNC_RL_CURVE_CLIENT_TRUSTS"
SERVER_ENV = (SERVER_PUBLIC_ENV, SERVER_SECRET_ENV, SERVER_ADMITS_ENV)
CLIENT_ENV = (CLIENT_PUBLIC_ENV, CLIENT_SECRET_ENV, CLIENT_TRUSTS_ENV)
KEY_CHARS = 40  # Z85 of a 32-byte CURVE key
_Z85 = frozenset(z85.Z85CHARS.decode())


@dataclass(frozen=True)
class CurveServer:
    """Server keys; `admitted`: Z85 public keys of the clients let in (None = any client knowing the server key)."""

    public: bytes
    secret: bytes = field(repr=False)
    admitted: frozenset[bytes] | None = None


@dataclass(frozen=True)
class CurveClient:
    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes


@dataclass(frozen=True)
class RunKeys:
    """One run's CURVE keys (Z85): a server pair for every socket that binds, a client pair for every one that
    connects. A component that binds gets `server_env()`, one that connects `client_env()`; one that does both
    (the trainer) gets their union, which is safe: the two dicts share no name."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> RunKeys:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def server(self) -> CurveServer:
        """The binding side, in-process: admits this run's client key and no other."""
        return CurveServer(self.server_public, self.server_secret, admitted=frozenset({self.client_public}))

    def client(self) -> CurveClient:
        """The connecting side, in-process (the orchestrator's own buffer client, tests)."""
        return CurveClient(self.client_public, self.client_secret, server_public=self.server_public)

    def server_env(self) -> dict[str, str]:
        return _env(SERVER_ENV, (self.server_public, self.server_secret, self.client_public))

    def client_env(self) -> dict[str, str]:
        return _env(CLIENT_ENV, (self.client_public, self.client_secret, self.server_public))


def _env(names: tuple[str, ...], keys: tuple[bytes, ...]) -> dict[str, str]:
    return {name: key.decode("ascii") for name, key in zip(names, keys, strict=True)}


def server_keys_from_env(environ: Mapping[str, str] = os.environ) -> CurveServer | None:
    """The keys `RunKeys.server_env` handed this process; None when none of its variables is set."""
    keys = _read_role(environ, SERVER_ENV)
    if keys is None:
        return None
    public, secret, admits = keys
    _check_pair(public, secret, SERVER_ENV)
    return CurveServer(public, secret, admitted=frozenset({admits}))


def client_keys_from_env(environ: Mapping[str, str] = os.environ) -> CurveClient | None:
    """The keys `RunKeys.client_env` handed this process; None when none of its variables is set."""
    keys = _read_role(environ, CLIENT_ENV)
    if keys is None:
        return None
    public, secret, trusts = keys
    _check_pair(public, secret, CLIENT_ENV)
    return CurveClient(public, secret, server_public=trusts)


def _read_role(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[bytes, ...] | None:
    """All of a role's keys or None; some without the others would silently leave a socket open, so it stops here."""
    missing = [name for name in names if name not in environ]
    if len(missing) == len(names):
        return None
    if missing:
        raise ValueError(f"CURVE keys incomplete: {', '.join(missing)} unset ({', '.join(names)}: all or none)")
    return tuple(_z85_key(name, environ[name]) for name in names)


def _z85_key(name: str, value: str) -> bytes:
    """A key's Z85 bytes; the message names the variable, never its value (it may be a secret)."""
    if len(value) == KEY_CHARS and set(value) <= _Z85:
        key = value.encode("ascii")
        try:
            z85.decode(key)
            return key
        except struct.error:  # a 5-character group above 2**32
            pass
    raise ValueError(f"{name} is not a CURVE key: expected {KEY_CHARS} Z85 characters encoding 32 bytes")


def _check_pair(public: bytes, secret: bytes, names: tuple[str, ...]) -> None:
    if zmq.curve_public(secret) != public:
        raise ValueError(f"{names[0]} is not the public key of {names[1]}: they come from different key pairs")


def generate_keys(directory: Path, name: str) -> Path:
    """Write NAME.key (public) and NAME.key_secret; return the secret file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    _, secret_file = zmq.auth.create_certificates(directory, name)
    return Path(secret_file)


def load_server(secret_file: Path, authorized_clients: Path | None = None) -> CurveServer:
    """Keys from files; `authorized_clients`: a folder of client `.key` files, read once (None = any client)."""
    public, secret = _load_secret_certificate(secret_file)
    admitted = None if authorized_clients is None else frozenset(zmq.auth.load_certificates(authorized_clients))
    return CurveServer(public=public, secret=secret, admitted=admitted)


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


@dataclass(frozen=True)
class _Admit:
    """pyzmq's credentials provider: a client gets in when its public key (Z85) is one of `keys`."""

    keys: frozenset[bytes]

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def start_authenticator(context: zmq.Context, keys: CurveServer) -> AsyncioAuthenticator | None:
    """ZAP handler for every CURVE server socket of `context`, admitting only `keys.admitted`
    (None when any client may connect); stop() it when done."""
    if keys.admitted is None:
        return None
    authenticator = AsyncioAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=_Admit(keys.admitted))
    return authenticator
