"""Phase-diagram sweeps: shards, merge, resume after SIGKILL, refused inputs, the benchmark."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same, load

import run_spiral as rs
from apparatus import sweeps

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--A",
    "1,8",
    "--T",
    "20,50",
    "--seeds",
    "3",
    "--seed-block",
    "2",
    "--steps",
    "300",
    "--width",
    "12",
    "--quiet",
]
FIELDS = ("train_acc", "val_acc", "train_loss", "val_loss", "diverged_step")


def test_sharded_and_merged_equals_unsharded(tmp_path):
    assert rs.main(["phase", *SMALL, "--out", str(tmp_path / "whole")]) == 0
    for i in range(3):
        assert rs.main(["phase", *SMALL, "--shard", f"{i}/3", "--out", str(tmp_path / "sh")]) == 0
    assert not (tmp_path / "sh" / "phase.npz").exists()  # shards do not merge by themselves
    assert rs.main(["merge", "--out", str(tmp_path / "sh")]) == 0
    whole = load(tmp_path / "whole" / "phase.npz")
    assert_same(whole, load(tmp_path / "sh" / "phase.npz"))
    assert whole["train_acc"].shape == (2, 2, 3)  # (T, A, seeds)
    np.testing.assert_array_equal(whole["A"], [1, 8])
    np.testing.assert_array_equal(whole["T"], [20, 50])
    assert (tmp_path / "whole" / "phase.png").stat().st_size > 1000


def test_cells_equal_single_training_runs(tmp_path):
    """A cell's seed equals ``train`` with the same settings (the batched trainer is exact)."""
    assert rs.main(["phase", *SMALL, "--out", str(tmp_path / "p")]) == 0
    ph = load(tmp_path / "p" / "phase.npz")
    assert (
        rs.main(
            [
                "train",
                "--A",
                "8",
                "--T",
                "50",
                "--steps",
                "300",
                "--width",
                "12",
                "--seed",
                "2",
                "--log-every",
                "300",
                "--quiet",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    run = load(tmp_path / "t" / "run.npz")
    assert ph["train_acc"][1, 1, 2] == run["train_acc"][-1]
    assert ph["val_acc"][1, 1, 2] == run["val_acc"][-1]
    assert ph["train_loss"][1, 1, 2] == run["loss_static"][-1]
    assert ph["val_loss"][1, 1, 2] == run["val_loss"][-1]


def test_sweep_killed_then_rerun_equals_uninterrupted(tmp_path):
    args = [
        "--A",
        "1,4,8",
        "--T",
        "20,50",
        "--seeds",
        "2",
        "--seed-block",
        "1",
        "--steps",
        "6000",
        "--width",
        "30",
        "--batch",
        "1",
        "--quiet",
    ]
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "run_spiral.py"), "phase", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    units = out / "units"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some, but not all, units are on disk
        n = len(list(units.glob("T*.npz"))) if units.exists() else 0
        if n >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(units.glob("T*.npz")))
    assert 2 <= done < 12, "the sweep should have been killed part-way"
    assert not (out / "phase.npz").exists()
    assert rs.main(["phase", *args, "--out", str(out)]) == 0  # resumes: runs only what is left
    assert rs.main(["phase", *args, "--out", str(tmp_path / "clean")]) == 0
    assert_same(load(out / "phase.npz"), load(tmp_path / "clean" / "phase.npz"))
    assert not list(units.glob(".tmp-*"))  # no half-written file survives


def test_rerun_skips_finished_units(tmp_path, capsys):
    assert rs.main(["phase", *SMALL, "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert rs.main(["phase", *SMALL, "--out", str(tmp_path / "p")]) == 0
    assert "0 of 8 units to run" in capsys.readouterr().out


def test_diverged_runs_are_counted_and_the_sweep_goes_on(tmp_path, capsys):
    args = [
        "--A",
        "1",
        "--T",
        "10",
        "--seeds",
        "2",
        "--seed-block",
        "2",
        "--steps",
        "50",
        "--width",
        "10",
        "--lr",
        "1e4",
        "--loss",
        "mse",
        "--quiet",
    ]
    assert rs.main(["phase", *args, "--out", str(tmp_path / "d")]) == 0
    ph = load(tmp_path / "d" / "phase.npz")
    assert ph["diverged"][0, 0] == 2 and (ph["diverged_step"] >= 0).all()
    assert np.isnan(ph["train_acc"]).all()  # no accuracy is reported for a diverged run
    assert "nan/nan!2" in capsys.readouterr().out  # the table flags the cell


@pytest.mark.parametrize(
    "bad,msg",
    [
        (["--A", "0.5,2"], "--A must be a finite number >= 1"),
        (["--A", "1,x"], "--A: expected a finite number >= 1"),
        (["--A", ""], "--A: the list is empty"),
        (["--T", "0,5"], "--T must be a finite number >= 1"),
        (["--T", "50,50"], "repeated values"),
        (["--shard", "3/2"], "need 0 <= i < n"),
        (["--shard", "1"], "--shard must look like i/n"),
        (["--shard=-1/2"], "need 0 <= i < n"),
        (["--seeds", "0"], "argument --seeds: must be an integer >= 1"),
        (["--width", "-5"], "argument --width: must be an integer >= 1"),
        (["--T", "5000"], "leaves no oscillating steps"),
    ],
)
def test_bad_grid_or_shard_is_refused_before_anything_runs(tmp_path, capsys, bad, msg):
    out = tmp_path / "p"
    with pytest.raises(SystemExit) as e:
        rs.main(["phase", *SMALL, *bad, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_different_sweep_in_the_same_folder_is_refused(tmp_path, capsys):
    assert rs.main(["phase", *SMALL, "--out", str(tmp_path / "p")]) == 0
    with pytest.raises(SystemExit):
        rs.main(["phase", *SMALL, "--lr", "0.5", "--out", str(tmp_path / "p")])
    assert "holds a different sweep (differs in: lr)" in capsys.readouterr().err


def test_merge_refuses_an_unfinished_sweep(tmp_path, capsys):
    assert rs.main(["phase", *SMALL, "--shard", "0/2", "--out", str(tmp_path / "p")]) == 0
    with pytest.raises(SystemExit):
        rs.main(["merge", "--out", str(tmp_path / "p")])
    assert "4 of 8 units are not done yet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rs.main(["merge", "--out", str(tmp_path / "nothing")])


def test_shards_partition_the_units():
    units = list(range(17))
    parts = [sweeps.shard(units, i, 5) for i in range(5)]
    assert sorted(u for p in parts for u in p) == units


def test_benchmark_script_runs_tiny():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_spiral.py"), "--tiny"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.split()[:1] in (["100"], ["1000"])]
    # batch, single, single with the reference loop, single with logging, phase command, per width
    assert len(rows) == 10
    ours = [float(row[25:].split()[2]) for row in rows]  # after width and run: networks steps ours
    assert all(rate > 0 for rate in ours)
    assert sum("the fast trainer is" in line for line in r.stdout.splitlines()) == 2
    ratios = [line for line in r.stdout.splitlines() if "the phase command runs at" in line]
    assert len(ratios) == 2 and all("its training at" in line for line in ratios)


GPU_AGREE = 1e-9  # float64 on cuBLAS vs OpenBLAS: other summation orders only


def has_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, or CuPy without a driver
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a GPU")
def test_same_sweep_on_cpu_and_gpu_agrees(tmp_path):
    args = [
        "--A",
        "1,5,20",
        "--T",
        "20,50",
        "--seeds",
        "3",
        "--seed-block",
        "3",
        "--steps",
        "500",
        "--width",
        "50",
        "--quiet",
    ]
    assert rs.main(["phase", *args, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    assert rs.main(["phase", *args, "--device", "gpu", "--out", str(tmp_path / "gpu")]) == 0
    cpu, gpu = load(tmp_path / "cpu" / "phase.npz"), load(tmp_path / "gpu" / "phase.npz")
    for f in ("train_loss", "val_loss"):
        np.testing.assert_allclose(gpu[f], cpu[f], rtol=GPU_AGREE, atol=0)
    for f in ("train_acc", "val_acc"):  # counts of right answers: equal unless a logit ties
        np.testing.assert_allclose(gpu[f], cpu[f], atol=1 / 300 + 1e-12)
    # the trained parameters themselves, through the train command
    for dev in ("cpu", "gpu"):
        assert (
            rs.main(
                [
                    "train",
                    "--A",
                    "5",
                    "--T",
                    "20",
                    "--steps",
                    "500",
                    "--width",
                    "50",
                    "--seed",
                    "0,1",
                    "--quiet",
                    "--device",
                    dev,
                    "--out",
                    str(tmp_path / f"t{dev}"),
                ]
            )
            == 0
        )
    a, b = load(tmp_path / "tcpu" / "run.npz"), load(tmp_path / "tgpu" / "run.npz")
    for k in ("W1", "b1", "W2", "b2", "loss"):
        np.testing.assert_allclose(b[k], a[k], rtol=GPU_AGREE, atol=GPU_AGREE * np.abs(a[k]).max())


def test_reevaluation_on_the_own_validation_set_reproduces_the_sweep(tmp_path):
    out = tmp_path / "p"
    assert rs.main(["phase", *SMALL, "--out", str(out)]) == 0
    own = load(out / "phase.npz")
    for val in ("uniform", "inner"):
        assert rs.main(["reeval", "--out", str(out), "--val", val]) == 0
    again = load(out / "phase.npz")  # reeval on the sweep's own set rewrites phase.npz
    for f in ("val_acc", "val_loss", "train_acc"):
        np.testing.assert_allclose(again[f], own[f], rtol=1e-12, atol=1e-12, err_msg=f)
    inner = load(out / "phase-val-inner.npz")
    np.testing.assert_array_equal(inner["train_acc"], own["train_acc"])  # the same networks
    assert not np.array_equal(inner["val_acc"], own["val_acc"]) and str(inner["val"]) == "inner"
    assert (out / "phase-val-inner.png").stat().st_size > 1000


def test_paired_differences_are_seed_by_seed_against_a1(tmp_path):
    out = tmp_path / "p"
    assert rs.main(["phase", *SMALL, "--out", str(out)]) == 0
    z = load(out / "phase.npz")
    d = z["val_acc"][:, 1, :] - z["val_acc"][:, 0, :]  # A = 8 minus A = 1, (T, seeds)
    np.testing.assert_allclose(z["val_acc_diff_mean"][:, 1], d.mean(axis=1), rtol=1e-12)
    half = 4.302653 * d.std(axis=1, ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    np.testing.assert_allclose(z["val_acc_diff_hi"][:, 1] - d.mean(axis=1), half, rtol=1e-5)
    np.testing.assert_array_equal(z["val_acc_diff_mean"][:, 0], 0)
    # A = 1 does not depend on T: the static cells of both periods are the same runs
    np.testing.assert_array_equal(z["val_acc"][0, 0], z["val_acc"][1, 0])


def test_a_sweep_grown_to_more_seeds_equals_one_run_with_them(tmp_path):
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    five = [a if a != "3" else "5" for a in SMALL]  # --seeds 5
    assert rs.main(["phase", *SMALL, "--out", str(grown)]) == 0
    assert rs.main(["phase", *five, "--out", str(grown)]) == 0
    assert rs.main(["phase", *five, "--out", str(fresh)]) == 0
    assert_same(load(grown / "phase.npz"), load(fresh / "phase.npz"))
    with pytest.raises(SystemExit):  # fewer seeds is another sweep, not a continuation
        rs.main(["phase", *SMALL, "--out", str(grown)])
