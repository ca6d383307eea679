"""Spiral training speed: our trainers and the same step in jit-compiled JAX, in one run.

    python benchmarks/bench_spiral.py              # the tables in README.md and docs/speed.md
    python benchmarks/bench_spiral.py --tiny       # a few seconds, for CI
    python benchmarks/bench_spiral.py --device gpu # our trainer on CuPy (JAX: its default device)

Work, for both: full-batch gradient descent on the 300-point spiral, float64, widths 100 and
1000, the dynamical loss of eqs. (1)-(5) (A = 10, T = 200, weights recomputed at every step),
learning rate 1, no logging. "batch" trains M networks: ours with fast/spiral_trainer.train_many
(blocks of networks in two worker processes on the CPU); JAX in whichever of its two ways is
faster in this run, ``jax.vmap`` over networks of a ``jax.lax.fori_loop`` of steps under
``jax.jit``, or the jitted single-network loop called once per network (the JAX column names the
winner; on two cores the second often wins at width 1000). "single" trains one network: ours
with fast/spiral_trainer.train_block on one BLAS thread (as the train, dynamics and threshold
commands do), JAX with the jitted single-network loop. "single, reference" is ours through
spiral.train_reference, the plain loop that ``--reference`` runs: the price of reading the code
that runs. Rates are network-steps per second, the best of
``--repeats`` timed runs after a warm-up (JAX's compilation is not timed). Before timing, both
train the same networks for ``CHECK_STEPS`` steps and must agree to ``CHECK_RTOL``: the JAX
step is the same computation. "single, logging" times our trainer logging every step with the
validation set every 10 (the ``dynamics`` command's training, without its spectra). "phase
command" times the whole ``run_spiral.py phase`` command in a child process (start-up, training
that keeps every network's final parameters, validation, writing the units, the phase file and
its figure) for the batch row's networks over PHASE_STEPS_FACTOR times its steps; the same
command for PHASE_SHORT_STEPS steps gives its fixed cost, and the difference of the two its
training rate alone, which must be the batch row's (both ratios are printed below the table,
with the fixed seconds, which a sweep of hours pays once). Without JAX
the script prints our rates and says that the comparison needs it
(``pip install -r requirements-bench.txt``).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import spiral  # noqa: E402
from apparatus.cli import backend  # noqa: E402
from fast import spiral_trainer  # noqa: E402
from machine import describe  # noqa: E402
from models import init_mlp  # noqa: E402

A_BENCH, T_BENCH, LR = 10.0, 200.0, 1.0  # a dynamical loss that oscillates during the run
SIZES = {  # width: (networks in a batch, steps)
    100: (64, 2000),
    1000: (16, 1000),
}
GPU_SIZES = {100: (2048, 2000), 1000: (512, 2000)}
TINY = {100: (4, 20), 1000: (2, 10)}
VAL_EVERY = 10  # the dynamics command's validation interval (steps), for "single, logging"
CHECK_STEPS = 50  # steps of the agreement check
CHECK_RTOL = 1e-9  # ours and JAX after CHECK_STEPS steps: the same sums in other orders
PHASE_STEPS_FACTOR = 2  # the phase command trains this many times the batch row's steps
PHASE_SHORT_STEPS = 10  # the phase command run this short measures its fixed cost
PHASE_SEED_BLOCK = {100: 8, 1000: 4}  # seeds per unit in the phase row (several units per batch)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def spec_for(M, steps):
    return spiral.TrainSpec(
        np.full(M, A_BENCH), np.full(M, T_BENCH), np.full(M, steps + 1), LR, steps, steps
    )


def ours_batch(params, data, steps, xp):
    t0 = time.perf_counter()
    spec = spec_for(len(params["W1"]), steps)
    out = spiral_trainer.train_many(params, data, spec, xp=xp, progress=False)
    if xp is not np:
        xp.cuda.Device().synchronize()
    return time.perf_counter() - t0, out["params"]


def ours_one(params, data, steps, xp, log_every=None, reference=False):
    spec = spec_for(1, steps)
    spec.log_every = log_every or steps
    spec.val_every = VAL_EVERY
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):
        if reference:
            out = spiral.train_reference(params, data, spec)
        else:
            out = spiral_trainer.train_block(params, data, spec, xp=xp)
    return time.perf_counter() - t0, out["params"]


def jax_trainer(X, y, K, steps, vmapped=True):
    """The same step in JAX, float64: jit over vmap (networks) over fori_loop (steps); with
    ``vmapped`` False, the jitted single-network loop called once per network."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    X, y = jnp.asarray(X), jnp.asarray(y)
    N = X.shape[0]
    onehot = jax.nn.one_hot(y, K, dtype=jnp.float64)

    def gamma_of(t, A, T):  # eqs. (2)-(5), as dynloss.class_weights (no stop during the run)
        tT = t - T * jnp.floor(t / T)
        m = 2.0 * (A - 1.0) / T
        f = jnp.where(tT <= T / 2, 1.0 + m * tT, 2.0 * A - m * tT - 1.0)
        chosen = jnp.floor(t / T).astype(jnp.int32) % K
        g = jnp.where(jnp.arange(K) == chosen, f, 1.0)
        return K * g / g.sum()

    def loss(p, gamma):  # eq. (1), the mean over samples
        h = jax.nn.relu(X @ p["W1"] + p["b1"])
        z = h @ p["W2"] + p["b2"]
        ce = -(jax.nn.log_softmax(z) * onehot).sum(axis=1)
        return (gamma[y] * ce).sum() / N

    grad = jax.grad(loss)

    def train_one(p, A, T):
        def body(t, p):
            g = grad(p, gamma_of(t.astype(jnp.float64), A, T))
            return jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)

        return jax.lax.fori_loop(0, steps, body, p)

    run = jax.jit(jax.vmap(train_one))
    run_one = jax.jit(train_one)
    A, T = jnp.float64(A_BENCH), jnp.float64(T_BENCH)

    def timed(params):
        M = len(params["W1"])
        p = {k: jnp.asarray(v) for k, v in params.items()}
        t0 = time.perf_counter()
        if vmapped:
            out = jax.block_until_ready(run(p, jnp.full(M, A_BENCH), jnp.full(M, T_BENCH)))
        else:  # one network after another
            outs = [jax.block_until_ready(run_one({k: v[m] for k, v in p.items()}, A, T))
                    for m in range(M)]  # fmt: skip
            out = {k: jnp.stack([o[k] for o in outs]) for k in p}
        return time.perf_counter() - t0, {k: np.asarray(v) for k, v in out.items()}

    return timed


