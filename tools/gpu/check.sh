#!/usr/bin/env bash
# One prepared GPU check (issue 31, part 8), run ON a one-GPU machine with nothing to fetch:
#   install the carried wheels (.whl/, made here by tools/gpu/prepare_wheels.sh) into /tmp/site,
#   build grouped_gemm and megablocks from their sdists with nvcc (background, time-boxed), and
#   (c) 30 fusion steps of a SmolLM2-135M-shaped MoE under DeepSpeed ZeRO-2 bf16 (random init)
#   (a) tests/gpu with every GPU backend REQUIRED (a backend that cannot run fails, never skips)
#   (b) tools/profiling/throughput.py at the 7B FFN shape: megablocks / grouped_mm / loop vs dense
# then ONE summary (tools/gpu/summary.py): gpu_check_summary.{json,md} in --out.
# Exit status: 0 when every part asked for passed, 1 otherwise, 2 for bad arguments.
#
#   bash tools/gpu/check.sh --out "$OUT"                # all parts (default --parts a,b,c)
#   bash tools/gpu/check.sh --dry-run                   # print the plan, run nothing
#   options: --out DIR (default: $OUT, else /tmp/h3f-gpu-check-out)  --parts a,b,c  --wheels DIR (.whl)
#            --work DIR (/tmp/h3f-gpu-check)  --budget SECONDS (470: the whole run, builds included)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/h3f-gpu-check-out}
PARTS=a,b,c
WHEELS=$REPO/.whl
WORK=/tmp/h3f-gpu-check
BUDGET=470
DRY=0
# every backend tests/gpu knows (tests/gpu/gpu_backends.py KNOWN): none may skip
REQUIRED=loop,grouped_mm,megablocks,nccl,deepspeed
# time boxes (seconds); the builds run in the background while part c and the first tests run
T_INSTALL=60 T_BUILD=300 T_C=180 T_A1=150 T_A2=90 T_B=100 T_SUMMARY=30

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "check.sh: error: $*" >&2; exit 2; }
# value OPTION VALUE: an option's value is there and is not the next option
value() { [ -n "${2:-}" ] && [ "${2#-}" = "$2" ] || die "$1 needs ${3}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) value "$1" "${2:-}" "a directory"; OUT_DIR=$2; shift 2 ;;
    --parts) value "$1" "${2:-}" "a list like a,b,c"; PARTS=$2; shift 2 ;;
    --wheels) value "$1" "${2:-}" "a directory"; WHEELS=$2; shift 2 ;;
    --work) value "$1" "${2:-}" "a directory"; WORK=$2; shift 2 ;;
    --budget) value "$1" "${2:-}" "seconds"; BUDGET=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$PARTS" =~ ^[abc](,[abc])*$ ]] || die "--parts must be a comma list of a, b, c; got '$PARTS'"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "--budget must be whole seconds; got '$BUDGET'"
