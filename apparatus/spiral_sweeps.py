"""The spiral's sweeps as resumable units (sweeps.py): the Fig. 3 phase diagrams and their seeds.

A phase sweep is a (T, A) grid x seeds for one width. Its units are one cell and a block of
``seed_block`` seeds; seed s initialises network s in every cell, so cells differ only by (T, A)
and each cell can be compared with the static loss (A = 1) seed by seed (sweeps.paired_summary).
A unit stores each network's final metrics, its seed and its final parameters (48 KB at width
1000), so that a finished sweep can be evaluated again on another validation set without
training (:func:`reevaluate`). With A = 1 the weights Gamma are 1 at every step whatever T is,
so the A = 1 cells of all periods are the same runs: each seed block is trained once and stored
for every T.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time

import numpy as np
from tqdm import tqdm

import stability
from apparatus import plots, signals, statistics, sweeps, tracker
from apparatus.storage import atomic_savez, exact_name, identity, unit_identity
from apparatus.workers import WORKERS, run_jobs
from dynloss import accuracy, cross_entropy
from models import MLP_PARAM_NAMES, init_mlp, mlp_forward
from spiral import (
    D_SPIRAL,
    K_SPIRAL,
    LOG_FIELDS,
    TrainSpec,
    make_spiral_val,
    spiral_data,
    stop_steps,
    train_reference,
)


def train(params, data, spec, reference=False, xp=np, progress=True, desc="training",
          pause=False, resume=None):  # fmt: skip
    """Train M networks with spiral.train_reference (``reference``, on the CPU) or the fast
    trainer's train_many, with a progress bar: the same arguments and result. pause, resume:
    train_many's (the fast trainer only: the reference loop stops at a signal)."""
    if not reference:
        from fast.spiral_trainer import train_many  # the fast path only: --reference loads none

        return train_many(params, data, spec, xp=xp, progress=progress, desc=desc, pause=pause,
                          resume=resume)  # fmt: skip
    M = params["W1"].shape[0]
    bar = tqdm(total=M * spec.steps, desc=desc + " (reference)", unit="net-step",
               unit_scale=True, disable=not progress, mininterval=0.5)  # fmt: skip
    res = train_reference(params, data, spec, progress=signals.checking(bar.update))
    bar.close()
    return res


def run_arrays(data, params0, res, net=None):
    """The arrays of a run.npz (docs/formats.md) from a training result (spiral.finish_run):
    every network with its seed axis (net None), or network ``net`` alone, without that axis."""
    X, y, Xv, yv = data
    pick = (lambda a, ax: a) if net is None else (lambda a, ax: np.take(a, net, axis=ax))
    S = res["logged"]  # rows logged (fewer when every network diverged)
    arrays = {
        "X_train": X,
        "y_train": y,
        "X_val": Xv,
        "y_val": yv,
        "step": res["step"][:S],
        "gamma": pick(res["gamma"][:S], 1),
        "diverged_step": pick(res["diverged_step"], 0),
    }
    for k in MLP_PARAM_NAMES:
        arrays[k + "_init"] = pick(params0[k], 0)
        arrays[k] = pick(res["params"][k], 0)
    for f in LOG_FIELDS:
        arrays[f] = pick(res[f][:S], 1)
    return arrays


def phase_units(n_T, n_A, seeds, seed_block):
    """The units in a fixed order: (name, T index, A index, seeds) per cell and seed block.

    A unit's name holds the index of its block's first seed, so growing a sweep's seed list
    keeps the names (and results) of the blocks that were complete."""
    units = []
    for ti in range(n_T):
        for ai in range(n_A):
            for b in range(0, len(seeds), seed_block):
                units.append((f"T{ti:03d}_A{ai:03d}_s{b:05d}", ti, ai, seeds[b : b + seed_block]))
    return units


def unit_expect(cfg):
    """name -> the fields (and shapes) a stored phase unit must have (sweeps.check_unit)."""
    units = phase_units(len(cfg["T"]), len(cfg["A"]), cfg["seeds"], cfg["seed_block"])
    seeds_of = {name: us for name, _, _, us in units}
    H = cfg["width"]

    def expect(name):
        us = seeds_of[name]
        n = len(us)
        fields = {f: (n,) for f in (*sweeps.PHASE_FIELDS, "diverged_step")}
        fields["seeds"] = lambda a, us=us: a.shape == (n,) and a.tolist() == list(us)
        shapes = {"W1": (n, D_SPIRAL, H), "b1": (n, H), "W2": (n, H, K_SPIRAL), "b2": (n, K_SPIRAL)}
        fields.update(shapes)
        return fields

    return expect


