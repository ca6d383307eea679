"""Nothing lost, nothing silently wrong, a clean stop on every signal: damaged or hand-edited
settings files (every field of each, missing or mistyped), folders this tool did not write,
symbolic links and impossible names, colliding values, results of other sweeps, SIGTERM and
SIGINT in the middle of a run, and commands started twice at once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import load, snapshot

import run_cifar as rc
import run_spiral as rs
from apparatus import schemas

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "6", "--steps", "40", "--T", "10", "--quiet"]
TINY_CIFAR = ["--data", "synthetic", "--synthetic-train", "100", "--synthetic-test", "50"]
TINY_CIFAR += ["--image-size", "8", "--channels", "2", "--batch", "20", "--epochs", "2", "--quiet"]
PHASE = ["phase", "--width", "6", "--A", "1,4", "--T", "10", "--seeds", "2", "--steps", "40"]
PHASE += ["--quiet"]
THRESHOLD = ["threshold", "--widths", "6", "--lrs", "1,2", "--T0", "10", "--steps0", "40"]
THRESHOLD += ["--static-steps", "20", "--hess-every", "5", "--seed", "0", "--quiet"]
DYNAMICS = ["dynamics", *TINY, "--hess-every", "5", "--ntk-every", "5", "--zoom-every", "0"]
ONSET = ["onset", "--width", "6", "--T0", "20", "--periods", "2", "--seed", "0", "--quiet"]
CIFAR_PHASE = ["phase", *TINY_CIFAR, "--A", "1,3", "--T", "4", "--seeds", "1"]
CIFAR_TRAIN = ["train", *TINY_CIFAR, "--A", "3", "--T", "4"]
TRAIN = ["train", *TINY]


def refused(main, argv, capsys):
    """Run a command that must be refused: exit 2, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# Hand-edited or damaged settings files: every field missing, and mistyped
# ---------------------------------------------------------------------------------------------

# (folder, the command that made it, the script, the file, the command that reads it again)
STATE = {
    "spiral-phase": (PHASE, "spiral", "sweep.json", ["merge"]),
    "spiral-threshold": (THRESHOLD, "spiral", "sweep.json", THRESHOLD),
    "spiral-dynamics": (DYNAMICS, "spiral", "sweep.json", DYNAMICS),
    "spiral-onset": (ONSET, "spiral", "sweep.json", ONSET),
    "cifar-phase": (CIFAR_PHASE, "cifar", "sweep.json", ["merge"]),
    "spiral-train": (TRAIN, "spiral", "config.json", TRAIN),
    "cifar-train": (CIFAR_TRAIN, "cifar", "config.json", CIFAR_TRAIN),
}
MAINS = {"spiral": rs.main, "cifar": rc.main}


def declared_fields(kind):
    """The fields the declaration of ``kind`` requires (optional ones aside)."""
    table = schemas.SWEEPS.get(kind) or schemas.RUNS[kind]
    return sorted(name for name in table if not name.endswith("?"))


def wrong_value(value):
    """A value no declared field accepts: an object (every field is a number, a string, a
    boolean or a list)."""
    return {"not": value}


