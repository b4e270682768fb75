#!/usr/bin/env bash
# The one script a machine with a GPU runs (at most 8 minutes): GPU tests, peak memory and
# throughput at the Llama-3-8B shape (B=4, T=2048, gradient checkpointing on). Everything it
# produces lands in one folder: $OUT if set, else ./gpu_check_out.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: checks the files and prints the plan
#
# What the machine lacks is installed from wheels carried in .whl/ (gitignored; no network
# needed). Build them on a machine with the project's venv and the index at hand:
#
#   pip wheel --no-deps --no-build-isolation -w .whl deepspeed   # DeepSpeed builds its ops
#   pip wheel --no-deps -w .whl hjson ninja py-cpuinfo msgpack    # its pure-Python deps
#   pip wheel --no-deps -w .whl "lightning>=2.6" "transformers>=5.0" "peft>=0.17" \
#       lightning-utilities torchmetrics safetensors tokenizers jsonargparse docstring-parser
#
# (torch itself is expected on the GPU machine: a CUDA wheel is ~2.5 GB.) medmoe runs from
# src/ through PYTHONPATH, nothing is installed in editable mode.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
DEST=${OUT:-$ROOT/gpu_check_out}
PY=${PYTHON:-python}
mkdir -p "$DEST"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$DEST/summary.txt"
: >"$SUMMARY"
STATUS=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, output into $DEST/NAME.txt
step() {
  local name=$1 limit=$2
  shift 2
  note "== $name (limit ${limit}s): $*"
  if ((DRY_RUN)); then
    return 0
  fi
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$DEST/$name.txt" 2>&1
  local rc=$?
  note "   rc=$rc, ${SECONDS - start}s -> $DEST/$name.txt"
  ((rc == 0)) || STATUS=1
  return 0
}

for file in benchmarks/memory.py benchmarks/gpu_throughput.py tests/test_gpu.py; do
  [[ -f "$file" ]] || { note "missing $file"; exit 2; }
done

# ---------------------------------------------------------------- 1. what the machine lacks
missing=()
for pair in torch:torch lightning:lightning transformers:transformers peft:peft \
  deepspeed:deepspeed torchmetrics:torchmetrics jsonargparse:jsonargparse \
  safetensors:safetensors tokenizers:tokenizers pytest:pytest; do
  module=${pair%%:*} package=${pair##*:}
  "$PY" -c "import $module" 2>/dev/null || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ -d .whl ]]; then
    step install 120 "$PY" -m pip install --no-index --find-links .whl "${missing[@]}"
  else
    note "missing ${missing[*]} and no .whl/ folder: see the header of this script"
  fi
else
  note "== install: nothing missing"
fi

# ---------------------------------------------------------------- 2. the device
if ((DRY_RUN)); then
  note "== device: (dry run) nvidia-smi"
else
  { nvidia-smi || true; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"; } \
    >"$DEST/device.txt" 2>&1
  note "== device: $(tail -1 "$DEST/device.txt")"
fi

# ---------------------------------------------------------------- 3. tests, memory, speed
step pytest_gpu 200 "$PY" -m pytest -m gpu -q -x tests/test_gpu.py tests/test_adapter_dtype.py \
  --junitxml "$DEST/pytest_gpu.xml"
step memory 150 "$PY" benchmarks/memory.py --shape llama3-8b --vocab 128256 --batch 4 \
  --seq 2048 --device cuda --variants ckpt ckpt_full_vocab peft_lora --json "$DEST/memory.json"
step throughput 130 "$PY" benchmarks/gpu_throughput.py --shape llama3-8b --batch 4 --seq 2048 \
  --checkpointing on --warmup 1 --steps 3 --json "$DEST/throughput.json"

note "all output in $DEST (status $STATUS)"
exit $STATUS
