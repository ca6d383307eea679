"""run_cifar.py: schedules, the training loop, checkpoints and resume, phase sweeps, refusals.

Everything runs on tiny synthetic data (8x8 images, Myrtle5 with 2-4 channels) in float64.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same, load

import protocol
import run_cifar as rc
import spectra
from apparatus import cifar_files as cifar
from apparatus import cifar_runs, sweeps, synthetic
from dynloss import class_weights
from models import MYRTLE5_PARAM_NAMES, init_myrtle5, myrtle5_loss_and_grads, nesterov_step

ROOT = Path(__file__).resolve().parents[1]
EXACT = 1e-12  # the same float64 arithmetic in another order of calls: equal up to rounding
LR_RTOL = 1e-12  # the schedule is a few float64 operations
EIG_RTOL = 1e-6  # eigsh's tolerance (spectra.EIGSH_TOL) bounds the eigenvalue's relative error
SPE_PAPER = 97  # CIFAR-10: 50000 // 512 steps per epoch

TINY = [
    "--data",
    "synthetic",
    "--synthetic-train",
    "200",
    "--synthetic-test",
    "100",
    "--image-size",
    "8",
    "--channels",
    "3",
    "--batch",
    "20",
    "--dtype",
    "float64",
    "--quiet",
]


def settings_for(argv):
    """The resolved settings of a ``train`` command line (what the trainer uses), from the
    options of cifar_runs.DEFAULTS overridden by ``argv`` (--name value pairs)."""
    opts = dict(cifar_runs.DEFAULTS, A=50.0, T=100.0, seed=0, hess_every=0, hess_batch=512)
    flags = [a for a in argv if a != "--quiet"]
    for key, value in zip(flags[::2], flags[1::2], strict=True):
        name = key.removeprefix("--").replace("-", "_")
        default = cifar_runs.PAPER_PROTOCOL.get(name) if opts[name] is None else opts[name]
        if name in ("peak_epoch", "stop_epoch"):  # default None: a float when given
            opts[name] = float(value)
        else:
            opts[name] = (
                value if default is None or isinstance(default, str) else type(default)(value)
            )
    s = cifar_runs.resolve_settings(argparse.Namespace(**opts))
    s.update(A=opts["A"], T=opts["T"], seed=opts["seed"], hess_every=0, hess_batch=None)
    return s


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def test_learning_rate_of_the_paper_protocol():
    epochs = np.array([0, 300, 600, 700])
    lr = protocol.lr_at(epochs * SPE_PAPER, SPE_PAPER)
    expected = [0.0, 0.02, 0.002 + (0.02 - 0.002) * 100 / 400, 0.002]
    np.testing.assert_allclose(lr, expected, rtol=LR_RTOL, atol=0)
    assert expected[2] == pytest.approx(0.0065, rel=LR_RTOL)
    # per step, not per epoch: linear in the fractional epoch
    assert protocol.lr_at(1, SPE_PAPER) == pytest.approx(0.02 / (300 * SPE_PAPER), rel=LR_RTOL)
    assert protocol.lr_at(150 * SPE_PAPER + 48, SPE_PAPER) == pytest.approx(
        0.02 * (150 + 48 / SPE_PAPER) / 300, rel=LR_RTOL
    )
    # the defaults are the protocol
    s = settings_for(["--data", "synthetic"])
    assert (s["epochs"], s["peak_epoch"], s["stop_epoch"]) == (700, 300, 600)
    assert (s["batch"], s["lr_peak"], s["lr_final"], s["momentum"], s["channels"]) == (
        512,
        0.02,
        0.002,
        0.9,
        64,
    )


def test_schedule_is_scaled_to_a_short_run():
    s = settings_for(["--data", "synthetic", "--epochs", "7"])
    assert (s["peak_epoch"], s["stop_epoch"]) == (3, 6)
    spe = 10
    lr = protocol.step_lrs(s, spe, 0, 71)
    np.testing.assert_allclose(
        lr[[0, 30, 60, 70]], [0.0, 0.02, 0.0065, 0.002], rtol=LR_RTOL, atol=0
    )
    assert np.argmax(lr) == 30 and (np.diff(lr[:31]) > 0).all() and (np.diff(lr[30:]) < 0).all()
    # explicit epochs win over the scaling
    s = settings_for(["--data", "synthetic", "--epochs", "7", "--peak-epoch", "1"])
    assert s["peak_epoch"] == 1 and s["stop_epoch"] == 6
    assert protocol.step_lrs(s, spe, 10, 11)[0] == 0.02


def test_gamma_is_one_from_the_stop_step_on_and_not_before():
    s = settings_for(["--data", "synthetic", "--epochs", "7", "--A", "5", "--T", "7"])
    spe, K = 10, 10
    assert protocol.stop_step(s, spe) == 60
    gam = protocol.step_gammas(s, spe, 0, 70, K)  # (70, K)
    np.testing.assert_allclose(gam.sum(axis=1), K, rtol=EXACT)
    assert (gam[60:] == 1.0).all()
    assert not (gam[59] == 1.0).all()
    # before the stop every step but the period starts (t_T = 0, where f = 1) is tilted
    tilted = ~(gam == 1.0).all(axis=1)
    np.testing.assert_array_equal(tilted[:60], np.arange(60) % 7 != 0)
    np.testing.assert_allclose(gam[:60], class_weights(np.arange(60), 5.0, 7.0, K), rtol=EXACT)


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


def test_train_writes_run_config_and_figure(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "7", "--A", "5", "--T", "7", "--out", str(out)]
    assert rc.main(["train", *argv]) == 0
    z = load(out / "run.npz")
    E, K = 7, 10
    for f in (*cifar_runs.HIST_FIELDS, "epoch", "step"):
        assert z[f].shape == (E + 1,), f
    assert z["gamma"].shape == (E + 1, K)
    assert int(z["steps_per_epoch"]) == 10 and int(z["stop_step"]) == 60
    np.testing.assert_array_equal(z["step"], np.arange(E + 1) * 10)
    # accuracy history: every epoch, in [0, 1]; the batch means start after the first epoch
    for f in ("train_acc", "test_acc"):
        assert np.isfinite(z[f]).all() and (z[f] >= 0).all() and (z[f] <= 1).all()
    assert np.isnan(z["batch_loss"][0]) and np.isfinite(z["batch_loss"][1:]).all()
    assert np.isnan(z["hess_top"]).all()
    # Gamma of each row's next update: tilted before the stop epoch, 1 from it on
    assert (z["gamma"][6:] == 1.0).all() and not (z["gamma"][1:6] == 1.0).all(axis=1).any()
    np.testing.assert_allclose(z["gamma"][:6].sum(axis=1), K, rtol=EXACT)
    assert z["W2"].shape == (3, 3, 3, 3) and int(z["diverged_epoch"]) == -1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["status"] == "done" and cfg["settings"]["A"] == 5.0
    assert cfg["settings"]["stop_epoch"] == 6 and "numpy" in cfg["versions"]
    assert cfg["final"]["val_acc"] == z["test_acc"][-1]
    assert (out / "run.png").stat().st_size > 1000
    assert (out / cifar_runs.CHECKPOINT_NAME).exists()


def test_training_replays_by_hand(tmp_path):
    """The trainer equals a plain loop: SeedSequence streams, a permutation per epoch, partial
    batch dropped, lr_at per step, Gamma stopped at round(stop_epoch * steps per epoch)."""
    argv = [*TINY, "--epochs", "3", "--A", "6", "--T", "4", "--seed", "5", "--batch", "30"]
    assert rc.main(["train", *argv, "--out", str(tmp_path / "r")]) == 0
    z = load(tmp_path / "r" / "run.npz")
    s = settings_for(argv)
    data = cifar_runs.load_data(s, None)
    x, y = data["x_train"], data["y_train"]
    init_seq, shuffle_seq = np.random.SeedSequence(5).spawn(2)
    params = init_myrtle5(np.random.default_rng(init_seq), c=3, dtype=np.float64)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(shuffle_seq)
    spe = 200 // 30  # 6 steps, 20 images left out per epoch
    stop = round(s["stop_epoch"] * spe)
    t = 0
    for _ in range(3):
        perm = rng.permutation(200)
        for i in range(spe):
            idx = perm[i * 30 : (i + 1) * 30]
            gamma = class_weights(t, 6.0, 4.0, 10, stop)
            e, peak = t / spe, 3 * 300 / 700  # fractional epoch; the peak scaled to 3 epochs
            lr = 0.02 * e / peak if e < peak else 0.02 + (0.002 - 0.02) * (e - peak) / (3 - peak)
            _, grads, _ = myrtle5_loss_and_grads(params, x[idx], y[idx], gamma)
            nesterov_step(params, grads, velocity, lr, 0.9)
            t += 1
    for k in MYRTLE5_PARAM_NAMES:
        np.testing.assert_allclose(z[k], params[k], rtol=EXACT, atol=EXACT, err_msg=k)


def test_same_command_same_result_and_resume_of_a_finished_run(tmp_path, capsys):
    argv = ["train", *TINY, "--epochs", "4", "--A", "3", "--T", "5"]
    assert rc.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert rc.main([*argv, "--out", str(tmp_path / "b"), "--checkpoint-every", "3"]) == 0
    a = load(tmp_path / "a" / "run.npz")
    assert_same(a, load(tmp_path / "b" / "run.npz"))
    capsys.readouterr()
    assert rc.main([*argv, "--out", str(tmp_path / "a")]) == 0  # finished: outputs rewritten
    assert "resuming" in capsys.readouterr().out
    assert_same(a, load(tmp_path / "a" / "run.npz"))


KILL_ARGS = [
    *TINY,
    "--synthetic-train",
    "1000",
    "--epochs",
    "16",
    "--A",
    "4",
    "--T",
    "9",
    "--checkpoint-every",
    "1",
]


def kill_after_first_checkpoint(command, out, checkpoint, extra=()):
    """Run ``run_cifar.py command KILL_ARGS extra --out out``, SIGKILL it once ``checkpoint``
    exists and check that it was killed part-way; returns the command line to rerun."""
    cmd = [sys.executable, str(ROOT / "run_cifar.py"), command, *KILL_ARGS, *extra]
    cmd += ["--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not checkpoint.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 60 s"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert 1 <= int(np.load(checkpoint)["epoch"]) < 16  # killed part-way through the run
    return cmd


def rerun_resumes(cmd):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout  # from the checkpoint, not from scratch


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    cmd = kill_after_first_checkpoint("train", killed, killed / cifar_runs.CHECKPOINT_NAME)
    assert not (killed / "run.npz").exists()
    rerun_resumes(cmd)
    assert rc.main(["train", *KILL_ARGS, "--out", str(tmp_path / "clean")]) == 0
    assert_same(load(tmp_path / "clean" / "run.npz"), load(killed / "run.npz"))


def test_archive_path_and_environment_variable(tmp_path, monkeypatch):
    archive = tmp_path / cifar.ARCHIVE_NAME
    md5 = synthetic.write_synthetic_archive(archive, 40, 50, np.random.default_rng(3), image_size=8)
    argv = [*TINY[2:], "--epochs", "2", "--A", "2", "--T", "3"]  # TINY without --data synthetic
    assert (
        rc.main(
            ["train", "--data", str(archive), "--md5", md5, *argv, "--out", str(tmp_path / "a")]
        )
        == 0
    )
    z = load(tmp_path / "a" / "run.npz")
    assert int(z["steps_per_epoch"]) == 200 // 20 and np.isfinite(z["test_acc"]).all()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["settings"]["data"] == "cifar10" and cfg["settings"]["md5"] == md5
    assert str(archive) in cfg["data_source"]
    # the same archive found through $CIFAR10_PATH (its folder) gives the same run
    monkeypatch.setenv(cifar.ENV_VAR, str(tmp_path))
    assert rc.main(["train", "--md5", md5, *argv, "--out", str(tmp_path / "b")]) == 0
    assert_same(z, load(tmp_path / "b" / "run.npz"))


def test_top_hessian_eigenvalue_every_epoch(tmp_path):
    from models import myrtle5_flatten, myrtle5_hvp

    argv = [*TINY, "--epochs", "2", "--channels", "2", "--hess-every", "1", "--hess-batch", "40"]
    assert rc.main(["train", *argv, "--out", str(tmp_path / "h")]) == 0
    z = load(tmp_path / "h" / "run.npz")
    assert np.isfinite(z["hess_top"]).all() and z["hess_top"].shape == (3,)
    # the last row against a dense Hessian built column by column from the exact HVP
    s = settings_for(argv)
    data = cifar_runs.load_data(s, None, hess_batch=40)
    params = {k: z[k] for k in MYRTLE5_PARAM_NAMES}
    P = myrtle5_flatten(params).size
    H = np.stack(
        [myrtle5_hvp(params, data["x_hess"], data["y_hess"], z["gamma"][-1], e) for e in np.eye(P)]
    )
    assert spectra.EIGSH_TOL <= EIG_RTOL
    np.testing.assert_allclose(z["hess_top"][-1], np.linalg.eigvalsh(H)[-1], rtol=EIG_RTOL)


# ---------------------------------------------------------------------------------------------
# Phase sweeps
# ---------------------------------------------------------------------------------------------

PHASE = [
    "--data",
    "synthetic",
    "--synthetic-train",
    "100",
    "--synthetic-test",
    "50",
    "--image-size",
    "8",
    "--channels",
    "2",
    "--batch",
    "25",
    "--epochs",
    "2",
    "--dtype",
    "float64",
    "--A",
    "1,4",
    "--T",
    "3,5",
    "--seeds",
    "2",
    "--quiet",
]


def test_sharded_and_merged_phase_equals_unsharded(tmp_path):
    assert rc.main(["phase", *PHASE, "--out", str(tmp_path / "whole")]) == 0
    for i in range(3):
        assert rc.main(["phase", *PHASE, "--shard", f"{i}/3", "--out", str(tmp_path / "sh")]) == 0
    assert not (tmp_path / "sh" / "phase.npz").exists()  # shards do not merge by themselves
    assert rc.main(["merge", "--out", str(tmp_path / "sh")]) == 0
    whole = load(tmp_path / "whole" / "phase.npz")
    assert_same(whole, load(tmp_path / "sh" / "phase.npz"))
    for f in sweeps.PHASE_FIELDS:
        assert whole[f].shape == (2, 2, 2) and np.isfinite(whole[f]).all(), f  # (T, A, seeds)
        np.testing.assert_allclose(whole[f + "_mean"], whole[f].mean(axis=2), rtol=EXACT)
        np.testing.assert_allclose(whole[f + "_std"], whole[f].std(axis=2), rtol=EXACT)
    np.testing.assert_array_equal(whole["A"], [1, 4])
    np.testing.assert_array_equal(whole["T"], [3, 5])
    assert whole["val_acc_history"].shape == (2, 2, 2, 3)
    assert (tmp_path / "whole" / "phase.png").stat().st_size > 1000
    assert not os.listdir(tmp_path / "whole" / "work")  # finished units leave no checkpoints
    # a rerun finds every unit done
    assert rc.main(["phase", *PHASE, "--out", str(tmp_path / "whole")]) == 0
    assert_same(whole, load(tmp_path / "whole" / "phase.npz"))
    # a cell's seed is the ``train`` run with the same settings
    train = [*PHASE[:16], "--A", "4", "--T", "5", "--seed", "1", "--train-eval-every", "0"]
    assert rc.main(["train", *train, "--quiet", "--out", str(tmp_path / "t")]) == 0
    z = load(tmp_path / "t" / "run.npz")
    assert whole["val_acc"][1, 1, 1] == z["test_acc"][-1]
    assert whole["train_acc"][1, 1, 1] == z["train_acc"][-1]
    np.testing.assert_array_equal(whole["val_acc_history"][1, 1, 1], z["test_acc"])


def test_phase_resumes_a_killed_unit_from_its_checkpoint(tmp_path):
    """A sweep killed (SIGKILL) in the middle of a run resumes that run from its checkpoint in
    OUT/work/<unit>/ and ends with exactly the uninterrupted sweep's results."""
    killed = tmp_path / "killed"
    checkpoint = killed / "work" / "T000_A000_s00000" / cifar_runs.CHECKPOINT_NAME
    cmd = kill_after_first_checkpoint("phase", killed, checkpoint, extra=["--seeds", "1"])
    assert not (killed / "phase.npz").exists()
    rerun_resumes(cmd)
    assert rc.main(["phase", *KILL_ARGS, "--seeds", "1", "--out", str(tmp_path / "clean")]) == 0
    assert_same(load(tmp_path / "clean" / "phase.npz"), load(killed / "phase.npz"))


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        rc.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "bad,msg",
    [
        (["--A", "0.5"], "argument --A: must be a finite number >= 1"),
        (["--T", "0"], "argument --T: must be a finite number >= 1"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1"),
        (["--epochs", "ten"], "--epochs"),
        (["--batch", "-1"], "argument --batch: must be an integer >= 1"),
        (["--batch", "500"], "larger than the 200 training images"),
        (["--lr-peak", "0"], "argument --lr-peak: must be a finite number >= 1e-12"),
        (["--lr-peak", "nan"], "argument --lr-peak: must be a finite number >= 1e-12"),
        (["--lr-final", "-0.1"], "argument --lr-final: must be a finite number >= 0"),
        (["--image-size", "12"], "multiples of 8"),
        (["--synthetic-train", "201"], "multiple of 5"),
        (["--peak-epoch", "0"], "--peak-epoch"),
        (["--stop-epoch", "800"], "--stop-epoch"),
        (["--momentum", "1"], "--momentum"),
        (["--dtype", "float16"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--channels", "0"], "--channels"),
        (["--seed", "-1"], "--seed"),
        (["--data", "/nonexistent/cifar"], "does not exist"),
        (["--data", "/nonexistent/c.tar.gz", "--md5", "xyz"], "--md5"),
    ],
)
def test_bad_train_input_is_refused_in_one_line_and_nothing_written(tmp_path, capsys, bad, msg):
    out = tmp_path / "out"
    err = refused(capsys, ["train", *TINY, "--epochs", "2", *bad, "--out", str(out)])
    assert msg in err
    assert not out.exists()


def test_wrong_md5_is_refused_before_any_work(tmp_path, capsys):
    archive = tmp_path / cifar.ARCHIVE_NAME
    synthetic.write_synthetic_archive(archive, 4, 5, np.random.default_rng(0), image_size=8)
    out = tmp_path / "out"
    err = refused(capsys, ["train", "--data", str(archive), "--out", str(out)])
    assert "md5 mismatch" in err and cifar.OFFICIAL_MD5 in err
    assert not out.exists()


def test_out_that_is_a_file_and_other_settings_in_the_same_out_are_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in refused(capsys, ["train", *TINY, "--out", str(f)])
    assert f.read_text() == "x"
    out = tmp_path / "run"
    assert rc.main(["train", *TINY, "--epochs", "2", "--A", "2", "--out", str(out)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    err = refused(capsys, ["train", *TINY, "--epochs", "2", "--A", "3", "--out", str(out)])
    assert "holds another cifar-train run" in err and "A" in err
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


@pytest.mark.parametrize(
    "bad,msg",
    [
        (["--shard", "3/3"], "--shard"),
        (["--shard", "x"], "--shard"),
        (["--A", "0.5,2"], "--A must be a finite number >= 1"),
        (["--T", "a,b"], "--T"),
        (["--seeds", "0"], "--seeds"),
    ],
)
def test_bad_phase_input_is_refused_in_one_line_and_nothing_written(tmp_path, capsys, bad, msg):
    out = tmp_path / "out"
    assert msg in refused(capsys, ["phase", *PHASE, *bad, "--out", str(out)])
    assert not out.exists()


def test_merge_of_an_unfinished_or_different_sweep_is_refused(tmp_path, capsys):
    out = tmp_path / "p"
    assert rc.main(["phase", *PHASE, "--shard", "0/4", "--out", str(out)]) == 0
    assert "not done yet" in refused(capsys, ["merge", "--out", str(out)])
    err = refused(capsys, ["phase", *PHASE, "--epochs", "3", "--out", str(out)])
    assert "different sweep" in err and "epochs" in err


def test_script_runs_as_a_command(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "run_cifar.py"), "train", *TINY, "--epochs", "1"]
        + ["--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "run.png" in r.stdout and "test acc" in r.stdout


def test_phase_with_progress_output_runs(tmp_path, capsys):
    """Without --quiet every finished unit prints its accuracies (a crash there once)."""
    args = [a for a in PHASE if a != "--quiet"]
    assert rc.main(["phase", *args, "--seeds", "1", "--out", str(tmp_path / "p")]) == 0
    assert "train acc" in capsys.readouterr().out
