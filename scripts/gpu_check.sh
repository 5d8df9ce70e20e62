#!/usr/bin/env bash
# The GPU check: the one script to run on an NVIDIA GPU machine (an H200: about 8 minutes).
#
#   scripts/gpu_check.sh pack          here, on the CPU host: fill .gpu/ (git-ignored) with what
#                                      travels: Horovod's sdist and the NCCL wheels built here
#   scripts/gpu_check.sh versions      there, first and short: Python, torch, CUDA, NCCL, driver
#   scripts/gpu_check.sh               there: the whole check, its records under $OUT
#   scripts/gpu_check.sh --dry-run     on a CPU host: every step up to the first one that needs
#                                      a GPU, then one line naming what is left, exit 0
#
# The GPU machine has its own torch and CUDA but no package registry, so nothing is fetched:
#  1. Horovod with NCCL ops for that machine's torch: the carried wheel when its build key
#     (Horovod, patch level, torch, Python, CUDA) matches, else built there from the carried
#     sdist by scripts/build_horovod.sh for this GPU's architecture alone. It goes into
#     $WORK/site (PYTHONPATH), so the machine's environment is left as it was.
#  2. hvdsgd._C built in place when it does not import.
#  3. --- the first GPU-only step: a CUDA device must be visible ---
#  4. HVDSGD_TEST_GPU=1 pytest -m gpu (a skip is a failure).
#  5. horovodrun -np 1 python -m hvdsgd.train --model resnet18 --dataset synthetic --amp bf16
#     --channels-last --profile, the same with --amp fp16, and ResNet-50 in bf16 (its images/s,
#     GPU utilisation and GPM SM occupancy are the figures the README reports).
#  6. The GPU forms of bench/throughput.py, bench/techniques.py and bench/occupancy.py, reduced
#     (--quick): their NAME-gpu records.
# Records: $OUT/gpu_check.log (every step's output), $OUT/versions.txt, $OUT/records.tar.gz
# (bench/results-style NAME-gpu.{json,md,png}, the runs' summary.json and profile files).
# Unpack the records with: tar -xzf records.tar.gz -C bench/results --strip-components=1 results
#
# Environment: PYTHON (default: python3 on PATH, the one that holds torch), OUT (default:
# ./gpu-out), WORK (default: a temporary directory), HVDSGD_GPU_CHECK_STEPS (default: all; a
# comma list of test,train,bench to run fewer).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
HOROVOD_VERSION=0.28.1
PACK=${HVDSGD_GPU_PACK:-$ROOT/.gpu}   # what travels (git-ignored); carry .gpu
say() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'gpu_check: %s\n' "$*" >&2; exit 1; }

MODE=check
case "${1:-}" in
  pack|versions) MODE=$1 ;;
  --dry-run) MODE=dry-run ;;
  "") ;;
  *) die "unknown argument '$1'; use one of: pack, versions, --dry-run, or nothing (the check)" ;;
esac

# --- pack (here) ---------------------------------------------------------------------------
if [ "$MODE" = pack ]; then
  cache=${HVDSGD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdsgd}
  sdist="$cache/sdist/horovod-$HOROVOD_VERSION.tar.gz"
  [ -f "$sdist" ] || die "no $sdist yet; run make setup (it downloads the sdist) first"
  mkdir -p "$PACK/sdist" "$PACK/wheels"
  cp "$sdist" "$PACK/sdist/"
  for d in "$cache"/wheels/horovod-*-nccl-*; do
    [ -d "$d" ] && mkdir -p "$PACK/wheels/$(basename "$d")" && cp "$d"/horovod-*.whl "$PACK/wheels/$(basename "$d")/"
  done
  say "packed into $PACK: $(cd "$PACK" && find . -type f | sort | tr '\n' ' ')($(du -sh "$PACK" | cut -f1))"
  exit 0
fi

PYTHON=${PYTHON:-$(command -v python3)}
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
"$PYTHON" -c 'import torch' 2>/dev/null || die "no torch for $PYTHON; set PYTHON to the Python that holds torch"

# --- versions (there, first) ---------------------------------------------------------------
versions() {
  "$PYTHON" - <<'EOF'
import platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as e:  # a CPU-only torch
    nccl = f"none ({e})"
print(f"NCCL (torch's) {nccl}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)")
else:
    print("GPU none visible to torch")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=driver_version,compute_cap --format=csv,noheader | sed 's/^/driver, compute capability: /' || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1 || echo "nvcc: none"
  echo "cores $(nproc)"
}
if [ "$MODE" = versions ]; then
  versions | tee "$OUT/versions.txt"
  exit 0
fi

exec > >(tee -a "$OUT/gpu_check.log") 2>&1
say "versions"; versions | tee "$OUT/versions.txt"
WORK=${WORK:-$(mktemp -d)}
STEPS=${HVDSGD_GPU_CHECK_STEPS:-test,train,bench}
export PYTHONUNBUFFERED=1

