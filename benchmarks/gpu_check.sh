#!/usr/bin/env bash
# The one script a machine with a GPU runs, in at most 8 minutes (the sum of the step limits
# below): it installs what the image lacks from the wheels in .whl/, then runs the GPU tests,
# the DeepSpeed rehearsal of the paper's run on one GPU, peak memory (bare loop and Lightning +
# ZeRO-2) and throughput at the Llama-3-8B shape (B=4, T=2048, gradient checkpointing on).
# Everything it writes lands in one folder, $OUT if set, else ./gpu_check_out: eight files
# (summary, setup, pytest_gpu, rehearsal, memory and throughput logs, memory.json,
# throughput.json), the most the device tool brings back.
#
#   make gpu-wheels                         # here, once (index needed): .whl/ from scratch
#   bash benchmarks/gpu_check.sh --dry-run  # here: the wheels against the image, the plan
#   bash benchmarks/gpu_check.sh            # there, from the repository root, .whl/ carried
#
# There is no index there: benchmarks/gpu_wheels.py lists what is carried and why, and
# `--dry-run` checks it against the image's package list (benchmarks/gpu_image.txt) and the
# modules the check imports, exiting non-zero when something is missing. medmoe runs from src/
# through PYTHONPATH; nothing is installed in editable mode. The step limits are estimates: no
# run on a GPU has timed these steps yet, and summary.txt records each step's wall time.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
BUDGET=480 # seconds: the device runs one command for at most 10 minutes
DEST=${OUT:-$ROOT/gpu_check_out}
PY=${PYTHON:-python3} # there: the image's python3, which holds torch
CHECK_PY=$PY           # here: the project's venv, whose imports the dry run traces
[[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]] && CHECK_PY=$ROOT/.venv/bin/python
mkdir -p "$DEST"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$DEST/summary.txt"
: >"$SUMMARY"
STATUS=0
PLANNED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LOG SECONDS COMMAND...: COMMAND under a time limit, its output appended to
# $DEST/LOG.txt; a failure or timeout is recorded and the next step runs
step() {
  local name=$1 log=$DEST/$2.txt limit=$3
  shift 3
  PLANNED=$((PLANNED + limit))
  note "== $name (limit ${limit}s): $*"
  ((DRY_RUN)) && return 0
  local start=$SECONDS
  echo "== $name: $*" >>"$log"
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  note "   rc=$rc$( ((rc == 124)) && echo ' (timed out)'), $((SECONDS - start))s -> $log"
  ((rc == 0)) || STATUS=1
}

for file in benchmarks/gpu_wheels.py benchmarks/memory.py benchmarks/gpu_throughput.py \
  configs/med.yaml configs/rehearsal/cpu.yaml tests/test_gpu.py; do
  [[ -f "$file" ]] || { note "missing $file"; exit 2; }
done
# the test files holding GPU tests (collecting every file would import lm-eval, absent there)
mapfile -t GPU_TESTS < <(grep -l "mark\.gpu" tests/test_*.py)

# ---------------------------------------------------------------- 1. wheels and device
if ((DRY_RUN)); then
  "$CHECK_PY" benchmarks/gpu_wheels.py check | tee -a "$SUMMARY"
  ((PIPESTATUS[0] == 0)) || STATUS=1
  note ""
fi
if [[ -d .whl ]] || ((DRY_RUN)); then
  step install setup 20 "$PY" benchmarks/gpu_wheels.py install
else
  note "no .whl/ folder: nothing installed (make gpu-wheels here, then carry .whl)"
  STATUS=1
fi
step device setup 5 bash -c "nvidia-smi; $PY -c \"import torch; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')\""
((DRY_RUN)) || note "   $(tail -1 "$DEST/setup.txt")"
# DeepSpeed's CPU Adam (ZeRO-Offload: med.yaml, the tests' offload runs, memory.py's
# zero2_offload), compiled once by ninja into ~/.cache/torch_extensions for every later step
step ds_ops setup 70 "$PY" -c "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; \
DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))]); print('CPU Adam loaded')"

# ---------------------------------------------------------------- 2. tests and rehearsal
step pytest_gpu pytest_gpu 155 "$PY" -m pytest -m gpu -v -rA --durations=0 -p no:cacheprovider \
  "${GPU_TESTS[@]}"
# med.yaml as the paper runs it (ZeRO-2, CPU-offloaded Adam, bf16-mixed, accumulation 4) with
# the rehearsal's toy base, data and step counts, on one GPU (its logs go to runs/rehearsal)
step rehearsal rehearsal 75 "$PY" -m medmoe fit --config configs/med.yaml \
  --config configs/rehearsal/cpu.yaml --trainer.accelerator gpu --trainer.devices 1

# ---------------------------------------------------------------- 3. memory and speed
step memory memory 90 "$PY" benchmarks/memory.py --shape llama3-8b --vocab 128256 --batch 4 \
  --seq 2048 --device cuda --variants ckpt zero2_offload fsdp2 peft_lora --json "$DEST/memory.json"
step throughput throughput 65 "$PY" benchmarks/gpu_throughput.py --shape llama3-8b --batch 4 \
  --seq 2048 --checkpointing on --warmup 1 --steps 3 --json "$DEST/throughput.json"

note "step limits: ${PLANNED}s in all (budget ${BUDGET}s)"
if ((PLANNED > BUDGET)); then
  note "the step limits exceed the budget"
  STATUS=1
fi
note "all output in $DEST (status $STATUS)"
exit $STATUS
