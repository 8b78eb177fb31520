#!/usr/bin/env bash
# Proves the `cuda` path in one command on a GPU machine, or the same checks on the CPU (part of the test
# suite, so the script cannot rot):
#   1. the binary's shared libraries resolve (CUDA's come from the machine's own PyTorch install);
#   2. `flywheel device-check`: the encoder and a LoRA step on the device agree with the CPU in f32 and
#      under bf16 autocast, and their timings (random weights with all-MiniLM-L6-v2's shapes);
#   3. benches/pytorch_device_check.py: PyTorch (+ PEFT where installed) at the same shapes on the device;
#   4. one table (markdown and JSON) with the ratios.
#
#   scripts/gpu-check.sh [--device cuda|cpu] [--binary PATH] [--out DIR]
#
# cuda (the default) times inference at 32 × 128 and a LoRA step at 64 × 128; cpu at 4 × 32 (a few seconds).
# The binary defaults to target/cuda/flywheel (scripts/build-cuda.sh) for cuda, target/debug/flywheel for
# cpu. Results go to DIR (default $OUT, else target/gpu-check): flywheel.json, pytorch.json, gpu-check.json,
# gpu-check.md. PYTHON picks the interpreter with torch (default: .venv/bin/python where it exists, else
# python3); without torch the PyTorch columns are left out on the CPU and the run fails on a GPU.
# Exits non-zero when a library is missing, a parity check fails or a step errs. docs/GPU.md has the rest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
device=cuda binary="" out=${OUT:-target/gpu-check}
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
case $device in
  cpu) timed=(--infer 4x32 --train 4x32 --seconds 0.5 --steps 2) parity=2x32
    binary=${binary:-target/debug/flywheel} ;;
  cuda | cuda:*) timed=(--infer 32x128 --train 64x128 --seconds 2 --steps 8) parity=4x64
    binary=${binary:-target/cuda/flywheel} ;;
  *) echo "error: --device is cpu, cuda or cuda:N, not '$device'" >&2; exit 2 ;;
esac
[ -x "$binary" ] || { echo "error: no binary at $binary (cuda: scripts/build-cuda.sh; cpu: cargo build)" >&2; exit 1; }
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"
rm -f "$out"/{flywheel,pytorch,gpu-check}.json "$out/gpu-check.md"
started=$(date +%s)

if [ "$device" != cpu ]; then
  # The CUDA runtime, cuBLAS and NVRTC of the machine's PyTorch wheels (nvidia/cu13/lib and friends).
  purelib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for lib in "$purelib"/nvidia/*/lib; do
    [ -d "$lib" ] && LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  # PyTorch ships no cuRAND; candle only opens a generator with it (our random numbers come from the CPU),
  # so scripts/build-cuda.sh leaves a stub beside the binary for that case.
  if ldd "$binary" | grep -q 'libcurand.*not found'; then
    LD_LIBRARY_PATH="$(dirname "$binary")/curand-stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "libcurand.so.10 is not installed here: using the stub beside the binary"
  fi
  export LD_LIBRARY_PATH
  missing=$(ldd "$binary" | grep 'not found' || true)
  if [ -n "$missing" ]; then
    echo "error: $binary cannot load:" >&2
    echo "$missing" >&2
    exit 1
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

status=0
# Both sides take the same timing flags; only Flywheel checks parity.
"$binary" device-check --device "$device" "${timed[@]}" --parity "$parity" --json "$out/flywheel.json" || status=$?
if "$python" -c 'import torch, transformers' 2>/dev/null; then
  "$python" benches/pytorch_device_check.py --device "$device" "${timed[@]}" --json "$out/pytorch.json" \
    2> >(grep -v -e FutureWarning -e 'warnings.warn' >&2) || status=$?
elif [ "$device" != cpu ]; then
  echo "error: $python has no torch + transformers; the comparison needs them" >&2
  status=1
else
  echo "no torch + transformers for $python: the PyTorch columns are left out"
fi

python3 - "$out" "$(($(date +%s) - started))" <<'PY'
import json, os, sys
out, seconds = sys.argv[1], int(sys.argv[2])
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
ours, theirs = load("flywheel.json"), load("pytorch.json")
if ours is None:
    sys.exit("flywheel device-check wrote no report")
lines = [f"# Device check: {ours['device']}" + (f" ({theirs['device_name']})" if theirs else ""), "",
         f"{ours['model']}; cuda build: {ours['cuda_build']}; torch: {theirs['torch'] if theirs else 'absent'}; "
         f"{seconds} s in all.", "", "| parity check | precision | relative error | tolerance | |",
         "| --- | --- | --- | --- | --- |"]
for p in ours["parity"]:
    lines.append(f"| {p['check']} | {p['precision']} | {p['relative_error']:.2e} | {p['tolerance']:.0e} | "
                 f"{'ok' if p['pass'] else 'FAIL'} |")
lines += ["", "| timing | precision | batch × tokens | Flywheel | PyTorch | PyTorch / Flywheel |",
          "| --- | --- | --- | --- | --- | --- |"]
rows = []
for t in ours["timings"]:
    match = next((p for p in (theirs or {}).get("timings", []) if p["what"] == t["what"]
                  and p["precision"] == t["precision"] and (p["batch"], p["length"]) == (t["batch"], t["length"])),
                 None)
    ratio = match["median_ms"] / t["median_ms"] if match else None
    what = t["what"].replace("_", " ") + ("" if t["path"] == "candle" else f" ({t['path']})")
    def cell(ms, path=""):  # inference also as sequences per second
        rate = f", {t['batch'] * 1e3 / ms:,.0f} seq/s" if t["what"] == "inference" else ""
        return f"{ms:.2f} ms{rate}" + (f" ({path})" if path else "")
    lines.append(f"| {what} | {t['precision']} | {t['batch']} × {t['length']} | {cell(t['median_ms'])} | "
                 + (f"{cell(match['median_ms'], match['path'])} | {ratio:.2f}× |" if match else "– | – |"))
    rows.append(dict(t, pytorch_ms=match["median_ms"] if match else None,
                     pytorch_path=match["path"] if match else None, pytorch_over_flywheel=ratio))
errors = [f"Flywheel: {e}" for e in ours.get("errors", [])] + [f"PyTorch: {e}" for e in (theirs or {}).get("errors", [])]
if errors:
    lines += ["", "Did not run:", ""] + [f"- {e}" for e in errors]
lines += ["", "Ratios above 1 mean Flywheel is faster. Timings are medians; inference includes copying the "
          "embeddings to the host."]
json.dump(dict(flywheel=ours, pytorch=theirs, timings=rows, seconds=seconds),
          open(os.path.join(out, "gpu-check.json"), "w"), indent=2)
open(os.path.join(out, "gpu-check.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit "$status"