has_part() { [[ ",$PARTS," == *",$1,"* ]]; }
WHEEL_FILES=$(ls "$WHEELS"/*.whl 2>/dev/null | xargs -r -n1 basename)
SDISTS=$(ls "$WHEELS"/*.tar.gz 2>/dev/null | xargs -r -n1 basename)
NEEDS_BUILD=$(has_part a || has_part b && echo 1 || echo 0)

plan() {
  echo "GPU check plan (budget ${BUDGET}s, parts $PARTS, out $OUT_DIR, work $WORK)"
  local wheels=${WHEEL_FILES:-"(none: run tools/gpu/prepare_wheels.sh here first)"}
  [ -n "$WHEEL_FILES" ] && wheels=$(echo $WHEEL_FILES | tr ' ' ',')
  echo "  install: pip --target /tmp/site from $WHEELS: $wheels"
  if [ "$NEEDS_BUILD" = 1 ]; then
    echo "  build (background, ${T_BUILD}s each, nvcc, TORCH_CUDA_ARCH_LIST=9.0): $(echo $SDISTS | tr ' ' ',')"
  fi
  has_part c && echo "  c: fusion smoke, 30 steps, SmolLM2-135M-shaped random-init MoE, DeepSpeed ZeRO-2 bf16 (${T_C}s)"
  has_part a && echo "  a: pytest tests/gpu with H3F_REQUIRE_GPU_BACKENDS=$REQUIRED (a1 ${T_A1}s; a2 megablocks, after the builds, ${T_A2}s)"
  has_part b && echo "  b: throughput.py --tokens 8192 --hidden 4096 --ffn 11008 --experts 3 --top-k 2 bf16: megablocks grouped_mm loop vs dense (${T_B}s)"
  echo "  summary: $OUT_DIR/gpu_check_summary.json and .md"
}
plan
[ "$DRY" = 1 ] && exit 0
[ -d "$WHEELS" ] || die "no wheel dir $WHEELS (run tools/gpu/prepare_wheels.sh first, carry .whl)"

START=$SECONDS
rm -rf "$WORK"; mkdir -p "$WORK/logs" "$OUT_DIR" || die "cannot create $WORK / $OUT_DIR"
: > "$WORK/steps.tsv"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# step NAME TIMEOUT CMD...: run CMD with `timeout` cut to what is left of the budget; its output
# goes to logs/NAME.log (and stdout); one line in steps.tsv: name, exit status, seconds, note
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START) - T_SUMMARY))
  if [ "$left" -lt 20 ]; then
    printf '%s\t%s\t0\tnot run: %ss of the budget left\n' "$name" 125 "$left" >> "$WORK/steps.tsv"
    echo "== $name: not run (out of time)"; return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "${STEP_NOTE:-}" >> "$WORK/steps.tsv"
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  return $rc
}

cuda_home() {   # the toolkit nvcc belongs to (a /usr/local/bin wrapper script is not one)
  local c nv
  nv=$(command -v nvcc || true)
  for c in "${CUDA_HOME:-}" /usr/local/cuda "$(ls -d /usr/local/cuda-* 2>/dev/null | sort -V | tail -1)" \
           "${nv:+$(dirname "$(dirname "$(readlink -f "$nv")")")}"; do
    [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ] && { echo "$c"; return; }
  done
}

install_wheels() {
  rm -rf /tmp/site && mkdir -p /tmp/site
  [ -n "$WHEEL_FILES" ] || { echo "no wheels in $WHEELS"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
}

# build_sdist NAME: pip-build the carried sdist NAME-*.tar.gz into /tmp/site-NAME against the
# machine's torch (--no-build-isolation --no-deps: megablocks pins torch 2.7.0, we keep this one)
build_sdist() {
  local name=$1 src
  src=$(ls "$WHEELS"/"$name"-*.tar.gz 2>/dev/null | head -1)
  [ -n "$src" ] || { echo "no $name sdist in $WHEELS"; return 1; }
  mkdir -p "$WORK/src" && tar -xzf "$src" -C "$WORK/src" || return 1
  src=$(ls -d "$WORK/src/$name"-*/ | head -1)
  if [ "$name" = megablocks ] && [ "${NVCC_MAJOR:-0}" -ge 13 ]; then
    # CUDA 13's CUB dropped the `debug_synchronous` argument megablocks 0.10.0 still passes
    perl -0pi -e 's/stream,\s*debug_synchronous\)\)/stream))/g' "$src/csrc/cumsum.h" || return 1
    echo "patched $src/csrc/cumsum.h: removed CUB's debug_synchronous argument (CUDA $NVCC_MAJOR)"
  fi
  CUDA_HOME=$CUDA_HOME_DIR TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 "$PY" -m pip install --no-index \
    --no-deps --no-build-isolation --no-cache-dir -v --target "/tmp/site-$name" "$src" || return 1
  # megablocks' setup.py silently skips its CUDA ops without CUDA_HOME: a build without them failed
  local ext=megablocks_ops
  [ "$name" = grouped_gemm ] && ext=grouped_gemm_backend
  ls "/tmp/site-$name/$ext".*.so > /dev/null 2>&1 || { echo "built $name has no $ext.*.so"; return 1; }
}

