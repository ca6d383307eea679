"""The CIFAR-10 experiment of the paper (Fig. 1) from the command line: Myrtle5, dynamical loss.

Commands
--------
One point of Fig. 1 (one GPU; the defaults are the Fig. 1 protocol, A = 50, T = 100):
    python run_cifar.py train --data ~/cifar-10-python.tar.gz --device gpu --out runs/c-A50-T100
The static baseline (A = 1 line of Fig. 1, validation accuracy ~0.73 in the paper):
    python run_cifar.py train --data ~/cifar-10-python.tar.gz --A 1 --device gpu --out runs/c-A1
Fig. 1, the phase diagram ((T, A) grid x 30 seeds; a SLURM array: slurm/cifar_phase.sbatch):
    python run_cifar.py phase --data PATH --seeds 30 --shard i/n --device gpu --out runs/cifar-phase
    python run_cifar.py merge --out runs/cifar-phase
  (phase evaluates the whole training set only after the last epoch, --train-eval-every 0, and
  the test set after every epoch; its units are one run each, checkpointed in OUT/work/<unit>/.)
A CPU demo on synthetic data (about a minute of CPU time; benchmarks/cifar_demo/README.md):
    python run_cifar.py train --data synthetic --synthetic-train 2000 --synthetic-test 1000 \\
        --image-size 16 --channels 16 --batch 100 --epochs 14 --lr-peak 0.05 --lr-final 0.005 \\
        --A 20 --T 20 --out runs/cifar-demo/A20-T20

The protocol (schedule, minibatches, one epoch) is in protocol.py, the run around it (settings,
checkpoints, exact resume) in apparatus/cifar_runs.py; outputs are
described in docs/formats.md. Rerunning a command resumes it from its checkpoint; an --out that
holds a run with other settings is refused.
"""

from __future__ import annotations

if __name__ == "__main__":  # a signal during the imports below: one line, not a traceback
    from apparatus.signals import guard_startup

    guard_startup("run_cifar.py")

import glob
import os
import shlex
import shutil
import sys
import time

import numpy as np

from apparatus import cifar_files as cifar
from apparatus import memory, plots, signals, statistics, sweeps
from apparatus.check_myrtle5 import add_cifar_check_command
from apparatus.cifar_runs import (
    CHECKPOINT_NAME,
    DEFAULTS,
    DIGITS_PROTOCOL,
    CheckpointError,
    check_run,
    final_metrics,
    load_data,
    read_checkpoint,
    resolve_settings,
    run_arrays,
    train_run,
)
from apparatus.cli import (
    AMPLITUDE,
    COUNT,
    COUNT0,
    FRACTION,
    MAX_AMPLITUDE,
    MAX_PERIOD,
    MAX_SEED,
    NONNEG,
    PERIOD,
    RATE,
    SEED,
    SEEDS,
    InputError,
    Parser,
    add_merge_command,
    check_memory,
    check_out_dir,
    checked_backend,
    command,
    parse_list,
    run_main,
)
from apparatus.storage import (
    atomic_savez,
    begin_run,
    check_claim,
    differing,
    identity,
    try_unit_lock,
    unit_unlock,
    versions,
    write_json,
)
from fast.myrtle5 import net_for
from protocol import (
    BATCH,
    CHANNELS,
    EPOCHS,
    LR_FINAL,
    LR_PEAK,
    MOMENTUM,
    PEAK_EPOCH,
    STOP_EPOCH,
    steps_per_epoch,
)

SCRIPT = "run_cifar.py"
PHASE_A = "1,5,10,20,30,50,70,100"
PHASE_T = "10,25,50,100,250,500,1000"
PHASE_SEEDS = 30  # Fig. 1 caption
FIG1_A, FIG1_T = 50.0, 100.0  # the best cell of Fig. 1: the default of ``train``
HESS_BATCH = 512  # training images of the optional Hessian eigenvalue


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def check_checkpoint(path, settings, data, overwrite):
    """A checkpoint in a run folder must read and be of this very run (it is resumed);
    otherwise refuse, or, with ``overwrite``, set it aside (renamed, not deleted)."""
    if not os.path.exists(path):
        return
    spe = steps_per_epoch(len(data["y_train"]), settings["batch"])
    try:
        stored = read_checkpoint(path, settings, data["K"], data["C"], spe)["settings"]
    except CheckpointError as err:
        stored, problem = None, str(err)
    else:
        diff = differing(stored, settings)
        problem = f"{path} is another run's (differs in: {', '.join(diff)})" if diff else None
    if problem is None:
        return
    if not overwrite:
        raise InputError(f"{problem}: use another --out, or --overwrite to start afresh")
    os.replace(path, f"{path}.replaced-{int(time.time())}")


