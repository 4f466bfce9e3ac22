#!/usr/bin/env bash
# One GPU check (issue 13): run it first whenever a GPU machine is lent, paste its summary into
# docs/results.md with the date and the GPU, and fix what fails. It finishes in <= 5 minutes on one
# GPU (every step has its own time limit) and prints one summary at the end:
#   1. the CUDA tests (tests/test_cuda.py);
#   2. training throughput and MFU in bf16, eager and torch.compile, at 8L/d256/seq128 and at the
#      paper's shape (12 layers, d_model 768, 12 heads, seq 1024, GPT-2 vocabulary);
#   3. a 2-trial study on cuda (quickstart recipe, tiny budget);
#   4. DDP over NCCL with torchrun on every visible GPU (one trial).
#
#   bash benchmarks/gpu_check.sh            # run it (needs CUDA)
#   bash benchmarks/gpu_check.sh --dry-run  # list what it would run, run nothing
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export LOOPSEARCH_STORAGE="sqlite:///$OUT/gpu_check.db"
GPUS=$( (python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null) || echo 0)
SUMMARY=()

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$DRY" = 1 ]; then
    echo "would run ($name, <= ${limit}s): $*"
    return
  fi
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  local verdict=ok
  [ $rc -ne 0 ] && verdict="FAILED (exit $rc; log $OUT/$name.log)"
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s (log $OUT/$name.log)"
  SUMMARY+=("$(printf '%-22s %-5ss %s' "$name" "$((SECONDS - t0))" "$verdict")")
}

step cuda_tests 45 python -m pytest -q tests/test_cuda.py
step tput_d256 30 python benchmarks/train_throughput.py --device cuda --dtypes bf16 --steps 30 --json
step tput_d256_compile 60 python benchmarks/train_throughput.py --device cuda --dtypes bf16 --steps 30 --compile --json
step tput_paper 30 python benchmarks/train_throughput.py --device cuda --dtypes bf16 --steps 10 \
  --shape 12,768,12,1024,8,50257 --json
step tput_paper_compile 75 python benchmarks/train_throughput.py --device cuda --dtypes bf16 --steps 10 --compile \
  --shape 12,768,12,1024,8,50257 --json
step study_cuda 30 bash -c "loopsearch study create --name gpu_check --recipe quickstart --budget 5e11 --n-trials 2 \
  && loopsearch study run gpu_check --device cuda --no-progress && loopsearch leaderboard --study gpu_check"
step ddp_torchrun 30 bash -c "loopsearch study create --name gpu_ddp --recipe quickstart --budget 5e11 --n-trials 1 \
  && torchrun --standalone --nproc-per-node ${GPUS} -m loopsearch study run gpu_ddp --device cuda --no-progress"

if [ "$DRY" = 1 ]; then
  echo "dry run: nothing ran (visible GPUs here: $GPUS)"
  exit 0
fi
echo
echo "== summary ($(date -u +%F), $(python -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null), $GPUS GPU(s), logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
grep -h '"mfu_pct"' "$OUT"/tput_*.log 2>/dev/null | python -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(f"  {r[\"n_layer\"]}L d{r[\"d_model\"]} seq{r[\"seq_len\"]} {r[\"config\"]:<30} bf16 compile={r[\"compile\"]}: "
          f"{r[\"tokens_per_s\"]:,.0f} tok/s, MFU {r[\"mfu_pct\"]:.1f}% of the measured bf16 matmul peak")
'
