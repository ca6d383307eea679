"""Network-steps per second of the spiral trainer: batched (blocks of networks, both cores) against
a one-network-at-a-time loop, float64, N = 300, widths 100 and 1000, in one run.

    python benchmarks/bench_spiral.py              # the numbers quoted in the README
    python benchmarks/bench_spiral.py --tiny       # a few seconds, for CI
    python benchmarks/bench_spiral.py --device gpu # the same on CuPy

Targets on the 2-core CPU: 12,000 network-steps/s at width 100 and 2,000 at width 1000 (a
jit-compiled JAX step does about 5,900 and 1,100 on the same kind of machine).
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import spiral as rs  # noqa: E402
from models import backend, init_mlp  # noqa: E402

TARGETS = {100: 12000, 1000: 2000}
JAX_ANCHOR = {100: 5900, 1000: 1100}


def rate(width, M, steps, xp, batched, workers):
    """Network-steps per second training M networks of this width for ``steps`` steps."""
    data = (*rs.make_spiral_train(), *rs.make_spiral_val())
    params = init_mlp(range(M), 2, width, 3)
    spec = rs.TrainSpec(np.full(M, 10.0), np.full(M, 200.0), np.full(M, steps), 1.0, steps, steps)
    t0 = time.perf_counter()
    if batched:
        rs.train_many(params, data, spec, xp=xp, workers=workers, progress=False)
    else:
        for m in range(M):  # one network at a time, same trainer, block of 1, one thread
            one = {k: v[m : m + 1] for k, v in params.items()}
            sub = rs.TrainSpec(spec.A[:1], spec.T[:1], spec.stop_step[:1], 1.0, steps, steps)
            rs.train_block(one, data, sub, xp=xp)
    if xp is not np:
        xp.cuda.Device().synchronize()
    return M * steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a few seconds (CI)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    xp = backend(args.device)
    print(
        f"machine: {platform.machine()} {platform.processor()}, cores {os.cpu_count()}, "
        f"python {platform.python_version()}, numpy {np.__version__}, device {args.device}"
    )
    if xp is not np:
        print(
            f"gpu: {xp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, cupy {xp.__version__}"
        )
    print(
        f"{'width':>6} {'networks':>8} {'steps':>6} {'batched':>10} {'one-by-one':>10} "
        f"{'ratio':>6} {'target':>7} {'JAX jit':>8}"
    )
    for width in (100, 1000):
        if args.tiny:
            M, steps = 4, 20
        elif xp is np:
            M, steps = (64, 2000) if width == 100 else (16, 1000)
        else:
            M, steps = (2048, 2000) if width == 100 else (512, 2000)
        rate(width, 2, 3, xp, True, args.workers)  # warm-up
        fast = rate(width, M, steps, xp, True, args.workers)
        m1 = max(1, M // 8) if xp is np else 2  # one at a time on a GPU is launch-bound
        slow = rate(width, m1, steps, xp, False, 1)
        print(
            f"{width:>6} {M:>8} {steps:>6} {fast:>10.0f} {slow:>10.0f} {fast / slow:>6.1f} "
            f"{TARGETS[width]:>7} {JAX_ANCHOR[width]:>8}"
        )


if __name__ == "__main__":
    main()