def best_rate(fn, work, repeats):
    """Network-steps per second of the fastest of ``repeats`` calls of fn() -> (seconds, out)."""
    return work / min(fn()[0] for _ in range(repeats))


def check_same(ours, theirs, what):
    for k in ours:
        scale = np.abs(ours[k]).max()
        err = np.abs(ours[k] - theirs[k]).max() / scale
        if not err < CHECK_RTOL:
            raise SystemExit(f"{what}: JAX and ours differ in {k} by {err:.2e} (relative)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a few seconds (CI)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="our trainer's device")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (the best counts)")
    args = ap.parse_args()
    xp = backend(args.device)
    repeats = 1 if args.tiny else args.repeats
    data = (*spiral.make_spiral_train(), *spiral.make_spiral_val())
    sizes = TINY if args.tiny else (SIZES if xp is np else GPU_SIZES)
    print(describe())
    if xp is not np:
        name = xp.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        print(f"our device: {name}, cupy {xp.__version__}")
    # ours first, JAX after: our CPU trainer forks worker processes, which must not happen once
    # JAX's threads run in this process
    ours = {w: bench_ours(w, M, steps, data, xp, repeats) for w, (M, steps) in sizes.items()}
    for w, (M, steps) in sizes.items():
        whole, training, fixed = bench_phase(w, M, steps * PHASE_STEPS_FACTOR, args.device, repeats)
        ours[w].update({"phase command": whole, "phase training": training, "phase fixed": fixed})
    try:
        import jax

        print(f"jax {jax.__version__}, default device {jax.devices()[0]}")
        theirs = {
            w: bench_jax(w, M, steps, data, repeats, ours[w]["check"])
            for w, (M, steps) in sizes.items()
        }
    except ImportError:
        theirs = {}
        print("JAX is not installed: our rates only; the comparison needs JAX")
    head = f"{'width':>6} {'run':<18} {'networks':>8} {'steps':>6} {'ours':>9} {'JAX':>9}"
    print(head + f" {'ours/JAX':>8}  JAX's way")
    for width, (M, steps) in sizes.items():
        rows = (("batch", M, steps), ("single", 1, steps), ("single, reference", 1, steps))
        rows += (("single, logging", 1, steps), ("phase command", M, steps * PHASE_STEPS_FACTOR))
        for run, m, n in rows:
            mine = ours[width][run]
            jax_rate = theirs.get(width, {}).get(run)
            j = f"{jax_rate:>9.0f} {mine / jax_rate:>8.2f}" if jax_rate else f"{'-':>9} {'-':>8}"
            way = theirs.get(width, {}).get(run + " way", "") if jax_rate else ""
            print(f"{width:>6} {run:<18} {m:>8} {n:>6} {mine:>9.0f} {j}  {way}")
        speedup = ours[width]["single"] / ours[width]["single, reference"]
        print(
            f"width {width}: the fast trainer is {speedup:.2f} x the reference loop (one network)"
        )
        if "batch vmap" in theirs.get(width, {}):
            t = theirs[width]
            print(
                f"width {width}: JAX batch {t['batch vmap']:.0f} (vmap) and "
                f"{t['batch loop']:.0f} (one network after another) network-steps/s"
            )
    for width in sizes:
        whole, training = (ours[width][k] / ours[width]["batch"] for k in PHASE_ROWS)
        print(
            f"width {width}: the phase command runs at {whole:.2f} x the batch row's rate; its "
            f"training at {training:.2f} x (net of its fixed {ours[width]['phase fixed']:.1f} s)"
        )


PHASE_ROWS = ("phase command", "phase training")


def time_phase(width, M, steps, device):
    """Seconds of one whole ``run_spiral.py phase`` command (one cell, M seeds, ``steps``)."""
    block = min(PHASE_SEED_BLOCK.get(width, 1), M)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "run_spiral.py"), "phase", "--width", str(width)]
        cmd += ["--A", f"{A_BENCH:g}", "--T", f"{T_BENCH:g}", "--seeds", str(M), "--steps"]
        cmd += [str(steps), "--seed-block", str(block), "--batch", str(M), "--lr", f"{LR:g}"]
        cmd += ["--no-stop", "--device", device, "--out", os.path.join(tmp, "sweep"), "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def bench_phase(width, M, steps, device, repeats):
    """Network-steps per second of the whole phase command, and of its training alone: the
    difference to the same command for PHASE_SHORT_STEPS steps cancels its fixed cost (start-up,
    writing the units, the phase file and the figure). Each time is the best of ``repeats``, as
    for the other rows. Returns (whole, training, fixed seconds)."""
    whole = min(time_phase(width, M, steps, device) for _ in range(repeats))
    short = min(time_phase(width, M, PHASE_SHORT_STEPS, device) for _ in range(repeats))
    training = M * (steps - PHASE_SHORT_STEPS) / (whole - short) if whole > short else np.nan
    return M * steps / whole, training, short


def bench_ours(width, M, steps, data, xp, repeats):
    """Our rates for one width, and our parameters after CHECK_STEPS steps of two networks."""
    batch = init_mlp(range(M), 2, width, 3)
    one = {k: v[:1] for k, v in batch.items()}
    two = {k: v[:2] for k, v in batch.items()}
    ours_batch(two, data, 3, xp)  # warm-up
    return {
        "batch": best_rate(lambda: ours_batch(batch, data, steps, xp), M * steps, repeats),
        "single": best_rate(lambda: ours_one(one, data, steps, xp), steps, repeats),
        "single, reference": best_rate(
            lambda: ours_one(one, data, steps, xp, reference=True), steps, repeats
        ),
        "single, logging": best_rate(lambda: ours_one(one, data, steps, xp, 1), steps, repeats),
        "check": (two, ours_batch(two, data, CHECK_STEPS, xp)[1]),
    }


def bench_jax(width, M, steps, data, repeats, check):
    """JAX's rates for one width, after checking that it computes what ours does."""
    two, mine = check
    check_same(mine, jax_trainer(data[0], data[1], 3, CHECK_STEPS)(two)[1], f"width {width}")
    loop = jax_trainer(data[0], data[1], 3, CHECK_STEPS, vmapped=False)
    check_same(mine, loop(two)[1], f"width {width}, one network after another")
    vmapped = jax_trainer(data[0], data[1], 3, steps)
    looped = jax_trainer(data[0], data[1], 3, steps, vmapped=False)
    batch = init_mlp(range(M), 2, width, 3)
    one = {k: v[:1] for k, v in batch.items()}
    vmapped(batch)  # compile for both ways
    looped(one)
    rates = {
        "batch vmap": best_rate(lambda: vmapped(batch), M * steps, repeats),
        "batch loop": best_rate(lambda: looped(batch), M * steps, repeats),
        "single": best_rate(lambda: looped(one), steps, repeats),
    }
    way = "vmap" if rates["batch vmap"] >= rates["batch loop"] else "loop"
    rates["batch"], rates["batch way"] = rates[f"batch {way}"], way
    rates["single, reference"] = rates["single"]
    rates["single way"] = rates["single, reference way"] = "jit"
    return rates


if __name__ == "__main__":
    main()
