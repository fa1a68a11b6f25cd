#!/usr/bin/env bash
# Train step and generation of the 7B-shaped LLaMA in bf16 on a GPU: tokens/s and MFU.
#
#   bash benchmarks/gpu.sh                       # Vicuna-7B shape, all 32 layers, LoRA r 64
#   bash benchmarks/gpu.sh --layers 8 --torch    # fewer layers of the real width, vs PyTorch
#   bash benchmarks/gpu.sh --layers 8 --attention_block 256 --profile   # faster; where time goes
#   bash benchmarks/gpu.sh --layers 8 --torch --attention_impl cudnn   # or xla, blocked, pallas_gpu
#   bash benchmarks/gpu.sh --mode full --layers 4  # every weight trained (16 B a parameter)
#   bash benchmarks/gpu.sh --layers 8 --memory   # also the PPO memory plan for the local GPUs
#
# Needs: this repository's requirements (requirements.txt) with a CUDA jax installed
# (pip install "jax[cuda12]==0.10.2"; measured with jax 0.11.2 + jax-cuda13-plugin), run from
# the repository root; --torch also needs torch with CUDA and peft. Nothing is downloaded: the
# weights are random. --memory compiles (without running) the vicuna7b PPO job's pieces for
# the local GPUs (real compiler numbers, not estimates), one rollout row a GPU in the update.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

memory=0
args=()
for a in "$@"; do
  if [[ "$a" == "--memory" ]]; then memory=1; else args+=("$a"); fi
done

if ! gpus=$($PY - <<'PYCHECK'
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
print(len(gpus))
PYCHECK
); then
  exit 1
fi

# Let XLA's allocator take most of the device; overlap collectives with compute (multi-GPU).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

$PY -m benchmarks.gpu_step ${args[@]+"${args[@]}"}
if [[ $memory == 1 ]]; then
  # Compiling only: take no device memory. The layouts measured on one H200
  # (docs/benchmarks.md): full remat with one row a GPU, and the preset's dots_no_batch with two.
  XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m benchmarks.memory_plan --target gpu --remat full \
    --train_micro_batch "$gpus" --rollout_micro_batch $((4 * gpus)) \
    --pieces ppo_train,rollout,ppo_experience
  XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m benchmarks.memory_plan --target gpu \
    --remat dots_no_batch --train_micro_batch $((2 * gpus)) --rollout_micro_batch $((32 * gpus)) \
    --pieces ppo_train,rollout
fi
