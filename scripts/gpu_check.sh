#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA: the tests marked `gpu`, then the CAM engine
# benchmarks at the configuration the README's GPU table names (resnet50, 512 px, batch 32, bf16),
# then the throughput benchmarks (CRF process pool, data loading; docs/throughput.md).
#
#   bash scripts/gpu_check.sh            # logs under $OUT if set, else ./gpu-check/
#
# Each step has its own time limit and log, and a failed step does not stop the next one.
# Where the machine's Python lacks camseg's dependencies, wheels placed in .whl/ (ignored by git)
# are unpacked into a private folder first (no index, no network).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
PY="${PYTHON:-python3}"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/camseg-site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
    export PYTHONPATH="$site:$PYTHONPATH"
  else
    echo "warning: the wheels in .whl/ did not install here; using this Python's own packages" >&2
  fi
fi

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} >"$out/device.txt"
cat "$out/device.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: error: torch sees no CUDA device here" >&2
  exit 2
fi

step test_gpu 240 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step bench_cam 200 "$PY" scripts/bench_cam.py --backbone resnet50 --size 512 --batch 32 \
  --device cuda --precision bf16 --iters 10 --repeats 2
step bench_pseudo 240 "$PY" scripts/bench_pseudo.py --images 1024 --size 512 --batch 32 \
  --backbone resnet50 --device cuda --precision bf16 --workers 14
# Throughput (issue 15): the CRF in 1..16 processes (the old writer's 16 threads beside), and the
# stage-1 loader against the bare training step, 2.5D with and without the decoded-slice cache.
step bench_crf 300 "$PY" scripts/bench_crf.py --size 256 --images 64 --repeats 2 \
  --workers 1 2 4 8 16 --thread-workers 16
step bench_data 420 "$PY" scripts/bench_data.py --experiments synthetic hemorrhage lgg_mri \
  --device cuda --precision bf16 --workers 7 14 --batches 40 --steps 20
step bench_data_nocache 240 "$PY" scripts/bench_data.py --experiments hemorrhage \
  --device cuda --precision bf16 --workers 7 14 --batches 40 --steps 20 \
  --override data.decode_cache_mb=0
tail -n 25 "$out"/bench_cam.log "$out"/bench_pseudo.log
tail -n 12 "$out"/bench_crf.log
grep -v -i warn "$out"/bench_data.log "$out"/bench_data_nocache.log | tail -n 30
tail -n 3 "$out"/test_gpu.log
