#!/bin/bash
# The GPU checks of one lent machine, as one prepared run (the device tool's `run`; each stage has its own time
# limit and its own output, so one failing stage does not cost the others). Fill what travels first, here:
#   bash scripts/gpu_carry.sh        # .gpu/: asset wheels, model configs + tokenizers
#   .whl/                            # fastapi, uvicorn, pydantic, gguf (+ their needs) for python 3.12, see
#                                    # /work/.library/device/README.md; not in that machine's image
# then, with carry [".gpu/minilm", ".gpu/smollm2", ".gpu/wheels", ".whl"]:
#   bash scripts/gpu_check.sh [STAGE ...]     # stages: fsdp bench-minilm serve tests bench-smollm2 (default all)
# Results land in $OUT (at most 8 files come back): run.log, test_gpu.log, bench-*.json, serve_load.json,
# fsdp.json. The packaged weights cannot travel (64 MiB a call): both models are random-initialised from their
# configs (benchmarks/random_weights.py) — timings and memory do not depend on the weights' values.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1
stages=("$@")
[[ ${#stages[@]} == 0 ]] && stages=(fsdp bench-minilm serve tests bench-smollm2)
want() { [[ " ${stages[*]} " == *" $1 "* ]]; }
stamp() { echo "[gpu_check $(date +%T)] $*"; }

stamp "install carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src LORAKIT_HOME=/tmp/lorakit-home
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 benchmarks/random_weights.py .gpu/minilm /tmp/minilm-rand || exit 1
python3 benchmarks/random_weights.py .gpu/smollm2 /tmp/smollm2-rand --task causal-lm || exit 1

if want fsdp; then
  stamp "FSDP2, one process over nccl, bf16 policy, peak vs lorakit plan"
  timeout 100 python3 benchmarks/fsdp_gpu.py --config .gpu/smollm2 --batch 8 --seq 512 --output "$OUT/fsdp.json" | tail -20
fi
for model in minilm smollm2; do
  if want "bench-$model"; then
    stamp "bench $model"
    timeout 130 python3 benchmarks/bench.py --device cuda --threads 8 --steps 10 --models "$model" \
        --model-dir "$model=/tmp/$model-rand" --output "$OUT/bench-$model.json" | tail -30
  fi
  if [[ $model == minilm ]] && want serve; then
    stamp "serve_load: lorakit serve vs peft generate + set_adapter"
    timeout 110 python3 benchmarks/serve_load.py --device cuda --dtype fp32 --base /tmp/smollm2-rand --clients 32 \
        --adapters 16 --seconds 15 --baseline-seconds 15 --max-tokens 32 --output "$OUT/serve_load.json" | tail -20
  fi
  if [[ $model == minilm ]] && want tests; then
    stamp "tests/test_gpu.py"
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -25
  fi
done
stamp "done"