def same_runs(cfg, unit):
    """A key shared by the units that are the same computation: A = 1 does not depend on T."""
    _, ti, ai, us = unit
    cell = "static" if cfg["A"][ai] == 1 else (ti, ai)
    return (cell, tuple(us))


def train_units(units, cfg, xp, progress, reference=False, pause=False, resume=None):
    """Train the networks of several units together; yield (name, arrays) per finished unit.

    Units that are the same runs (:func:`same_runs`) are trained once. pause, resume: the fast
    trainer's (:func:`train`): at a signal, fast_trainer.Paused carries the batch in flight."""
    firsts = {}
    for u in units:
        firsts.setdefault(same_runs(cfg, u), u)
    todo = list(firsts.values())
    seeds = [s for u in todo for s in u[3]]
    A = np.array([cfg["A"][u[2]] for u in todo for _ in u[3]], dtype=float)
    T = np.array([cfg["T"][u[1]] for u in todo for _ in u[3]], dtype=float)
    steps = cfg["steps"]
    stop = stop_steps(steps, T, not cfg["stop_last_period"])  # (n,)
    spec = TrainSpec(A, T, stop, cfg["lr"], steps, steps, cfg["loss"])
    params = init_mlp(seeds, D=D_SPIRAL, H=cfg["width"], K=K_SPIRAL, init=cfg["init"])
    desc = f"{len(todo)} cells x seeds"
    data = spiral_data(cfg.get("val", "uniform"))
    res = train(params, data, spec, reference, xp, progress, desc, pause, resume)
    final = {
        "train_acc": res["train_acc"][-1],
        "val_acc": res["val_acc"][-1],
        "train_loss": res["loss_static"][-1],
        "val_loss": res["val_loss"][-1],
        "diverged_step": res["diverged_step"],
        "seeds": np.array(seeds, dtype=np.int64),
        **res["params"],
    }
    start, arrays_of = 0, {}
    for u in todo:
        n = len(u[3])
        arrays_of[same_runs(cfg, u)] = {k: v[start : start + n] for k, v in final.items()}
        start += n
    for u in units:
        yield u[0], arrays_of[same_runs(cfg, u)]