def check_train(args):
    """Validate ``train`` before any work: the plan with the settings, the backend, the data
    (loaded once the memory of the run is known to fit) and the run's memory."""
    check_out_dir(args.out)
    settings = resolve_settings(args)
    check_run(args.A, args.T, args.seed)
    settings.update(A=args.A, T=args.T, seed=args.seed, hess_every=args.hess_every)
    settings["hess_batch"] = args.hess_batch if args.hess_every else None
    need = memory.cifar_run(settings)
    check_memory(need, "this run")  # before the data are loaded
    xp = checked_backend(args.device)
    data = load_data(settings, args.data, args.hess_batch if args.hess_every else 0)
    settings["data_fingerprint"] = data["fingerprint"]
    check_claim(args.out, "cifar-train", settings, overwrite=args.overwrite)
    check_checkpoint(os.path.join(args.out, CHECKPOINT_NAME), settings, data, args.overwrite)
    return {"settings": settings, "xp": xp, "data": data, "memory": need, "what": "this run"}


@command(check_train)
def cmd_train(args, plan):
    """``train``: one run of the Fig. 1 protocol; writes run.npz, config.json, run.png."""
    settings, xp, data = plan["settings"], plan["xp"], plan["data"]
    config = {
        "kind": "cifar-train",
        "settings": settings,
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "device": args.device,
        "data_source": data["source"],
        "versions": versions(),
        "status": "running",
    }
    outputs = ("run.npz", "run.png")  # the previous run's, which --overwrite replaces
    begin_run(args.out, "cifar-train", settings, config, args.overwrite, outputs)
    state, info = train_run(
        settings,
        data,
        xp,
        args.out,
        args.checkpoint_every,
        hess_every=args.hess_every,
        progress=not args.quiet,
        net=net_for(xp),
    )
    arrays = run_arrays(state, info)
    arrays["identity"] = np.array(identity(settings))
    atomic_savez(os.path.join(args.out, "run.npz"), **arrays)
    final = final_metrics(state)
    trained = settings["epochs"] - (info["resumed_from_epoch"] or 0)
    config.update(info, status="done", final=final, diverged_epoch=state.diverged_epoch)
    config["seconds_per_epoch"] = round(info["seconds"] / max(trained, 1), 3)
    write_json(os.path.join(args.out, "config.json"), config)
    title = (
        f"Myrtle5 c={settings['channels']}, {settings['data']}, A = {settings['A']:g}, "
        f"T = {settings['T']:g} steps, batch {settings['batch']}, lr {settings['lr_peak']:g}, "
        f"{settings['epochs']} epochs, seed {settings['seed']}"
    )
    png = os.path.join(args.out, "run.png")
    plots.plot_cifar_run(arrays, settings, png, title)
    if state.diverged_epoch >= 0:
        print(f"diverged in epoch {state.diverged_epoch}")
    print(
        f"final train acc {state.hist['train_acc'][-1]:.4f}, test acc "
        f"{state.hist['test_acc'][-1]:.4f} ({info['seconds']:.1f} s, "
        f"{config['seconds_per_epoch']:.2f} s/epoch)"
    )
    print(f"wrote {args.out}/run.npz, config.json and the figure {png}")


# ---------------------------------------------------------------------------------------------
# Phase diagrams (Fig. 1)
# ---------------------------------------------------------------------------------------------


def phase_units(n_T, n_A, seeds):
    """One run per unit, seeds outermost (every cell gets its first seed first):
    (name, T index, A index, seed)."""
    return [
        (f"T{ti:03d}_A{ai:03d}_s{s:05d}", ti, ai, s)
        for s in seeds
        for ti in range(n_T)
        for ai in range(n_A)
    ]


