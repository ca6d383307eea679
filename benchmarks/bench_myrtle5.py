"""Time one Myrtle5 training step (forward, backward, Nesterov update) against PyTorch + cuDNN.

Commands
--------
python benchmarks/bench_myrtle5.py             GPU rows (when CuPy sees a GPU) and the CPU rows
python benchmarks/bench_myrtle5.py --profile   also time the pieces of our GPU step
python benchmarks/bench_myrtle5.py --tiny      a few seconds on the CPU (what CI runs)

GPU rows: batch 512, c = 64, 32x32x3 images, the dynamical loss (A = 20), our NumPy/CuPy code in
float32 and in TF32 (CUPY_TF32=1; CuPy reads the variable itself when it first multiplies float32
matrices, so each precision runs in its own child process of this script), and, when PyTorch is
importable, the same network in PyTorch with cuDNN (cudnn.benchmark on, NCHW and channels-last,
fp32 with TF32 off, then TF32 on) in the same run. The ratio is ours over the faster PyTorch
layout. Timing: warm-up steps, then CUDA events around ``inner`` steps, median of ``reps``.
CPU rows: NumPy at a small batch (32, c = 64) in float32 and float64, and the step of the
handwritten-digits experiment (8x8x1 images, c = 16, batch 30, float32), median of a few steps.

Measured results, with the machine and versions: docs/gpu.md (one H200) and docs/speed.md (the
2-core CPU). ``FULL=1 bash benchmarks/gpu_check.sh`` runs this script with ``--profile``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynloss import class_weights, to_device  # noqa: E402
from fast import gpu  # noqa: E402
from fast import myrtle5 as fused  # noqa: E402
from fast.layers import GPU_LAYERS as L  # noqa: E402  (fast/myrtle5.py's layers on NumPy arrays)
from machine import cpu_name  # noqa: E402
from models import (  # noqa: E402
    avgpool2_backward,
    init_myrtle5,
    myrtle5_forward,
    relu_backward,
    relu_forward,
)

K = 10
DIGITS_STEP = (30, 16, 8)  # batch, channels c, image side of the digits experiment (docs/digits.md)
LR = 0.02  # the paper's peak learning rate
A_DYN, T_DYN = 20.0, 100  # a tilted loss, so gamma is not all ones
RESULT = "RESULT "  # prefix of the JSON line a child process prints
# our GPU rows: (label, precision compared with PyTorch, profile column, child's environment)
OUR_GPU_ROWS = (
    ("ours, im2col+cuBLAS", "fp32", "fp32-im2col", {"CUPY_TF32": "0", "DYNLOSS_CONV": "auto"}),
    ("ours, implicit 3xTF32", "fp32", "3xtf32", {"CUPY_TF32": "0", "DYNLOSS_CONV": "3xtf32"}),
    ("ours, im2col+cuBLAS", "tf32", "tf32-im2col", {"CUPY_TF32": "1", "DYNLOSS_CONV": "im2col"}),
    ("ours, implicit TF32", "tf32", "tf32-implicit", {"CUPY_TF32": "1", "DYNLOSS_CONV": "auto"}),
)


def make_batch(xp, batch, side, dtype, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    x = xp.asarray(rng.normal(size=(batch, side, side, channels)).astype(dtype))
    y = xp.asarray(rng.integers(0, K, size=batch))
    gamma = xp.asarray(class_weights(50, A_DYN, T_DYN, K).astype(dtype))
    return x, y, gamma


def our_step_fn(xp, batch, c, side, dtype, channels=3):
    """A closure running one training step of our Myrtle5 on the backend xp."""
    params = to_device(init_myrtle5(0, c=c, in_channels=channels, dtype=dtype), xp)
    velocity = {k: xp.zeros_like(p) for k, p in params.items()}
    x, y, gamma = make_batch(xp, batch, side, dtype, channels=channels)

    def step():
        _, grads, _ = fused.myrtle5_loss_and_grads(params, x, y, gamma, layers=L)
        L.nesterov_step(params, grads, velocity, LR)

    return step


def cpu_time(step, reps):
    step()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def gpu_time(step, start, end, elapsed_ms, warmup, reps, inner):
    """Median ms per step: events around ``inner`` steps, ``reps`` times, after warm-up."""
    for _ in range(warmup):
        step()
    end.record()
    end.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            step()
        end.record()
        end.synchronize()
        times.append(elapsed_ms(start, end) / inner)
    return float(np.median(times))


# ---------------------------------------------------------------------------------------------
# Child processes (one per precision for CuPy; one for PyTorch)
# ---------------------------------------------------------------------------------------------


def apply_tiles(path):
    """Set the implicit-GEMM tiles from a benchmarks/tune_conv.py result (JSON)."""
    best = json.loads(Path(path).read_text())
    gpu.IGEMM_TILES = tuple(best["IGEMM_TILES"])
    gpu.WGRAD_TILES = tuple(best["WGRAD_TILES"])
    gpu.WGRAD_BLOCKS_PER_SM = int(best["WGRAD_BLOCKS_PER_SM"])


def child_cupy(args):
    import cupy

    if args.tiles:
        apply_tiles(args.tiles)

    step = our_step_fn(cupy, args.batch, args.width, 32, np.float32)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    ms = gpu_time(step, start, end, cupy.cuda.get_elapsed_time, 3, args.reps, args.inner)
    out = {"ms": ms, "peak_GB": cupy.get_default_memory_pool().total_bytes() / 1e9}
    if args.profile:
        out["profile"] = profile_cupy(cupy, args)
    print(RESULT + json.dumps(out), flush=True)


def profile_cupy(cupy, args):
    """ms of the pieces of one step at the largest (32x32) layer, and of whole passes."""
    N, c = args.batch, args.width
    rng = np.random.default_rng(1)
    h = cupy.asarray(np.abs(rng.normal(size=(N, 32, 32, c))).astype(np.float32))
    W = cupy.asarray(rng.normal(size=(3, 3, c, c)).astype(np.float32))
    b = cupy.zeros(c, dtype=np.float32)
    cols = gpu.im2col3x3(h)
    dout = cupy.asarray(rng.normal(size=(N, 32, 32, c)).astype(np.float32))
    params = to_device(init_myrtle5(0, c=c, dtype=np.float32), cupy)
    x, y, gamma = make_batch(cupy, N, 32, np.float32)
    dout2, cols1 = dout.reshape(-1, c), gpu.im2col3x3(x)
    dp = cupy.ascontiguousarray(dout[:, :16, :16])
    params2 = {k: p.copy() for k, p in params.items()}
    velocity = {k: cupy.zeros_like(p) for k, p in params.items()}
    hvp = fused.myrtle5_hvp_operator(params, x, y, gamma, layers=L)
    v = cupy.asarray(rng.normal(size=sum(p.size for p in params.values())).astype(np.float32))
    _, cache = L.conv3x3_forward(h, W, b)
    pieces = {
        "im2col 32x32xc": lambda: gpu.im2col3x3(h),
        "GEMM fwd cols@W 32x32": lambda: cols @ W.reshape(-1, c),
        "conv fwd 32x32 (this method)": lambda: L.conv3x3_forward(h, W, b),
        "conv+bias+relu fwd 32x32": lambda: L.conv3x3_relu_forward(h, W, b),
        "conv bwd 32x32: dW, db, dx*1[h>0]": lambda: L.relu_conv3x3_backward(dout, h, cache),
        "GEMM dW cols.T@dout 32x32": lambda: cols.T @ dout.reshape(-1, c),
        "conv dx (flipped conv) 32x32": lambda: L.conv3x3_input_grad(dout, W),
        "relu fwd 32x32": lambda: relu_forward(dout),
        "relu bwd 32x32": lambda: relu_backward(dout, h),
        "avgpool2 fwd 32x32": lambda: L.avgpool2_forward(h),
        "avgpool2 bwd 32x32": lambda: avgpool2_backward(dout[:, :16, :16], h.shape),
        "relu_avgpool2_backward 32x32": lambda: L.relu_avgpool2_backward(dp, h.shape, h),
        "db ones@dout 32x32": lambda: gpu.column_sums(dout2),
        "conv1 fwd (C_in = 3)": lambda: L.conv3x3_forward(x, params["W1"], params["b1"]),
        "conv1 dW (K = 27)": lambda: cols1.T @ dout2,
        "Myrtle5 forward": lambda: myrtle5_forward(x, params, L),
        "Myrtle5 loss+grads": lambda: fused.myrtle5_loss_and_grads(params, x, y, gamma, layers=L),
        "Myrtle5 HVP (cached forward/backward)": lambda: hvp(v),
        "nesterov_step (10 arrays)": lambda: L.nesterov_step(params, params2, velocity, LR),
    }
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    out = {
        name: gpu_time(fn, start, end, cupy.cuda.get_elapsed_time, 2, 5, 3)
        for name, fn in pieces.items()
    }
    step = our_step_fn(cupy, N, c, 32, np.float32)
    host = []
    for _ in range(6):
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        step()
        host.append(1e3 * (time.perf_counter() - t0))  # no sync: the time to enqueue
    out["host time to enqueue one step"] = float(np.median(host[1:]))
    return out


def set_torch_tf32(torch, on):
    """TF32 for cuBLAS and cuDNN on or off (PyTorch >= 2.9 API where it exists)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
            torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        else:
            torch.backends.cudnn.allow_tf32 = on
            torch.backends.cuda.matmul.allow_tf32 = on


