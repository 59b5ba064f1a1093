"""The engine core: continuous batching on one thread, controlled at step boundaries.

Requests join and leave the running batch at every decode step. Each row keeps its KV in
a cache slot written in place (`decoder`); newcomers are prefilled in chunks of at most
`chunked_prefill_size` tokens into the slots after the running rows. All control (abort,
pause, weight updates, memory release) runs on the engine thread between steps, so
weights never change in the middle of a forward pass. Other threads talk to the core
only through `call`, which returns a concurrent Future.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from async_rl.logprobs import token_logprobs
from rollout_workers.engine.batch import RowState, RunningBatch
from rollout_workers.engine.decoder import Decoder
from rollout_workers.engine.sampling import RETURN_ORIGINAL_LOGPROB, sample

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")
MEMORY_TAGS = ("weights", "kv_cache")


class RequestRefused(Exception):
    """A request the engine core refuses; the server answers it with a 4xx carrying this message
    (the client's EngineError is what that answer becomes on the other side)."""


@dataclass(eq=False)
class Sequence:
    """One sample being generated. Its lists only ever grow, so other threads may read prefixes
    (with trainer logprobs on, output_logprobs values are replaced where they are settled)."""

    sid: str  # meta_info.id
    rid: str  # abort key, shared by the n samples of one input
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    logprob_start_len: int = -1
    # Called on the engine thread after each new token (streaming) or at finish.
    on_update: Callable[[Sequence], None] = lambda seq: None
    stream: bool = False
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_versions: list[str] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    finish_reason: dict[str, Any] | None = None
    finish_version: str | None = None
    trainer_logprobs_upto: int = 0  # output_logprobs before this index are the trainer's (trainer_logprobs_chunk)
    created: float = field(default_factory=time.time)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.output_ids)

    def finish_after(self, token: int, tokenizer) -> dict[str, Any] | None:
        """SGLang's order: length first, then stop tokens, then stop strings."""
        if len(self.output_ids) >= self.max_new_tokens:
            return {"type": "length", "length": self.max_new_tokens}
        if token in self.stop_token_ids:
            return {"type": "stop", "matched": token}
        if self.stop_strings and tokenizer is not None:
            window = max(len(s) for s in self.stop_strings) + 4
            tail = tokenizer.decode(self.output_ids[-window:])
            for stop in self.stop_strings:
                if stop in tail:
                    return {"type": "stop", "matched": stop}
        return None


@dataclass
class EngineStats:
    steps: int = 0
    decode_forwards: int = 0
    prefill_forwards: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0
    max_batch_size: int = 0
    running: int = 0
    waiting: int = 0
    # Where a decode step's time goes, summed over steps (host seconds): launching the forward and the
    # sampling, waiting for their results, the per-row bookkeeping; and prefills whole.
    decode_launch_s: float = 0.0
    decode_wait_s: float = 0.0
    decode_record_s: float = 0.0
    prefill_s: float = 0.0
    graph_replays: int = 0
    graph_captures: int = 0

    def breakdown(self, since: dict[str, Any] | None = None) -> str:
        """Where the decode steps' time went (since the `asdict` of an earlier copy), per step."""
        now = asdict(self)
        delta = {k: v - (since or {}).get(k, 0) for k, v in now.items() if isinstance(v, int | float)}
        steps = max(delta["decode_forwards"], 1)
        per_step = " ".join(
            f"{key} {1e3 * delta[f'decode_{key}_s'] / steps:.3f}" for key in ("launch", "wait", "record")
        )
        return (
            f"{delta['decode_forwards']} decode steps, ms/step {per_step}; prefill {delta['prefill_s']:.3f} s in "
            f"{delta['prefill_forwards']} forwards; graph replays {delta['graph_replays']}, "
            f"captures {delta['graph_captures']}"
        )


