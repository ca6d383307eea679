#!/usr/bin/env bash
# The GPU check, for any machine with CuPy and a GPU (CI has none):
#   1. the backend-parametrized tests on CuPy: the spiral sweep on CPU and GPU agrees to 1e-9 in
#      float64, every Myrtle5 layer, gradient and HVP matches NumPy, and the implicit-GEMM
#      convolution kernels (TF32 and 3xTF32) match float64 references;
#   2. CuPy against NumPy for Myrtle5 on the same weights: float64, then float32 (im2col +
#      cuBLAS), 3xTF32 and TF32 (the implicit-GEMM kernels);
#   3. the spiral trainer's network-steps per second on the GPU;
#   4. with FULL=1: the implicit-GEMM tile candidates timed on whole training steps (tune_conv.py,
#      a report), then the Myrtle5 training step against PyTorch + cuDNN (fp32 and TF32).
# Logs and JSON results go to $OUT (default results/gpu). Usage:
#   bash benchmarks/gpu_check.sh            (about a minute; FULL=1 adds about 3 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
status=0
run() { echo "\$ $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import sys, numpy, cupy; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__)"
run timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_igemm.py tests/test_myrtle5.py tests/test_phase.py
run timeout 120 $PY benchmarks/gpu_check_myrtle5.py
run timeout 120 env DYNLOSS_CONV=3xtf32 $PY benchmarks/gpu_check_myrtle5.py
run timeout 120 env CUPY_TF32=1 $PY benchmarks/gpu_check_myrtle5.py
run timeout 180 $PY benchmarks/bench_spiral.py --device gpu
if [ "${FULL:-0}" = 1 ]; then
    run timeout 240 $PY benchmarks/tune_conv.py --out "$OUT/tiles.json"
    # the default tiles (models.IGEMM_TILES, ...), so that the numbers are those of the code as it
    # ships; to time the tuned ones: bench_myrtle5.py --tiles "$OUT/tiles.json"
    run timeout 400 $PY benchmarks/bench_myrtle5.py --profile --json "$OUT/bench_myrtle5.json"
fi
exit $status
