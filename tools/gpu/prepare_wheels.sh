#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before the GPU check: fills .whl/ (git-ignored) with what the GPU
# machine lacks, for tools/gpu/check.sh to install there with nothing to fetch. The GPU image
# (/work/.library/device/KINDS.md, 2026-11-17; tools/gpu/gpu_image_packages.txt) has torch 2.11
# (cu130), triton, nvcc, transformers 5.17, huggingface_hub 1.33, tokenizers 0.23.2, ninja,
# msgpack, py-cpuinfo, psutil, einops, numpy, ... but no deepspeed, pydantic, hjson, megablocks,
# grouped_gemm, stanford-stk or datasets (not needed: the fusion smoke run gets pre-tokenized rows).
# Versions = requirements-cpu.txt's where it pins them (tests/unit/test_gpu_check.py checks).
#
#   bash tools/gpu/prepare_wheels.sh            # -> .whl/, prints each file and the total size
#   bash tools/gpu/prepare_wheels.sh --list     # print the package lists, download nothing
#   options: --dest DIR (default .whl)  --max-mib N (fail above N MiB; default 60)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}   # its pip downloads; its torch + setuptools build the pure wheels
DEST=$REPO/.whl
MAX_MIB=60

# binary wheels for the GPU machine (CPython 3.12, manylinux x86_64); pure ones are py3-none-any
WHEELS=(
  hjson==3.1.0                 # deepspeed
  pydantic==2.14.3             # deepspeed
  pydantic_core==2.50.4        # pydantic (compiled, cp312)
  annotated-types==0.8.0       # pydantic
  typing-inspection==0.4.5     # pydantic
  typing_extensions==4.16.0    # pydantic needs >= 4.14.1; the image's version is not recorded
  transformers==5.23.0         # the image's 5.17 lacks transformers.modeling_utils.slice_logits_to_keep
)
# pure-Python sdists built into wheels HERE (no compiled code; DS_BUILD_OPS=0: no DeepSpeed ops,
# the fusion engine needs none: ZeRO-2 with a torch AdamW)
PURE_SDISTS=(
  deepspeed==0.19.8
  stanford-stk==0.7.1          # megablocks' Triton kernels
)
# CUDA sdists carried as they are and built THERE with nvcc by check.sh (TORCH_CUDA_ARCH_LIST=9.0,
# --no-build-isolation --no-deps against the machine's torch; megablocks pins torch 2.7.0)
CUDA_SDISTS=(
  grouped_gemm==0.3.0
  megablocks==0.10.0
)

die() { echo "prepare_wheels.sh: error: $*" >&2; exit 2; }
LIST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) [ -n "${2:-}" ] && [ "${2#-}" = "$2" ] || die "--dest needs a directory"; DEST=$2; shift 2 ;;
    --max-mib) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--max-mib needs a whole number"; MAX_MIB=$2; shift 2 ;;
    --list) LIST=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
if [ "$LIST" = 1 ]; then
  echo "wheels: ${WHEELS[*]}"
  echo "pure sdists (built here): ${PURE_SDISTS[*]}"
  echo "CUDA sdists (built on the GPU machine): ${CUDA_SDISTS[*]}"
  exit 0
fi
[ -x "$PY" ] || die "no python at $PY (make the venv first, or set PYTHON)"

# .whl/ never goes into git; the device tool carries it when a call names it in `carry`
EXCLUDE=$(git -C "$REPO" rev-parse --git-path info/exclude)
case "$EXCLUDE" in /*) ;; *) EXCLUDE=$REPO/$EXCLUDE ;; esac
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"

rm -rf "$DEST"
mkdir -p "$DEST"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "${WHEELS[@]}"

for spec in "${PURE_SDISTS[@]}"; do
  "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$TMP/sdist" "$spec"
done
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation \
  -w "$DEST" "$TMP"/sdist/*.tar.gz

# pip prepares an sdist's metadata even to download it: grouped_gemm's setup.py builds a
# CUDAExtension for that, which a CPU-only torch refuses (CUDA_HOME unset); a placeholder
# CUDA_HOME lets it describe itself. Nothing is compiled here.
mkdir -p "$TMP/shim"
cat > "$TMP/shim/sitecustomize.py" <<'EOF'
import torch.utils.cpp_extension as cpp_extension
cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or "/nonexistent-cuda-home"
EOF
for spec in "${CUDA_SDISTS[@]}"; do
  PYTHONPATH=$TMP/shim TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip download -q --no-deps \
    --no-binary=:all: --no-build-isolation -d "$DEST" "$spec"
done

ls -l "$DEST" | awk 'NR > 1 {printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
BYTES=$(du -sb "$DEST" | cut -f1)
MIB=$(awk -v b="$BYTES" 'BEGIN {printf "%.1f", b / 1048576}')
echo "total: $MIB MiB in $(ls "$DEST" | wc -l) files ($DEST)"
if [ "$BYTES" -gt $((MAX_MIB * 1048576)) ]; then
  echo "prepare_wheels.sh: error: $MIB MiB exceeds --max-mib $MAX_MIB (the device tool carries 64 MiB with the repo)" >&2
  exit 1
fi
