"""Pick the tiles of the implicit-GEMM convolution kernels by timing whole Myrtle5 training steps.

Command
-------
python benchmarks/tune_conv.py [--precision tf32|3xtf32] [--out tiles.json]

Every candidate is first checked: the gradients of a small batch (8 images 32x32, c = 64) must
agree with float64 NumPy within 5e-2 (TF32) or 1e-4 (3xTF32), max-abs relative (a kernel bug
gives errors of order 1); a candidate that fails is reported and skipped. Then each one is timed
on the training step of benchmarks/bench_myrtle5.py (batch 512, c = 64, forward + backward +
Nesterov; CUDA events, median). The search is by coordinates: the forward/input-gradient tiles
first (default weight-gradient tiles), then the weight-gradient tiles and the blocks per SM with
the best forward tiles. The im2col + cuBLAS step (DYNLOSS_CONV=im2col) is timed in the same run
for comparison. Prints a table and writes the best setting to --out (JSON), which
``bench_myrtle5.py --tiles FILE`` reads. Needs CuPy and a GPU.
Tile tuples: (warps along M, warps along N, warp tile M, warp tile N, reduction slice BK).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

IGEMM_CANDIDATES = [
    (4, 2, 32, 32, 32),
    (2, 2, 64, 32, 32),
    (4, 2, 64, 32, 32),
    (2, 2, 32, 32, 64),
    (4, 1, 32, 64, 32),
    (2, 4, 64, 16, 32),
    (8, 1, 16, 64, 32),
]
WGRAD_CANDIDATES = [
    (2, 4, 32, 16, 32),
    (2, 2, 32, 32, 32),
    (2, 2, 32, 32, 64),
    (4, 2, 16, 32, 32),
    (1, 4, 64, 16, 32),
]
BLOCKS_PER_SM = [4, 8, 16]
RTOL = {"tf32": 5e-2, "3xtf32": 1e-4}  # max-abs relative errors; gross bugs give O(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--precision", choices=sorted(RTOL), default="tf32")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--out", type=Path, help="write the best setting here (JSON)")
    args = ap.parse_args(argv)
    os.environ["CUPY_TF32"] = "1" if args.precision == "tf32" else "0"  # before CuPy starts
    os.environ["DYNLOSS_CONV"] = "auto" if args.precision == "tf32" else "3xtf32"

    import cupy
    from bench_myrtle5 import gpu_time, make_batch, our_step_fn

    from dynloss import to_device
    from fast import gpu
    from fast import myrtle5 as fused
    from fast.layers import GPU_LAYERS
    from models import init_myrtle5, myrtle5_loss_and_grads

    # the float64 reference gradients of a small batch
    params64 = init_myrtle5(0, c=64, dtype=np.float64)
    x64, y, gamma = make_batch(np, 8, 32, np.float64)
    _, ref, _ = myrtle5_loss_and_grads(params64, x64, y, gamma)
    params32 = to_device({k: v.astype(np.float32) for k, v in params64.items()}, cupy)
    x32 = cupy.asarray(x64.astype(np.float32))

    def check():
        _, g, _ = fused.myrtle5_loss_and_grads(params32, x32, y, gamma, layers=GPU_LAYERS)
        return max(float(np.abs(g[k].get() - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    elapsed = cupy.cuda.get_elapsed_time

    def step_ms():
        step = our_step_fn(cupy, args.batch, 64, 32, np.float32)
        return gpu_time(step, start, end, elapsed, 3, 7, 3)

    def trial(igemm, wgrad, bps):
        gpu.IGEMM_TILES, gpu.WGRAD_TILES, gpu.WGRAD_BLOCKS_PER_SM = igemm, wgrad, bps
        try:
            err = check()
        except Exception as exc:  # a tile that does not compile or launch is reported, not fatal
            return {"igemm": igemm, "wgrad": wgrad, "bps": bps, "error": repr(exc)[:300]}
        row = {"igemm": igemm, "wgrad": wgrad, "bps": bps, "grad_rel_err": err}
        if not err < RTOL[args.precision]:
            row["error"] = f"gradients off by {err:.2e}"
            return row
        row["ms"] = step_ms()
        return row

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"GPU {name}, CuPy {cupy.__version__}, precision {args.precision}, batch {args.batch}")
    rows = []
    best_w, best_b = gpu.WGRAD_TILES, gpu.WGRAD_BLOCKS_PER_SM
    for igemm in IGEMM_CANDIDATES:
        rows.append(trial(igemm, best_w, best_b))
        print(_fmt(rows[-1]), flush=True)
    ok = [r for r in rows if "ms" in r]
    if not ok:
        print("no candidate passed the gradient check")
        return 1
    best_i = min(ok, key=lambda r: r["ms"])["igemm"]
    for wgrad in WGRAD_CANDIDATES:
        for bps in BLOCKS_PER_SM:
            if (wgrad, bps) == (best_w, best_b):
                continue
            rows.append(trial(best_i, wgrad, bps))
            print(_fmt(rows[-1]), flush=True)
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    os.environ["DYNLOSS_CONV"] = "im2col"
    im2col_err, im2col_ms = check(), step_ms()
    print(f"im2col + cuBLAS (DYNLOSS_CONV=im2col): {im2col_ms:.3f} ms/step "
          f"(grad rel err {im2col_err:.1e})")  # fmt: skip
    print(f"best: {_fmt(best)}")
    if args.out:
        result = {
            "precision": args.precision,
            "gpu": name,
            "IGEMM_TILES": best["igemm"],
            "WGRAD_TILES": best["wgrad"],
            "WGRAD_BLOCKS_PER_SM": best["bps"],
            "ms": best["ms"],
            "im2col_ms": im2col_ms,
            "im2col_grad_rel_err": im2col_err,
            "trials": rows,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _fmt(row):
    head = f"igemm {row['igemm']} wgrad {row['wgrad']} blocks/SM {row['bps']:>2}"
    if "error" in row:
        return f"{head}: FAILED {row['error']}"
    return f"{head}: {row['ms']:.3f} ms/step (grad rel err {row['grad_rel_err']:.1e})"


if __name__ == "__main__":
    sys.exit(main())
