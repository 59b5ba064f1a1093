"""Trajectory stream and buffer throughput, printed as ratios in one run.

1. Stream: a sender process encodes and streams 1k-token trajectories over
   DEALER->ROUTER (the submission sockets); the receiver decodes each frame into a
   Trajectory (and, in a second row, does the buffer's per-frame checks instead:
   lengths, finiteness, oldest version). Compared with raw ZMQ bytes of the same
   size and with pickle.
2. Buffer: a real `async-rl buffer serve` process; put = trajectories acked
   (WAL-logged) per second through TrajectorySender, get = trajectories served
   per second through BufferClient.get_batch; compared with what a trainer needs.

Usage: python benchmarks/transport.py [--messages N] [--trainer-need TRAJ_PER_S]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pickle
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
import zmq.asyncio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from async_rl.messages import Trajectory, decode, encode  # noqa: E402
from async_rl.transport import BufferClient, TrajectorySender  # noqa: E402
from buffer.frames import read_header  # noqa: E402

TOKENS = 1024


def make_trajectory(index: int, group_size: int = 8) -> Trajectory:
    rng = random.Random(index)
    return Trajectory(
        sample_id=f"sample-{index:08d}",
        group_id=f"group-{index // group_size:08d}",
        group_size=group_size,
        prompt_ids=[rng.randrange(50_000) for _ in range(128)],
        response_ids=[rng.randrange(50_000) for _ in range(TOKENS)],
        behavior_logprobs=[-rng.random() * 5 for _ in range(TOKENS)],
        token_versions=[7] * TOKENS,
        reward=1.0,
        finish_reason="stop",
    )


def _sender(endpoint: str, mode: str, count: int) -> None:
    trajectory = make_trajectory(0)
    encoders = {
        "raw": lambda: raw_payload,
        "msgspec": lambda: encode(trajectory),
        "msgspec + buffer checks": lambda: encode(trajectory),
        "pickle": lambda: pickle.dumps(trajectory, protocol=pickle.HIGHEST_PROTOCOL),
    }
    raw_payload = bytes(len(encode(trajectory)))
    context = zmq.Context()
    out = context.socket(zmq.DEALER)
    out.sndhwm = 1000
    out.connect(endpoint)
    for _ in range(count):
        out.send(encoders[mode]())
    out.send(b"")  # end marker
    out.close(linger=-1)
    context.term()


async def stream(mode: str, count: int) -> tuple[float, float]:
    """(messages/s, MB/s) at the receiver, timed from the first to the last frame."""
    handle = {
        "raw": lambda frame: frame,
        "msgspec": decode,  # the stream: every field back as a typed Trajectory
        "msgspec + buffer checks": read_header,  # what the buffer service does per submission
        "pickle": pickle.loads,
    }[mode]
    context = zmq.asyncio.Context()
    receiver = context.socket(zmq.ROUTER)
    receiver.rcvhwm = 1000
    port = receiver.bind_to_random_port("tcp://127.0.0.1")
    process = multiprocessing.get_context("spawn").Process(
        target=_sender, args=(f"tcp://127.0.0.1:{port}", mode, count)
    )
    process.start()
    _, frame = await receiver.recv_multipart()
    handle(frame)
    received, size, start = 1, len(frame), time.perf_counter()
    while True:
        _, frame = await receiver.recv_multipart()
        if not frame:
            break
        handle(frame)
        received += 1
    elapsed = time.perf_counter() - start
    process.join()
    receiver.close(linger=0)
    context.term()
    return (received - 1) / elapsed, (received - 1) * size / elapsed / 1e6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def buffer_rates(count: int, fsync: str) -> tuple[float, float]:
    """(acked puts/s, served gets/s) against a real buffer service process."""
    submit, serve = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    trajectories = [make_trajectory(i) for i in range(count)]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, outside what is timed
            [
                sys.executable,
                "-m",
                "async_rl.cli",
                "buffer",
                "serve",
                "--dir",
                directory,
                "--set",
                f"fsync={fsync}",
                "--bind-submit",
                submit,
                "--bind-serve",
                serve,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert "buffer ready" in process.stdout.readline()
            async with TrajectorySender(submit, max_in_flight=512) as sender, BufferClient(serve) as client:
                start = time.perf_counter()
                for trajectory in trajectories:
                    await sender.send(trajectory)
                await sender.flush(120)
                put_rate = count / (time.perf_counter() - start)
                start, served = time.perf_counter(), 0
                while served < count:
                    batch = await client.get_batch(trainer_version=7, num_groups=8, max_staleness=4, timeout=10)
                    served += len(batch.trajectories)
                get_rate = served / (time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait(10)
    return put_rate, get_rate


async def run(args: argparse.Namespace) -> None:
    size = len(encode(make_trajectory(0)))
    print(f"1k-token trajectory: {size} bytes msgpack, {len(pickle.dumps(make_trajectory(0)))} bytes pickle")
    rates = {
        mode: await stream(mode, args.messages) for mode in ("raw", "msgspec", "msgspec + buffer checks", "pickle")
    }
    raw_rate, raw_mb = rates["raw"]
    print(f"\n{'stream':<26}{'traj/s':>10}{'MB/s':>9}{'vs raw':>9}{'vs pickle':>11}")
    for mode, (rate, mb) in rates.items():
        print(f"{mode:<26}{rate:>10.0f}{mb:>9.0f}{rate / raw_rate:>9.2f}{rate / rates['pickle'][0]:>11.2f}")
    print(f"\nbuffer service (trainer needs {args.trainer_need:.0f} traj/s)")
    print(f"{'fsync':<10}{'put traj/s':>12}{'x need':>9}{'get traj/s':>12}{'x need':>9}")
    for fsync in ("batch", "always"):
        put_rate, get_rate = await buffer_rates(args.buffer_messages, fsync)
        print(
            f"{fsync:<10}{put_rate:>12.0f}{put_rate / args.trainer_need:>9.0f}"
            f"{get_rate:>12.0f}{get_rate / args.trainer_need:>9.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--buffer-messages", type=int, default=8_000)
    # One H100 trains a ~1B model at roughly 50k tokens/s: ~50 trajectories of 1k tokens per second.
    parser.add_argument("--trainer-need", type=float, default=50.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
