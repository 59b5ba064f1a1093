"""Throughput of the RL loop on 64-4096 GPUs: the simulator with costs measured on one H200.

Why: the Ray runner places engines and trainer ranks on the same GPUs (colocated, time-sliced) or on
separate ones (disaggregated, N_e:N_t), and which placement and mode pay at a cluster size costs
GPU-days to find out; this answers from one measured GPU run, every input measured
(`H200Run`, benchmarks/RESULTS.md) or an interconnect assumption (`Cluster`).

- Weak scaling: each engine GPU adds `samples_per_engine_gpu` (the measured run's 128) to every
  step, so the trainer's batch grows with the engine GPUs.
- Engines: one per `gpus_per_engine` GPUs, independent but for the shared admission and batch, so
  at most `slice_engines` run exactly, with the whole cluster's train and sync times, and the rate
  is scaled by engines / slice. Exact in expectation: a slice has the cluster's per-engine load,
  and its tail is the cluster's too, because 128 samples already reach the length cap (99.8%).
  An engine of k GPUs (tensor parallel) keeps the per-step cost and divides the per-sequence one by k.
- Trainer: data parallel (HSDP: FSDP within a node, replicas across nodes), each rank trains its
  1 / N_t of the batch; communication is added in full, never overlapped (pessimistic).
- Colocation: each GPU holds an engine and a trainer rank. As measured on the H200, the engine
  keeps its speed beside a train step and the trainer yields: while any engine generates (ranks
  wait for the slowest) a step runs 1 + x times slower, x fitted so that the simulated run's train
  steps average the measured 1.188 s (`trainer_yield`). Or, explicitly time-sliced
  (`pause_engines_training`), engines stop while their GPUs train. Disaggregated: no contention.
- Weight sync: NCCL broadcast from the trainer (pipelined: bytes / bandwidth + a hop latency per
  tree level, so ~constant in the engine count; the trainer takes part) or disk as measured (the
  trainer writes a snapshot, engines keep generating, then each engine reads it from a shared
  file system whose aggregate bandwidth they share, while the trainer trains on).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import msgspec
import numpy as np

from staleness.experiments.sim_calibrate import simulated_rate
from staleness.experiments.simulator import LengthDist, Mode, SimConfig, SimParams, SimResult, simulate

Sync = Literal["nccl", "disk"]
SKIP_STEPS = 2  # the measured rate runs from the end of the 3rd step to the last
FIT_SEEDS = 4  # simulated repeats of the measured run, for the fit and the reproduction


class H200Run(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One NVIDIA H200, SGLang 0.5.17, random-init Qwen2-0.5B bf16, engine and trainer on the GPU.

    RESULTS.md "Async vs sync on the GPU with Qwen2-0.5B": the run (tiny task, long-tail lengths of
    recipes/long_tail.py, max_new_tokens 512, eta 2, 12 steps of 8 x 16, disk sync, pause in_place);
    phase times are means over its rate window (steps 4-12) from its metrics.jsonl. "Real SGLang ...":
    engine_throughput.py. "Trainer memory ...": trainer_memory.py's unchunked train_step.
    """

    sync_samples_per_s: float = 22.0
    async_samples_per_s: float = 36.6
    steps: int = 12
    sync_period_s: float = 5.817  # sync run: wall clock per step
    train_alone_s: float = 0.775  # sync run: train step, the engine idle
    train_beside_engine_s: float = 1.188  # async run: train step, SGLang generating beside some of them
    train_tokens: float = 15_607  # sync run: prompt + response tokens per step
    sync_run_weight_sync_s: float = 3.477  # sync run: weight_sync/seconds, export to last engine loaded
    export_s: float = 2.549  # weight_sync/export_s, both runs: the trainer writes the 1 GB snapshot
    load_s: float = 0.733  # weight_sync/seconds - export_s, both runs: the engine's side
    samples_per_engine_gpu: int = 128
    group_size: int = 16
    eta: int = 2
    prompt_tokens: int = 4  # "3+1=" in Qwen2's tokenizer: 4 + 117 (mean response) = the 121 tokens/sample measured
    max_new_tokens: int = 512
    lengths: LengthDist = LengthDist(kind="lognormal", median=64, sigma=1.25)  # median cap / 8
    max_running: int = 256  # engine.max_running_requests
    sglang_tokens_per_s: float = 30_607  # 128 concurrent x 128 new tokens, 64-token prompts
    sglang_concurrency: int = 128
    trainer_tokens_per_s: float = 67_279  # train_step on 32 rows x 512 tokens: one full micro-batch
    microbatch_tokens: int = 16_384  # trainer.max_tokens_per_microbatch, padded rows x longest
    model_bytes: float = 0.988e9  # 494 M parameters in bf16