class EngineCore:
    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        device: str = "cpu",
        max_running_requests: int = 256,
        max_total_tokens: int | None = None,
        chunked_prefill_size: int = 8192,
        cuda_graph_max_bs: int = 256,
        trainer_logprobs_chunk: int | None = None,
        weight_version: str = "0",
        seed: int = 0,
    ):
        """cuda_graph_max_bs: decode steps of up to this many rows replay CUDA graphs (0: never).
        trainer_logprobs_chunk: report each finished sequence's logprobs as the trainer computes them
        (async_rl.logprobs, one sequence, the trainer's logprob_chunk_tokens); None: the sampler's."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.decoder = Decoder(model, self.device, cuda_graph_max_bs)
        self.chunked_prefill_size = chunked_prefill_size if chunked_prefill_size > 0 else sys.maxsize
        self.trainer_logprobs_chunk = trainer_logprobs_chunk
        config = model.config
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.max_running_requests = max_running_requests
        self.max_total_tokens = max_total_tokens or self.context_length * max_running_requests
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.eos_token_ids = frozenset(
            _as_list(config.eos_token_id) + _as_list(getattr(model.generation_config, "eos_token_id", None))
        )
        self.weight_version = weight_version
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.stats = EngineStats()
        self.paused: str | None = None  # the pause mode while paused
        self.released: set[str] = set()
        self.waiting: collections.deque[Sequence] = collections.deque()
        # Requests that arrive while paused wait outside the scheduler until continue, as in SGLang
        # (its tokenizer manager holds them): they keep neither /flush_cache nor an update from running.
        self.held: list[Sequence] = []
        self.batch: RunningBatch | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live_lock = threading.Lock()
        self._live: dict[str, int] = {}  # rid -> unfinished sequences
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)

    # ---- any thread ----

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Aborts everything; a thread stuck in a collective is left behind (it is a daemon)."""
        self.call(self._stop).result(timeout_s)
        self._thread.join(timeout_s)

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the engine thread at the next step boundary."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, args, future))
        return future

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences; raises RequestRefused if a rid is already live (nothing is queued then)."""
        rids = collections.Counter(seq.rid for seq in sequences)
        with self._live_lock:
            taken = [rid for rid in rids if rid in self._live]
            if taken:
                raise RequestRefused(f"request id {taken[0]!r} is already running")
            self._live.update(rids)
        self.call(self._enqueue, sequences)

    def is_live(self, rid: str) -> bool:
        with self._live_lock:
            return rid in self._live

    # ---- engine thread: control ----

    def _stop(self) -> None:
        self._abort_where(lambda seq: True, "engine shutting down")
        self._stopping = True

    def _enqueue(self, sequences: list[Sequence]) -> None:
        (self.held if self.paused else self.waiting).extend(sequences)

    def abort(self, rid: str | None, message: str = "aborted by request") -> int:
        """Engine thread. rid None aborts everything. A rid that names a live request aborts it and
        every other request whose rid starts with it, as SGLang does (its tokenizer manager needs the
        exact rid, its scheduler then matches prefixes); any other rid aborts nothing.
        Returns how many sequences were aborted."""
        if rid is not None and not self.is_live(rid):
            return 0
        return self._abort_where(lambda seq: rid is None or seq.rid.startswith(rid), message)

    def _abort_where(self, predicate: Callable[[Sequence], bool], message: str) -> int:
        reason = {"type": "abort", "message": message}
        aborted = [seq for seq in self.held if predicate(seq)]
        self.held = [seq for seq in self.held if not predicate(seq)]
        queued = [seq for seq in self.waiting if predicate(seq)]
        for seq in queued:
            self.waiting.remove(seq)
        aborted += queued
        for seq in aborted:
            self._finish(seq, reason)
        if self.batch is not None:
            keep = [not predicate(row) for row in self.batch.rows]
            for row, k in zip(self.batch.rows, keep):
                if not k:
                    aborted.append(row)
                    self._finish(row, reason)
            self._keep_rows(keep)
        return len(aborted)

    def pause(self, mode: str) -> None:
        if mode not in PAUSE_MODES:
            raise RequestRefused(f"unknown pause mode {mode!r}; expected one of {', '.join(PAUSE_MODES)}")
        if mode == "abort":
            self.abort(None, "aborted by pause_generation")
        elif mode == "retract":
            self._retract()
        self.paused = mode

    def resume(self) -> None:
        self.paused = None
        self.waiting.extend(self.held)
        self.held.clear()

    def _retract(self) -> None:
        """Move running rows to the front of the queue and drop their KV; they are re-prefilled later."""
        if self.batch is not None:
            self.waiting.extendleft(reversed(self.batch.rows))
            self.batch = None

    def _live_sequences(self) -> list[Sequence]:
        return [*(self.batch.rows if self.batch is not None else []), *self.waiting, *self.held]

    def has_requests(self) -> bool:
        return bool(self.waiting) or self.batch is not None

    def flush_cache(self) -> tuple[bool, str]:
        if self.has_requests():
            return False, "cannot flush the cache while requests are running, waiting or paused in place"
        self.batch = None  # the slots stay allocated: they hold no prefix anyone could reuse
        return True, "Cache flushed."

    def release_memory(self, tags: list[str]) -> tuple[bool, str]:
        if self.has_requests():  # SGLang asserts an idle scheduler here, and exits if it is not
            return False, "cannot release memory while requests are running, waiting or paused; abort them first"
        if "weights" in tags and "weights" not in self.released and self.device.type != "cpu":
            self.model.to("cpu")  # host copy keeps the weights; the device memory is what gets freed
        self.decoder.reset()  # the cache, and the graphs captured over the weights' old addresses
        self.released.update(tags)
        _empty_device_cache(self.device)
        return True, f"released {', '.join(sorted(tags))}"

    def resume_memory(self, tags: list[str]) -> tuple[bool, str]:
        if not_released := sorted(set(tags) - self.released):  # SGLang fails on a tag it never released
            return False, f"not released: {', '.join(not_released)}"
        if "weights" in tags and "weights" in self.released and self.device.type != "cpu":
            self.model.to(self.device)
            self.decoder.reset()
        self.released.difference_update(tags)
        return True, f"resumed {', '.join(sorted(tags))}"

    def load_weights(
        self, tensors: dict[str, torch.Tensor], weight_version: str | None, flush_cache: bool = True
    ) -> tuple[bool, str]:
        """All or nothing: every name must exist with the same shape and finite values, else nothing changes.

        `flush_cache` while requests are paused in the engine (retract, in_place) is refused: SGLang
        asserts that the flush after an update succeeds, and with paused requests it cannot, so the
        server exits; here the same call is a 400 that changes nothing.
        """
        if flush_cache and self.paused and self.has_requests():
            return False, (
                f"flush_cache=true with requests paused ({self.paused}): the cache cannot be flushed, "
                "and SGLang exits on this ('Cache flush failed after updating weights'); send flush_cache=false"
            )
        state = self.model.state_dict()
        for name, tensor in tensors.items():
            if name not in state:
                return False, f"unknown parameter {name!r}"
            if tuple(tensor.shape) != tuple(state[name].shape):
                return (
                    False,
                    f"shape mismatch for {name!r}: got {list(tensor.shape)}, model has {list(state[name].shape)}",
                )
            if tensor.is_floating_point() and not _all_finite(tensor):
                return False, f"parameter {name!r} has non-finite values"
        if not tensors:
            return False, "no tensors given"
        for seq in self._live_sequences():
            self._settle_trainer_logprobs(seq)
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
        if weight_version is not None:
            self.weight_version = weight_version
        return True, f"updated {len(tensors)} tensors; weight_version={self.weight_version}"

    # ---- engine thread: the loop ----

    def _can_step(self) -> bool:
        return not self._stopping and self.paused is None and not self.released and self.has_requests()

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self._run_commands(block=not self._can_step())
                if self._can_step():
                    try:
                        self._step()
                    except Exception as exc:  # a broken step must not kill the server: fail what was in it
                        log.exception("engine step failed")
                        self._abort_where(lambda seq: True, f"engine error: {exc!r}")
                        self.batch = None

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return
        while True:
            fn, args, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        if self.batch is not None:
            self._decode()
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception:  # they are in neither the queue nor the batch: finish them here
                for seq in admitted:
                    if seq.finish_reason is None:
                        self._finish(seq, {"type": "abort", "message": "engine error during prefill"})
                raise
        self.stats.steps += 1
        if (graphs := self.decoder.graphs) is not None:
            self.stats.graph_replays, self.stats.graph_captures = graphs.replays, graphs.captures
        running = len(self.batch.rows) if self.batch is not None else 0
        self.stats.running, self.stats.waiting = running, len(self.waiting)
        self.stats.max_batch_size = max(self.stats.max_batch_size, running)

    def _admit(self) -> list[Sequence]:
        """Newcomers for this step's prefill: within the cache budget (slots hold the longest row's
        prompt + max_new_tokens each), the batch size and one chunk (right-padded), and at least one,
        so that a prompt longer than a chunk goes alone."""
        rows = self.batch.rows if self.batch is not None else []
        longest = max((len(r.prompt_ids) + r.max_new_tokens for r in rows), default=0)
        admitted: list[Sequence] = []
        widest = 0
        while self.waiting and len(rows) + len(admitted) < self.max_running_requests:
            head = self.waiting[0]
            need = max(longest, len(head.prompt_ids) + head.max_new_tokens)
            if (len(rows) + len(admitted) + 1) * need > self.max_total_tokens and (rows or admitted):
                break
            width = max(widest, len(head.prompt_ids) + len(head.output_ids))
            if admitted and width * (len(admitted) + 1) > self.chunked_prefill_size:
                break
            longest, widest = need, width
            admitted.append(self.waiting.popleft())
        return admitted

    def _decode(self) -> None:
        batch = self.batch
        assert batch is not None  # _step decodes only while a batch runs
        started = time.perf_counter()
        logits = self.decoder.decode(batch.last_tokens, batch.positions, batch.longest + 1)
        self.stats.decode_forwards += 1
        batch.advance()
        tokens, logprobs = sample(logits, batch.state, self.generator)
        batch.last_tokens = tokens
        self.stats.decode_launch_s += time.perf_counter() - started
        self._keep_rows(self._record(batch.rows, batch.state, tokens, logprobs, timed=True))

    def _prefill(self, sequences: list[Sequence]) -> None:
        """Prefill `sequences` into the slots after the running rows; they join the batch."""
        first = len(self.batch) if self.batch is not None else 0
        texts = [seq.prompt_ids + seq.output_ids for seq in sequences]
        lengths = [len(t) for t in texts]
        longest = max(n + seq.remaining for n, seq in zip(lengths, sequences))
        started = time.perf_counter()
        self.decoder.cache.reserve(first + len(texts), longest)
        last_hidden = self._prefill_hidden(texts, first, sequences)
        self.stats.prefill_forwards += 1
        state = RowState.of(sequences, self.device)
        tokens, logprobs = sample(self.decoder.logits(last_hidden), state, self.generator)
        fresh = RunningBatch(sequences, lengths, tokens, state)
        keep = [seq.remaining > 0 for seq in sequences]
        for seq, k in zip(sequences, keep):
            if not k:  # max_new_tokens == 0: a prefill for logprobs only
                self._finish(seq, {"type": "length", "length": seq.max_new_tokens})
        generating = [i for i, k in enumerate(keep) if k]
        index = torch.tensor(generating, dtype=torch.long, device=self.device)
        going_on = self._record([sequences[i] for i in generating], state, tokens, logprobs, index)
        for i, k in zip(generating, going_on):
            keep[i] = k
        self.stats.prefill_s += time.perf_counter() - started
        if self.batch is None:
            self.batch = fresh
            self._keep_rows(keep)
        else:
            self.batch.extend(fresh)
            self._keep_rows([True] * first + keep)

    def _prefill_hidden(self, texts: list[list[int]], first: int, sequences: list[Sequence]) -> torch.Tensor:
        """The final hidden state at each text's last token (rows, hidden), written to slots from `first`;
        fills input logprobs where asked. The texts go in one right-padded forward; a text longer than
        a chunk (admitted alone) goes chunk by chunk."""
        width = max(len(t) for t in texts)
        chunk = width if len(texts) > 1 else min(width, self.chunked_prefill_size)
        ids = torch.full((len(texts), width), self.pad_token_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids[i, : len(text)] = torch.tensor(text, dtype=torch.long)
        ids = ids.to(self.device)
        pieces = [self.decoder.prefill(ids[:, start : start + chunk], first, start) for start in range(0, width, chunk)]
        hidden = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        for i, seq in enumerate(sequences):
            if seq.logprob_start_len >= 0 and seq.input_logprobs is None:
                logits = self.decoder.logits(hidden[i, : len(texts[i])])
                seq.input_logprobs = _input_logprobs(logits, texts[i], seq.logprob_start_len)
        ends = torch.tensor([len(t) - 1 for t in texts], device=self.device)
        return hidden[torch.arange(len(texts), device=self.device), ends]

    def _record(
        self,
        rows: list[Sequence],
        state: RowState,
        tokens: torch.Tensor,
        logprobs: torch.Tensor,
        index: torch.Tensor | None = None,
        timed: bool = False,
    ) -> list[bool]:
        """Append each row's new token; finish rows that are done. Returns which rows go on.
        `index` picks `rows` out of the state's rows where not all of them generate; `timed` counts
        the wait for the results and the bookkeeping in the decode stats."""
        done = state.finished(tokens)
        if index is not None:
            tokens, logprobs, done = tokens[index], logprobs[index], done[index]
        started = time.perf_counter()
        # One transfer (float64 holds token ids exactly): the step's only wait for the device.
        host_tokens, host_logprobs, host_done = torch.stack(
            [tokens.double(), logprobs.double(), done.double()]
        ).tolist()
        waited = time.perf_counter()
        keep = []
        version = self.weight_version
        for seq, value, logprob, finished in zip(rows, host_tokens, host_logprobs, host_done):
            token = int(value)
            seq.output_ids.append(token)
            seq.output_logprobs.append(logprob)
            seq.output_versions.append(version)
            reason = seq.finish_after(token, self.tokenizer) if finished or seq.stop_strings else None
            if reason is None:
                keep.append(True)
                if seq.stream:
                    seq.on_update(seq)
            else:
                keep.append(False)
                self._finish(seq, reason)
        self.stats.generated_tokens += len(rows)
        if timed:
            self.stats.decode_wait_s += waited - started
            self.stats.decode_record_s += time.perf_counter() - waited
        return keep

    def _keep_rows(self, keep: list[bool]) -> None:
        if all(keep):
            return
        if not any(keep):
            self.batch = None
        else:
            assert self.batch is not None  # `keep` has one entry per row of the running batch
            self.batch.keep(keep, self.decoder.cache)

    def _finish(self, seq: Sequence, reason: dict[str, Any]) -> None:
        self._settle_trainer_logprobs(seq)
        seq.finish_reason = reason
        seq.finish_version = self.weight_version
        self.stats.finished_requests += 1
        with self._live_lock:
            self._live[seq.rid] -= 1
            if not self._live[seq.rid]:
                del self._live[seq.rid]
        try:
            seq.on_update(seq)
        except Exception:
            log.exception("finish callback of %s failed", seq.sid)

    def _settle_trainer_logprobs(self, seq: Sequence) -> None:
        """With trainer_logprobs_chunk set, replace the logprobs of the tokens generated under the current
        weights by the trainer's: its function on its input (prompt + response so far, one unpadded row).
        Runs at finish and, for every live sequence, before new weights load, so each token's logprob
        is of the weights that sampled it; a finished sequence's latest tokens get exactly the trainer's
        numbers (the same row it will compute)."""
        if self.trainer_logprobs_chunk is None or seq.trainer_logprobs_upto == len(seq.output_ids):
            return
        ids = torch.tensor([seq.prompt_ids + seq.output_ids], device=self.device)
        temperature = 1.0 if RETURN_ORIGINAL_LOGPROB or seq.temperature == 0 else seq.temperature
        try:
            values = token_logprobs(self.model, ids, torch.ones_like(ids), temperature, self.trainer_logprobs_chunk)
        except Exception:  # e.g. out of memory: the sampler's logprobs stay (the trainer's metrics show the gap)
            log.exception("trainer logprobs of %s failed; keeping the sampler's", seq.sid)
            return
        start, prompt = seq.trainer_logprobs_upto, len(seq.prompt_ids)
        seq.output_logprobs[start:] = values[0, prompt - 1 + start :].tolist()
        seq.trainer_logprobs_upto = len(seq.output_ids)


def _input_logprobs(logits: torch.Tensor, tokens: list[int], start: int) -> list[float | None]:
    """logprob of tokens[j] given tokens[:j] for j >= start; the first token has none."""
    start = min(start, len(tokens))
    first = max(start, 1)
    values: list[float | None] = [None] if start == 0 else []
    if first < len(tokens):
        logprobs = torch.log_softmax(logits[first - 1 : len(tokens) - 1].float(), dim=-1)
        targets = torch.tensor(tokens[first:], device=logits.device).unsqueeze(1)
        values += logprobs.gather(1, targets).squeeze(1).tolist()
    return values


def _all_finite(tensor: torch.Tensor) -> bool:
    """Exact, and one reduction where it can: a sum is finite only if every element is (an inf or a
    NaN anywhere makes it inf or NaN); only a sum that overflows needs the elementwise check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
