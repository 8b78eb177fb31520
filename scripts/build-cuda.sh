#!/usr/bin/env bash
# Builds the `cuda` flavour of the server binary on a machine with no GPU and no system CUDA toolkit, for
# carrying to a GPU machine: target/cuda/flywheel, stripped (the device tool carries at most 64 MiB), and
# target/cuda/curand-stub (see below).
#
#   scripts/build-cuda.sh            # then: scripts/gpu-check.sh on the GPU machine (see docs/GPU.md)
#
# The CUDA 13.0 compiler and libraries come from NVIDIA's wheels on PyPI, installed into a cached venv
# (FLYWHEEL_CUDA_ENV, default ~/.cache/flywheel-cuda). The driver library libcuda.so.1 exists only where a GPU
# is, so the link runs against a generated stub with the same soname that defines each driver symbol the
# linker asked for; the GPU machine's real driver replaces it at run time. The first build compiles candle's
# CUDA kernels (~15 min on 2 cores); later ones are incremental. The CPU build never sees any of this.
#
# Env: CUDA_COMPUTE_CAP (default 90: H100 and H200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
env_dir=${FLYWHEEL_CUDA_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/flywheel-cuda}
[ -x "$env_dir/bin/pip" ] || python3 -m venv "$env_dir"
# One consistent CUDA 13.0 set: cudarc 0.19 (candle 0.11) knows CUDA 13.0 to 13.4, and the GPU machine's
# PyTorch ships 13.x runtime libraries.
"$env_dir/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==13.0.88" \
  "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.5.25"
cuda="$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
# The wheels carry only versioned sonames; the linker looks for the plain names.
for lib in cublas cublasLt cudart nvrtc; do
  [ -e "$cuda/lib/lib$lib.so" ] || ln -s "lib$lib.so.13" "$cuda/lib/lib$lib.so"
done
[ -e "$cuda/lib/libcurand.so" ] || ln -s libcurand.so.10 "$cuda/lib/libcurand.so"
export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CARGO_TARGET_DIR=target/cuda

symbols="$env_dir/libcuda-symbols.txt"
touch "$symbols"
# Every driver function cudarc declares, so one link usually suffices (the loop below adds any it missed).
cargo fetch --locked -q
find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-*/src/driver/sys/mod.rs' \
  -exec grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' {} + | awk '{print $NF}' >>"$symbols"
sort -u "$symbols" -o "$symbols"
# A libcuda.so.1 whose functions are the driver symbols the link has asked for so far (each returns an
# error code; it is never loaded at run time).
make_stub() {
  local src
  src=$(mktemp --suffix=.c)
  while read -r s; do [ -n "$s" ] && echo "int $s(void){return 999;}"; done <"$symbols" >"$src"
  gcc -shared -fPIC -o "$cuda/lib/libcuda.so" "$src" -Wl,-soname,libcuda.so.1
  rm -f "$src"
}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
built=""
for round in 1 2 3 4 5 6 7 8; do
  make_stub
  if cargo build --release --locked --features cuda --bin flywheel >"$log" 2>&1; then
    built=yes
    break
  fi
  missing=$(grep -oE 'undefined (symbol: |reference to .)cu[A-Za-z0-9_]+' "$log" | grep -oE 'cu[A-Za-z0-9_]+$' | sort -u || true)
  if [ -z "$missing" ]; then
    tail -40 "$log"
    echo "error: the cuda build failed (not for a missing driver symbol)" >&2
    exit 1
  fi
  printf '%s\n' $missing >>"$symbols"
  sort -u "$symbols" -o "$symbols"
  echo "round $round: the driver stub now defines $(wc -l <"$symbols") symbols; linking again"
done
[ -n "$built" ] || { echo "error: still missing driver symbols after 8 rounds" >&2; exit 1; }
strip -o target/cuda/flywheel target/cuda/release/flywheel
# PyTorch's wheels bring CUDA's runtime, cuBLAS and NVRTC to the GPU machine but not cuRAND (100 MB, too big
# to carry). candle opens a cuRAND generator when it opens the device and uses it only for random tensors,
# which Flywheel draws on the CPU; so a stub stands in where the real library is missing: it opens a
# generator and refuses to generate. scripts/gpu-check.sh puts it on the library path only in that case.
mkdir -p target/cuda/curand-stub
stub_src=$(mktemp --suffix=.c)
nm -D --undefined-only target/cuda/flywheel | awk '{print $NF}' | grep '^curand' | sed 's/@.*//' | sort -u |
  while read -r s; do
    case $s in
      curandCreateGenerator) echo "int $s(void **generator, int kind){static int g; *generator = &g; return 0;}" ;;
      curandGenerate*) echo "int $s(void){return 201;} /* CURAND_STATUS_NOT_INITIALIZED */" ;;
      *) echo "int $s(void){return 0;}" ;;
    esac
  done >"$stub_src"
# The binary asks for the symbols under the real library's version node, which the stub must define too.
stub_versions=$(mktemp)
echo 'libcurand.so.10 { global: *; };' >"$stub_versions"
gcc -shared -fPIC -o target/cuda/curand-stub/libcurand.so.10 "$stub_src" -Wl,-soname,libcurand.so.10 \
  -Wl,--version-script="$stub_versions"
rm -f "$stub_src" "$stub_versions"
bytes=$(stat -c %s target/cuda/flywheel)
echo "built target/cuda/flywheel (cuda, compute capability $CUDA_COMPUTE_CAP): $((bytes / 1024 / 1024)) MiB stripped"
if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
  echo "error: over the 64 MiB the device tool carries" >&2
  exit 1
fi
