"""The spiral's sweeps as resumable units (sweep.py): the Fig. 3 phase diagrams and their seeds.

A phase sweep is a (T, A) grid x seeds for one width. Its units are one cell and a block of
``seed_block`` seeds; seed s initialises network s in every cell, so cells differ only by (T, A)
and each cell can be compared with the static loss (A = 1) seed by seed (sweep.paired_summary).
A unit stores each network's final metrics, its seed and its final parameters (48 KB at width
1000), so that a finished sweep can be evaluated again on another validation set without
training (:func:`reevaluate`). With A = 1 the weights Gamma are 1 at every step whatever T is,
so the A = 1 cells of all periods are the same runs: each seed block is trained once and stored
for every T.
"""

from __future__ import annotations

import os
import time

import numpy as np

import plots
import sweep
from dynloss import accuracy, cross_entropy
from models import MLP_PARAM_NAMES, init_mlp, mlp_forward
from spiral import K_SPIRAL, TrainSpec, make_spiral_train, make_spiral_val, train_many
from sweep import atomic_savez

D_SPIRAL = 2  # the spiral's input dimension
METRIC_FIELDS = ("train_acc", "val_acc", "train_loss", "val_loss")  # = sweep.PHASE_FIELDS


def spiral_data(val="uniform"):
    """(X_train, y_train, X_val, y_val) of the spiral with the validation set ``val``."""
    return (*make_spiral_train(), *make_spiral_val(val))


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
    """name -> the fields (and shapes) a stored phase unit must have (sweep.check_unit)."""
    units = phase_units(len(cfg["T"]), len(cfg["A"]), cfg["seeds"], cfg["seed_block"])
    seeds_of = {name: us for name, _, _, us in units}
    H = cfg["width"]

    def expect(name):
        us = seeds_of[name]
        n = len(us)
        fields = {f: (n,) for f in (*METRIC_FIELDS, "diverged_step")}
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


def train_units(units, cfg, xp, progress):
    """Train the networks of several units together; yield (name, arrays) per finished unit.

    Units that are the same runs (:func:`same_runs`) are trained once."""
    firsts = {}
    for u in units:
        firsts.setdefault(same_runs(cfg, u), u)
    todo = list(firsts.values())
    seeds = [s for u in todo for s in u[3]]
    A = np.array([cfg["A"][u[2]] for u in todo for _ in u[3]], dtype=float)
    T = np.array([cfg["T"][u[1]] for u in todo for _ in u[3]], dtype=float)
    steps = cfg["steps"]
    stop = np.maximum(steps - T, 0) if cfg["stop_last_period"] else np.full(len(A), steps + 1)
    spec = TrainSpec(A, T, stop, cfg["lr"], steps, steps, cfg["loss"])
    params = init_mlp(seeds, D=D_SPIRAL, H=cfg["width"], K=K_SPIRAL, init=cfg["init"])
    desc = f"{len(todo)} cells x seeds"
    data = spiral_data(cfg.get("val", "uniform"))
    res = train_many(params, data, spec, xp=xp, progress=progress, desc=desc)
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


def run_phase(out, cfg, units, xp, batch, progress=True):
    """Train the given units of a prepared sweep folder in batches of about ``batch`` networks,
    storing each as it finishes. Units that are the same runs as another (:func:`same_runs`)
    are trained once and copied: from a stored unit, or from the one trained here."""
    every = phase_units(len(cfg["T"]), len(cfg["A"]), cfg["seeds"], cfg["seed_block"])
    expect = unit_expect(cfg)
    stored = {}  # same-runs key -> the name of a stored unit with those runs
    for v in every:
        key = same_runs(cfg, v)
        if key not in stored and sweep.read_unit(out, v[0], expect(v[0]))[0] is not None:
            stored[key] = v[0]
    trained, copies = [], []  # copies: (unit name, name of the unit it repeats)
    for u in units:
        key = same_runs(cfg, u)
        if key in stored:
            copies.append((u[0], stored[key]))
        else:
            stored[key] = u[0]
            trained.append(u)
    per_batch = max(1, batch // cfg["seed_block"])
    t0 = time.time()
    for b in range(0, len(trained), per_batch):
        for name, arrays in train_units(trained[b : b + per_batch], cfg, xp, progress):
            sweep.save_unit(out, name, arrays)
        copies = _copy_ready(out, copies, expect)
    _copy_ready(out, copies, expect)
    return time.time() - t0


def _copy_ready(out, copies, expect):
    """Store the copies whose source unit is on disk; return the others."""
    waiting = []
    for name, source in copies:
        arrays = sweep.read_unit(out, source, expect(source))[0]
        if arrays is None:
            waiting.append((name, source))
        else:
            sweep.save_unit(out, name, arrays)  # the same runs, stored under another T
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
    Returns the summary (sweep.summarize)."""
    cfg = sweep.load_config(out)
    A_list, T_list, seeds = cfg["A"], cfg["T"], cfg["seeds"]
    units = phase_units(len(T_list), len(A_list), seeds, cfg["seed_block"])
    done = sweep.load_units(out, [u[0] for u in units], unit_expect(cfg))
    own = cfg.get("val", "uniform")
    if val is not None and val != own:
        done = reevaluate(done, val)
    placements = [(name, ti, ai, seeds.index(us[0])) for name, ti, ai, us in units]
    metrics = {n: {k: d[k] for k in (*METRIC_FIELDS, "diverged_step")} for n, d in done.items()}
    arrays = sweep.assemble(metrics, placements, len(T_list), len(A_list), len(seeds))
    summary = sweep.summarize(arrays, sweep.PHASE_FIELDS, A_list, T_list, seeds, "diverged_step")
    stem = "phase" if val is None or val == own else f"phase-val-{val}"
    atomic_savez(os.path.join(out, f"{stem}.npz"), **arrays, **summary, val=np.array(val or own))
    png = os.path.join(out, f"{stem}.png")
    plots.plot_phase(summary, png, phase_title(cfg, len(seeds), val or own), "period T (steps)")
    sweep.print_table(summary)
    print(f"wrote {out}/{stem}.npz and the figure {png}")
    return summary


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
