"""Per-run CURVE keys handed over in the environment: real buffer and trainer sockets, bound off loopback."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import zmq
import zmq.asyncio

from async_rl import zmq_auth
from async_rl.config import load_config
from async_rl.messages import WeightsPublished, decode
from async_rl.transport import BufferClient, TrajectorySender, VersionPublisher, VersionSubscriber
from async_rl.zmq_auth import RunKeys
from rollout_workers.launcher import free_port
from tests.helpers import REPO, buffer_process, make_trajectory


def _node_host() -> str:
    """The address other nodes would reach this machine at (its default route's), or loopback without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # a UDP connect sends nothing: it only picks the interface
        except OSError:
            return "127.0.0.1"
        return probe.getsockname()[0]


def _node_endpoint() -> str:
    host = _node_host()
    return f"tcp://{host}:{free_port(host)}"


def _intruders(keys: RunKeys) -> tuple[zmq_auth.CurveClient | None, ...]:
    """No keys; another run's keys; a pair of its own with this run's server key (public: knowing it is not enough)."""
    other = RunKeys.generate()
    return None, other.client(), zmq_auth.CurveClient(other.client_public, other.client_secret, keys.server_public)


class SecuredBuffer(NamedTuple):
    keys: RunKeys
    submit: str
    serve: str
    process: subprocess.Popen


@pytest.fixture
def secured_buffer(tmp_path, monkeypatch) -> Iterator[SecuredBuffer]:
    """`async-rl buffer serve` on this node's address, given a fresh run's server keys in its environment only."""
    keys = RunKeys.generate()
    for name, value in keys.server_env().items():
        monkeypatch.setenv(name, value)  # inherited by the buffer process
    submit, serve = _node_endpoint(), _node_endpoint()
    directory = tmp_path / "buffer"
    directory.mkdir()
    with buffer_process(directory, submit, serve, "--max-staleness", "1") as process:
        yield SecuredBuffer(keys, submit, serve, process)


async def test_a_buffer_secured_from_the_env_takes_trajectories_from_the_runs_client_only(secured_buffer):
    keys, submit, serve, _ = secured_buffer
    async with asyncio.timeout(30):
        async with TrajectorySender(submit, curve=keys.client()) as sender:
            await sender.send(make_trajectory("run", "g"))
            await sender.flush(10)
        for intruder in _intruders(keys):
            async with TrajectorySender(submit, curve=intruder) as sender:
                await sender.send(make_trajectory("intruder", "g"))
                with pytest.raises(TimeoutError):
                    await sender.flush(1)
            async with BufferClient(serve, curve=intruder) as client:
                with pytest.raises(TimeoutError):
                    await client.stats(timeout=1)
        async with BufferClient(serve, curve=keys.client()) as client:
            stats = await client.stats()
    assert (stats.stored, stats.rejected, stats.duplicates) == (1, 0, 0)  # the intruders' frames never arrived


def test_the_keys_reach_the_buffer_in_its_environment_never_its_argv(secured_buffer):
    keys, _, _, process = secured_buffer
    proc = Path(f"/proc/{process.pid}")
    argv, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes().split(b"\0")
    assert keys.server_secret not in argv and keys.client_secret not in argv and b"CURVE" not in argv
    assert f"{zmq_auth.SERVER_SECRET_ENV}={keys.server_secret.decode()}".encode() in environ


async def test_version_notices_reach_only_subscribers_holding_the_runs_keys():
    keys = RunKeys.generate()
    publisher = VersionPublisher(_node_endpoint(), repeat_s=0.05, curve=keys.server())
    run, *intruders = (
        VersionSubscriber(publisher.endpoint, curve=curve) for curve in (keys.client(), *_intruders(keys))
    )
    try:
        async with asyncio.timeout(10):
            await publisher.publish(WeightsPublished(version=1, method="disk"))
            assert (await run.wait_for(1)).version == 1
        for intruder in intruders:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1):  # twenty repeats of the notice go out meanwhile
                    await intruder.next()
    finally:
        for subscriber in (run, *intruders):
            subscriber.close()
        publisher.close()


