#!/usr/bin/env bash
# Train step and generation of the 7B-shaped LLaMA in bf16 on a GPU: tokens/s and MFU.
#
#   bash benchmarks/gpu.sh                       # Vicuna-7B shape, all 32 layers, LoRA r 64
#   bash benchmarks/gpu.sh --layers 8            # fewer layers of the real width
#   bash benchmarks/gpu.sh --mode full --layers 4  # every weight trained (16 B a parameter)
#
# Needs: this repository's requirements (requirements.txt) with a CUDA jax installed
# (pip install "jax[cuda12]==0.10.2"), run from the repository root. Nothing is downloaded:
# the weights are random. Also writes the PPO memory plan for the local GPU (real compiler
# numbers, not estimates) when --memory is given.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

memory=0
args=()
for a in "$@"; do
  if [[ "$a" == "--memory" ]]; then memory=1; else args+=("$a"); fi
done

if ! $PY - <<'PYCHECK'
import sys
try:
    import jax
except ImportError:
    sys.exit("gpu.sh: jax is not installed; install requirements.txt and jax[cuda12]==0.10.2")
gpus = [d for d in jax.devices() if d.platform == "gpu"]
if not gpus:
    sys.exit(f"gpu.sh: jax sees no GPU (backend {jax.default_backend()!r}); install "
             "jax[cuda12]==0.10.2 on a machine with an NVIDIA GPU and a CUDA 12 driver")
print(f"gpu.sh: jax {jax.__version__} on {len(gpus)} x {gpus[0].device_kind}", file=sys.stderr)
PYCHECK
then
  exit 1
fi

# Let XLA's allocator take most of the device; overlap collectives with compute (multi-GPU).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

$PY -m benchmarks.gpu_step "${args[@]}"
if [[ $memory == 1 ]]; then
  $PY -m benchmarks.memory_plan --target gpu --pieces rollout,ppo_experience,ppo_train
fi