# --- 1. Horovod with NCCL, into $WORK/site ---------------------------------------------------
say "1. Horovod $HOROVOD_VERSION with NCCL for this torch"
cc=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')
fi
t0=$(date +%s)
# build_horovod.sh finds a carried wheel under .gpu/wheels/KEY or builds one from .gpu/sdist
# (no download: the sdist is carried); it prints the wheel's path last.
[ -f "$PACK/sdist/horovod-$HOROVOD_VERSION.tar.gz" ] || ls "$PACK"/wheels/*/horovod-*.whl >/dev/null 2>&1 \
  || die "nothing packed in $PACK: run scripts/gpu_check.sh pack on the CPU host, and carry .gpu"
wheel=$(HVDSGD_CACHE="$PACK" HVDSGD_HOROVOD_GPU=1 HVDSGD_HOROVOD_INSTALL=0 \
  HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-$cc} \
  scripts/build_horovod.sh "$PYTHON" | tee /dev/stderr | tail -n 1)
[ -f "$wheel" ] || die "no Horovod NCCL wheel came out of scripts/build_horovod.sh"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$wheel"
export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"
say "Horovod ready in $(( $(date +%s) - t0 )) s: $(basename "$wheel")"
"$PYTHON" - <<'EOF' || die "the Horovod in $WORK/site has no NCCL ops"
import horovod, horovod.torch as hvd
print(f"horovod {horovod.__version__} from {horovod.__file__}: nccl_built={hvd.nccl_built()}, gloo_built={hvd.gloo_built()}")
raise SystemExit(0 if hvd.nccl_built() else 1)
EOF
horovodrun --check-build

# --- 2. hvdsgd._C ----------------------------------------------------------------------------
say "2. hvdsgd._C"
if ! "$PYTHON" -c 'import hvdsgd._C' 2>/dev/null; then
  "$PYTHON" setup.py -q build_ext --inplace >"$WORK/build_ext.log" 2>&1 \
    || { tail -n 30 "$WORK/build_ext.log"; die "building hvdsgd._C failed (log above)"; }
fi
"$PYTHON" -c 'import hvdsgd, hvdsgd._C; print("hvdsgd", hvdsgd.__file__)'

# --- 3. the first GPU-only step --------------------------------------------------------------
left="pytest -m gpu, the resnet18 bf16/fp16 --profile runs, the GPU forms of throughput/techniques/occupancy"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  line="stopped at the first GPU-only step: no CUDA device visible to torch (torch.cuda.is_available() is False); left for a GPU machine: $left"
  if [ "$MODE" = dry-run ]; then echo "gpu_check: $line"; exit 0; fi
  die "$line"
fi
[ "$MODE" = dry-run ] && { echo "gpu_check: dry run on a GPU machine: stopping before the GPU steps ($left)"; exit 0; }
status=0
step() { # NAME COMMAND...: run, log, remember a failure and go on
  local name=$1; shift; local s; s=$(date +%s)
  say "$name: $*"
  if "$@"; then say "$name: ok ($(( $(date +%s) - s )) s)"; else say "$name: FAILED ($(( $(date +%s) - s )) s)"; status=1; fi
}
mkdir -p "$WORK/records/results" "$WORK/records/runs"

# --- 4. the gpu tests ------------------------------------------------------------------------
case ",$STEPS," in *,test,*) step "4. pytest -m gpu" env HVDSGD_TEST_GPU=1 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests ;; esac

# --- 5. resnet18 on the GPU, bf16 and fp16, profiled ------------------------------------------
train_run() { # MODEL AMP: synthetic images at the model's input size, channels-last, profiled
  local out="$WORK/records/runs/$1-$2"
  horovodrun -np 1 -H localhost:1 "$PYTHON" -m hvdsgd.train --model "$1" --dataset synthetic \
    --amp "$2" --channels-last --profile --epochs 3 --batch-size 256 --synthetic-samples 16384 \
    --out "$out" --overwrite --no-progress \
    && "$PYTHON" -c 'import json, sys; s = json.load(open(sys.argv[1])); print({k: s.get(k) for k in ("device", "samples_per_sec", "test_accuracy", "profile")})' "$out/summary.json"
}
case ",$STEPS," in *,train,*)
  step "5. train resnet18 bf16" train_run resnet18 bf16
  step "5. train resnet18 fp16" train_run resnet18 fp16
  step "5. train resnet50 bf16 (the images/s figure)" train_run resnet50 bf16
;; esac

# --- 6. the GPU bench forms ------------------------------------------------------------------
R="$WORK/records/results"
case ",$STEPS," in *,bench,*)
  step "6. bench/throughput.py" "$PYTHON" bench/throughput.py --quick --np 1 --models resnet18,resnet50 --out "$R"
  step "6. bench/techniques.py" "$PYTHON" bench/techniques.py --quick --models resnet50 --out "$R"
  step "6. bench/occupancy.py" "$PYTHON" bench/occupancy.py --quick --out "$R"
;; esac

tar -czf "$OUT/records.tar.gz" -C "$WORK/records" .
say "records: $OUT/records.tar.gz ($(du -h "$OUT/records.tar.gz" | cut -f1)); $([ $status = 0 ] && echo 'every step passed' || echo 'some step FAILED (see above)')"
exit $status