def check_phase(args):
    """Validate ``phase``: the plan with the sweep's config, the backend, the data, the shard
    and the memory of one run."""
    check_out_dir(args.out)
    settings = resolve_settings(args)
    A_list = parse_list(args.A, "--A", low=1, high=MAX_AMPLITUDE)
    T_list = parse_list(args.T, "--T", low=1, high=MAX_PERIOD)
    if args.seed0 + args.seeds - 1 > MAX_SEED:
        raise InputError(f"--seed0 {args.seed0} --seeds {args.seeds}: seeds end above 2**63 - 1")
    shard = sweeps.parse_shard(args.shard)
    need = memory.cifar_run(settings)
    check_memory(need, "a run of this sweep")  # before the data are loaded
    xp = checked_backend(args.device)
    data = load_data(settings, args.data)
    cfg = {"kind": "cifar-phase", **settings, "A": A_list, "T": T_list}
    cfg["seeds"] = list(range(args.seed0, args.seed0 + args.seeds))
    cfg["data_fingerprint"] = data["fingerprint"]
    check_claim(args.out, "cifar-phase", cfg, args.overwrite, grow=("seeds",))
    return {"cfg": cfg, "xp": xp, "data": data, "shard": shard, "memory": need,
            "what": "a run of this sweep"}  # fmt: skip


def unit_settings(cfg, A, T, seed):
    """The settings of one run of the sweep (what ``train`` would store)."""
    s = {k: v for k, v in cfg.items() if k not in ("kind", "A", "T", "seeds")}
    s.update(A=A, T=T, seed=seed, hess_every=0, hess_batch=None)
    return s


@command(check_phase)
def cmd_phase(args, plan):
    """``phase``: the (T, A) grid x seeds, one run per unit; resumable, shardable; Fig. 1."""
    cfg, xp, data, (i, n) = plan["cfg"], plan["xp"], plan["data"], plan["shard"]
    cfg = sweeps.prepare(args.out, cfg, ("seeds",), args.overwrite, work=f"{i}/{n}")
    sweeps.note_shards(args.out, n)
    write_json(os.path.join(args.out, "versions.json"), versions())
    units = phase_units(len(cfg["T"]), len(cfg["A"]), cfg["seeds"])
    mine = sweeps.shard(units, i, n)
    todo = set(sweeps.pending(args.out, [u[0] for u in mine], unit_expect(cfg)))
    print(f"shard {i}/{n}: {len(todo)} of {len(mine)} runs to do ({len(units)} in the sweep)")
    t0 = time.time()
    index = {u[0]: k for k, u in enumerate(units)}
    for name, ti, ai, seed in mine:
        if name not in todo:
            continue
        if not try_unit_lock(args.out, index[name]):  # another shard is training it
            print(f"{name}: another process is training this unit; left to it")
            continue
        try:
            train_unit(args, cfg, data, xp, units, name, ti, ai, seed)
        finally:
            unit_unlock(args.out, index[name])
    print(f"shard {i}/{n} done in {time.time() - t0:.0f} s")
    if n == 1:
        merge_phase(args.out)
    else:
        print(f"when every shard is done: python {SCRIPT} merge --out {shlex.quote(args.out)}")


def train_unit(args, cfg, data, xp, units, name, ti, ai, seed):
    """Train one unit of the sweep (resuming its checkpoint in OUT/work/<unit>/) and store it."""
    if sweeps.read_unit(args.out, name, unit_expect(cfg)(name))[0] is not None:
        return  # done by another process meanwhile
    if cfg["A"][ai] == 1 and copy_static_twin(args.out, cfg, name, ti, ai, seed, units):
        return
    settings = unit_settings(cfg, cfg["A"][ai], cfg["T"][ti], seed)
    work = os.path.join(args.out, "work", name)
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, CHECKPOINT_NAME)
    if os.path.exists(ckpt):  # a unit's own checkpoint: resumed if it is sound, else redone
        try:
            spe = steps_per_epoch(len(data["y_train"]), settings["batch"])
            stored = read_checkpoint(ckpt, settings, data["K"], data["C"], spe)["settings"]
            stale = bool(differing(stored, settings))
        except CheckpointError as err:
            print(f"{err}: this unit is trained again from the start")
            stale = True
        if stale:
            os.remove(ckpt)
    state, info = train_run(
        settings,
        data,
        xp,
        work,
        args.checkpoint_every,
        progress=not args.quiet,
        say=print,
        net=net_for(xp),
    )
    arrays = {k: np.array([v], dtype=np.float64) for k, v in final_metrics(state).items()}
    arrays["diverged_epoch"] = np.array([state.diverged_epoch], dtype=np.int64)
    arrays["val_acc_history"] = state.hist["test_acc"][None]  # a leading axis of one seed
    sweeps.save_unit(args.out, name, arrays)
    shutil.rmtree(work)
    if not args.quiet:
        acc, val = arrays["train_acc"][0], arrays["val_acc"][0]
        print(f"{name}: train acc {acc:.4f}, val acc {val:.4f}")


