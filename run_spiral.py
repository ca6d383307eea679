"""The spiral experiments of the paper (Figs. 2-5) from the command line.

Commands
--------
python run_spiral.py                      the demo: width 100, A = 20, T = 1000, 30k steps (~10 s)
python run_spiral.py train --reference    the same run through the reference loop (its own folder)
python run_spiral.py train --A 1 --steps 35000 --out runs/static            the static loss
python run_spiral.py train --A 10 --T 200 --steps 35000 --seed 0-7           one cell of Fig. 3
python run_spiral.py phase --width 100 --seeds 50 --out runs/phase-w100      Fig. 3 (a, b)
python run_spiral.py phase --width 1000 --seeds 50 --out runs/phase-w1000    Fig. 3 (c, d)
python run_spiral.py merge --out runs/phase-w100                  assemble a sharded sweep
python run_spiral.py reeval --out runs/phase-w1000 --val inner    the sweep on another val set
python run_spiral.py dynamics --out runs/fig4                                Fig. 4
python run_spiral.py threshold --out runs/fig5                               Fig. 5
python run_spiral.py density --at 0,1000,10000,30000 --out runs/density    Hessian spectra
python run_spiral.py check                every hand-written derivative against differences
python run_spiral.py onset --T0 1250,5000 --out runs/onset   where the instabilities begin

Every command writes its arrays (npz), its settings (json) and its figure (png) into --out;
docs/formats.md lists the keys. Every command that trains takes --reference: it then trains with
spiral.train_reference, the plain loop built from dynloss.py and models.py, instead of the fast
trainer (fast/spiral_trainer.py); both write the same files, by default into folders of their
own (--out with "-reference"). apparatus/spiral_sweeps.train makes that choice. The modules do
the work: spiral.py (data, reference loop), fast/ (the fast trainer), apparatus/ (sweeps, the
spectra tracker, statistics, figures).
"""

from __future__ import annotations

if __name__ == "__main__":  # a signal during the imports below: one line, not a traceback
    from apparatus.signals import guard_startup

    guard_startup("run_spiral.py")

import glob
import os
import shlex
import sys
import time

import numpy as np

import stability
from apparatus import (
    memory,
    onset,
    onset_analysis,
    plots,
    rule,
    signals,
    spiral_sweeps,
    statistics,
    sweeps,
    tracker,
)
from apparatus.checks import add_spiral_check_command
from apparatus.cli import (
    AMPLITUDE,
    COUNT,
    COUNT0,
    MAX_AMPLITUDE,
    MAX_PERIOD,
    MAX_PERTURBATION,
    MAX_RATE,
    MAX_SEED,
    MAX_STEPS,
    MIN_RATE,
    PERIOD,
    RATE,
    SEED,
    SEEDS,
    InputError,
    Parser,
    add_merge_command,
    backend,
    check_number,
    check_out_dir,
    checked_backend,
    command,
    number,
    parse_choices,
    parse_items,
    parse_list,
    parse_seeds,
    run_main,
)
from apparatus.spiral_sweeps import run_arrays
from apparatus.storage import (
    atomic_savez,
    begin_run,
    check_claim,
    identity,
    versions,
    write_json,
)
from apparatus.workers import WORKERS
from beyond.density import SLQ_PROBES, SLQ_STEPS
from dynloss import LOSSES
from models import INITS, init_mlp
from spiral import (
    D_SPIRAL,
    K_SPIRAL,
    VAL_SETS,
    TrainSpec,
    spiral_data,
    spiral_params,
    stop_steps,
)

SCRIPT = "run_spiral.py"
REFERENCE_SUFFIX = "-reference"  # the default folders of --reference runs: the two trainers' apart
TRAIN_DEFAULTS = {
    "width": 100,
    "A": 20.0,
    "T": 1000.0,
    "steps": 30000,
    "log_every": 10,
    "out": "runs/spiral-train",
}
DYNAMICS_DEFAULTS = {  # Fig. 4 caption
    "width": 100,
    "A": 70.0,
    "T": 5000.0,
    "steps": 70000,
    "log_every": 1,  # F at every step: period-two bouncing shows only there
    "val_every": 10,  # the validation set every 10 steps: a forward pass, half a step's cost
    "out": "runs/fig4",
}
QUICK = {"T": 1000.0, "steps": 14000}  # dynamics --quick: the same A, periods 5x shorter
SPECTRA_EVERY = 25  # steps between spectra: odd, so both branches of a period-two bounce show
PHASE_A = "1,2,5,10,20,30,50,70,100"
PHASE_T = "50,100,200,300,500,1000,2000,3000"
PHASE_STEPS = 35000  # Fig. 3 caption
PHASE_SEEDS = 50  # Fig. 3 caption
CPU_BATCH = 64  # networks trained together by one phase batch on the CPU
GPU_BATCH = {100: 4096, 1000: 1024}  # ... and on a GPU: up to width 100, and wider
FIG5_T0, FIG5_STEPS0 = 5000.0, 70000  # Fig. 5: T = T0/eta, steps0/eta steps
FIG5_STATIC_STEPS = 35000
ONSET_PERIODS = 5  # periods of an onset run (oscillating throughout): instabilities in each


