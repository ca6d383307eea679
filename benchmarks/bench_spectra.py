"""Cost of following the Hessian and NTK lambda_max during spiral training.

Command (about a minute on 2 shared cores):

    python benchmarks/bench_spectra.py
    python benchmarks/bench_spectra.py --widths 100 --steps 1000 --repeats 1     (quick look)

For each width: full-batch gradient descent on the 300-point spiral (A = 70, T = 500, learning
rate 1), once plain (no logging at all) and once logging every ``--every`` steps with an
apparatus.tracker.SpectraTracker as the on_log callback (Hessian top-k eigenvalues, full and
traced NTK lambda_max at every logged step; a tight eigsh at the first call, warm-started Lanczos to
residual 1e-3 after that). The table gives the best of ``--repeats`` runs, the ratio (training +
tracking) / training, the Hessian-vector / NTK-vector products per call (the cold first call
included), and the largest relative error of the tracked eigenvalues against exact ones at a few
of the tracked steps (dense eigvalsh of the exact Hessian and NTKs; at width 1000 the Hessian's
exact lambda_max comes from a tight cold-started eigsh on the dense exact Hessian). Then the
cost of one exact dense Hessian, spectra.hessian, per width. BLAS runs on ``--threads`` threads
(1, as in the fast trainer's workers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import scipy
from scipy.sparse.linalg import eigsh
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import spectra  # noqa: E402
from apparatus.tracker import SpectraTracker  # noqa: E402
from dynloss import class_weights  # noqa: E402
from fast.spiral_trainer import train_block  # noqa: E402
from machine import describe  # noqa: E402
from models import init_mlp  # noqa: E402
from spiral import TrainSpec, make_spiral_train, make_spiral_val  # noqa: E402

A_BENCH, T_BENCH = 70.0, 500.0  # Fig. 4's amplitude; a shorter period so the run sees cycles
EXACT_SAMPLES = {100: 20, 1000: 3}  # tracked steps checked against exact eigenvalues


def timed_runs(H, steps, every, k, repeats):
    """Best plain and tracked training times; the last tracker; params at sampled steps."""
    X, y = make_spiral_train()
    Xv, yv = make_spiral_val()
    data = (X, y, Xv, yv)
    params0 = init_mlp([0], D=2, H=H, K=3)
    spec = TrainSpec(
        A=np.array([A_BENCH]),
        T=np.array([T_BENCH]),
        stop_step=np.array([steps + 1]),
        lr=1.0,
        steps=steps,
        log_every=every,
    )
    n_logged = steps // every + 1
    sample = set(np.linspace(0, n_logged - 1, EXACT_SAMPLES.get(H, 2)).astype(int).tolist())
    plain, tracked, snaps = np.inf, np.inf, {}
    quiet = TrainSpec(spec.A, spec.T, spec.stop_step, spec.lr, steps, steps)  # logs only ends
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_block(params0, data, quiet)  # plain training: no logging, no spectra
        plain = min(plain, time.perf_counter() - t0)
        tracker = SpectraTracker(X, y, spec, k=k)
        snaps, calls = {}, []

        def on_log(step, params, tracker=tracker, snaps=snaps, calls=calls):
            tracker(step, params)
            if len(calls) in sample:
                snaps[step] = {name: a.copy() for name, a in params.items()}  # live views
            calls.append(step)

        t0 = time.perf_counter()
        train_block(params0, data, spec, on_log=on_log)
        tracked = min(tracked, time.perf_counter() - t0)
    return plain, tracked, tracker, snaps, spec


def exact_errors(H, tracker, snaps, spec):
    """Largest relative error of the tracked lambda_max values against exact ones."""
    X, y = make_spiral_train()
    err = np.zeros(3)
    row = {s: i for i, s in enumerate(tracker.hess_step)}
    for step, params in snaps.items():
        gamma = class_weights(step, spec.A[0], spec.T[0], 3, spec.stop_step[0])
        hess = spectra.hessian(params, X, y, gamma)
        if H <= 100:
            h_exact = np.linalg.eigvalsh(hess)[-1]
        else:
            h_exact = eigsh(hess, k=1, which="LA", tol=1e-13)[0][0]
        exact = np.array(
            [
                h_exact,
                np.linalg.eigvalsh(spectra.ntk(params, X))[-1],
                np.linalg.eigvalsh(spectra.ntk_traced(params, X))[-1],
            ]
        )
        i = row[step]
        got = np.array([tracker.hess_lmax[i], tracker.ntk_lmax[i], tracker.ntk_traced_lmax[i]])
        err = np.maximum(err, np.abs(got / exact - 1))
    return err


def hessian_cost(H, repeats):
    """Best time of one exact dense Hessian (spectra.hessian) at width H, N = 300."""
    X, y = make_spiral_train()
    params = init_mlp([0], D=2, H=H, K=3)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        spectra.hessian(params, X, y, class_weights(250, A_BENCH, T_BENCH, 3))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="100,1000", help="hidden widths H")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per run")
    parser.add_argument("--every", type=int, default=10, help="track every this many steps")
    parser.add_argument("--k", type=int, default=1, help="Hessian eigenvalues tracked")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    with threadpool_limits(limits=args.threads):
        print(describe() + f", scipy {scipy.__version__}, {args.threads} BLAS thread(s)")
        print(
            f"spiral N = 300, A = {A_BENCH:g}, T = {T_BENCH:g}, lr = 1, {args.steps} steps, "
            f"tracking every {args.every} steps (Hessian top-{args.k}, NTK full and traced), "
            f"best of {args.repeats}\n"
        )
        print(
            "| width | P | train s | train+track s | ratio | track ms/call | "
            "products/call Hessian / NTK / traced | max rel. err. Hessian / NTK / traced NTK |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for H in widths:
            plain, tracked, tracker, snaps, spec = timed_runs(
                H, args.steps, args.every, args.k, args.repeats
            )
            err = exact_errors(H, tracker, snaps, spec)
            calls = len(tracker.hess_step)
            per_call = 1e3 * tracker.seconds / calls
            products = " / ".join(f"{n / calls:.1f}" for n in tracker.products.values())
            P = 2 * H + H + 3 * H + 3
            print(
                f"| {H} | {P} | {plain:.2f} | {tracked:.2f} | {tracked / plain:.2f} | "
                f"{per_call:.2f} | {products} | {err[0]:.1e} / {err[1]:.1e} / {err[2]:.1e} |"
            )
        print("\n| width | P | one exact Hessian (spectra.hessian) s |")
        print("|---|---|---|")
        for H in widths:
            P = 2 * H + H + 3 * H + 3
            print(f"| {H} | {P} | {hessian_cost(H, min(args.repeats, 2)):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