def unit_expect(cfg):
    """name -> the fields (shapes) of a stored unit: one run's final metrics and history."""
    fields = {f: (1,) for f in (*sweeps.PHASE_FIELDS, "diverged_epoch")}
    fields["val_acc_history"] = (1, cfg["epochs"] + 1)
    return lambda name: fields


def copy_static_twin(out, cfg, name, ti, ai, seed, units):
    """A = 1 keeps Gamma = 1 at every step whatever T is: the static cells of all periods are
    the same runs. Store the unit ``name`` as a copy of a finished one of the same seed, if any;
    return whether one was found."""
    for other, tj, aj, s in units:
        if s == seed and tj != ti and cfg["A"][aj] == 1:
            arrays, _ = sweeps.read_unit(out, other, unit_expect(cfg)(other))
            if arrays is not None:
                sweeps.save_unit(out, name, arrays)
                return True
    return False


def merge_phase(out):
    """Combine the units of a finished sweep into phase.npz and the Fig. 1 figure."""
    cfg = sweeps.load_config(out, kind="cifar-phase")
    A_list, T_list, seeds = cfg["A"], cfg["T"], cfg["seeds"]
    units = phase_units(len(T_list), len(A_list), seeds)
    done = sweeps.load_units(out, [u[0] for u in units], unit_expect(cfg))
    placements = [(name, ti, ai, seeds.index(seed)) for name, ti, ai, seed in units]
    arrays = sweeps.assemble(done, placements, len(T_list), len(A_list), len(seeds))
    summary = statistics.summarize(
        arrays, sweeps.PHASE_FIELDS, A_list, T_list, seeds, "diverged_epoch"
    )
    atomic_savez(os.path.join(out, "phase.npz"), **arrays, **summary)
    png = os.path.join(out, "phase.png")
    title = (
        f"Myrtle5 c={cfg['channels']}, {cfg['data']}, {len(seeds)} seeds per point, "
        f"{cfg['epochs']} epochs, batch {cfg['batch']}, lr peak {cfg['lr_peak']:g}"
    )
    plots.plot_phase(summary, png, title, "period T (minibatch steps)")
    statistics.print_table(summary, digits=3)
    print(f"wrote {out}/phase.npz and the figure {png}")
    return summary


def check_merge(args):
    """``merge``: a CIFAR sweep folder, its units read."""
    sweeps.load_config(args.out, kind="cifar-phase")
    units = glob.glob(os.path.join(args.out, "units", "*.npz"))
    return {"memory": memory.files(units), "what": f"the units of {args.out}"}