def child_torch(args):
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    c = args.width
    x, y, gamma = make_batch(np, args.batch, 32, np.float32)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev)  # NCHW
    y, gamma = torch.from_numpy(y).to(dev), torch.from_numpy(gamma).to(dev)
    out = {}
    for layout in ("nchw", "channels_last"):
        for tf32 in (False, True):
            set_torch_tf32(torch, tf32)
            torch.manual_seed(0)
            conv = lambda cin: nn.Conv2d(cin, c, 3, padding=1)  # noqa: E731
            model = nn.Sequential(
                conv(3), nn.ReLU(), conv(c), nn.ReLU(), nn.AvgPool2d(2),
                conv(c), nn.ReLU(), nn.AvgPool2d(2), conv(c), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, K),
            ).to(dev)  # fmt: skip
            xb = x
            if layout == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                xb = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)

            def step(model=model, opt=opt, xb=xb):
                opt.zero_grad(set_to_none=True)
                loss = (F.cross_entropy(model(xb), y, reduction="none") * gamma[y]).mean()
                loss.backward()
                opt.step()

            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            ms = gpu_time(
                step, start, end, lambda s, e: s.elapsed_time(e), 5, args.reps, args.inner
            )
            out[f"{layout} {'tf32' if tf32 else 'fp32'}"] = ms
    print(RESULT + json.dumps(out), flush=True)


