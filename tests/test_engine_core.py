"""The engine core driven directly (no HTTP): batching, exactness of tokens and logprobs, control."""

from __future__ import annotations

import threading

import pytest
import torch

from rollout_workers.engine.core import EngineCore, RequestRefused, Sequence
from rollout_workers.engine.model import create_tiny_model, load_model

WAIT_S = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(create_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama"))


@pytest.fixture
def core(tiny):
    core = EngineCore(tiny.model, tiny.tokenizer, max_running_requests=64, seed=0)
    core.start()
    yield core
    core.stop(timeout_s=WAIT_S)


class Tracker:
    """Builds sequences whose finish (and, for streaming ones, every token) sets events."""

    def __init__(self):
        self.finished: dict[str, threading.Event] = {}
        self.progress = threading.Condition()

    def seq(self, sid: str, prompt: list[int], max_new_tokens: int, **kwargs) -> Sequence:
        self.finished[sid] = threading.Event()

        def on_update(seq: Sequence) -> None:
            with self.progress:
                self.progress.notify_all()
            if seq.finish_reason is not None:
                self.finished[seq.sid].set()

        return Sequence(
            sid=sid,
            rid=kwargs.pop("rid", sid),
            prompt_ids=prompt,
            max_new_tokens=max_new_tokens,
            on_update=on_update,
            **kwargs,
        )

    def wait(self, *seqs: Sequence) -> None:
        for seq in seqs:
            assert self.finished[seq.sid].wait(WAIT_S), f"{seq.sid} did not finish"

    def wait_until(self, predicate) -> None:
        with self.progress:
            assert self.progress.wait_for(predicate, WAIT_S)


def join_mid_generation(core: EngineCore, tracker: Tracker, running: Sequence, tokens: int, newcomers: list[Sequence]):
    """Submit `newcomers` once `running` has `tokens` tokens; an in-place pause makes the timing deterministic."""
    tracker.wait_until(lambda: len(running.output_ids) >= tokens)
    core.call(core.pause, "in_place").result(WAIT_S)
    assert running.finish_reason is None
    core.submit(newcomers)
    core.call(core.resume).result(WAIT_S)


def prompts_of_different_lengths() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(4, 100, (n,), generator=generator).tolist() for n in (3, 11, 1, 7, 20)]