probe_versions() {
  "$PY" - "$WORK/versions.json" <<'EOF'
import importlib.metadata as md, json, platform, subprocess, sys
import torch
v = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
     "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    v["gpu"] = torch.cuda.get_device_name()
    v["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
for dist in ("deepspeed", "megablocks", "grouped_gemm", "stanford-stk", "transformers", "triton",
             "pydantic", "huggingface_hub", "tokenizers"):
    try:
        v[dist.replace("-", "_")] = md.version(dist)
    except md.PackageNotFoundError:
        v[dist.replace("-", "_")] = None
for name, cmd in (("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                  ("nvcc", ["nvcc", "--version"])):
    try:
        v[name] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[-1]
    except Exception as exc:
        v[name] = f"unavailable ({exc})"
json.dump(v, open(sys.argv[1], "w"), indent=1)
print(json.dumps(v))
EOF
}

# ----------------------------------------------------------------------------- run
cd "$REPO" || exit 2
CUDA_HOME_DIR=$(cuda_home)
NVCC_MAJOR=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p' | head -1)
echo "CUDA_HOME=$CUDA_HOME_DIR nvcc major=${NVCC_MAJOR:-none}"
export PY WHEELS WHEEL_FILES WORK CUDA_HOME_DIR NVCC_MAJOR
export -f install_wheels build_sdist   # `timeout` runs them through bash -c
STEP_NOTE="wheels: $(echo $WHEEL_FILES | wc -w)" step install "$T_INSTALL" bash -c install_wheels
export PYTHONPATH=/tmp/site:/tmp/site-grouped_gemm:/tmp/site-megablocks:$REPO${PYTHONPATH:+:$PYTHONPATH}
export H3F_REQUIRE_GPU_BACKENDS=$REQUIRED

BUILD_PIDS=()
if [ "$NEEDS_BUILD" = 1 ]; then
  for name in grouped_gemm megablocks; do
    STEP_NOTE="CUDA_HOME=$CUDA_HOME_DIR" step "build_$name" "$T_BUILD" bash -c "build_sdist $name" > /dev/null &
    BUILD_PIDS+=($!)
  done
fi
if has_part c; then
  mkdir -p "$WORK/fusion"
  step c "$T_C" "$PY" tools/gpu/fusion_smoke.py --out "$WORK/fusion" --require-cuda
fi
if has_part a; then
  step a1 "$T_A1" "$PY" -m pytest tests/gpu -q -p no:cacheprovider -rs \
    --ignore=tests/gpu/test_megablocks_parity.py --junitxml="$WORK/pytest-a1.xml"
fi
for pid in ${BUILD_PIDS[@]+"${BUILD_PIDS[@]}"}; do wait "$pid"; done
probe_versions > "$WORK/logs/versions.log" 2>&1 || echo "version probe failed: $(tail -3 "$WORK/logs/versions.log")"
if has_part a; then
  step a2 "$T_A2" "$PY" -m pytest tests/gpu/test_megablocks_parity.py -q -p no:cacheprovider \
    -rs --junitxml="$WORK/pytest-a2.xml"
fi
if has_part b; then
  step b "$T_B" "$PY" tools/profiling/throughput.py --preset llama2-7b-ffn --tokens 8192 \
    --hidden 4096 --ffn 11008 --experts 3 --top-k 2 --dtype bfloat16 --device cuda \
    --backends megablocks grouped_mm loop --skip-unavailable --warmup 3 --repeats 10 \
    --out "$WORK/throughput" --overwrite
fi
"$PY" tools/gpu/summary.py --work "$WORK" --out "$OUT_DIR" --parts "$PARTS"
rc=$?
tar -czf "$OUT_DIR/gpu_check_logs.tar.gz" -C "$WORK" logs steps.tsv 2>/dev/null
echo "GPU check: $([ $rc = 0 ] && echo PASS || echo FAIL) after $((SECONDS - START))s; summary in $OUT_DIR"
exit $rc