def run_child(kind, args, env_extra):
    cmd = [sys.executable, __file__, "--child", kind, "--batch", str(args.batch)]
    cmd += ["--width", str(args.width), "--reps", str(args.reps), "--inner", str(args.inner)]
    cmd += ["--profile"] if args.profile else []
    cmd += ["--tiles", str(args.tiles)] if args.tiles else []
    env = {**os.environ, **env_extra}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    print(f"[{kind} {env_extra}] failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return None


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def versions():
    import scipy

    v = {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__}
    for name in ("cupy", "torch"):
        try:
            v[name] = __import__(name).__version__
        except Exception:
            pass
    return v


def gpu_info():
    """(GPU name, CUDA runtime version) if CuPy sees a GPU, else None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        return name, cupy.cuda.runtime.runtimeGetVersion()
    except Exception:
        return None


def torch_available():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU only, tiny sizes (seconds)")
    ap.add_argument("--batch", type=int, default=512, help="GPU batch")
    ap.add_argument("--width", type=int, default=64, help="channels c")
    ap.add_argument("--cpu-batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions (median)")
    ap.add_argument("--inner", type=int, default=5, help="GPU steps per timed repetition")
    ap.add_argument("--profile", action="store_true", help="also time the pieces of a GPU step")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--tiles", help="implicit-GEMM tiles from benchmarks/tune_conv.py --out")
    ap.add_argument("--json", type=Path, help="also write the rows and the profile here (JSON)")
    ap.add_argument("--child", choices=("cupy", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "cupy":
        return child_cupy(args)
    if args.child == "torch":
        return child_torch(args)

    rows = []  # (what, precision, batch, c, ms, PyTorch ms or None)
    gpu_name = None if (args.tiny or args.no_gpu) else gpu_info()
    profile = None
    if gpu_name is not None:
        torch_ms = run_child("torch", args, {}) if torch_available() else None
        for what, prec, column, env in OUR_GPU_ROWS:
            res = run_child("cupy", args, env)
            if res is None:
                continue
            base = None
            if torch_ms:
                base = min(torch_ms[f"nchw {prec}"], torch_ms[f"channels_last {prec}"])
            rows.append((what, prec, args.batch, args.width, res["ms"], base))
            if "profile" in res:
                profile = profile or {}
                for name, ms in res["profile"].items():
                    profile.setdefault(name, {})[column] = ms
        for key, ms in (torch_ms or {}).items():
            layout, prec = key.split()
            rows.append((f"PyTorch+cuDNN {layout}", prec, args.batch, args.width, ms, None))

    cpu_batch, c, reps = (8, 16, 2) if args.tiny else (args.cpu_batch, args.width, 3)
    for dtype in (np.float32, np.float64):
        ms = cpu_time(our_step_fn(np, cpu_batch, c, 32, dtype), reps)
        rows.append(("ours, NumPy CPU", np.dtype(dtype).name, cpu_batch, c, ms, None))
    # the handwritten-digits experiment's step: 8x8x1 images, c = 16, batch 30, float32
    batch, c, side = DIGITS_STEP
    ms = cpu_time(our_step_fn(np, batch, c, side, np.float32, channels=1), 3 if args.tiny else 20)
    rows.append(("ours, NumPy CPU, digits 8x8x1", "float32", batch, c, ms, None))

    v = versions()
    print(f"machine: {platform.node()} | CPU: {cpu_name()} ({os.cpu_count()} cores)")
    if gpu_name is not None:
        print(f"GPU: {gpu_name[0]} (CUDA runtime {gpu_name[1]})")
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    print("Myrtle5 training step (forward + backward + Nesterov), 32x32x3 images unless said,")
    print("dynamical cross-entropy")
    print(
        f"{'implementation':<32}{'precision':>10}{'batch':>7}{'c':>5}{'ms/step':>10}{'ours/PyTorch':>14}"
    )
    for what, prec, batch, c, ms, base in rows:
        ratio = f"{ms / base:.2f}" if base else "-"
        print(f"{what:<32}{prec:>10}{batch:>7}{c:>5}{ms:>10.2f}{ratio:>14}")
    if gpu_name is not None and not torch_available():
        print("(PyTorch not importable or without CUDA: no baseline in this run)")
    if profile:
        print(f"\nprofile of our step (ms, median), batch {args.batch}, c {args.width}")
        cols = [column for _, _, column, _ in OUR_GPU_ROWS]
        print(f"  {'piece':<40}" + "".join(f"{k:>14}" for k in cols))
        for name, ms in profile.items():
            cells = "".join(f"{ms[k]:14.3f}" if k in ms else f"{'-':>14}" for k in cols)
            print(f"  {name:<40}{cells}")
    if args.json:
        keys = ("implementation", "precision", "batch", "c", "ms", "pytorch_ms")
        record = {"gpu": gpu_name and gpu_name[0], "cpu": cpu_name(), "versions": v}
        record["tiles"] = args.tiles
        record["rows"] = [dict(zip(keys, row, strict=True)) for row in rows]
        record["profile"] = profile
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