@command(check_merge)
def cmd_merge(args, plan):
    """``merge``: combine the shards of a sweep into phase.npz and its figure."""
    merge_phase(args.out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_common_options(p, out):
    """Data, protocol and device options shared by ``train`` and ``phase`` (protocol.DEFAULTS)."""
    d, DIG = DEFAULTS, DIGITS_PROTOCOL
    p.add_argument(
        "--data",
        default=d["data"],
        help="CIFAR-10 archive/folder (default: $CIFAR10_PATH), 'synthetic' or 'digits'",
    )
    p.add_argument("--md5", default=d["md5"], help="expected archive md5 ('none': no check)")
    p.add_argument(
        "--synthetic-train", type=COUNT, default=d["synthetic_train"], help="synthetic train images"
    )
    p.add_argument(
        "--synthetic-test", type=COUNT, default=d["synthetic_test"], help="synthetic test images"
    )
    p.add_argument(
        "--image-size", type=COUNT, default=d["image_size"], help="synthetic image side (8k)"
    )
    p.add_argument(
        "--data-seed",
        type=COUNT0,
        default=d["data_seed"],
        help="seed of the synthetic data / digits split",
    )
    p.add_argument(
        "--digits-train",
        type=COUNT,
        default=d["digits_train"],
        help="--data digits: training images (the rest of the 1797 are the test set)",
    )
    p.add_argument("--epochs", type=COUNT, help=f"final epoch ({EPOCHS}; digits: {DIG['epochs']})")
    p.add_argument("--batch", type=COUNT, help=f"minibatch size ({BATCH}; digits: {DIG['batch']})")
    p.add_argument(
        "--lr-peak", type=RATE, default=d["lr_peak"], help=f"peak learning rate ({LR_PEAK})"
    )
    p.add_argument(
        "--lr-final", type=NONNEG, default=d["lr_final"], help=f"final learning rate ({LR_FINAL})"
    )
    p.add_argument(
        "--peak-epoch",
        type=NONNEG,
        default=d["peak_epoch"],
        help=f"epoch of the peak ({PEAK_EPOCH}/{EPOCHS} of --epochs)",
    )
    p.add_argument(
        "--stop-epoch",
        type=NONNEG,
        default=d["stop_epoch"],
        help=f"Gamma = 1 from here ({STOP_EPOCH}/{EPOCHS} of --epochs)",
    )
    p.add_argument(
        "--momentum", type=FRACTION, default=d["momentum"], help=f"Nesterov momentum ({MOMENTUM})"
    )
    p.add_argument(
        "--channels", type=COUNT, help=f"Myrtle5 width c ({CHANNELS}; digits: {DIG['channels']})"
    )
    p.add_argument(
        "--dtype", default=d["dtype"], choices=("auto", "float32", "float64"), help="auto: float32"
    )
    p.add_argument(
        "--train-eval-every",
        type=COUNT0,
        default=d["train_eval_every"],
        help="full training-set evaluation every E epochs and at the end (0: end only)",
    )
    p.add_argument(
        "--eval-batch", type=COUNT, default=d["eval_batch"], help="images per evaluation pass"
    )
    p.add_argument(
        "--checkpoint-every",
        type=COUNT,
        default=d["checkpoint_every"],
        help="epochs between checkpoints",
    )
    p.add_argument("--device", default=d["device"], choices=("cpu", "gpu"), help="cpu or gpu")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that holds another run or files this tool did not write",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser():
    """The argparse parser of every CIFAR-10 command."""
    parser = Parser(prog=SCRIPT, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="one run of the Fig. 1 protocol")
    add_common_options(p, "runs/cifar-train")
    p.add_argument("--A", type=AMPLITUDE, default=FIG1_A, help="amplitude (1: static loss)")
    p.add_argument("--T", type=PERIOD, default=FIG1_T, help="period in minibatch steps")
    p.add_argument("--seed", type=SEED, default=0, help="initialisation and shuffling seed")
    p.add_argument(
        "--hess-every",
        type=COUNT0,
        default=0,
        help="top Hessian eigenvalue every E epochs (0: off)",
    )
    p.add_argument("--hess-batch", type=COUNT, default=HESS_BATCH, help="first N training images")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("phase", help="a (T, A) grid x seeds: Fig. 1 (resumable, shardable)")
    add_common_options(p, "runs/cifar-phase")
    p.add_argument("--A", default=PHASE_A, help="amplitudes, e.g. 1,10,50")
    p.add_argument("--T", default=PHASE_T, help="periods in minibatch steps, e.g. 50,100")
    p.add_argument(
        "--seeds", type=SEEDS, default=PHASE_SEEDS, help="seeds per point (the paper: 30)"
    )
    p.add_argument("--seed0", type=SEED, default=0, help="first seed")
    p.add_argument("--shard", default="0/1", help="i/n: run the i-th of n slices of the work")
    p.set_defaults(func=cmd_phase, train_eval_every=0)

    add_merge_command(sub, cmd_merge, "Fig. 1")
    add_cifar_check_command(sub)  # Myrtle5's hand-written derivatives against differences
    return parser


def main(argv=None):
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    errors = (InputError, cifar.CifarError, CheckpointError)  # one line each, exit 2
    return run_main(build_parser(), argv, SCRIPT, errors=errors)


if __name__ == "__main__":
    code = main()
    signals.ignore_after_work()  # the work is done: a late signal must not kill the exit
    sys.exit(code)
