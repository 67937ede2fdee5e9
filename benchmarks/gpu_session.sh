#!/usr/bin/env bash
# The Triton backend's GPU checks in one run, for a device session that has minutes, not hours:
# tests/test_triton.py with real kernels, then `sparsa bench gpu` (correctness at long lengths,
# then times against torch SDPA and adasplash). Run it from the repository root on a CUDA machine
# whose python3 has torch and triton; wheels in .whl/ (adasplash) are installed first. Logs and
# gpu.json go to $OUT (results/gpu when unset); extra arguments go to `sparsa bench gpu`, e.g.
#   benchmarks/gpu_session.sh --lengths 1024 32768 --batches 1 --dims 64 128 --tile-sizes 32x32x4 32x32x8 64x64x8
set -o pipefail
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/sparsa-site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/sparsa-site"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_triton.py 2>&1 | tee "$out/tests.log"
python3 -m sparsa.cli bench gpu --out "$out" "$@" 2>&1 | tee "$out/bench.log"
