"""Check the CuPy path of Myrtle5 against the NumPy path on the same weights and batch.

Command
-------
python benchmarks/gpu_check_myrtle5.py

In float64, on three small problems, the logits, the loss, every gradient and the exact
Hessian-vector product computed with CuPy must agree with NumPy to a relative error (norm-wise)
below ``F64_RTOL``; one Nesterov step too. A float32 run on the GPU is compared with the float64
host result at ``F32_RTOL``, or at ``TF32_RTOL`` when CUPY_TF32=1 is set (CuPy then multiplies
float32 matrices in TF32, and dynloss its TF32 implicit-GEMM convolutions):
``CUPY_TF32=1 python benchmarks/gpu_check_myrtle5.py``; ``DYNLOSS_CONV=3xtf32`` checks the 3xTF32
convolutions at the float32 tolerance. The float32 exact HVP is checked too (at ``F32_HVP_RTOL``).
The GPU side runs fast/myrtle5.py's fused network through fast/layers.py's table (our CUDA
kernels); the host side is the plain reference of models.py. Prints one PASS/FAIL line per
check and exits 1 on any failure; without CuPy or a GPU it prints 'skipped: no CuPy/GPU' and
exits 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynloss import class_weights, to_device, to_host  # noqa: E402
from fast import myrtle5 as fused  # noqa: E402
from fast.layers import GPU_LAYERS as L  # noqa: E402
from models import (  # noqa: E402
    init_myrtle5,
    myrtle5_flatten,
    myrtle5_hvp,
    myrtle5_loss_and_grads,
    nesterov_step,
)

F64_RTOL = 1e-10  # same float64 arithmetic, other summation order (cuBLAS vs OpenBLAS)
F32_RTOL = 1e-5  # float32 gradients against float64 (rounding 6e-8, hundreds of terms deep)
TF32_RTOL = 5e-2  # TF32 rounds GEMM inputs to 10-bit mantissas (5e-4), compounded over 5 layers;
# at c = 64 the gradients differ from float64 by 1-2e-2 (docs/gpu.md: cuBLAS TF32 and ours alike)
F32_HVP_RTOL = 1e-4  # the HVP has more cancellation than the gradient
# small, both image sizes, and c = 64, where float32 takes the implicit-GEMM kernels
PROBLEMS = (
    {"N": 8, "side": 16, "c": 8},
    {"N": 4, "side": 32, "c": 16},
    {"N": 4, "side": 16, "c": 64},
)


def get_cupy():
    """cupy when it imports and sees a GPU, else None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # not installed, or no driver / device
        pass
    return None


def rel(a, b):
    """Norm-wise relative error ||a - b|| / ||b|| of two host or device arrays."""
    a = a.get() if hasattr(a, "get") else np.asarray(a)
    b = b.get() if hasattr(b, "get") else np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def problem(N, side, c, seed):
    rng = np.random.default_rng(seed)
    params = init_myrtle5(rng, c=c)
    params = {
        k: v + (0.1 * rng.normal(size=v.shape) if k[0] == "b" else 0) for k, v in params.items()
    }
    x = rng.normal(size=(N, side, side, 3))
    y = rng.integers(0, 10, size=N)
    gamma = class_weights(13, 20.0, 10, 10)  # a tilted dynamical loss (A = 20)
    v = rng.normal(size=myrtle5_flatten(params).size)
    return params, x, y, gamma, v


def run_checks(cupy):
    results = []
    for i, spec in enumerate(PROBLEMS):
        params, x, y, gamma, v = problem(**spec, seed=i)
        tag = f"N={spec['N']} {spec['side']}x{spec['side']} c={spec['c']}"
        F, grads, logits = myrtle5_loss_and_grads(params, x, y, gamma)
        Hv = myrtle5_hvp(params, x, y, gamma, v)
        p_gpu = to_device(params, cupy)
        x_gpu, y_gpu, g_gpu = cupy.asarray(x), cupy.asarray(y), cupy.asarray(gamma)
        F2, grads2, logits2 = fused.myrtle5_loss_and_grads(p_gpu, x_gpu, y_gpu, g_gpu, layers=L)
        Hv2 = fused.myrtle5_hvp(p_gpu, x_gpu, y_gpu, g_gpu, cupy.asarray(v), layers=L)
        results.append((f"float64 logits {tag}", rel(logits2, logits), F64_RTOL))
        results.append((f"float64 loss {tag}", rel(F2, F), F64_RTOL))
        results.append(
            (f"float64 grads {tag}", rel(myrtle5_flatten(grads2), myrtle5_flatten(grads)), F64_RTOL)
        )
        results.append((f"float64 HVP {tag}", rel(Hv2, Hv), F64_RTOL))

        velocity = {k: np.zeros_like(p) for k, p in params.items()}
        v_gpu = to_device(velocity, cupy)
        nesterov_step(params, grads, velocity, lr=0.02)
        L.nesterov_step(p_gpu, grads2, v_gpu, lr=0.02)
        results.append(
            (
                f"float64 Nesterov step {tag}",
                rel(myrtle5_flatten(to_host(p_gpu)), myrtle5_flatten(params)),
                F64_RTOL,
            )
        )

        p32 = {k: cupy.asarray(p, dtype=cupy.float32) for k, p in params.items()}
        F3, grads3, _ = fused.myrtle5_loss_and_grads(
            p32, cupy.asarray(x, dtype=cupy.float32), y_gpu, g_gpu, layers=L
        )
        _, grads_ref, _ = myrtle5_loss_and_grads(params, x, y, gamma)  # at the stepped weights
        Hv_ref = myrtle5_hvp(params, x, y, gamma, v)
        f32 = F3.dtype == cupy.float32 and all(g.dtype == cupy.float32 for g in grads3.values())
        results.append((f"float32 loss and grads stay float32 {tag}", 0.0 if f32 else np.inf, 1.0))
        tf32 = os.environ.get("CUPY_TF32", "0") == "1"
        err32 = rel(myrtle5_flatten(grads3), myrtle5_flatten(grads_ref))
        label = f"{'TF32' if tf32 else 'float32'} grads vs float64 {tag}"
        results.append((label, err32, TF32_RTOL if tf32 else F32_RTOL))
        Hv3 = fused.myrtle5_hvp(p32, cupy.asarray(x, dtype=cupy.float32), y_gpu, g_gpu, v, layers=L)
        label = f"{'TF32' if tf32 else 'float32'} HVP vs float64 {tag}"
        results.append((label, rel(Hv3, Hv_ref), TF32_RTOL if tf32 else F32_HVP_RTOL))
    return results


def main():
    cupy = get_cupy()
    if cupy is None:
        print("skipped: no CuPy/GPU")
        return 0
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    env = {k: os.environ.get(k, "unset") for k in ("CUPY_TF32", "DYNLOSS_CONV")}
    print(f"GPU {name}, CuPy {cupy.__version__}, " + ", ".join(f"{k}={v}" for k, v in env.items()))
    failed = 0
    for label, err, tol in run_checks(cupy):
        ok = err < tol
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {label}: rel err {err:.2e} (< {tol:.0e})")
    print(f"{'FAIL' if failed else 'PASS'}: {failed} of the checks failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
