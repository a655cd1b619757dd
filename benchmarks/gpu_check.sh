#!/usr/bin/env bash
# One-shot GPU check of the custom ops, for a session that has a CUDA device (about 5-8 minutes on
# an H100/H200 with 16 cores): build ama_stream._C with its CUDA kernels, run the CUDA tests, then
# benchmark (fused tail vs twin, sampler, Scorer frames/s at 32x32 in bfloat16 for batch 256 and
# 1024, the Scorer's speed options at batch 1024). Writes benchmarks/results/ops_bench_cuda.json and
# the CUDA block of docs/benchmarks.md; copies both to $OUT when it is set. Last, distributed training:
# 2 steps under torchrun with nccl, one process per GPU (at most 2; about a minute), checked from
# metrics.json (copied to $OUT/ddp_check_metrics.json).
#   PYTHON=/path/to/python  SKIP_COMPILE=1 (leave torch.compile variants out)  TORCH_CUDA_ARCH_LIST=...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export AMA_FORCE_CUDA=1 AMA_REQUIRE_COMPILED=cuda
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")
PYEOF

log="${OUT:-${TMPDIR:-/tmp}}/gpu_check_build.log"
start=$(date +%s)
# In place and offline (no dependency resolution); ninja compiles the sources in parallel.
if ! "$PY" setup.py build_ext --inplace > "$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "build failed (full log: $log)" >&2
  exit 1
fi
grep "ama-stream build" "$log" | head -n 1
echo "build: $(( $(date +%s) - start )) s"

"$PY" -c "import ama_stream.ops as o; b = o.backend('cuda'); print('cuda backend:', b); assert b == 'compiled'"

"$PY" -m pytest -q -x -p no:cacheprovider tests/test_ops_pair_rscore.py tests/test_ops_shell_sample.py \
  tests/test_ops_backend.py tests/test_ops_scorer.py -k "cuda or required"

compile_flag=()
if [[ "${SKIP_COMPILE:-0}" == "1" ]]; then compile_flag=(--no-compile); fi
"$PY" benchmarks/ops_bench.py --device cuda --reps 50 --presets paper,narrow --sizes 32 \
  --batch-sizes 256,1024 --precision bfloat16 --options-batch 1024 --option-reps 20 --min-seconds 1 "${compile_flag[@]}"

if [[ -n "${OUT:-}" ]]; then
  cp benchmarks/results/ops_bench_cuda.json docs/benchmarks.md "$OUT"/
fi

# Distributed training (issue 12 part 4): torchrun, nccl, SyncBatchNorm and DDP on the GPU(s), 2 steps of
# the Fashion-MNIST CPU preset on the test fixture's images with the full objective switched on.
ngpu=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))")
ddp_out="$(mktemp -d)/ddp_check"
start=$(date +%s)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$ngpu" -m training \
  --config configs/fmnist_vs_mnist_cpu.yaml --data-root tests/data --out "$ddp_out" --device cuda --max-steps 2 \
  --set train.batch_size=16 --set train.log_every=1 --set data.limit_train=256 --set data.limit_test=64 \
  --set loss.gradient_penalty.enabled=true --set loss.negatives.enabled=true --set loss.negatives.start_epoch=0 \
  --set optim.d_steps=2
"$PY" - "$ddp_out" "$ngpu" <<'PYEOF'
import json, sys
from ama_stream.checkpoint import load_checkpoint
out, ngpu = sys.argv[1], int(sys.argv[2])
metrics = json.load(open(f"{out}/metrics.json"))
record = metrics["distributed"]
assert record["backend"] == "nccl" and record["processes"] == ngpu and metrics["steps"] == 2, metrics
assert record["images_per_process"] == [2 * 16 // ngpu] * ngpu, record
load_checkpoint(f"{out}/model.pt").build_model()
print(f"distributed training on {ngpu} GPU(s): {record}, AUROC R {metrics.get('auroc_r')}")
PYEOF
echo "distributed check: $(( $(date +%s) - start )) s"
if [[ -n "${OUT:-}" ]]; then
  cp "$ddp_out/metrics.json" "$OUT"/ddp_check_metrics.json
fi
