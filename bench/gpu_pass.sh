#!/usr/bin/env bash
# One prepared GPU pass (issue 13): gpu-marked tests + GPU benchmarks, JSON results, under 8 minutes.
#
#   bash bench/gpu_pass.sh                 GPU machine (H200, torch 2.11 / CUDA 13, Triton 3.6, no package index)
#   bash bench/gpu_pass.sh --dry-run       any CPU machine: every part collected, nothing installed or timed
#   bash bench/gpu_pass.sh --fetch-wheels  a machine with a package index: download the wheels into .whl/
#
# What it does on the GPU machine, in order:
#   1. installs the wheels carried in .whl/ (if any) with pip --no-index --no-deps into /tmp/site and puts that
#      first on PYTHONPATH: bitsandbytes (NF4, needed by the packing benchmark), liger-kernel and
#      cut-cross-entropy (peers in the kernel benchmarks); the image already has torch, triton, transformers,
#      peft, accelerate, pytest and pytest-benchmark;
#   2. installs this checkout editable without its C++ extension (PVFAST_SKIP_CPP_BUILD=1, --no-index
#      --no-build-isolation: setuptools from the image), so that `pvfast.kernels` maps to kernels/;
#   3. runs `python3 -m bench.gpu_pass`, which runs each part with its own timeout (see bench/gpu_pass.py for the
#      list) and writes gpu_pass.json + gpu_pass.log into $OUT (or bench/results/).
# Exit status: that of bench.gpu_pass (1 if a part failed or timed out; every part still runs).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(bitsandbytes==0.50.2 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
fi

if [[ "${1:-}" == "--dry-run" ]]; then
  ls .whl/*.whl 2>/dev/null | sed 's/^/gpu_pass.sh: would install /' || echo "gpu_pass.sh: no .whl/ folder (peers and NF4 would be skipped)"
  exec python3 -m bench.gpu_pass --dry-run "${@:2}"
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  timeout 20 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" \
    || echo "gpu_pass.sh: wheel install failed; the parts that need them will skip" >&2
else
  echo "gpu_pass.sh: no .whl/ folder: bitsandbytes and the peers are absent (their cases skip)" >&2
fi
PVFAST_SKIP_CPP_BUILD=1 timeout 30 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || { echo "gpu_pass.sh: editable install of pvfast failed" >&2; exit 3; }
unset TRITON_INTERPRET
exec python3 -m bench.gpu_pass "$@"