def full_forward_logprobs(model, prompt: list[int], output: list[int], temperature: float = 1.0) -> list[float]:
    """What the trainer computes: logprobs of softmax(logits / T), T = 0 (greedy) counting as 1."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output], device=model.device)).logits[0].float()
    logprobs = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return [logprobs[len(prompt) - 1 + i, token].item() for i, token in enumerate(output)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt], device=model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
        )
    return output[0, len(prompt) :].tolist()


def assert_greedy_matches_hf_generate_with_staggered_arrivals(core: EngineCore, model) -> None:
    tracker = Tracker()
    seqs = [
        tracker.seq(f"g{i}", p, 30 - 5 * i, temperature=0.0, stream=True)
        for i, p in enumerate(prompts_of_different_lengths())
    ]
    core.submit(seqs[:2])
    join_mid_generation(core, tracker, seqs[0], 2, seqs[2:])
    tracker.wait(*seqs)
    for seq in seqs:
        assert seq.output_ids == hf_greedy(model, seq.prompt_ids, seq.max_new_tokens)
        assert seq.finish_reason == {"type": "length", "length": seq.max_new_tokens}


def test_greedy_matches_hf_generate_with_staggered_arrivals(core, tiny):
    assert_greedy_matches_hf_generate_with_staggered_arrivals(core, tiny.model)


def test_prompts_longer_than_a_chunk_are_prefilled_chunk_by_chunk(tiny):
    """Chunks of 8 tokens: the 11- and 20-token prompts take several forwards; tokens, sampled
    logprobs and input logprobs are those of one full forward."""
    core = EngineCore(tiny.model, tiny.tokenizer, chunked_prefill_size=8, seed=0)
    core.start()
    try:
        assert_greedy_matches_hf_generate_with_staggered_arrivals(core, tiny.model)
        tracker = Tracker()
        prompt = prompts_of_different_lengths()[-1]
        seq = tracker.seq("long", prompt, 6, logprob_start_len=0)
        core.submit([seq])
        tracker.wait(seq)
        assert seq.input_logprobs[0] is None
        expected = full_forward_logprobs(tiny.model, prompt[:1], prompt[1:] + seq.output_ids)
        assert seq.input_logprobs[1:] == pytest.approx(expected[: len(prompt) - 1], abs=1e-4)
        assert seq.output_logprobs == pytest.approx(expected[len(prompt) - 1 :], abs=1e-4)
    finally:
        core.stop(timeout_s=WAIT_S)


def assert_sampled_logprobs_equal_full_forward(core: EngineCore, model, tolerance: float) -> None:
    tracker = Tracker()
    settings = [
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, top_k=5),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.0),
    ]
    seqs = [
        tracker.seq(f"s{i}", p, 40 - 6 * i, stream=True, **settings[i])
        for i, p in enumerate(prompts_of_different_lengths())
    ]
    core.submit([seqs[0]])
    join_mid_generation(core, tracker, seqs[0], 3, seqs[1:3])
    join_mid_generation(core, tracker, seqs[1], 2, seqs[3:])
    tracker.wait(*seqs)
    for seq in seqs:
        expected = full_forward_logprobs(model, seq.prompt_ids, seq.output_ids, seq.temperature)
        assert max(abs(a - b) for a, b in zip(seq.output_logprobs, expected)) <= tolerance
        assert seq.output_versions == ["0"] * len(seq.output_ids)
    stats = core.stats
    assert stats.max_batch_size == 5
    assert stats.decode_forwards < sum(len(seq.output_ids) for seq in seqs)


def test_sampled_logprobs_equal_full_forward_and_batching_is_continuous(core, tiny):
    assert_sampled_logprobs_equal_full_forward(core, tiny.model, 1e-4)


def test_top_k_1_is_greedy_and_n_samples_differ(core):
    tracker = Tracker()
    prompt = [5, 6, 7, 8]
    greedy = tracker.seq("greedy", prompt, 10, temperature=0.0)
    top1 = tracker.seq("top1", prompt, 10, temperature=1.0, top_k=1)
    samples = [tracker.seq(f"n{j}", prompt, 10, rid="n", temperature=1.0) for j in range(4)]
    core.submit([greedy, top1, *samples])
    tracker.wait(greedy, top1, *samples)
    assert top1.output_ids == greedy.output_ids
    assert len({tuple(s.output_ids) for s in samples}) > 1


def test_stop_token_stop_string_and_prefill_only(core, tiny):
    tracker = Tracker()
    probe = tracker.seq("probe", [5, 6, 7], 4, temperature=0.0)
    core.submit([probe])
    tracker.wait(probe)
    second = probe.output_ids[1]
    by_token = tracker.seq("tok", [5, 6, 7], 4, temperature=0.0, stop_token_ids=frozenset({second}))
    stop_text = tiny.tokenizer.decode(probe.output_ids[1:3])
    by_string = tracker.seq("str", [5, 6, 7], 4, temperature=0.0, stop_strings=(stop_text,))
    logprobs_only = tracker.seq("zero", [5, 6, 7, 8, 9], 0, logprob_start_len=1)
    core.submit([by_token, by_string, logprobs_only])
    tracker.wait(by_token, by_string, logprobs_only)
    assert by_token.output_ids == probe.output_ids[: probe.output_ids.index(second) + 1]
    assert by_token.finish_reason == {"type": "stop", "matched": second}
    shortest = next(n for n in range(1, 5) if stop_text in tiny.tokenizer.decode(probe.output_ids[:n]))
    assert by_string.output_ids == probe.output_ids[:shortest]
    assert by_string.finish_reason == {"type": "stop", "matched": stop_text}
    assert logprobs_only.output_ids == [] and logprobs_only.finish_reason["type"] == "length"
    expected = full_forward_logprobs(tiny.model, [5], [6, 7, 8, 9])  # from position 1 on
    assert logprobs_only.input_logprobs == pytest.approx(expected, abs=1e-4)


def test_abort_returns_partial_output_and_duplicate_rid_is_refused(core):
    tracker = Tracker()
    long = tracker.seq("long", [5, 6], 1500, stream=True, temperature=0.0)
    core.submit([long])
    with pytest.raises(RequestRefused):
        core.submit([tracker.seq("again", [5], 3, rid="long")])
    tracker.wait_until(lambda: len(long.output_ids) >= 3)
    assert core.call(core.abort, "long").result(WAIT_S) == 1
    tracker.wait(long)
    assert long.finish_reason["type"] == "abort"
    assert 3 <= len(long.output_ids) == len(long.output_logprobs) < 1500
    assert not core.is_live("long")
    assert core.call(core.abort, "unknown").result(WAIT_S) == 0


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_update_continue_resumes_under_new_weights(core, tiny, mode):
    tracker = Tracker()
    prompt = [7, 8, 9]
    baseline = tracker.seq("base", prompt, 40, temperature=0.0)
    core.submit([baseline])
    tracker.wait(baseline)
    run = tracker.seq(f"run-{mode}", prompt, 40, temperature=0.0, stream=True)
    core.submit([run])
    tracker.wait_until(lambda: len(run.output_ids) >= 5)
    core.call(core.pause, mode).result(WAIT_S)
    paused_at = len(run.output_ids)
    if mode == "in_place":
        assert core.call(core.flush_cache).result(WAIT_S)[0] is False
    # Same values, new version: the continuation must match the uninterrupted run exactly.
    same = {name: tensor.clone() for name, tensor in tiny.model.state_dict().items()}
    refused, message = core.call(core.load_weights, same, "1").result(WAIT_S)  # flush_cache=True: SGLang would exit
    assert not refused and "flush_cache" in message and core.weight_version == "0"
    assert core.call(core.load_weights, same, "1", False).result(WAIT_S)[0]
    assert len(run.output_ids) == paused_at  # nothing generated while paused
    core.call(core.resume).result(WAIT_S)
    tracker.wait(run)
    assert run.output_ids == baseline.output_ids
    assert run.output_versions == ["0"] * paused_at + ["1"] * (40 - paused_at)
    assert run.finish_version == "1"


def test_pause_abort_and_weight_update_is_all_or_nothing(core, tiny):
    tracker = Tracker()
    run = tracker.seq("victim", [5, 6, 7], 1000, stream=True)
    core.submit([run])
    tracker.wait_until(lambda: len(run.output_ids) >= 2)
    core.call(core.pause, "abort").result(WAIT_S)
    tracker.wait(run)
    assert run.finish_reason["type"] == "abort"
    name, tensor = next(iter(tiny.model.state_dict().items()))
    before = tensor.clone()
    bad_shape = {name: torch.zeros(before.shape[0] + 1, *before.shape[1:])}
    ok, message = core.call(core.load_weights, bad_shape, "9").result(WAIT_S)
    assert not ok and "shape" in message
    ok, message = core.call(core.load_weights, {name: torch.full_like(before, float("nan"))}, "9").result(WAIT_S)
    assert not ok and "non-finite" in message
    opposite_infinities = before.clone()
    opposite_infinities.view(-1)[:2] = torch.tensor([float("inf"), float("-inf")])
    ok, message = core.call(core.load_weights, {name: opposite_infinities}, "9").result(WAIT_S)
    assert not ok and "non-finite" in message
    ok, message = core.call(core.load_weights, {"no.such.weight": before}, "9").result(WAIT_S)
    assert not ok and "unknown" in message
    assert torch.equal(tiny.model.state_dict()[name], before) and core.weight_version == "0"
    # Finite values whose sum overflows are loaded (the fast check's overflow falls back to the exact one).
    assert core.call(core.load_weights, {name: torch.full_like(before, 3e38)}, "9").result(WAIT_S)[0]
    assert core.call(core.load_weights, {name: before}, "0").result(WAIT_S)[0]
    core.call(core.resume).result(WAIT_S)


def test_requests_that_arrive_while_paused_wait_outside_the_scheduler(core):
    """As in SGLang, they keep neither a flush nor a flushing update from running, start on continue,
    and can be aborted while they wait."""
    tracker = Tracker()
    core.call(core.pause, "abort").result(WAIT_S)
    early, other = tracker.seq("held/1", [5, 6], 3), tracker.seq("kept", [5, 6], 3)
    core.submit([early, other])
    assert core.call(core.flush_cache).result(WAIT_S)[0]
    assert core.call(core.abort, "held/").result(WAIT_S) == 0  # no such live rid: SGLang aborts nothing
    assert core.call(core.abort, "held/1").result(WAIT_S) == 1
    tracker.wait(early)
    assert early.finish_reason["type"] == "abort" and not early.output_ids
    core.call(core.resume).result(WAIT_S)
    tracker.wait(other)
    assert other.finish_reason["type"] == "length" and len(other.output_ids) == 3


# ---- CUDA: the decode step replayed from CUDA graphs (gpu-marked; skipped without CUDA) ----


def cuda_core(folder, dtype: str) -> tuple[EngineCore, object]:
    loaded = load_model(folder, device="cuda", dtype=dtype)
    core = EngineCore(loaded.model, loaded.tokenizer, device="cuda", seed=0)
    core.start()
    return core, loaded.model


@pytest.fixture(scope="module")
def gqa_folders(tmp_path_factory):
    """Grouped-query attention (4 query heads over 2 KV heads), the shape of Qwen2-0.5B's attention."""
    root = tmp_path_factory.mktemp("gqa")
    return [
        create_tiny_model(
            root / f"seed{seed}", "qwen2", hidden_size=128, num_layers=3, seed=seed, num_key_value_heads=2
        )
        for seed in (0, 1)
    ]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_cuda_graph_decode_gives_full_forward_logprobs(gqa_folders, dtype, tolerance):
    core, model = cuda_core(gqa_folders[0], dtype)
    try:
        assert_sampled_logprobs_equal_full_forward(core, model, tolerance)
        assert core.decoder.graphs is not None and core.decoder.graphs.graphs, "no decode step ran from a graph"
        assert core.stats.graph_replays == core.stats.decode_forwards  # every step of <= 256 rows replays
        if dtype == "float32":
            assert_greedy_matches_hf_generate_with_staggered_arrivals(core, model)
    finally:
        core.stop(timeout_s=WAIT_S)


