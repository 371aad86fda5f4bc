#!/usr/bin/env bash
# One-GPU readiness check (issue 34), from the GPU install (make setup-gpu), in about 10 minutes:
#   tools/gpu_check.sh [VENV]     (default .venv-gpu)
# One line per check, then a summary; exit 1 if any failed. Output also in gpu_check.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv-gpu}/bin/python"
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=gpu_check.jsonl
: > "$out"
failed=0
run() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS line
  if line=$(timeout "$limit" "$@" 2>gpu_check_"$name".log | tail -n 1) && [ -n "$line" ]; then
    echo "PASS $name ($((SECONDS - t0)) s) $line"
  else
    failed=$((failed + 1))
    echo "FAIL $name ($((SECONDS - t0)) s) ${line:-no result; see gpu_check_$name.log}"
  fi
  echo "{\"check\": \"$name\", \"seconds\": $((SECONDS - t0)), \"line\": $(printf '%s' "${line:-}" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}" >> "$out"
}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.cuda.get_device_name(0))' || exit 1
run gpu_tests 240 bash -c "set -o pipefail; '$PY' -m pytest -q -m gpu tests -p no:cacheprovider | tail -n 1"
run nccl 60 "$PY" -m tools.gpu_checks nccl
run vllm_actor 180 "$PY" -m tools.gpu_checks vllm_actor
run train 180 "$PY" -m tools.gpu_checks train
run startup_7b 300 "$PY" -m tools.gpu_checks startup_7b
echo "summary: $((5 - failed)) of 5 checks passed (details: $out, gpu_check_*.log)"
[ "$failed" -eq 0 ]