# ---------------------------------------------------------------------------------------------
# train (Fig. 4 (a)-(d))
# ---------------------------------------------------------------------------------------------


def check_common(args):
    """Validate what every spiral command shares (the typed options checked their own values);
    raise InputError."""
    if getattr(args, "reference", False) and args.device != "cpu":
        raise InputError("--reference runs the NumPy reference loop on the CPU: drop --device gpu")
    checked_backend(args.device)  # --device gpu without CuPy or a GPU: one line, before any work
    check_out_dir(args.out)


def check_oscillates(args, A_max, T_max):
    """A dynamical loss (A > 1) with the final period static needs steps beyond a period."""
    if A_max != 1 and not args.no_stop and T_max >= args.steps:
        raise InputError(
            f"--steps {args.steps} leaves no oscillating steps for T = {T_max:g} (the final "
            "period is static): give more --steps, a shorter --T or --no-stop"
        )


def check_train(args, kind="spiral-train"):
    """Validate ``train`` (and what ``dynamics`` and ``density`` share with it): the plan with
    the seeds, the run's identity (for which --out must be free: check_claim) and the memory of
    its training."""
    check_common(args)
    seeds = parse_seeds(args.seed, "--seed")
    check_oscillates(args, args.A, args.T)
    rows = args.steps // args.log_every + 2
    identity_of = train_settings(args, seeds, kind)
    gpu = args.device == "gpu"
    need = memory.spiral_training(len(seeds), args.width, rows, args.reference, gpu)
    return {"seeds": seeds, "identity_of": identity_of, "rows": rows, "memory": need,
            "what": "this run"}  # fmt: skip


def claim_run(args, plan):
    """Refuse an --out that holds another run (before any work; plan: check_train's)."""
    check_claim(args.out, *plan["identity_of"], overwrite=getattr(args, "overwrite", False))


def train_spec(args, M):
    """The TrainSpec of M networks with the settings of ``args``."""
    stop = stop_steps(args.steps, args.T, args.no_stop)
    return TrainSpec(
        A=np.full(M, args.A),
        T=np.full(M, args.T),
        stop_step=np.full(M, stop),
        lr=args.lr,
        steps=args.steps,
        log_every=args.log_every,
        loss=args.loss,
        val_every=getattr(args, "val_every", None),
    )


def run_config(args, seeds, spec, t0, identity_of=None, **extra):
    """config.json of a run: its kind and settings (what the folder is claimed for), every
    option, the seeds, the stop step, versions, wall time."""
    config = {k: v for k, v in vars(args).items() if k != "func"}
    if identity_of is not None:
        config.update(kind=identity_of[0], settings=identity_of[1])
    config.update(
        seeds=seeds,
        stop_step=int(spec.stop_step[0]),
        versions=versions(),
        seconds=round(time.time() - t0, 2),
        data=f"spiral, validation set {getattr(args, 'val', 'uniform')!r} (spiral.py)",
    )
    config.update(extra)
    return config


TRAIN_KEYS = ("width", "A", "T", "steps", "lr", "init", "loss", "log_every", "val_every")
TRAIN_KEYS += ("no_stop", "val")  # the options that define a train run's results


def train_settings(args, seeds, kind="spiral-train"):
    """(kind, settings) of a train-like run: what its config.json records as its identity."""
    return kind, {**{k: getattr(args, k) for k in TRAIN_KEYS}, "seeds": seeds}


def start_run(args, seeds, spec, t0, identity_of, outputs):
    """Claim --out for a run about to start (storage.begin_run): its config.json first (status
    "running"), so that the folder names this run even if it is killed; with --overwrite the
    previous run's ``outputs`` go first."""
    config = run_config(args, seeds, spec, t0, identity_of, status="running")
    begin_run(args.out, *identity_of, config, getattr(args, "overwrite", False), outputs)


def check_train_command(args):
    """``train``'s check: check_train, and --out free for this run."""
    plan = check_train(args)
    claim_run(args, plan)
    return plan


@command(check_train_command)
def cmd_train(args, plan):
    """``train``: one setting, one or a few seeds; writes run.npz, config.json, run.png. The
    trainer is chosen in apparatus/spiral_sweeps.train: spiral.train_reference with --reference,
    fast/spiral_trainer.train_many without."""
    seeds, identity_of = plan["seeds"], plan["identity_of"]
    t0 = time.time()
    data = spiral_data(args.val)
    params0 = init_mlp(seeds, D=D_SPIRAL, H=args.width, K=K_SPIRAL, init=args.init)
    spec = train_spec(args, len(seeds))
    start_run(args, seeds, spec, t0, identity_of, ("run.npz", "run.png"))
    res = spiral_sweeps.train(
        params0, data, spec, args.reference, backend(args.device), progress=not args.quiet
    )
    arrays = run_arrays(data, params0, res, net=0 if len(seeds) == 1 else None)
    arrays["identity"] = np.array(identity({"kind": identity_of[0], "settings": identity_of[1]}))
    atomic_savez(os.path.join(args.out, "run.npz"), **arrays)
    diverged = [int(d) for d in res["diverged_step"]]
    config = run_config(args, seeds, spec, t0, identity_of, status="done", diverged_step=diverged)
    write_json(os.path.join(args.out, "config.json"), config)
    title = (
        f"width {args.width}, A = {args.A:g}, T = {args.T:g}, lr = {args.lr:g}, "
        f"{args.init} init, seed(s) {args.seed}"
    )
    png = os.path.join(args.out, "run.png")
    plots.plot_spiral_run(arrays, png, title)
    for m, s in enumerate(seeds):
        d = res["diverged_step"][m]
        state = (
            f"diverged at step {d}"
            if d >= 0
            else (f"train acc {res['train_acc'][-1, m]:.3f}, val acc {res['val_acc'][-1, m]:.3f}")
        )
        print(f"seed {s}: {state}")
    print(f"wrote {args.out}/run.npz, config.json and the figure {png}")
    print(trainer_line(args))