async def test_the_trainer_trains_and_publishes_over_curve_sockets(secured_buffer, tmp_path):
    """Both of its sockets: the buffer client (a batch arrives) and the versions PUB it binds (a notice does)."""
    from async_rl.trainer_main import train
    from rollout_workers.engine.model import create_tiny_model

    keys, submit, serve, _ = secured_buffer
    model_dir = create_tiny_model(tmp_path / "model", "llama")
    overrides = ["trainer.total_steps=1", "trainer.groups_per_step=1", "rollout.group_size=2"]
    config = load_config("recipes/tiny.toml", [f"run.output_dir={tmp_path / 'run'}", *overrides])
    versions = _node_endpoint()
    subscriber = zmq.asyncio.Context.instance().socket(zmq.SUB)
    subscriber.reconnect_ivl = 5  # the trainer publishes soon after it binds: be connected by then
    zmq_auth.secure_client(subscriber, keys.client())
    subscriber.subscribe(b"")
    subscriber.connect(versions)
    try:
        async with asyncio.timeout(60):
            async with TrajectorySender(submit, curve=keys.client()) as sender:
                for i in range(2):
                    await sender.send(make_trajectory(f"good-{i}", "good"))
                await sender.flush()
            trainer = train(
                config, model_dir, [], serve, versions, curve_server=keys.server(), curve_client=keys.client()
            )
            async with asyncio.TaskGroup() as tasks:  # a failing trainer fails the test at once
                tasks.create_task(trainer)
                notice = decode(await subscriber.recv())
    finally:
        subscriber.close(linger=0)
    assert notice.version == 1


def test_run_keys_round_trip_through_the_environment():
    keys = RunKeys.generate()
    both = keys.server_env() | keys.client_env()  # the trainer's: it binds and connects
    assert len(both) == len(zmq_auth.SERVER_ENV + zmq_auth.CLIENT_ENV)
    assert zmq_auth.server_keys_from_env(both) == keys.server()
    assert zmq_auth.client_keys_from_env(both) == keys.client()
    assert keys.server().admitted == {keys.client_public}
    assert zmq_auth.server_keys_from_env(keys.client_env()) is None  # a worker only connects
    assert zmq_auth.client_keys_from_env(keys.server_env()) is None  # the buffer only binds
    assert zmq_auth.server_keys_from_env({}) is None and zmq_auth.client_keys_from_env({}) is None
    shown = repr(keys) + repr(keys.server()) + repr(keys.client())
    assert keys.server_secret.decode() not in shown and keys.client_secret.decode() not in shown
    assert RunKeys.generate().server_public != keys.server_public


def _reader(name: str):
    return zmq_auth.server_keys_from_env if name in zmq_auth.SERVER_ENV else zmq_auth.client_keys_from_env


@pytest.mark.parametrize("unset", zmq_auth.SERVER_ENV + zmq_auth.CLIENT_ENV)
def test_a_partial_key_set_is_refused_naming_what_is_missing(unset):
    keys = RunKeys.generate()
    env = keys.server_env() | keys.client_env()
    del env[unset]
    with pytest.raises(ValueError, match=f"incomplete: {unset} unset"):
        _reader(unset)(env)


@pytest.mark.parametrize("value", ["", "short", "0" * 39 + "~", "é" * 40, "#" * 40, "0" * 41])
@pytest.mark.parametrize("name", zmq_auth.SERVER_ENV + zmq_auth.CLIENT_ENV)
def test_a_malformed_key_is_refused_naming_its_variable(name, value):
    keys = RunKeys.generate()
    env = keys.server_env() | keys.client_env() | {name: value}
    with pytest.raises(ValueError, match=f"{name} is not a CURVE key: expected 40 Z85 characters"):
        _reader(name)(env)


@pytest.mark.parametrize("secret", [zmq_auth.SERVER_SECRET_ENV, zmq_auth.CLIENT_SECRET_ENV])
def test_a_secret_from_another_pair_is_refused_without_echoing_it(secret):
    other_secret = zmq.curve_keypair()[1].decode()
    env = RunKeys.generate().server_env() | RunKeys.generate().client_env() | {secret: other_secret}
    with pytest.raises(ValueError, match="different key pairs") as refused:
        _reader(secret)(env)
    assert other_secret not in str(refused.value)


def test_a_buffer_given_half_the_keys_exits_with_the_reason(tmp_path):
    env = os.environ | RunKeys.generate().server_env()
    del env[zmq_auth.SERVER_ADMITS_ENV]
    argv = [sys.executable, "-m", "async_rl.cli", "buffer", "serve", "--dir", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"error: CURVE keys incomplete: {zmq_auth.SERVER_ADMITS_ENV} unset" in done.stderr


def test_the_key_files_of_the_flags_win_over_the_environment(tmp_path, monkeypatch):
    """One source of truth per process: a standalone buffer's --curve-secret is never replaced by an inherited env."""
    from buffer.service import add_arguments, server_keys

    secret_file = zmq_auth.generate_keys(tmp_path, "server")
    for name, value in RunKeys.generate().server_env().items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flagged = parser.parse_args(["--dir", str(tmp_path), "--curve-secret", str(secret_file)])
    assert server_keys(flagged) == zmq_auth.load_server(secret_file)
    assert server_keys(parser.parse_args(["--dir", str(tmp_path)])) == zmq_auth.server_keys_from_env()