def run_phase(out, cfg, units, xp, batch, progress=True, reference=False):
    """Train the given units of a prepared sweep folder in batches of about ``batch`` networks,
    storing each as it finishes. Units that are the same runs as another (:func:`same_runs`)
    are trained once and copied: from a stored unit, or from the one trained here.
    reference : train with spiral.train_reference instead of the fast trainer.

    A signal (a SLURM time limit, scancel, Ctrl-C) pauses the fast trainer's batch in flight at
    its next chunk and stores it in OUT/work/ (:func:`save_batch`); the same command continues
    it (bit for bit) instead of starting the batch again."""
    every = phase_units(len(cfg["T"]), len(cfg["A"]), cfg["seeds"], cfg["seed_block"])
    expect = unit_expect(cfg)
    stored = {}  # same-runs key -> the name of a stored unit with those runs
    for v in every:
        key = same_runs(cfg, v)
        if key not in stored and sweeps.read_unit(out, v[0], expect(v[0]))[0] is not None:
            stored[key] = v[0]
    by_name = {u[0]: u for u in units}
    paused = [names for names in stored_batches(out) if set(names) <= set(by_name)]
    batches = [[by_name[n] for n in names] for names in paused]  # continued as they were
    for names in paused:
        for n in names:
            stored.setdefault(same_runs(cfg, by_name[n]), n)
    resumed = {n for names in paused for n in names}
    trained, copies = [], []  # copies: (unit name, name of the unit it repeats)
    for u in units:
        key = same_runs(cfg, u)
        if u[0] in resumed:
            continue
        if key in stored:
            copies.append((u[0], stored[key]))
        else:
            stored[key] = u[0]
            trained.append(u)
    per_batch = max(1, batch // cfg["seed_block"])
    batches += [trained[b : b + per_batch] for b in range(0, len(trained), per_batch)]
    t0 = time.time()
    for batch_units in batches:
        names = [u[0] for u in batch_units]
        resume = None if reference else load_batch(out, names)
        try:
            for name, arrays in train_units(batch_units, cfg, xp, progress, reference,
                                            pause=not reference, resume=resume):  # fmt: skip
                sweeps.save_unit(out, name, arrays)
        except signals.Interrupted as stop:
            if not hasattr(stop, "parts"):  # not fast_trainer.Paused: nothing to checkpoint
                raise
            where = save_batch(out, names, stop.parts)
            steps = [int(p["paused"]) for p in stop.parts if p is not None and "paused" in p]
            at = f" at step {min(steps):,} of {cfg['steps']:,}" if steps else ""
            units = f"{len(names)} unit{'s' if len(names) != 1 else ''}"
            raise signals.Interrupted(stop.signum, f"the batch in flight ({units}{at}) is "
                                      f"checkpointed in {where}") from None  # fmt: skip
        drop_batch(out, names)
        copies = _copy_ready(out, copies, expect)
    _copy_ready(out, copies, expect)
    return time.time() - t0


def batch_path(out, names):
    """Where the checkpoint of the batch of units ``names`` is kept: OUT/work/batch-<identity>."""
    return os.path.join(out, "work", f"batch-{identity(names)}.npz")


def save_batch(out, names, parts):
    """Store a paused batch: per block of the fast trainer its paused state, or its finished
    result, or nothing (not started), with the identity of the sweep and of the batch; written
    whole, then renamed. Returns its path."""
    arrays = {sweeps.IDENTITY_FIELD: np.array(unit_identity(sweeps.load_config(out), names[0])),
              "names": np.array(names), "blocks": np.int64(len(parts))}  # fmt: skip
    for b, part in enumerate(parts):
        if part is None:
            continue
        kind = "paused" if "paused" in part else "done"
        flat = {k: v for k, v in part.items() if k != "params"}
        flat.update({f"params_{k}": v for k, v in part.get("params", {}).items()})
        arrays.update({f"b{b}_{kind}_{k}": np.asarray(v) for k, v in flat.items()})
    path = batch_path(out, names)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_savez(path, **arrays)
    return path


def load_batch(out, names):
    """The parts of a stored batch checkpoint of exactly these units in this sweep, or None
    (none stored, another sweep's, or unreadable: the batch starts again)."""
    path = batch_path(out, names)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:  # truncated or damaged: train the batch again
        return None
    ident = unit_identity(sweeps.load_config(out), names[0])
    if str(arrays.get(sweeps.IDENTITY_FIELD)) != ident or arrays["names"].tolist() != names:
        return None
    parts = []
    for b in range(int(arrays["blocks"])):
        part = {}
        for key, v in arrays.items():
            prefix = f"b{b}_"
            if key.startswith(prefix):
                kind, field = key[len(prefix) :].split("_", 1)
                part[field] = v
        if not part:
            parts.append(None)
        elif "paused" in part:
            parts.append(part)
        else:
            params = {k[len("params_") :]: v for k, v in part.items() if k.startswith("params_")}
            rest = {k: v for k, v in part.items() if not k.startswith("params_")}
            parts.append({**rest, "params": params, "logged": int(rest["logged"])})
    return parts


def stored_batches(out):
    """The unit names of every readable batch checkpoint of this sweep in OUT/work/ (a batch
    paused there is continued with exactly its units, whatever other shards stored since)."""
    found = []
    ident = None
    for path in sorted(glob.glob(os.path.join(out, "work", "batch-*.npz"))):
        try:
            with np.load(path, allow_pickle=False) as z:
                names, stamp = z["names"].tolist(), str(z[sweeps.IDENTITY_FIELD])
        except Exception:  # damaged: its batch is trained again
            continue
        ident = ident or (lambda n: unit_identity(sweeps.load_config(out), n))
        if names and stamp == ident(names[0]) and path == batch_path(out, names):
            found.append(names)
    return found


def drop_batch(out, names):
    """Remove the batch's checkpoint once its units are stored."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(batch_path(out, names))


def _copy_ready(out, copies, expect):
    """Store the copies whose source unit is on disk; return the others."""
    waiting = []
    for name, source in copies:
        arrays = sweeps.read_unit(out, source, expect(source))[0]
        if arrays is None:
            waiting.append((name, source))
        else:
            sweeps.save_unit(out, name, arrays)  # the same runs, stored under another T
    return waiting


def phase_title(cfg, n_seeds, val):
    return (
        f"spiral, width {cfg['width']}, {n_seeds} seeds, {cfg['steps']} steps, lr {cfg['lr']:g}, "
        f"{cfg['init']} init, validation set '{val}'"
    )


def merge_phase(out, val=None):
    """Combine the units of a finished sweep into its phase file and figure: phase.npz and
    phase.png for the sweep's own validation set, or, with ``val``, the units' parameters
    evaluated on that validation set (:func:`reevaluate`) into phase-val-<val>.npz / .png.
    Returns the summary (statistics.summarize)."""
    cfg = sweeps.load_config(out, kind="spiral-phase")
    A_list, T_list, seeds = cfg["A"], cfg["T"], cfg["seeds"]
    units = phase_units(len(T_list), len(A_list), seeds, cfg["seed_block"])
    done = sweeps.load_units(out, [u[0] for u in units], unit_expect(cfg))
    done, flagged = flag_nonfinite(done, cfg["steps"])
    if flagged:
        print(f"{len(flagged)} unit(s) hold networks whose parameters are not finite but were not "
              f"marked diverged; counted as diverged at step {cfg['steps']}: "
              f"{', '.join(flagged[:5])}")  # fmt: skip
    own = cfg.get("val", "uniform")
    if val is not None and val != own:
        done = reevaluate(done, val)
    placements = [(name, ti, ai, seeds.index(us[0])) for name, ti, ai, us in units]
    metrics = {
        n: {k: d[k] for k in (*sweeps.PHASE_FIELDS, "diverged_step")} for n, d in done.items()
    }
    arrays = sweeps.assemble(metrics, placements, len(T_list), len(A_list), len(seeds))
    summary = statistics.summarize(
        arrays, sweeps.PHASE_FIELDS, A_list, T_list, seeds, "diverged_step"
    )
    stem = "phase" if val is None or val == own else f"phase-val-{val}"
    atomic_savez(os.path.join(out, f"{stem}.npz"), **arrays, **summary, val=np.array(val or own))
    png = os.path.join(out, f"{stem}.png")
    plots.plot_phase(summary, png, phase_title(cfg, len(seeds), val or own), "period T (steps)")
    statistics.print_table(summary)
    print(f"wrote {out}/{stem}.npz and the figure {png}")
    return summary


def flag_nonfinite(done, steps):
    """Networks whose stored parameters are not finite count as diverged (at ``steps`` where no
    step was recorded) and their metrics as NaN: a NaN network classifies every point as one
    class, and its chance accuracy is not a result. Returns (units, names of the flagged)."""
    out, flagged = {}, []
    for name, arrays in done.items():
        bad = ~np.all(
            [
                np.isfinite(arrays[k]).reshape(len(arrays[k]), -1).all(axis=1)
                for k in MLP_PARAM_NAMES
            ],
            axis=0,
        )  # fmt: skip  (n,)
        unmarked = bad & (arrays["diverged_step"] < 0)
        if not bad.any():
            out[name] = arrays
            continue
        new = dict(arrays, diverged_step=np.where(unmarked, steps, arrays["diverged_step"]))
        for f in sweeps.PHASE_FIELDS:
            new[f] = np.where(bad, np.nan, arrays[f])
        out[name] = new
        if unmarked.any():
            flagged.append(name)
    return out, flagged


def reevaluate(done, val):
    """Each unit's networks (their stored final parameters) on the validation set ``val``:
    the units with val_acc and val_loss replaced (static cross-entropy, models.mlp_forward)."""
    Xv, yv = make_spiral_val(val)
    out = {}
    for name, arrays in done.items():
        params = {k: arrays[k] for k in MLP_PARAM_NAMES}  # (n, ...)
        with np.errstate(all="ignore"):
            logits, _ = mlp_forward(Xv, params)  # (n, Nv, K)
            acc, loss = accuracy(logits, yv), cross_entropy(logits, yv)
        diverged = arrays["diverged_step"] >= 0
        new = dict(arrays)
        new["val_acc"] = np.where(diverged, np.nan, acc)
        new["val_loss"] = np.where(diverged, np.nan, loss)
        out[name] = new
    return out


# ---------------------------------------------------------------------------------------------
# Figs. 4 and 5 over seeds: runs followed by the spectra tracker, one unit per network
# ---------------------------------------------------------------------------------------------


def tracked_units(
    units,
    cfg,
    spec_of,
    data,
    xp,
    progress,
    store,
    k=1,
    every=25,
    ntk_every=0,
    workers=WORKERS,
    reference=False,
):
    """Train the networks of pending units side by side (tracker.track), units with the same
    TrainSpec together, spread over worker processes; ``store(unit, res, net, spectra)`` is
    called for each network as its group finishes. units : [(name, width, key, seed)] with key
    a hashable naming the spec (spec_of(width, key, M) -> TrainSpec). Units sharing a spec are
    one job (split in WORKERS pieces when there is only one such group)."""
    by_spec = {}
    for u in units:
        by_spec.setdefault((u[1], u[2]), []).append(u)
    pieces = max(1, -(-workers // max(len(by_spec), 1)))  # a single group still fills the workers
    groups = []
    for (width, key), group in by_spec.items():
        size = -(-len(group) // pieces)
        groups += [((width, key), group[i : i + size]) for i in range(0, len(group), size)]
    jobs, members = [], []
    for (width, key), group in groups:
        seeds = [u[3] for u in group]
        params0 = init_mlp(seeds, D=D_SPIRAL, H=width, K=K_SPIRAL, init=cfg["init"])
        spec = spec_of(width, key, len(seeds))
        jobs.append((params0, data, spec, k, every, ntk_every, reference))
        members.append(group)
    total = sum(len(g) * j[2].steps for g, j in zip(members, jobs, strict=True))
    bar = tqdm(total=total, unit="net-step", unit_scale=True, disable=not progress, mininterval=1)

    def done(i, result):
        res, spectra = result
        for m, u in enumerate(members[i]):
            store(u, res, m, spectra[m], jobs[i][0], jobs[i][2])

    run_jobs(tracker.track, jobs, xp, workers, bar=bar, done=done)
    bar.close()


def threshold_units(widths, lrs, seeds):
    """Fig. 5 units: (name, width, (kind, lr), seed) for the dynamical runs, then the static."""
    units = [
        (f"w{w}_lr{exact_name(lr)}_s{s:05d}", w, ("dynamic", lr), s)
        for w in widths
        for lr in lrs
        for s in seeds
    ]
    return units + [(f"static_w{w}_s{s:05d}", w, ("static", 1.0), s) for w in widths for s in seeds]


def threshold_spec(cfg, key, M):
    """The Fig. 4 protocol rescaled for learning rate eta (T = T0/eta, steps0/eta steps, the last
    period static), or the static run (A = 1, eta = 1): the TrainSpec of M networks."""
    kind, lr = key
    if kind == "dynamic":
        A, T, steps = cfg["A"], cfg["T0"] / lr, int(round(cfg["steps0"] / lr))
    else:
        A, T, steps = 1.0, cfg["T0"], cfg["static_steps"]
    every = cfg["hess_every"]
    full = lambda v: np.full(M, float(v))
    return TrainSpec(full(A), full(T), full(stop_steps(steps, T)), lr, steps, every, cfg["loss"])


def threshold_expect(name):
    """The fields a stored threshold unit must have."""
    series = lambda a: a.ndim == 1
    fields = {"hess_step": series, "hess_lmax": series, "train_acc": (), "val_acc": ()}
    if not name.startswith("static"):
        fields.update(threshold=(), settled_period=(), thr_start=series, thr_end=series)
    return fields


def run_threshold(out, cfg, units, xp, progress=True, reference=False):
    """Train the pending threshold units of a prepared sweep folder and store each."""
    data = spiral_data(cfg.get("val", "uniform"))

    def store(u, res, m, sa, params0, spec):
        arrays = {
            "hess_step": sa["hess_step"],
            "hess_lmax": sa["hess_lmax"],
            "train_acc": res["train_acc"][-1, m],
            "val_acc": res["val_acc"][-1, m],
        }
        if u[2][0] == "dynamic":
            run = {**sa, "step": res["step"], "loss": res["loss"][:, m]}
            T, stop = float(spec.T[m]), int(spec.stop_step[m])
            info = stability.analyze(run, spec.lr, len(data[0]), T, stop)
            keep = ("threshold", "settled_period", "thr_start", "thr_end")
            arrays.update({key: info[key] for key in keep})
        sweeps.save_unit(out, u[0], arrays)

    spec_of = lambda width, key, M: threshold_spec(cfg, key, M)
    tracked_units(
        units, cfg, spec_of, data, xp, progress, store, every=cfg["hess_every"], reference=reference
    )


def merge_threshold(out):
    """Per (width, eta): the threshold of each seed, their mean with a t interval, the periods
    after which lambda_max stays below it; per width the exponent with a bootstrap interval over
    seeds, and the widths' difference; threshold.npz and the Fig. 5 figure."""
    cfg = sweeps.load_config(out, kind="spiral-threshold")
    widths, lrs, seeds = cfg["widths"], np.array(cfg["lrs"]), cfg["seeds"]
    units = threshold_units(widths, cfg["lrs"], seeds)
    done = sweeps.load_units(out, [u[0] for u in units], threshold_expect)
    unit = lambda w, lr, s: done[f"w{w}_lr{exact_name(lr)}_s{s:05d}"]
    thr = np.array(
        [[[stability.unit_threshold(unit(w, lr, s)) for s in seeds] for lr in lrs] for w in widths]
    )  # (W, L, S)
    settled = np.array(
        [[[float(unit(w, lr, s)["settled_period"]) for s in seeds] for lr in lrs] for w in widths]
    )
    mean, lo, hi, n = statistics.mean_interval(thr)  # (W, L)
    rng = np.random.default_rng(statistics.BOOTSTRAP_SEED)
    q = (
        50 * (1 - statistics.CONFIDENCE),
        50 * (1 + statistics.CONFIDENCE),
    )  # percentiles of the interval
    arrays = {
        "widths": np.array(widths),
        "lrs": lrs,
        "seeds": np.array(seeds),
        "threshold": thr,
        "threshold_mean": mean,
        "threshold_lo": lo,
        "threshold_hi": hi,
        "settled_period": settled,
    }
    draws = {}
    for key, rows in [(str(w), thr[i].T) for i, w in enumerate(widths)] + [
        ("all", thr.transpose(0, 2, 1).reshape(-1, len(lrs)))
    ]:
        (slope, stderr, icpt), draws[key] = statistics.bootstrap_exponent(lrs, rows, rng)
        b_lo, b_hi = (
            np.nanpercentile(draws[key], q) if np.isfinite(draws[key]).any() else (np.nan,) * 2
        )
        arrays.update({f"slope_{key}": slope, f"slope_{key}_stderr": stderr})
        arrays.update({f"slope_{key}_lo": b_lo, f"slope_{key}_hi": b_hi, f"icpt_{key}": icpt})
    if len(widths) == 2:
        diff = draws[str(widths[1])] - draws[str(widths[0])]
        arrays["slope_diff"] = arrays[f"slope_{widths[1]}"] - arrays[f"slope_{widths[0]}"]
        arrays["slope_diff_lo"], arrays["slope_diff_hi"] = np.nanpercentile(diff, q)
        d, d_lo, d_hi = statistics.welch_difference(thr[0], thr[1])  # (L,): wide - narrow per eta
        arrays.update(threshold_diff=d, threshold_diff_lo=d_lo, threshold_diff_hi=d_hi)
    for w in widths:
        static = [done[f"static_w{w}_s{s:05d}"] for s in seeds]
        longest = max(static, key=lambda u: len(u["hess_step"]))  # a diverged run stops early
        n = len(longest["hess_step"])
        padded = [
            np.pad(u["hess_lmax"], (0, n - len(u["hess_lmax"])), constant_values=np.nan)
            for u in static
        ]
        arrays[f"static_w{w}_hess_step"] = longest["hess_step"]
        arrays[f"static_w{w}_hess_lmax"] = np.array(padded)  # (S, n), NaN after an early stop
        arrays[f"static_w{w}_train_acc"] = np.array([float(u["train_acc"]) for u in static])
    atomic_savez(os.path.join(out, "threshold.npz"), **arrays)
    png = os.path.join(out, "threshold.png")
    plots.plot_threshold(arrays, cfg, png)
    print_threshold(arrays, cfg)
    print(f"wrote {out}/threshold.npz and the figure {png}")
    return arrays


def print_threshold(arrays, cfg):
    """The Fig. 5 summary: thresholds with intervals, settled periods, exponents."""
    widths, lrs, S = arrays["widths"], arrays["lrs"], len(arrays["seeds"])
    c = f"{statistics.CONFIDENCE:.0%}"
    print(f"Hessian threshold: mean over {S} seeds [{c} t interval]; lambda_max below it after")
    for i, w in enumerate(widths):
        for j, lr in enumerate(lrs):
            m, lo, hi = (arrays[f"threshold_{k}"][i, j] for k in ("mean", "lo", "hi"))
            sp = arrays["settled_period"][i, j]
            periods = " ".join("-" if not np.isfinite(p) else f"{p:g}" for p in sp)
            ci = statistics.interval(lo, hi)
            print(f"  width {w}, lr {lr:g}: {m:.3f} {ci}; periods: {periods}")
    for key in [str(w) for w in widths] + ["all"]:
        name = "all widths" if key == "all" else f"width {key}"
        if not np.isfinite(arrays[f"slope_{key}"]):
            print(f"exponent of threshold ~ lr^x, {name}: not fitted (fewer than 3 thresholds)")
            continue
        print(
            f"exponent of threshold ~ lr^x, {name}: {arrays[f'slope_{key}']:.3f} "
            f"{statistics.interval(arrays[f'slope_{key}_lo'], arrays[f'slope_{key}_hi'])} "
            f"({c} bootstrap over seeds; paper about -0.9, eq. (7): -1)"
        )
    if "slope_diff" in arrays:
        print(
            f"difference of the exponents (width {widths[1]} - width {widths[0]}): "
            f"{arrays['slope_diff']:+.3f} "
            f"{statistics.interval(arrays['slope_diff_lo'], arrays['slope_diff_hi'], '+.3f')}"
        )
        for j, lr in enumerate(lrs):
            print(
                f"  threshold, width {widths[1]} - width {widths[0]}, lr {lr:g}: "
                f"{arrays['threshold_diff'][j]:+.3f} "
                + statistics.interval(
                    arrays["threshold_diff_lo"][j], arrays["threshold_diff_hi"][j], "+.3f"
                )
                + f" ({c} Welch t interval)"
            )


def dynamics_units(seeds, width):
    """Fig. 4 over seeds: one unit per seed, (name, width, "dynamics", seed)."""
    return [(f"seed_{s:05d}", width, "dynamics", s) for s in seeds]


def dynamics_expect(name):
    """The fields a stored dynamics unit must have (a run.npz of one seed, docs/formats.md)."""
    series = lambda a: a.ndim == 1
    fields = {f: series for f in ("step", "loss", "dloss", "train_acc", "val_acc")}
    fields.update({f: series for f in tracker.SPECTRA_FIELDS if f != "hess_topk"})
    fields.update(threshold=(), settled_period=(), bif_start=series, thr_start=series)
    return fields


def run_dynamics(out, cfg, units, spec_of, xp, progress=True, k=1, reference=False):
    """Train the pending dynamics units (seeds) of a prepared folder side by side, each followed
    by the tracker; store each seed's run arrays with its spectra and stability analysis."""
    data = spiral_data(cfg.get("val", "uniform"))

    def store(u, res, m, sa, params0, spec):
        arrays = run_arrays(data, params0, res, net=m)
        arrays.update(sa)
        arrays["T"] = np.float64(spec.T[m])
        info = stability.analyze(
            arrays, spec.lr, len(data[0]), float(spec.T[m]), int(spec.stop_step[m])
        )
        arrays.update(info)
        sweeps.save_unit(out, u[0], arrays)

    tracked_units(
        units,
        cfg,
        spec_of,
        data,
        xp,
        progress,
        store,
        k=k,
        every=cfg["hess_every"],
        ntk_every=cfg["ntk_every"],
        reference=reference,
    )


def dynamics_summary(done, seeds):
    """Per seed: the threshold, the periods after which lambda_max stays below it, the number of
    instabilities and of bifurcation episodes; the threshold's mean and t interval."""
    runs = [done[f"seed_{s:05d}"] for s in seeds]
    thr = np.array([float(r["threshold"]) for r in runs])
    mean, lo, hi, n = statistics.mean_interval(thr)
    return {
        "seeds": np.array(seeds),
        "threshold": thr,
        "settled_period": np.array([float(r["settled_period"]) for r in runs]),
        "instabilities": np.array([len(r["thr_start"]) for r in runs]),
        "bifurcation_episodes": np.array([len(r["bif_start"]) for r in runs]),
        "final_train_acc": np.array([float(r["train_acc"][-1]) for r in runs]),
        "final_val_acc": np.array([float(r["val_acc"][-1]) for r in runs]),
        "threshold_mean": np.float64(mean),
        "threshold_lo": np.float64(lo),
        "threshold_hi": np.float64(hi),
    }