EDITS = [
    (kind, field, how)
    for kind in STATE
    for field in declared_fields(kind)
    for how in ("missing", "mistyped")
]
EDITS += [(kind, "kind", "missing") for kind in STATE] + [
    (kind, "kind", "mistyped") for kind in STATE
]
EDITS += [
    ("spiral-phase", "seed_block", 0),  # no seeds per block
    ("spiral-phase", "seeds", []),
    ("spiral-phase", "A", [1.0, 1.0]),
    ("spiral-phase", "steps", None),
    ("spiral-phase", "lr", float("inf")),
    ("spiral-onset", "conditions", [{"T0": 20.0}]),
    ("spiral-train", "settings", [1, 2]),  # "settings" not an object
    ("cifar-train", "settings", None),
    ("spiral-phase", "extra", 1),  # an unknown field
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished folder of every kind of run and sweep."""
    root = tmp_path_factory.mktemp("made")
    for kind, (argv, script, _, _) in STATE.items():
        assert MAINS[script]([*argv, "--out", str(root / kind)]) == 0
    return root


def edited(made, tmp_path, kind, field, how):
    """A copy of the folder of ``kind`` with its settings file's ``field`` edited."""
    argv, script, name, again = STATE[kind]
    folder = tmp_path / kind
    shutil.copytree(made / kind, folder)
    path = folder / name
    stored = json.loads(path.read_text())
    target = stored if name == "sweep.json" or field in ("kind", "settings") else stored["settings"]
    if how == "missing":
        del target[field]
    elif how == "mistyped":
        target[field] = wrong_value(target[field])
    else:
        target[field] = how
    path.write_text(json.dumps(target if target is stored else stored))
    return folder, script, again


def test_the_table_has_at_least_sixty_new_rows():
    assert len(EDITS) >= 60


@pytest.mark.parametrize("kind,field,how", EDITS, ids=[f"{k}-{f}-{h}" for k, f, h in EDITS])
def test_an_edited_settings_file_is_refused_naming_the_field_and_nothing_is_written(
    made, tmp_path, capsys, kind, field, how
):
    folder, script, again = edited(made, tmp_path, kind, field, how)
    before = snapshot(folder)
    err = refused(MAINS[script], [*again, "--out", str(folder)], capsys)
    assert STATE[kind][2] in err and (f"'{field}'" in err or "'kind'" in err or "settings" in err)
    assert snapshot(folder) == before  # nothing rewritten before the refusal


# ---------------------------------------------------------------------------------------------
# A folder belongs to one run
# ---------------------------------------------------------------------------------------------

WRITERS = {  # every command that writes into --out, with tiny settings
    "train": ("spiral", TRAIN),
    "density": ("spiral", ["density", *TINY, "--at", "0,40"]),
    "phase": ("spiral", PHASE),
    "dynamics": ("spiral", DYNAMICS),
    "threshold": ("spiral", THRESHOLD),
    "onset": ("spiral", ONSET),
    "cifar-train": ("cifar", CIFAR_TRAIN),
    "cifar-phase": ("cifar", CIFAR_PHASE),
}


@pytest.mark.parametrize("command", WRITERS)
def test_a_folder_with_foreign_files_needs_overwrite(tmp_path, capsys, command):
    script, argv = WRITERS[command]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "run.npz").write_bytes(b"a user's own results")
    (out / "notes.txt").write_text("do not lose me")
    before = snapshot(out)
    err = refused(MAINS[script], [*argv, "--out", str(out)], capsys)
    assert "did not write" in err and snapshot(out) == before
    assert MAINS[script]([*argv, "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "do not lose me"  # only our outputs are replaced


@pytest.mark.parametrize("command", ["train", "phase", "cifar-train", "onset"])
def test_a_dangling_symlink_or_an_impossible_name_is_refused(tmp_path, capsys, command):
    script, argv = WRITERS[command]
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    assert "symbolic link" in refused(MAINS[script], [*argv, "--out", str(link)], capsys)
    long = tmp_path / ("x" * 300)
    assert "longer than" in refused(MAINS[script], [*argv, "--out", str(long)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]  # nothing made


EMPTY_ITEMS = [
    ("spiral", [*PHASE, "--A", "1,,4"]),
    ("spiral", [*PHASE, "--T", "10,"]),
    ("spiral", [*THRESHOLD, "--lrs", "1,,2"]),
    ("spiral", [*THRESHOLD, "--widths", ",6"]),
    ("spiral", [*TRAIN, "--seed", "0,,1"]),
    ("spiral", [*ONSET, "--T0", "20,,40"]),
    ("cifar", [*CIFAR_PHASE, "--A", "1,,3"]),
]


@pytest.mark.parametrize(
    "script,argv", EMPTY_ITEMS, ids=[" ".join(a[:1] + a[-2:]) for _, a in EMPTY_ITEMS]
)
def test_an_empty_list_item_is_refused(tmp_path, capsys, script, argv):
    assert "empty item" in refused(MAINS[script], [*argv, "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_colliding_learning_rates_get_their_own_units(tmp_path):
    out = tmp_path / "t"
    argv = [*THRESHOLD, "--lrs", "1,1.0000001", "--out", str(out)]  # the last --lrs counts
    assert rs.main(argv) == 0
    names = sorted(p.name for p in (out / "units").glob("w6_lr1*"))
    assert names == ["w6_lr1.0000001_s00000.npz", "w6_lr1_s00000.npz"]
    thr = load(out / "threshold.npz")
    np.testing.assert_array_equal(thr["lrs"], [1.0, 1.0000001])


def test_a_unit_of_another_sweep_is_redone_not_merged(tmp_path, capsys):
    """Units copied from a sweep with other settings (other --steps) carry another identity:
    merge refuses them, a rerun of the sweep redoes them."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert rs.main([*PHASE, "--out", str(a)]) == 0
    assert rs.main([*PHASE, "--steps", "60", "--out", str(b)]) == 0
    for unit in (a / "units").glob("*.npz"):
        shutil.copy(unit, b / "units" / unit.name)  # the wrong sweep's results
    capsys.readouterr()
    assert "from another sweep" in refused(rs.main, ["merge", "--out", str(b)], capsys)
    assert rs.main([*PHASE, "--steps", "60", "--out", str(b)]) == 0
    assert "from another sweep" in capsys.readouterr().out  # named, then redone
    fresh = tmp_path / "fresh"
    assert rs.main([*PHASE, "--steps", "60", "--out", str(fresh)]) == 0
    x, y = load(b / "phase.npz"), load(fresh / "phase.npz")
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_one_seed_prints_no_nan_interval(tmp_path, capsys):
    assert rs.main([*THRESHOLD, "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out.replace(str(tmp_path), "")
    assert "nan" not in out.lower() and "no interval: one value" in out


def test_the_merge_hint_is_shell_quoted(tmp_path, capsys):
    out = tmp_path / "with space"
    assert rs.main([*PHASE, "--shard", "0/2", "--out", str(out)]) == 0
    assert f"merge --out '{out}'" in capsys.readouterr().out


def test_an_unusable_mplbackend_does_not_break_a_command(tmp_path):
    env = dict(os.environ, MPLBACKEND="no-such-backend")
    r = subprocess.run([sys.executable, str(ROOT / "run_spiral.py"), *TRAIN, "--out", str(tmp_path / "r")],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r" / "run.png").exists()


# ---------------------------------------------------------------------------------------------
# Signals: SIGTERM (a SLURM time limit) and SIGINT (Ctrl-C) mid-run, then resume
# ---------------------------------------------------------------------------------------------

SIGNAL_RUNS = {  # commands of a few seconds, and the file that shows they are under way
    "train": ("run_spiral.py", ["train", "--width", "30", "--steps", "30000", "--T", "300"],
              "config.json"),
    "phase": ("run_spiral.py", ["phase", "--width", "20", "--A", "1,3,5", "--T", "50,70",
                                "--seeds", "4", "--seed-block", "1", "--steps", "6000",
                                "--batch", "4"],
              "units/T000_A000_s00000.npz"),  # six batches: the signal comes in a later one
    "cifar-train": ("run_cifar.py", ["train", *TINY_CIFAR[:-3], "--epochs", "150",
                                     "--checkpoint-every", "1", "--A", "3", "--T", "4"],
                    "checkpoint.npz"),
    "phase-batch": ("run_spiral.py", ["phase", "--width", "50", "--A", "1,20", "--T", "100",
                                      "--seeds", "4", "--seed-block", "2", "--steps", "30000"],
                    "sweep.json"),  # stopped mid-batch: the batch in flight is checkpointed
}  # fmt: skip
SIGNAL_DELAY = {"phase-batch": 3.0}  # seconds after the marker before the signal (default 0.3)
SIGNAL_WAIT = 60  # seconds to wait for a run to get under way


def start(script, argv, out):
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *argv, "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("run", SIGNAL_RUNS)
def test_a_signal_ends_the_run_in_one_line_and_a_rerun_resumes_it_bit_for_bit(tmp_path, run, sig):
    script, argv, marker = SIGNAL_RUNS[run]
    out = tmp_path / "stopped"
    proc = start(script, argv, out)
    deadline = time.time() + SIGNAL_WAIT
    while not (out / marker).exists() and time.time() < deadline:  # under way, some work stored
        time.sleep(0.05)
    time.sleep(SIGNAL_DELAY.get(run, 0.3))
    assert proc.poll() is None, "the run ended before the signal: make it longer"
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 5, "the run took too long to stop"
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted by " + signal.Signals(sig).name in lines[0], err
    assert "rerun the same command to resume" in lines[0] and "Traceback" not in err
    leftovers = [p for p in out.rglob(".tmp-*")]
    assert not leftovers, leftovers
    if run == "phase-batch":  # the networks at the step they reached, not the batch's start
        assert "the batch in flight (4 units at step" in lines[0], lines[0]
        assert len(list((out / "work").glob("batch-*.npz"))) == 1
    again = start(script, argv, out)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    whole = start(script, argv, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    name = "phase.npz" if run.startswith("phase") else "run.npz"
    if run == "phase-batch":
        assert not list((out / "work").glob("batch-*.npz"))  # done: the checkpoint is gone
    resumed, uninterrupted = load(out / name), load(tmp_path / "whole" / name)
    assert sorted(resumed) == sorted(uninterrupted)
    for k in resumed:
        np.testing.assert_array_equal(resumed[k], uninterrupted[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Two commands on one folder at once
# ---------------------------------------------------------------------------------------------

CONCURRENT = ["phase", "--width", "20", "--A", "1,3", "--T", "50,70", "--seeds", "4",
              "--seed-block", "1", "--steps", "3000", "--quiet"]  # fmt: skip


def test_two_identical_commands_and_two_shards_at_once(tmp_path):
    """The same phase twice at once: one runs, the other refuses in one line (or, started after
    the first finished, finds nothing to do); two shards at once both run; every merge equals an
    unsharded run."""
    run = lambda out, *extra: subprocess.Popen(
        [sys.executable, str(ROOT / "run_spiral.py"), *CONCURRENT, *extra, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    twins = [run(tmp_path / "twice") for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in twins)
    errs = [p.stderr.read() for p in twins]
    assert codes[0] == 0 and codes[1] in (0, 2), errs
    if codes[1] == 2:
        assert any("another process is running this same command" in e for e in errs), errs
    shards = [run(tmp_path / "shards", "--shard", f"{i}/2") for i in range(2)]
    assert [p.wait(timeout=300) for p in shards] == [0, 0], [p.stderr.read() for p in shards]
    assert rs.main(["merge", "--out", str(tmp_path / "shards")]) == 0
    whole = run(tmp_path / "whole")
    assert whole.wait(timeout=300) == 0
    reference = load(tmp_path / "whole" / "phase.npz")
    for folder in ("twice", "shards"):
        got = load(tmp_path / folder / "phase.npz")
        for k in reference:
            np.testing.assert_array_equal(got[k], reference[k], err_msg=f"{folder} {k}")


def test_two_cifar_phases_at_once_share_the_work(tmp_path):
    """The case of a "No such file" crash: the same CIFAR phase started twice at once."""
    argv = [sys.executable, str(ROOT / "run_cifar.py"), *CIFAR_PHASE[:-2], "--seeds", "2",
            "--epochs", "6", "--quiet", "--out", str(tmp_path / "c")]  # fmt: skip
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]  # fmt: skip
    codes = sorted(p.wait(timeout=300) for p in procs)
    errs = [p.stderr.read() for p in procs]
    assert codes[0] == 0 and codes[1] in (0, 2), errs
    assert all("Traceback" not in e and "No such file" not in e for e in errs), errs
    if codes[1] != 0:
        assert rc.main(["merge", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "phase.npz").exists()


# ---------------------------------------------------------------------------------------------
# The one validation layer: every subcommand of both scripts goes through its check
# ---------------------------------------------------------------------------------------------


def subcommands(parser):
    """{name: the subparser} of every subcommand of an argparse parser."""
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


@pytest.mark.parametrize("script", ["spiral", "cifar"])
def test_every_subcommand_passes_through_its_check(script):
    parser = {"spiral": rs.build_parser, "cifar": rc.build_parser}[script]()
    commands = subcommands(parser)
    assert len(commands) >= (10 if script == "spiral" else 4)
    for name, sub in commands.items():
        func = sub.get_default("func")
        assert callable(getattr(func, "check", None)), f"{script} {name} has no check"


def test_a_command_without_a_check_does_not_run(tmp_path):
    from apparatus.cli import Parser, run_main

    ran = []
    parser = Parser(prog="x")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("bare").set_defaults(func=lambda args, plan=None: ran.append(1))
    with pytest.raises(RuntimeError, match="has no check"):
        run_main(parser, ["bare"], "x")
    assert not ran


def test_a_plan_above_the_machine_and_a_memory_error_end_in_one_line(capsys):
    from apparatus.cli import Parser, command, run_main

    def huge(args):
        return {"memory": 10**18, "what": "this plan"}

    def fits(args):
        return {"memory": 1, "what": "this plan"}

    def out_of_memory(args, plan):
        raise MemoryError

    parser = Parser(prog="x")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("huge").set_defaults(func=command(huge)(lambda args, plan: 0))
    sub.add_parser("oom").set_defaults(func=command(fits)(out_of_memory))
    for argv, code, text in ((["huge"], 2, "this plan needs about"), (["oom"], 1, "out of memory")):
        with pytest.raises(SystemExit) as e:
            run_main(parser, argv, "x")
        err = capsys.readouterr().err.strip()
        assert e.value.code == code and text in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------
# Locks on the normalised work, stored state read under the lock, the tool's own leftovers
# ---------------------------------------------------------------------------------------------


def test_the_same_shard_written_two_ways_is_one_piece_of_work(tmp_path):
    """--shard 0/1 and --shard 00/01 name the same work: one runs, the other is refused."""
    argv = [*CONCURRENT[:-1], "--steps", "30000", "--quiet", "--out", str(tmp_path / "s")]
    run = lambda shard: subprocess.Popen(
        [sys.executable, str(ROOT / "run_spiral.py"), *argv, "--shard", shard],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    first = run("0/1")
    deadline = time.time() + SIGNAL_WAIT
    while not list(tmp_path.glob("s/.lock-*")) and time.time() < deadline:
        time.sleep(0.05)
    second = run("00/01")
    assert second.wait(timeout=120) == 2, second.stderr.read()
    assert "another process is running this same command" in second.stderr.read()
    first.kill()
    first.wait()


def test_two_onset_commands_adding_conditions_at_once_both_land(tmp_path):
    out = tmp_path / "o"
    run = lambda lr: subprocess.Popen(
        [sys.executable, str(ROOT / "run_spiral.py"), *ONSET, "--lrs", lr, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    procs = [run("1"), run("2")]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    lrs = sorted(c["lr"] for c in json.loads((out / "sweep.json").read_text())["conditions"])
    assert lrs == [1.0, 2.0]


def test_a_folder_holding_only_this_tools_leftovers_is_taken_over(tmp_path, capsys):
    out = tmp_path / "left"
    out.mkdir()
    (out / ".lock").write_text("")
    (out / ".tmp-abc.json").write_text("{")  # a SIGKILL during the very first write
    assert rs.main([*PHASE, "--out", str(out)]) == 0
    assert "taking it over" in capsys.readouterr().out
    assert (out / "phase.npz").exists()


def test_networks_with_non_finite_parameters_are_counted_as_diverged(tmp_path, capsys):
    out = tmp_path / "p"
    assert rs.main([*PHASE, "--out", str(out)]) == 0
    unit = sorted((out / "units").glob("*.npz"))[-1]
    arrays = dict(np.load(unit))
    arrays["W1"] = np.full_like(arrays["W1"], np.nan)  # NaN, not marked diverged
    np.savez(unit, **arrays)
    capsys.readouterr()
    for argv in (["merge", "--out", str(out)], ["reeval", "--out", str(out), "--val", "inner"]):
        assert rs.main(argv) == 0
        said = capsys.readouterr().out
        assert "not finite but were not marked diverged" in said and unit.stem in said
    phase = load(out / "phase.npz")
    assert (phase["diverged_step"] >= 0).sum() == len(arrays["W1"])
    assert np.isnan(load(out / "phase-val-inner.npz")["val_acc"]).sum() == len(arrays["W1"])


# ---------------------------------------------------------------------------------------------
# Signals at random instants: startup, worker pools, writes, figures; never a traceback
# ---------------------------------------------------------------------------------------------

SCAN_RUNS = {  # commands of a few seconds that pass through imports, workers, npz and figures
    "train": ("run_spiral.py", ["train", "--width", "30", "--steps", "3000", "--T", "300"]),
    "phase": (
        "run_spiral.py",
        [
            "phase",
            "--width",
            "20",
            "--A",
            "1,3",
            "--T",
            "50",
            "--seeds",
            "4",
            "--seed-block",
            "1",
            "--steps",
            "2000",
        ],
    ),  # fmt: skip
    "threshold": ("run_spiral.py", THRESHOLD[:-1]),
    "cifar-train": (
        "run_cifar.py",
        ["train", *TINY_CIFAR[:-3], "--epochs", "4", "--A", "3", "--T", "4"],
    ),  # fmt: skip
}
SCAN_INSTANTS = 6  # signal instants per command, uniform over its whole duration (seeded) ...
SCAN_FROM = 0.25  # ... from this many seconds on: before the interpreter reaches the script's
# first line (Python's own start-up, tens of milliseconds, longer on a busy machine), a signal
# takes its default action (apparatus/signals.py)
SCAN_SEED = 20261208


@pytest.mark.parametrize("name", SCAN_RUNS)
def test_a_signal_at_any_instant_ends_in_one_line_without_a_traceback(tmp_path, name):
    script, argv = SCAN_RUNS[name]
    cmd = lambda out: [sys.executable, str(ROOT / script), *argv, "--quiet", "--out", str(out)]
    t0 = time.time()
    whole = subprocess.run(cmd(tmp_path / "whole"), capture_output=True, text=True, cwd=ROOT)
    duration = time.time() - t0
    assert whole.returncode == 0, whole.stderr
    rng = np.random.default_rng([SCAN_SEED, len(name)])
    for k, at in enumerate(rng.uniform(SCAN_FROM, duration, SCAN_INSTANTS)):
        sig = (signal.SIGTERM, signal.SIGINT)[k % 2]
        proc = subprocess.Popen(cmd(tmp_path / f"cut-{k}"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
        time.sleep(at)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, f"{name}, {sig.name} at {at:.2f} s: {err}"
        assert proc.returncode in (0, 128 + sig), f"{name} at {at:.2f} s: {err}"
        if proc.returncode:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and f"interrupted by {sig.name}" in lines[0], err