class Cluster(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The interconnect the scale model assumes: HGX H200 nodes on an InfiniBand NDR fabric (not measured)."""

    gpus_per_node: int = 8
    nvlink_bytes_per_s: float = 360e9  # NCCL bus bandwidth in a node (NVLink 4: 450 GB/s per direction)
    network_bytes_per_s: float = 40e9  # per GPU across nodes: a 400 Gb/s NDR link at 80%
    hop_latency_s: float = 20e-6  # per level of a tree collective across nodes
    nccl_sync_overhead_s: float = 0.05  # per NCCL weight update: pause, group call, SGLang's load of ~290 tensors
    fs_bytes_per_s: float = 100e9  # a shared file system's aggregate read bandwidth (disk sync)


class Placement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Colocated: every GPU holds an engine share and a trainer rank; disaggregated: N_e:N_t = engines:trainers.

    pause_engines_training (colocated): engines stop while their GPUs train, instead of contending as measured.
    """

    kind: Literal["colocated", "disaggregated"]
    engines: int = 1
    trainers: int = 1
    gpus_per_engine: int = 1
    pause_engines_training: bool = False

    @property
    def label(self) -> str:
        if self.kind == "disaggregated":
            return f"disagg {self.engines}:{self.trainers}"
        return "colocated, paused" if self.pause_engines_training else "colocated"

    def split(self, gpus: int) -> tuple[int, int]:
        """(engine GPUs, trainer GPUs) of `gpus`; colocated GPUs count on both sides."""
        if self.kind == "colocated":
            engine_gpus = trainer_gpus = gpus
        else:
            engine_gpus, rest = divmod(gpus * self.engines, self.engines + self.trainers)
            trainer_gpus = gpus - engine_gpus
            if rest or trainer_gpus < 1:
                raise ValueError(f"{gpus} GPUs do not split {self.engines}:{self.trainers}")
        if engine_gpus % self.gpus_per_engine:
            raise ValueError(f"{engine_gpus} engine GPUs are not a multiple of gpus_per_engine={self.gpus_per_engine}")
        return engine_gpus, trainer_gpus


COLOCATED = Placement(kind="colocated")
PLACEMENTS = (
    COLOCATED,
    Placement(kind="colocated", pause_engines_training=True),
    Placement(kind="disaggregated", engines=1, trainers=1),
    Placement(kind="disaggregated", engines=3, trainers=1),
    Placement(kind="disaggregated", engines=7, trainers=1),
)


class ScaleModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a prediction rests on: the measured run, the interconnect, the sync method, the simulation's size."""

    run: H200Run = H200Run()
    cluster: Cluster = Cluster()
    sync: Sync = "nccl"
    slice_engines: int = 32
    steps: int = 12
    seed: int = 0


DEFAULT_MODEL = ScaleModel()


class ScalePrediction(msgspec.Struct, frozen=True, kw_only=True):
    gpus: int
    placement: str
    mode: str
    eta: int
    engine_gpus: int
    trainer_gpus: int
    samples_per_s: float
    samples_per_s_per_gpu: float
    engine_busy: float  # fraction of engine time generating, over the rate window
    trainer_idle: float  # fraction of trainer time not in a train step (sync included), same window
    train_step_s: float  # mean simulated train step of a rank
    sync_s: float  # engines' pause per weight sync
    simulated_engines: int


class Reproduction(msgspec.Struct, frozen=True, kw_only=True):
    measured_sync: float
    measured_async: float
    predicted_sync: float
    predicted_async: float

    @property
    def measured_ratio(self) -> float:
        return self.measured_async / self.measured_sync

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_async / self.predicted_sync

    @property
    def ratio_error(self) -> float:
        return self.predicted_ratio / self.measured_ratio - 1


def padding_factor(run: H200Run) -> float:
    """Padded / real trainer tokens: the trainer packs rows longest first, each micro-batch padded to its longest."""
    return _padding(msgspec.json.encode(run))


@functools.cache
def _padding(encoded_run: bytes) -> float:
    from async_rl.trainer.batch import pack_microbatches

    run = msgspec.json.decode(encoded_run, type=H200Run)
    rows = run.prompt_tokens + run.lengths.sample(
        np.random.default_rng(0), 32 * run.samples_per_engine_gpu, run.max_new_tokens
    )
    padded = 0
    for start in range(0, len(rows), run.samples_per_engine_gpu):  # one measured batch at a time
        lengths = rows[start : start + run.samples_per_engine_gpu].tolist()
        packs = pack_microbatches(list(range(len(lengths))), lengths, run.microbatch_tokens)
        padded += sum(len(pack) * lengths[pack[0]] for pack in packs)
    return padded / int(rows.sum())


def mean_response_tokens(run: H200Run) -> float:
    return float(run.lengths.sample(np.random.default_rng(0), 200_000, run.max_new_tokens).mean())


def decode_costs(run: H200Run) -> tuple[float, float]:
    """(seconds per decode step, seconds per sequence in it) from two measurements on the H200.

    SGLang alone decodes its 128 concurrent sequences at sglang_tokens_per_s: one step of 128 takes
    128 / that. The sync run generates a batch in its period less its train and sync time; the batch's
    longest sample reaches the cap, so that is cap steps and every response token once. Prefill and
    hand-offs are folded into both.
    """
    full_step = run.sglang_concurrency / run.sglang_tokens_per_s
    generation = run.sync_period_s - run.train_alone_s - run.sync_run_weight_sync_s
    response_tokens = run.samples_per_engine_gpu * mean_response_tokens(run)
    cap = run.max_new_tokens
    per_seq = (cap * full_step - generation) / (cap * run.sglang_concurrency - response_tokens)
    return full_step - run.sglang_concurrency * per_seq, per_seq


def trainer_costs(run: H200Run) -> tuple[float, float]:
    """(fixed seconds per step, seconds per real token) of a rank training alone.

    The per-token cost is the trainer benchmark's (padded tokens) times the padding of this length
    distribution; the rest of the measured step (optimizer, batch set-up) is taken as fixed per step.
    """
    per_token = padding_factor(run) / run.trainer_tokens_per_s
    return run.train_alone_s - per_token * run.train_tokens, per_token


def trainer_communication(trainer_gpus: int, run: H200Run, cluster: Cluster) -> tuple[float, float]:
    """(seconds per step, seconds per real token of a rank) of HSDP's communication.

    In a node of g ranks each micro-batch all-gathers the bf16 parameters twice (forward, backward)
    and reduce-scatters fp32 gradients: 8 bytes per parameter x (g - 1) / g over NVLink. Across the
    M nodes each rank all-reduces its fp32 gradient shard once per step: 2 (M - 1) / M x 4 P / g
    bytes over its network link, plus 2 log2(M) tree levels.
    """
    params = run.model_bytes / 2
    local = min(trainer_gpus, cluster.gpus_per_node)
    nodes = math.ceil(trainer_gpus / local)
    per_microbatch = 8 * params * (local - 1) / local / cluster.nvlink_bytes_per_s
    per_token = padding_factor(run) * per_microbatch / run.microbatch_tokens
    per_step = 0.0
    if nodes > 1:
        shard = 4 * params / local
        per_step = 2 * (nodes - 1) / nodes * shard / cluster.network_bytes_per_s
        per_step += 2 * math.ceil(math.log2(nodes)) * cluster.hop_latency_s
    return per_step, per_token


def dp_efficiency(trainer_gpus: int, tokens_per_rank: float, run: H200Run, cluster: Cluster) -> float:
    """A rank's step alone over its step among trainer_gpus ranks, for the same tokens: DP throughput / (N_t x one)."""
    fixed, per_token = trainer_costs(run)
    comm_step, comm_token = trainer_communication(trainer_gpus, run, cluster)
    alone = fixed + per_token * tokens_per_rank
    return alone / (alone + comm_step + comm_token * tokens_per_rank)


def weight_sync(engines: int, gpus: int, model: ScaleModel) -> tuple[float, float, bool]:
    """(trainer-side export seconds, engines' pause seconds, whether the trainer waits for the engines)."""
    run, cluster = model.run, model.cluster
    if model.sync == "disk":
        return run.export_s, max(run.load_s, engines * run.model_bytes / cluster.fs_bytes_per_s), False
    bandwidth = cluster.nvlink_bytes_per_s if gpus <= cluster.gpus_per_node else cluster.network_bytes_per_s
    levels = math.ceil(math.log2(engines + 1))
    return 0.0, cluster.nccl_sync_overhead_s + run.model_bytes / bandwidth + levels * cluster.hop_latency_s, True


class Setup(msgspec.Struct, frozen=True):
    """A point of the sweep as the simulator sees it."""

    config: SimConfig
    params: SimParams
    engine_gpus: int
    trainer_gpus: int
    scale: float  # engines in the cluster / engines simulated


def _build(gpus: int, placement: Placement, mode: Mode, eta: int, model: ScaleModel, yield_x: float) -> Setup:
    run, cluster = model.run, model.cluster
    engine_gpus, trainer_gpus = placement.split(gpus)
    k = placement.gpus_per_engine
    engines = engine_gpus // k
    simulated = min(engines, model.slice_engines)
    decode_base, decode_per_seq = decode_costs(run)
    fixed, per_token = trainer_costs(run)
    comm_step, comm_token = trainer_communication(trainer_gpus, run, cluster)
    export, sync, trainer_waits = weight_sync(engines, gpus, model)
    contended = placement.kind == "colocated" and not placement.pause_engines_training
    params = SimParams(
        decode_base=decode_base,
        decode_per_seq=decode_per_seq / k,
        train_base=fixed + comm_step,
        train_per_token=(per_token + comm_token) * engines / simulated / trainer_gpus,  # a rank's share
        sync_time=sync,
        export_time=export,
        train_slowdown_generating=yield_x if contended else 0.0,
    )
    config = SimConfig(
        mode=mode,
        n_engines=simulated,
        batch_groups=run.samples_per_engine_gpu * k // run.group_size * simulated,
        group_size=run.group_size,
        eta=eta,
        steps=model.steps,
        max_running=run.max_running * k,
        prompt_tokens=run.prompt_tokens,
        max_new_tokens=run.max_new_tokens,
        lengths=run.lengths,
        trainer_waits_for_sync=trainer_waits,
        pause_engines_training=placement.pause_engines_training,
        seed=model.seed,
    )
    return Setup(config, params, engine_gpus, trainer_gpus, engines / simulated)


def _measured_run(model: ScaleModel, mode: Mode, seed: int, yield_x: float) -> SimResult:
    """The H200 run simulated: 1 GPU colocated, its disk sync, its steps."""
    like_run = msgspec.structs.replace(model, sync="disk", steps=model.run.steps, seed=seed)
    setup = _build(1, COLOCATED, mode, model.run.eta, like_run, yield_x)
    return simulate(setup.config, setup.params)


@functools.cache
def _fit_yield(encoded_run: bytes) -> float:
    run = msgspec.json.decode(encoded_run, type=H200Run)
    model = ScaleModel(run=run)

    def mean_train(x: float) -> float:
        steps = [s for seed in range(FIT_SEEDS) for s in _measured_run(model, "async", seed, x).steps[SKIP_STEPS + 1 :]]
        return float(np.mean([s.train_end_s - s.train_start_s for s in steps]))

    low, high = 0.0, math.log1p(1e3)  # bisection on log(1 + x): x from 0 to a trainer stalled at 0.1%
    if mean_train(math.expm1(high)) < run.train_beside_engine_s:
        return math.expm1(high)
    for _ in range(14):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_train(math.expm1(mid)) < run.train_beside_engine_s else (low, mid)
    return math.expm1((low + high) / 2)


def trainer_yield(run: H200Run) -> float:
    """x: a colocated train step runs 1 + x times slower while engines generate, fitted to the H200 run.

    Its trace shows the trainer yielding: generation beside a train step is as fast as alone, and
    such steps took longer by about the overlap. x is the value with which the simulated run's train
    steps average the measured train_beside_engine_s (bisection; the mean grows with x).
    """
    return _fit_yield(msgspec.json.encode(run))


def build(gpus: int, placement: Placement, mode: Mode, eta: int, model: ScaleModel) -> Setup:
    """The SimConfig and SimParams of `model.slice_engines` engines standing for the whole cluster."""
    return _build(gpus, placement, mode, eta, model, trainer_yield(model.run))


def _window_fractions(result: SimResult, engines: int) -> tuple[float, float]:
    """(engine busy, trainer idle) between the end of step SKIP_STEPS + 1 and the last, as the rate is taken."""
    start, end = result.steps[SKIP_STEPS].sync_end_s, result.steps[-1].sync_end_s

    def covered(a: float, b: float) -> float:
        return max(0.0, min(b, end) - max(a, start))

    busy = sum(covered(s.start_s, s.end_s) for s in result.engine_spans) / (engines * (end - start))
    training = sum(covered(r.train_start_s, r.train_end_s) for r in result.steps) / (end - start)
    return busy, 1 - training


def predict(
    gpus: int, placement: Placement, mode: Mode, eta: int = 2, model: ScaleModel = DEFAULT_MODEL
) -> ScalePrediction:
    """Predicted trained samples/s of the whole cluster, with the engines' and the trainer's utilisation."""
    setup = build(gpus, placement, mode, eta, model)
    result = simulate(setup.config, setup.params, record_spans=True)
    rate = simulated_rate(result, SKIP_STEPS) * setup.scale
    busy, idle = _window_fractions(result, setup.config.n_engines)
    return ScalePrediction(
        gpus=gpus,
        placement=placement.label,
        mode=mode,
        eta=setup.config.effective_eta,
        engine_gpus=setup.engine_gpus,
        trainer_gpus=setup.trainer_gpus,
        samples_per_s=rate,
        samples_per_s_per_gpu=rate / gpus,
        engine_busy=busy,
        trainer_idle=idle,
        train_step_s=float(np.mean([r.train_end_s - r.train_start_s for r in result.steps[SKIP_STEPS + 1 :]])),
        sync_s=setup.params.sync_time,
        simulated_engines=setup.config.n_engines,
    )


def engine_capacity(
    engine_gpus: int, gpus_per_engine: int = 1, eta: int = 2, model: ScaleModel = DEFAULT_MODEL
) -> float:
    """Samples/s the engines generate when training and weight sync cost nothing: the engine side's ceiling."""
    placement = Placement(kind="disaggregated", engines=engine_gpus, trainers=1, gpus_per_engine=gpus_per_engine)
    setup = _build(engine_gpus + 1, placement, "async", eta, model, 0.0)
    free = msgspec.structs.replace(setup.params, train_base=0.0, train_per_token=0.0, sync_time=0.0, export_time=0.0)
    return simulated_rate(simulate(setup.config, free), SKIP_STEPS) * setup.scale


def reproduce_h200(model: ScaleModel = DEFAULT_MODEL) -> Reproduction:
    """The measured run predicted from the calibration: sync and async trained samples/s, mean over FIT_SEEDS."""
    x = trainer_yield(model.run)

    def rate(mode: Mode) -> float:
        return float(
            np.mean([simulated_rate(_measured_run(model, mode, seed, x), SKIP_STEPS) for seed in range(FIT_SEEDS)])
        )

    return Reproduction(
        measured_sync=model.run.sync_samples_per_s,
        measured_async=model.run.async_samples_per_s,
        predicted_sync=rate("sync"),
        predicted_async=rate("async"),
    )
