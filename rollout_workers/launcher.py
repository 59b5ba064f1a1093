"""Start and stop one engine server process: real SGLang or the embedded engine.

Both speak the same HTTP API, so what differs is only the command line. The
process's output goes to a log file, whose tail is what an error shows when the
engine dies before it becomes healthy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from async_rl.private_files import write_private


class EngineSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How to start an engine; this is the shape configs use."""

    kind: Literal["embedded", "sglang"] = "embedded"
    model: str  # a HF folder, or for the embedded engine also tiny:llama / tiny:qwen2 / smollm2
    extra_args: list[str] = []  # passed through verbatim, e.g. ["--mem-fraction-static", "0.7"]
    device: str | None = None  # cpu | cuda | cuda:N; for SGLang cuda:N is --base-gpu-id N
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port is picked at start
    # SGLang: hand every token of a non-streamed request to the HTTP side (see engine_env); the run
    # turns it off where no request is ever aborted while waiting, since it costs per-token work.
    hand_over_every_token: bool = True


class EngineStartError(RuntimeError):
    """The engine exited or stayed unhealthy; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def engine_command(
    spec: EngineSpec, port: int, python: str = sys.executable, secrets_dir: Path | None = None
) -> list[str]:
    """The argv that starts `spec` listening on `port`. An API key is written to a private options
    file in `secrets_dir` (both engines read SGLang's --config), never onto the command line."""
    if spec.kind == "sglang":
        argv = [
            python,
            "-m",
            "sglang.launch_server",
            "--model-path",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(port),
        ]
        if spec.device is not None and spec.device.startswith("cuda:"):
            argv += ["--base-gpu-id", spec.device.removeprefix("cuda:")]
    else:
        argv = [
            python,
            "-m",
            "async_rl.cli",
            "engine",
            "serve",
            "--model",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(port),
        ]
        if spec.device is not None:
            argv += ["--device", spec.device]
    if spec.api_key:
        if secrets_dir is None:
            raise ValueError("an engine with an API key needs secrets_dir: the key never goes on the command line")
        options = yaml.safe_dump({"api-key": spec.api_key}).encode()
        argv += ["--config", str(write_private(secrets_dir / f"engine-{port}.yaml", options))]
    return argv + list(spec.extra_args)


def engine_env(spec: EngineSpec) -> dict[str, str]:
    """Environment an engine process needs beyond its command line.

    SGLang's /health generates a token by default (a second or more, and a 503 after 20 s while
    paused): the project uses /health as liveness and /health_generate when it means generation,
    as the contract describes. SGLang hands a non-streamed request's tokens to its HTTP side only
    every 50 tokens, and a request aborted while waiting (after a retract-mode pause, which an
    abort-mode pause starts with) returns only what was handed over: at interval 1 it returns all.
    """
    if spec.kind != "sglang":
        return {}
    env = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"}
    return env | ({"SGLANG_FORCE_STREAM_INTERVAL": "1"} if spec.hand_over_every_token else {})


def probe_health(url: str, api_key: str | None = None) -> bool:
    """One blocking GET /health; False on any connection failure (the engine may still be starting)."""
    request = urllib.request.Request(url + "/health")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class EngineProcess:
    """One engine subprocess. `with EngineProcess(spec) as engine:` starts it, waits
    for /health and stops it on exit; `engine.url` is where the client connects."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        stop_grace_s: float = 10.0,
    ):
        self.spec = spec
        self.port = spec.port
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.stop_grace_s = stop_grace_s
        self._process: subprocess.Popen[bytes] | None = None
        self._secrets_dir: str | None = None  # a private folder for the options file, while it runs

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("engine not started: no port yet")
        return f"http://{self.spec.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> EngineProcess:
        if self._process is not None:
            raise RuntimeError(f"engine already started (pid {self._process.pid})")
        if self.port is None:
            self.port = free_port(self.spec.host)
        if self.log_path is None:
            log_dir = Path(tempfile.gettempdir()) / "async-rl-logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = log_dir / f"engine-{self.spec.kind}-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **engine_env(self.spec), **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._secrets_dir = tempfile.mkdtemp(prefix="async-rl-engine-") if self.spec.api_key else None
        command = engine_command(
            self.spec, self.port, secrets_dir=Path(self._secrets_dir) if self._secrets_dir else None
        )
        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # Own process group: a Ctrl-C in the parent's terminal reaches us, and we stop the engine.
                start_new_session=True,
            )
        return self

    def poll(self) -> int | None:
        """The exit code if the engine has exited, else None."""
        return None if self._process is None else self._process.poll()

    def _check_alive(self) -> None:
        if self._process is None:
            raise RuntimeError("engine not started")
        code = self._process.poll()
        if code is not None:
            raise EngineStartError(
                f"engine exited with code {code} before becoming healthy; log {self.log_path}:\n{self.log_tail()}"
            )

    def _probe_health(self) -> bool:
        return probe_health(self.url, self.spec.api_key)

    def _unhealthy_error(self, timeout_s: float) -> EngineStartError:
        return EngineStartError(
            f"engine not healthy within {timeout_s} s at {self.url}; log {self.log_path}:\n{self.log_tail()}"
        )

    def wait_healthy(self, timeout_s: float = 120.0, poll_interval_s: float = 0.1) -> None:
        """Poll /health until 200; fail at once, with the log tail, if the process exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            if self._probe_health():
                return
            if time.monotonic() >= deadline:
                raise self._unhealthy_error(timeout_s)
            time.sleep(poll_interval_s)

    async def wait_healthy_async(self, timeout_s: float = 120.0, poll_interval_s: float = 0.1) -> None:
        """`wait_healthy` for an event loop: each probe runs in a thread, the wait does not block."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            if await asyncio.to_thread(self._probe_health):
                return
            if time.monotonic() >= deadline:
                raise self._unhealthy_error(timeout_s)
            await asyncio.sleep(poll_interval_s)

    def stop(self) -> int | None:
        """SIGTERM the engine's process group, SIGKILL it after the grace period; reap it.

        Returns the exit code (None if never started). Safe to call twice."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        # Children the engine spawned (SGLang's scheduler/detokenizer) may outlive it.
        self._signal_group(process, signal.SIGKILL)
        if self._secrets_dir is not None:
            shutil.rmtree(self._secrets_dir, ignore_errors=True)
        return process.returncode

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as log_file:
            tail = deque(log_file, maxlen=lines)
        return b"".join(tail).decode("utf-8", "replace")

    def __enter__(self) -> EngineProcess:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> EngineProcess:
        self.start()
        try:
            await self.wait_healthy_async()
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)