@pytest.mark.gpu
def test_cuda_graphs_see_weight_updates_and_survive_memory_release(gqa_folders):
    core, model = cuda_core(gqa_folders[0], "float32")
    other = load_model(gqa_folders[1], device="cuda", dtype="float32").model
    try:
        prompt = prompts_of_different_lengths()[1]

        def greedy() -> list[int]:
            tracker = Tracker()
            seq = tracker.seq(f"q{core.stats.finished_requests}", prompt, 24, temperature=0.0)
            core.submit([seq])
            tracker.wait(seq)
            return seq.output_ids

        assert greedy() == hf_greedy(model, prompt, 24)
        ok, _ = core.call(core.load_weights, dict(other.state_dict()), "1").result(WAIT_S)
        assert ok
        assert greedy() == hf_greedy(other, prompt, 24)
        assert core.call(core.release_memory, ["weights", "kv_cache"]).result(WAIT_S)[0]
        assert core.call(core.resume_memory, ["weights", "kv_cache"]).result(WAIT_S)[0]
        assert greedy() == hf_greedy(other, prompt, 24)
    finally:
        core.stop(timeout_s=WAIT_S)


def test_trainer_logprobs_are_the_trainers_function_on_each_version(tiny):
    """With trainer_logprobs_chunk set, a sample's logprobs are exactly async_rl.logprobs' on its row;
    across a weight update mid-sample, the tokens before it keep the old weights' logprobs."""
    from async_rl.logprobs import token_logprobs

    old = {name: tensor.clone() for name, tensor in tiny.model.state_dict().items()}
    core = EngineCore(tiny.model, tiny.tokenizer, trainer_logprobs_chunk=4, seed=0)
    core.start()
    try:
        tracker = Tracker()
        seqs = [
            tracker.seq(f"t{i}", p, 12, temperature=0.8, stream=True)
            for i, p in enumerate(prompts_of_different_lengths())
        ]
        core.submit(seqs)
        tracker.wait(*seqs)

        def trainer(seq: Sequence, model) -> list[float]:
            ids = torch.tensor([seq.prompt_ids + seq.output_ids])
            with torch.no_grad():
                values = token_logprobs(model, ids, torch.ones_like(ids), seq.temperature, 4)
            return values[0, len(seq.prompt_ids) - 1 :].tolist()

        for seq in seqs:
            assert seq.output_logprobs == trainer(seq, tiny.model)  # bitwise: ratios exactly 1

        run = tracker.seq("across", [5, 6, 7], 20, temperature=1.0, stream=True)
        core.submit([run])
        tracker.wait_until(lambda: len(run.output_ids) >= 5)
        core.call(core.pause, "in_place").result(WAIT_S)
        before = len(run.output_ids)
        scaled = {name: tensor * 1.5 for name, tensor in old.items()}
        assert core.call(core.load_weights, scaled, "1", False).result(WAIT_S)[0]
        core.call(core.resume).result(WAIT_S)
        tracker.wait(run)
        new_weights = trainer(run, tiny.model)
        assert run.output_logprobs[before:] == new_weights[before:]
        tiny.model.load_state_dict(old)
        assert run.output_logprobs[:before] == pytest.approx(trainer(run, tiny.model)[:before], abs=1e-5)
        assert run.output_logprobs[:before] != pytest.approx(new_weights[:before], abs=1e-3)
    finally:
        tiny.model.load_state_dict(old)
        core.stop(timeout_s=WAIT_S)


def test_max_total_tokens_bounds_rows_times_the_longest_row(tiny):
    """The cache holds the longest row's prompt + max_new_tokens for every row: 2 x 45 fit in 100, 3 do not."""
    core = EngineCore(tiny.model, tiny.tokenizer, max_total_tokens=100, seed=0)
    core.start()
    try:
        tracker = Tracker()
        seqs = [tracker.seq(f"b{i}", [5, 6, 7, 8, 9], 40 - 30 * (i == 3), temperature=0.0) for i in range(4)]
        core.submit(seqs)
        tracker.wait(*seqs)
        assert core.stats.max_batch_size == 2
        assert all(len(seq.output_ids) == seq.max_new_tokens for seq in seqs)
    finally:
        core.stop(timeout_s=WAIT_S)