def trainer_line(args, argv=None):
    """Which trainer ran, and the command for the other one, into a folder of its own (the
    default folders differ by "-reference"; an explicit --out gets that suffix added or
    removed), so that running it keeps this run."""
    words = list(sys.argv[1:] if argv is None else argv) or ["train"]
    kept, skip = [], False
    for w in words:
        if skip or w == "--reference" or w.startswith("--out="):
            skip = False
            continue
        skip = w == "--out"
        if not skip:
            kept.append(w)
    if args.out_given:
        out = args.out.rstrip("/")
        if args.reference:
            out = out[: -len(REFERENCE_SUFFIX)] if out.endswith(REFERENCE_SUFFIX) else out + "-fast"
        else:
            out += REFERENCE_SUFFIX
        kept += ["--out", out]
    other = " ".join(shlex.quote(w) for w in kept + ([] if args.reference else ["--reference"]))
    if args.reference:
        return ("trained by spiral.train_reference, the loop to read (dynloss.py, models.py); "
                f"the fast trainer: python {SCRIPT} {other}")  # fmt: skip
    return ("trained by the fast trainer (fast/spiral_trainer.py); the same run through the loop "
            f"to read (spiral.train_reference): python {SCRIPT} {other}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# phase and merge (Fig. 3)
# ---------------------------------------------------------------------------------------------


def check_phase(args):
    """Validate ``phase`` options before any work: the plan with the A and T lists, the seeds,
    the shard (i, n), the networks per batch and the memory of one batch."""
    check_common(args)
    A_list = parse_list(args.A, "--A", low=1, high=MAX_AMPLITUDE)
    T_list = parse_list(args.T, "--T", low=1, high=MAX_PERIOD)
    check_oscillates(args, max(A_list), max(T_list))
    if args.seed0 + args.seeds - 1 > MAX_SEED:
        raise InputError(f"--seed0 {args.seed0} --seeds {args.seeds}: seeds end above 2**63 - 1")
    seeds = list(range(args.seed0, args.seed0 + args.seeds))
    gpu = args.device == "gpu"
    batch = args.batch if args.batch is not None else default_batch(args.width, gpu)
    networks = min(batch, len(seeds) * len(A_list) * len(T_list))
    need = memory.spiral_training(networks, args.width, 2, args.reference, gpu)
    return {"A": A_list, "T": T_list, "seeds": seeds, "shard": sweeps.parse_shard(args.shard),
            "batch": batch, "memory": need, "what": "a batch of this sweep"}  # fmt: skip


def phase_config(args, A_list, T_list, seeds):
    """What defines a sweep's results (not how the work is split): stored as sweep.json."""
    return {
        "kind": "spiral-phase",
        "width": args.width,
        "A": A_list,
        "T": T_list,
        "seeds": seeds,
        "seed_block": args.seed_block,
        "steps": args.steps,
        "lr": args.lr,
        "init": args.init,
        "loss": args.loss,
        "stop_last_period": not args.no_stop,
        "val": args.val,
    }


def default_batch(width, gpu):
    """Networks per phase batch: CPU_BATCH on the CPU, GPU_BATCH by width on a GPU."""
    if not gpu:
        return CPU_BATCH
    narrow, wide = sorted(GPU_BATCH)
    return GPU_BATCH[narrow] if width <= narrow else GPU_BATCH[wide]


@command(check_phase)
def cmd_phase(args, plan):
    """``phase``: a (T, A) grid x seeds for one width; resumable, shardable; Fig. 3."""
    A_list, T_list, seeds, (i, n) = plan["A"], plan["T"], plan["seeds"], plan["shard"]
    cfg = phase_config(args, A_list, T_list, seeds)
    xp = backend(args.device)
    cfg = sweeps.prepare(args.out, cfg, ("seeds",), args.overwrite, work=f"{i}/{n}")
    sweeps.note_shards(args.out, n)
    write_json(os.path.join(args.out, "versions.json"), versions())
    units = spiral_sweeps.phase_units(len(T_list), len(A_list), seeds, args.seed_block)
    expect = spiral_sweeps.unit_expect(cfg)
    mine = sweeps.shard(units, i, n)
    todo = set(sweeps.pending(args.out, [u[0] for u in mine], expect))
    batch = plan["batch"]
    print(
        f"shard {i}/{n}: {len(todo)} of {len(mine)} units to run ({len(units)} in the sweep), "
        f"{max(1, batch // args.seed_block)} unit(s) per batch"
    )
    seconds = spiral_sweeps.run_phase(
        args.out, cfg, [u for u in mine if u[0] in todo], xp, batch, not args.quiet, args.reference
    )
    print(f"shard {i}/{n} done in {seconds:.0f} s")
    if n == 1:
        spiral_sweeps.merge_phase(args.out)
    else:
        print(f"when every shard is done: python {SCRIPT} merge --out {shlex.quote(args.out)}")


def check_merge(args):
    """``merge`` and ``reeval``: a sweep folder whose units are read (and, for reeval, their
    networks run on the validation set)."""
    sweeps.load_config(args.out, kind="spiral-phase")
    units = glob.glob(os.path.join(args.out, "units", "*.npz"))
    return {"memory": memory.files(units), "what": f"the units of {args.out}"}


@command(check_merge)
def cmd_merge(args, plan):
    """``merge``: combine the shards of a sweep into phase.npz and its figure."""
    spiral_sweeps.merge_phase(args.out)


@command(check_merge)
def cmd_reeval(args, plan):
    """``reeval``: a finished sweep's networks on another validation set, without training."""
    spiral_sweeps.merge_phase(args.out, val=args.val)


# ---------------------------------------------------------------------------------------------
# dynamics (Fig. 4) and threshold (Fig. 5)
# ---------------------------------------------------------------------------------------------


def dynamics_config(args, seeds):
    """What defines a dynamics run's results: stored as the folder's sweep.json."""
    keys = ("width", "A", "T", "steps", "lr", "init", "loss", "log_every", "val_every")
    keys += ("hess_every", "ntk_every", "top_k", "no_stop", "val")
    return {"kind": "spiral-dynamics", **{k: getattr(args, k) for k in keys}, "seeds": seeds}


def check_dynamics(args):
    """``dynamics``: check_train's plan, the top-k and the strides, the tracker's memory."""
    if args.quick:
        if (args.T, args.steps) != (DYNAMICS_DEFAULTS["T"], DYNAMICS_DEFAULTS["steps"]):
            raise InputError("--quick sets --T and --steps: give one or the other")
        args.T, args.steps = QUICK["T"], QUICK["steps"]
    plan = check_train(args, "spiral-dynamics")
    P = spiral_params(args.width)
    if args.top_k >= P:
        raise InputError(f"--top-k {args.top_k}: a width-{args.width} network has {P} parameters")
    problem = tracker.stride_problem(args.hess_every, args.ntk_every, args.log_every)
    if problem:
        raise InputError(problem)
    spectra_rows = args.steps // args.hess_every + 2
    M, jobs = len(plan["seeds"]), min(len(plan["seeds"]), WORKERS)  # spiral_sweeps.tracked_units
    plan["memory"] = memory.tracked(-(-M // jobs), jobs, args.width, args.steps, args.log_every,
                                    spectra_rows, args.top_k, args.ntk_every > 0)  # fmt: skip
    return plan


@command(check_dynamics)
def cmd_dynamics(args, plan):
    """``dynamics``: runs with the Hessian and NTK spectra along them (Fig. 4), one unit per
    seed; the figure follows the first seed, the summary gives every seed's threshold."""
    seeds = plan["seeds"]
    t0 = time.time()
    cfg = dynamics_config(args, seeds)
    cfg = sweeps.prepare(args.out, cfg, ("seeds",), args.overwrite, work="dynamics")
    units = spiral_sweeps.dynamics_units(seeds, args.width)
    todo = set(sweeps.pending(args.out, [u[0] for u in units], spiral_sweeps.dynamics_expect))
    xp = backend(args.device)
    spiral_sweeps.run_dynamics(
        args.out,
        cfg,
        [u for u in units if u[0] in todo],
        lambda width, key, M: train_spec(args, M),
        xp,
        not args.quiet,
        k=args.top_k,
        reference=args.reference,
    )
    done = sweeps.load_units(args.out, [u[0] for u in units], spiral_sweeps.dynamics_expect)
    arrays = dict(done[units[0][0]])  # the figure follows the first seed
    info = {k: arrays[k] for k in stability.ANALYSIS_FIELDS}  # stored with the unit
    if args.zoom_every > 0:
        data = spiral_data(args.val)
        params0 = init_mlp(seeds[:1], D=D_SPIRAL, H=args.width, K=K_SPIRAL, init=args.init)
        window = tracker.zoom_window(info, arrays["step"], args.T)
        zoom = tracker.zoom_replay(
            params0,
            data,
            train_spec(args, 1),
            window,
            k=args.top_k,
            every=args.zoom_every,
            ntk=args.ntk_every > 0,
            reference=args.reference,
            xp=xp,
        )
        arrays.update(zoom)
    arrays["identity"] = np.array(identity({"kind": cfg["kind"], "settings": cfg}))
    atomic_savez(os.path.join(args.out, "run.npz"), **arrays)
    summary = spiral_sweeps.dynamics_summary(done, seeds)
    if len(seeds) > 1:
        atomic_savez(os.path.join(args.out, "seeds.npz"), **summary)
    spec = train_spec(args, 1)
    config = run_config(
        args,
        seeds,
        spec,
        t0,
        threshold=[float(t) for t in summary["threshold"]],
        settled_period=[float(p) for p in summary["settled_period"]],
        bifurcation_episodes=[int(b) for b in summary["bifurcation_episodes"]],
        instabilities=[int(i) for i in summary["instabilities"]],
    )
    write_json(os.path.join(args.out, "config.json"), config)
    png = os.path.join(args.out, "dynamics.png")
    title = (
        f"width {args.width}, A = {args.A:g}, T = {args.T:g}, lr = {args.lr:g}, "
        f"{args.steps} steps, Hessian every {args.hess_every}, NTK every {args.ntk_every}, "
        f"seed {seeds[0]}"
    )
    plots.plot_dynamics(arrays, info, png, title)
    print_dynamics(summary, arrays, info)
    print(f"wrote {args.out}/run.npz, config.json and the figure {png}")


def print_dynamics(summary, arrays, info):
    """The Fig. 4 summary line(s): one seed, or the mean and interval over seeds."""
    S = len(summary["seeds"])
    if S == 1:
        print(
            f"Hessian threshold {info['threshold']:.4g} (2/lr = {info['gd_bound']:.4g}) from "
            f"{len(info['thr_start'])} instabilities; {len(info['bif_start'])} bifurcation "
            f"episodes of F; lambda_max stays below the threshold after "
            f"{info['settled_period']:g} periods"
        )
    else:
        print(
            f"Hessian threshold over {S} seeds: {summary['threshold_mean']:.4g} "
            f"{statistics.interval(summary['threshold_lo'], summary['threshold_hi'], '.4g')} "
            f"({statistics.CONFIDENCE:.0%} t interval; 2/lr = {info['gd_bound']:.4g}); per seed "
            + " ".join(f"{t:.3g}" for t in summary["threshold"])
        )
        print(
            "lambda_max stays below the threshold after (periods, per seed): "
            + " ".join(f"{p:g}" for p in summary["settled_period"])
        )
    if len(arrays["ntk_lmax"]):
        print(
            f"seed {summary['seeds'][0]}: final train acc {arrays['train_acc'][-1]:.3f}, val acc "
            f"{arrays['val_acc'][-1]:.3f}; final Hessian lambda_max {arrays['hess_lmax'][-1]:.4g}"
            f", NTK lambda_max {arrays['ntk_lmax'][-1]:.4g}"
        )


def check_threshold(args):
    """``threshold``: the widths, learning rates and seeds; the memory of the longest run."""
    check_common(args)
    widths = parse_list(args.widths, "--widths", int, low=1)
    lrs = parse_list(args.lrs, "--lrs", low=MIN_RATE, high=MAX_RATE)
    seeds = parse_seeds(args.seed, "--seed")
    if not (args.T0 / max(lrs) >= 1 and args.steps0 > args.T0):
        raise InputError(
            f"need T0/eta >= 1 for every eta and steps0 > T0 (an oscillating part); got T0 "
            f"{args.T0:g}, steps0 {args.steps0}, largest eta {max(lrs):g}"
        )
    steps = int(round(args.steps0 / min(lrs)))
    if steps > MAX_STEPS:
        raise InputError(
            f"steps0/eta: {steps:,} steps at eta {min(lrs):g}, more than {MAX_STEPS:,}"
        )
    jobs = len(widths) * (len(lrs) + 1)  # a job per width and eta, and the static runs
    need = memory.tracked(len(seeds), jobs, max(widths), steps, args.hess_every,
                          steps // args.hess_every + 2, ntk=False)  # fmt: skip
    return {"widths": widths, "lrs": lrs, "seeds": seeds, "memory": need,
            "what": "the longest run"}  # fmt: skip


@command(check_threshold)
def cmd_threshold(args, plan):
    """``threshold``: Fig. 5, the Hessian threshold against the learning rate, over seeds."""
    widths, lrs, seeds = plan["widths"], plan["lrs"], plan["seeds"]
    cfg = {
        "kind": "spiral-threshold",
        "widths": widths,
        "lrs": lrs,
        "A": args.A,
        "T0": args.T0,
        "steps0": args.steps0,
        "static_steps": args.static_steps,
        "seeds": seeds,
        "init": args.init,
        "loss": args.loss,
        "hess_every": args.hess_every,
        "val": args.val,
    }
    cfg = sweeps.prepare(args.out, cfg, ("seeds",), args.overwrite, work="threshold")
    write_json(os.path.join(args.out, "versions.json"), versions())
    units = spiral_sweeps.threshold_units(widths, lrs, seeds)
    todo = set(sweeps.pending(args.out, [u[0] for u in units], spiral_sweeps.threshold_expect))
    print(f"{len(todo)} of {len(units)} runs to do")
    t0 = time.time()
    mine = [u for u in units if u[0] in todo]
    spiral_sweeps.run_threshold(
        args.out, cfg, mine, backend(args.device), not args.quiet, args.reference
    )
    print(f"trained in {time.time() - t0:.0f} s")
    spiral_sweeps.merge_threshold(args.out)


def check_density(args):
    """``density``: one seed, the steps, the memory of SLQ's Lanczos bases."""
    plan = check_train(args, "spiral-density")
    if len(plan["seeds"]) != 1:
        raise InputError("density follows one network: give one --seed")
    at = parse_list(args.at, "--at", int, low=0, high=args.steps)
    plan["identity_of"][1].update(at=at, probes=args.probes, lanczos_steps=args.lanczos_steps)
    claim_run(args, plan)
    plan["at"] = at
    plan["memory"] = memory.density(args.width, args.steps, args.log_every, args.probes,
                                    args.lanczos_steps, at)  # fmt: skip
    return plan


@command(check_density)
def cmd_density(args, plan):
    """``density``: the Hessian's eigenvalue density (SLQ) and trace at chosen steps of a run."""
    seeds, at, identity_of = plan["seeds"], plan["at"], plan["identity_of"]
    t0 = time.time()
    data = spiral_data(args.val)
    params0 = init_mlp(seeds, D=D_SPIRAL, H=args.width, K=K_SPIRAL, init=args.init)
    spec = train_spec(args, 1)
    start_run(args, seeds, spec, t0, identity_of, ("density.npz", "density.png"))
    out = tracker.densities_along(
        params0, data, spec, at, args.probes, args.lanczos_steps, args.reference,
        backend(args.device),
    )  # fmt: skip
    run = out.pop("run")
    out["identity"] = np.array(identity({"kind": identity_of[0], "settings": identity_of[1]}))
    atomic_savez(os.path.join(args.out, "density.npz"), **out)
    diverged = int(run["diverged_step"][0])
    config = run_config(args, seeds, spec, t0, identity_of, status="done", diverged_step=diverged)
    write_json(os.path.join(args.out, "config.json"), config)
    png = os.path.join(args.out, "density.png")
    title = (
        f"Hessian density (SLQ, {args.probes} probes x {args.lanczos_steps} steps): width "
        f"{args.width}, A = {args.A:g}, T = {args.T:g}, lr = {args.lr:g}, seed {seeds[0]}"
    )
    plots.plot_density(out, png, title)
    for i, step in enumerate(out["at"]):
        print(
            f"step {step}: trace {out['trace'][i]:.5g} +- {out['trace_stderr'][i]:.2g} "
            f"(SLQ {out['slq_trace'][i]:.5g}), lambda_max {out['lmax'][i]:.5g}"
        )
    print(f"wrote {args.out}/density.npz, config.json and the figure {png}")


# ---------------------------------------------------------------------------------------------
# onset (beyond the paper: where the instabilities begin)
# ---------------------------------------------------------------------------------------------


def parse_beta(item, name):
    """'relu' -> None (the paper's ReLU), a number -> the softplus beta (within RATE's bounds)."""
    return None if item == "relu" else check_number(item, name, low=MIN_RATE, high=MAX_RATE)


def check_onset(args):
    """``onset``: the grid of conditions (every list parsed, no item repeated once normal), the
    seeds, the longest run's steps, and the memory of its jobs."""
    check_common(args)
    T0s = parse_list(args.T0, "--T0", low=1, high=MAX_PERIOD)
    lrs = parse_list(args.lrs, "--lrs", low=MIN_RATE, high=MAX_RATE)
    noises = parse_list(args.noise, "--noise", low=0, high=MAX_PERTURBATION)
    forces = parse_list(args.force, "--force", low=0, high=MAX_PERTURBATION)
    dtypes = parse_choices(args.dtypes, "--dtypes", ("float64", "float32"))
    betas = parse_items(args.betas, "--betas", parse_beta)
    seeds = parse_seeds(args.seed, "--seed")
    if min(T0s) / max(lrs) < 1:
        raise InputError("need T0/lr >= 1 step for every T0 and lr")
    steps = int(round(args.periods * max(T0s) / min(lrs)))
    if steps > MAX_STEPS:
        raise InputError(f"--periods {args.periods} of T0/lr: {steps:,} steps, more than "
                         f"{MAX_STEPS:,}")  # fmt: skip
    conditions = onset.grid(T0s, lrs, dtypes, noises, betas, forces)
    M_job = -(-len(seeds) // memory.workers_at_once(len(seeds)))  # networks of one job
    need = memory.onset(M_job, args.width, steps, len(conditions) * len(seeds), len(onset.SERIES))
    return {"seeds": seeds, "conditions": conditions, "memory": need,
            "what": f"the onset runs ({steps:,} steps)"}  # fmt: skip


@command(check_onset)
def cmd_onset(args, plan):
    """``onset``: runs with lambda_max and the period-two mode at every step, for a grid of
    periods, learning rates, arithmetics, perturbations and activations; resumable; the folder
    collects the conditions of several commands (added under the folder's lock), and each run
    merges every complete one."""
    new = plan["conditions"]
    cfg = {
        "kind": "spiral-onset",
        "width": args.width,
        "A": args.A,
        "periods": args.periods,
        "init": args.init,
        "loss": args.loss,
        "seeds": plan["seeds"],
        "conditions": new,
    }
    cfg = sweeps.prepare(args.out, cfg, ("seeds",), args.overwrite, work=new, union=("conditions",))
    write_json(os.path.join(args.out, "versions.json"), versions())
    mine = {onset.condition_name(c) for c in new}
    units = [u for u in onset.onset_units(cfg) if u[0].rsplit("_s", 1)[0] in mine]
    todo = set(sweeps.pending(args.out, [u[0] for u in units], onset.onset_expect(cfg)))
    print(f"{len(todo)} of {len(units)} runs to do")
    t0 = time.time()
    onset.run_onset(args.out, cfg, [u for u in units if u[0] in todo], not args.quiet)
    print(f"trained and measured in {time.time() - t0:.0f} s")
    onset_analysis.merge_onset(args.out)


def check_rule(args):
    """``rule``: the two folders it reads (their units' arrays), the output folder."""
    check_out_dir(args.out)
    paths = []
    for folder in (args.every_step, args.fig5):
        sweeps.load_config(folder)
        paths += glob.glob(os.path.join(folder, "units", "*.npz"))
    return {"memory": memory.files(paths, copies=rule.SERIES_COPIES), "what": "the runs read"}


@command(check_rule)
def cmd_rule(args, plan):
    """``rule``: the Fig. 4 runs and the Fig. 5 sweep read with other jumps and strides, their
    marks by kind (apparatus/rule.py)."""
    rule.audit(args.every_step, args.fig5, args.out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_train_options(p, defaults):
    """The options of ``train`` (also used by ``dynamics`` and ``density``), per-command
    defaults."""
    p.add_argument("--width", type=COUNT, default=defaults["width"], help="hidden units H")
    p.add_argument("--A", type=AMPLITUDE, default=defaults["A"], help="amplitude (1: static)")
    p.add_argument("--T", type=PERIOD, default=defaults["T"], help="period in steps")
    p.add_argument("--steps", type=COUNT, default=defaults["steps"], help="gradient-descent steps")
    p.add_argument("--lr", type=RATE, default=1.0, help="learning rate eta")
    p.add_argument("--seed", default="0", help="init seed(s): 0, or 0,1,2, or 0-4")
    p.add_argument("--init", default="standard", choices=INITS, help="initialisation")
    p.add_argument("--loss", default="ce", choices=LOSSES, help="base loss")
    p.add_argument("--log-every", type=COUNT, default=defaults["log_every"], help="steps per log")
    p.add_argument(
        "--val-every",
        type=COUNT,
        default=defaults.get("val_every"),
        help="steps between validation evaluations (default: every logged step)",
    )
    p.add_argument(
        "--no-stop",
        action="store_true",
        help="keep oscillating in the final period (default: Gamma = 1 for the last T)",
    )
    add_common_options(p, defaults["out"], "output folder")


def add_common_options(p, out, what):
    """--val, --device, --reference, --out and --quiet."""
    p.add_argument("--val", default="uniform", choices=tuple(VAL_SETS), help="validation set")
    p.add_argument(
        "--reference",
        action="store_true",
        help="train with the reference loop (spiral.train_reference) instead of the fast trainer",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="cpu or gpu (CuPy)")
    p.add_argument("--out", default=None, help=f"{what} (default {out}; with --reference "
                   f"{out}{REFERENCE_SUFFIX})")  # fmt: skip
    p.set_defaults(out_for=lambda a, out=out: out + (REFERENCE_SUFFIX if a.reference else ""))
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that holds another run or files this tool did not write",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_spectra_options(p, ntk=True):
    """How often the spectra are measured (both in steps; an odd stride shows period-two
    bouncing, which an even one never samples on both branches)."""
    p.add_argument(
        "--hess-every", type=COUNT, default=SPECTRA_EVERY, help="steps between Hessian lambda_max"
    )
    if not ntk:
        return
    p.add_argument(
        "--ntk-every",
        type=COUNT0,
        default=SPECTRA_EVERY,
        help="steps between NTK lambda_max (0: no NTK)",
    )


def build_parser():
    """The argparse parser of every spiral command."""
    parser = Parser(prog=SCRIPT, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="one training run (or a few seeds); Fig. 4 (a)-(d)")
    add_train_options(p, TRAIN_DEFAULTS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("dynamics", help="runs with Hessian and NTK spectra: Fig. 4")
    add_train_options(p, DYNAMICS_DEFAULTS)
    add_spectra_options(p)
    p.add_argument(
        "--top-k",
        type=number(int, low=1, high=tracker.TOP_K_MAX),
        default=1,
        help=f"Hessian eigenvalues kept (top k, at most {tracker.TOP_K_MAX})",
    )
    p.add_argument(
        "--zoom-every",
        type=COUNT0,
        default=1,
        help="replay the zoomed window with spectra every this many steps (0: off)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a shorter look: T = {QUICK['T']:g}, {QUICK['steps']} steps",
    )
    p.set_defaults(func=cmd_dynamics)

    p = sub.add_parser("density", help="the Hessian's eigenvalue density at chosen steps")
    add_train_options(p, TRAIN_DEFAULTS | {"out": "runs/density"})
    p.add_argument("--at", default="0,1000,10000,30000", help="steps, e.g. 0,5000")
    p.add_argument("--probes", type=COUNT, default=SLQ_PROBES, help="random probes of SLQ")
    p.add_argument("--lanczos-steps", type=COUNT, default=SLQ_STEPS, help="Lanczos steps per probe")
    p.set_defaults(func=cmd_density)

    p = sub.add_parser("threshold", help="Hessian threshold against the learning rate: Fig. 5")
    p.add_argument("--widths", default="100,1000", help="hidden widths H, e.g. 100,1000")
    p.add_argument("--lrs", default="0.5,1,2,4", help="learning rates eta, e.g. 0.5,1,2")
    p.add_argument("--A", type=AMPLITUDE, default=DYNAMICS_DEFAULTS["A"], help="amplitude")
    p.add_argument("--T0", type=PERIOD, default=FIG5_T0, help="period at eta = 1: T = T0/eta")
    p.add_argument("--steps0", type=COUNT, default=FIG5_STEPS0, help="steps = steps0/eta")
    p.add_argument(
        "--static-steps", type=COUNT, default=FIG5_STATIC_STEPS, help="steps of the A = 1 runs"
    )
    p.add_argument("--seed", default="0", help="init seed(s): 0, or 0,1,2, or 0-4")
    p.add_argument("--init", default="standard", choices=INITS, help="initialisation")
    p.add_argument("--loss", default="ce", choices=LOSSES, help="base loss")
    add_spectra_options(p, ntk=False)  # Fig. 5 follows the Hessian only
    add_common_options(p, "runs/fig5", "sweep folder (resumable)")
    p.set_defaults(func=cmd_threshold)

    p = sub.add_parser("phase", help="a (T, A) grid x seeds: Fig. 3 (resumable, shardable)")
    p.add_argument("--width", type=COUNT, default=100, help="hidden units H")
    p.add_argument("--A", default=PHASE_A, help="amplitudes, e.g. 1,5,10")
    p.add_argument("--T", default=PHASE_T, help="periods in steps, e.g. 100,300")
    p.add_argument("--seeds", type=SEEDS, default=PHASE_SEEDS, help="seeds per cell (paper: 50)")
    p.add_argument("--seed0", type=SEED, default=0, help="first seed")
    p.add_argument("--seed-block", type=COUNT, default=PHASE_SEEDS, help="seeds per unit of work")
    p.add_argument("--steps", type=COUNT, default=PHASE_STEPS, help="gradient-descent steps")
    p.add_argument("--lr", type=RATE, default=1.0, help="learning rate eta")
    p.add_argument("--init", default="standard", choices=INITS, help="initialisation")
    p.add_argument("--loss", default="ce", choices=LOSSES, help="base loss")
    p.add_argument("--no-stop", action="store_true", help="oscillate in the last period too")
    p.add_argument("--shard", default="0/1", help="i/n: run the i-th of n slices of the work")
    p.add_argument(
        "--batch",
        type=COUNT,
        default=None,
        help=f"networks trained together (default {CPU_BATCH} on the CPU, 1024-4096 on a GPU)",
    )
    add_common_options(p, "runs/phase-w100", "sweep folder")
    p.set_defaults(func=cmd_phase)

    p = sub.add_parser("onset", help="where the instabilities begin (beyond the paper)")
    p.add_argument("--T0", default=str(FIG5_T0), help="periods at lr 1: T = T0/lr, e.g. 1250,5000")
    p.add_argument("--lrs", default="1", help="learning rates, e.g. 0.5,1,2,4")
    p.add_argument("--dtypes", default="float64", help="float64 and/or float32")
    p.add_argument("--noise", default="0", help="norms of a perturbation after every step")
    p.add_argument("--betas", default="relu", help="relu and/or softplus betas, e.g. relu,10")
    p.add_argument(
        "--force", default="0", help="sizes of a period-two forcing along the top eigenvector"
    )
    p.add_argument("--A", type=AMPLITUDE, default=DYNAMICS_DEFAULTS["A"], help="amplitude")
    p.add_argument("--periods", type=COUNT, default=ONSET_PERIODS, help="periods per run")
    p.add_argument("--width", type=COUNT, default=100, help="hidden units H")
    p.add_argument("--seed", default="0-9", help="init seed(s): 0, or 0,1,2, or 0-4")
    p.add_argument("--init", default="standard", choices=INITS, help="initialisation")
    p.add_argument("--loss", default="ce", choices=LOSSES, help="base loss")
    p.add_argument("--device", default="cpu", choices=("cpu",), help="cpu (the reference loop)")
    p.add_argument("--out", default="runs/onset", help="sweep folder (resumable)")
    p.add_argument("--overwrite", action="store_true", help="write into another run's --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_onset)

    p = sub.add_parser("rule", help="the Fig. 4 rule as a detector: jump, stride, marks by kind")
    p.add_argument(
        "--every-step", default="runs/fig4-every-step", help="dynamics --hess-every 1 folder"
    )
    p.add_argument("--fig5", default="runs/fig5", help="the threshold (Fig. 5) sweep folder")
    p.add_argument("--out", default="runs/rule", help="where rule.npz, .json, .png go")
    p.set_defaults(func=cmd_rule)

    add_merge_command(sub, cmd_merge, "Fig. 3")
    add_spiral_check_command(sub)  # every hand-written derivative against differences
    p = sub.add_parser("reeval", help="a finished phase sweep on another validation set")
    p.add_argument("--out", required=True, help="sweep folder")
    p.add_argument("--val", required=True, choices=tuple(VAL_SETS), help="validation set")
    p.set_defaults(func=cmd_reeval)
    return parser


def main(argv=None):
    """Entry point: no arguments runs the default ``train`` demo."""
    argv = sys.argv[1:] if argv is None else argv
    return run_main(build_parser(), argv, SCRIPT, default_argv=["train"])


if __name__ == "__main__":
    code = main()
    signals.ignore_after_work()  # the work is done: a late signal must not kill the exit
    sys.exit(code)
