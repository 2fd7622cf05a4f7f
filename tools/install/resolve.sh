#!/usr/bin/env bash
# Resolve the pinned GPU dependency sets from their inputs, reading package metadata only.
#
#   tools/install/resolve.sh [--write] [--list] [--python X.Y]... [torch] [megablocks]
#
# Sets (default: both):
#   torch       requirements-gpu-torch.in      -> requirements-gpu-torch.txt
#   megablocks  requirements-gpu-megablocks.in -> requirements-gpu-megablocks.txt
# Every set is resolved for Linux x86_64 (manylinux_2_28, the CUDA wheels' platform) and each
# --python (default 3.11 and 3.12); the pins must be the same for all of them, since one file
# serves both. It prints the key versions of each set, then whether the committed .txt holds
# exactly these pins; --write rewrites it (from the first --python), --list prints every pin.
# Exit status: 0 = resolved and the files match (or were written), 1 = a file differs from the
# resolution or the pythons disagree, 2 = usage error or no resolution.
#
# Why uv: `pip install --dry-run` / `pip download` fetch every wheel whole to read its metadata
# (torch alone is ~0.9 GB, its nvidia-* wheels several GB more); `uv pip compile` reads the
# metadata files PyPI serves beside the wheels (PEP 658) and never installs anything. uv comes
# from $UV, PATH, or a private venv made here with `pip install uv==$UV_VERSION`. It runs on a
# fresh, private cache that is measured at the end (the largest file it holds is printed) and
# removed: that is everything the resolution downloaded.
#
# megablocks, stanford-stk and grouped_gemm are sdist-only and their builds need torch (and a
# GPU or TORCH_CUDA_ARCH_LIST): their declared requirements come from uv.toml beside this script
# instead of a build (the comment there says why and from where), and build-constraints.txt
# forbids any build from installing torch, so nothing large is ever fetched.
#
# Versions: each set is also constrained to requirements-cpu.txt (the versions the CPU test
# suite runs), except the packages listed in CPU_PINS_NOT_USED below, which the set bounds itself.
set -euo pipefail

UV_VERSION=0.13.9
PLATFORM=x86_64-manylinux_2_28
REPO="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/tools/install"
declare -A CPU_PINS_NOT_USED=(
    [torch]=""                              # same torch 2.13.0 as requirements-cpu.txt
    [megablocks]="torch numpy packaging"    # megablocks 0.10.0: torch 2.7.0, numpy<2.1, packaging<24.2
)
KEY='^(torch|triton|deepspeed|transformers|datasets|peft|accelerate|numpy|megablocks|stanford-stk|grouped-gemm|nvidia-nccl[a-z0-9-]*|nvidia-cuda-runtime[a-z0-9-]*)=='

die() { echo "resolve.sh: error: $*" >&2; exit 2; }

write=0 list=0 pythons=() sets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --write) write=1 ;;
        --list) list=1 ;;
        --python) [ $# -ge 2 ] || die "--python needs a version (3.11)"; pythons+=("$2"); shift ;;
        --python=*) pythons+=("${1#--python=}") ;;
        torch | megablocks) sets+=("$1") ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (sets: torch megablocks; options: --write --list --python X.Y)" ;;
    esac
    shift
done
[ ${#pythons[@]} -gt 0 ] || pythons=(3.11 3.12)
[ ${#sets[@]} -gt 0 ] || sets=(torch megablocks)

find_uv() {
    if [ -n "${UV:-}" ]; then echo "$UV"; return; fi
    if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
    local venv="${TMPDIR:-/tmp}/h3f-uv-$UV_VERSION"
    if [ ! -x "$venv/bin/uv" ]; then
        echo "resolve.sh: installing uv==$UV_VERSION into $venv (once)" >&2
        python3 -m venv "$venv" >&2 || die "python3 -m venv $venv failed"
        "$venv/bin/pip" install --quiet "uv==$UV_VERSION" >&2 || die "pip install uv==$UV_VERSION failed"
    fi
    echo "$venv/bin/uv"
}

pins() { grep -E '^[A-Za-z0-9]' "$1" | sed 's/ *#.*//' | sort -f; }   # name==version lines only

UV_BIN="$(find_uv)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/h3f-resolve.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export UV_CACHE_DIR="$WORK/cache"
echo "uv: $("$UV_BIN" --version); platform $PLATFORM; python ${pythons[*]}"

status=0
for set in "${sets[@]}"; do
    in="$REPO/requirements-gpu-$set.in" out="$REPO/requirements-gpu-$set.txt"
    [ -f "$in" ] || die "$in not found"
    skip="${CPU_PINS_NOT_USED[$set]}"
    constraints="$WORK/cpu-$set.txt"
    grep -viE "^(${skip// /|}${skip:+|}__none__)==" "$REPO/requirements-cpu.txt" >"$constraints"
    first=""
    for py in "${pythons[@]}"; do
        res="$WORK/$set-$py.txt"
        (cd "$REPO" && "$UV_BIN" pip compile --quiet "requirements-gpu-$set.in" \
            --constraint "$constraints" --config-file "$HERE/uv.toml" \
            --build-constraint "$HERE/build-constraints.txt" \
            --python-platform "$PLATFORM" --python-version "$py" \
            --custom-compile-command "tools/install/resolve.sh --write" --annotation-style line \
            --output-file "$res") || die "set $set: no resolution for python $py (uv's message above)"
        sed -i "s#$constraints#requirements-cpu.txt#" "$res"   # the .in says which pins it leaves out
        n=$(pins "$res" | wc -l)
        echo "set $set, python $py: $n pins; $(pins "$res" | grep -iE "$KEY" | paste -sd' ')"
        [ "$list" = 1 ] && pins "$res" | paste -sd' ' | fold -s -w 100 | sed 's/^/    /'
        if [ -z "$first" ]; then
            first="$res"
        elif ! diff <(pins "$first") <(pins "$res") >"$WORK/pydiff"; then
            echo "set $set: python $py resolves differently from ${pythons[0]}:"
            sed 's/^/    /' "$WORK/pydiff"
            status=1
        fi
    done
    if [ "$write" = 1 ]; then
        cp "$first" "$out"
        echo "requirements-gpu-$set.txt: written (python ${pythons[0]})"
    elif [ ! -f "$out" ]; then
        echo "requirements-gpu-$set.txt: missing (run with --write)"
        status=1
    elif diff <(pins "$out") <(pins "$first") >"$WORK/filediff"; then
        echo "requirements-gpu-$set.txt: up to date"
    else
        echo "requirements-gpu-$set.txt: differs from this resolution (< file, > resolution; --write updates it):"
        grep '^[<>]' "$WORK/filediff" | sed 's/^/    /'
        status=1
    fi
done
largest="$(find "$UV_CACHE_DIR" -type f -printf '%s %P\n' | sort -n | tail -1)"
echo "downloaded (uv's fresh cache): $(du -sm "$UV_CACHE_DIR" | cut -f1) MB in all; largest file $((${largest%% *} / 1048576)) MB (${largest#* })"
exit "$status"
