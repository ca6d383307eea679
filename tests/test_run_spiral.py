"""The ``train`` command of run_spiral.py: outputs, replay, refusals."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run_spiral as rs
from dynloss import class_weights
from models import mlp_loss_and_grads

ROOT = Path(__file__).resolve().parents[1]


def test_same_seed_same_result_bit_for_bit(tmp_path):
    args = [
        "train",
        "--width",
        "10",
        "--steps",
        "40",
        "--T",
        "5",
        "--A",
        "4",
        "--log-every",
        "10",
        "--quiet",
    ]
    for name in ("a", "b"):
        assert rs.main(args + ["--out", str(tmp_path / name)]) == 0
    a, b = np.load(tmp_path / "a" / "run.npz"), np.load(tmp_path / "b" / "run.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_train_writes_run_config_and_figure(tmp_path):
    out = tmp_path / "run"
    assert (
        rs.main(
            [
                "train",
                "--width",
                "12",
                "--steps",
                "30",
                "--T",
                "6",
                "--A",
                "3",
                "--log-every",
                "10",
                "--seed",
                "0,1",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    z = np.load(out / "run.npz")
    for k in (
        "X_train",
        "y_train",
        "X_val",
        "y_val",
        "W1_init",
        "b1_init",
        "W2_init",
        "b2_init",
        "W1",
        "b1",
        "W2",
        "b2",
        "step",
        "gamma",
        "loss",
        "loss_static",
        "train_acc",
        "val_acc",
    ):
        assert k in z.files, k
    assert z["W1"].shape == (2, 2, 12) and z["gamma"].shape == (4, 2, 3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["width"] == 12 and cfg["seeds"] == [0, 1] and "numpy" in cfg["versions"]
    assert cfg["stop_step"] == 24
    assert (out / "run.png").stat().st_size > 1000
    assert z["loss_static"][-1, 0] < z["loss_static"][0, 0]  # it learns
    # the saved initial parameters replay to the saved final ones
    X, y = z["X_train"], z["y_train"]
    p = {k: z[k + "_init"].copy() for k in ("W1", "b1", "W2", "b2")}
    for t in range(30):
        gamma = class_weights(t, np.full(2, 3.0), np.full(2, 6.0), 3, np.full(2, 24))
        _, g, _ = mlp_loss_and_grads(p, X, y, gamma)
        for k in p:
            p[k] -= g[k]
    for k in p:
        np.testing.assert_allclose(p[k], z[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (["--A", "0.5"], "argument --A: must be a finite number >= 1"),
        (["--T", "0"], "argument --T: must be a finite number >= 1"),
        (["--width", "0"], "argument --width: must be an integer >= 1"),
        (["--steps", "-3"], "argument --steps: must be an integer >= 1"),
        (["--lr", "0"], "argument --lr: must be a finite number >= 1e-12"),
        (["--lr", "nan"], "argument --lr: must be a finite number >= 1e-12"),
        (["--init", "xavier"], "argument --init: invalid choice"),
        (["--loss", "hinge"], "argument --loss: invalid choice"),
        (["--seed", "a,b"], "--seed"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_nothing_written(tmp_path, capsys, bad, msg):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        rs.main(["train", "--out", str(out), "--quiet"] + bad)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_output_folder_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        rs.main(["train", "--out", str(f), "--quiet", "--steps", "5"])
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_script_runs_as_a_command(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_spiral.py"),
            "train",
            "--width",
            "8",
            "--steps",
            "20",
            "--T",
            "5",
            "--quiet",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "run.png" in r.stdout


def _has_cupy():
    try:
        import cupy  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_cupy(), reason="only meaningful where CuPy is missing")
def test_gpu_without_cupy_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rs.main(["train", "--device", "gpu", "--quiet", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "needs CuPy" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


REFERENCE_RTOL = 1e-9  # the reference loop against the fast trainer over a few hundred steps
REFERENCE_ATOL = 1e-12  # for entries that are zero up to rounding (dloss near a turning point)


def assert_same_run(a, b, rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL):
    """Two run.npz files: the same keys, the same NaN pattern, every value to rtol."""
    a, b = np.load(a), np.load(b)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        x, y = a[k], b[k]
        assert x.shape == y.shape, k
        if x.dtype.kind != "f":
            np.testing.assert_array_equal(x, y, err_msg=k)
            continue
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=k)
        ok = np.isfinite(x)
        np.testing.assert_allclose(x[ok], y[ok], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--seed", "0-2", "--steps", "600", "--T", "100", "--A", "20"],
        ["dynamics", "--steps", "600", "--T", "100", "--hess-every", "5", "--ntk-every", "5"],
    ],
    ids=["train", "dynamics"],
)
def test_reference_and_fast_trainer_write_the_same_run(tmp_path, command):
    """The same short command through spiral.train_reference (--reference) and through the fast
    trainer: every logged array (and the spectra measured along the run) agrees to 1e-9."""
    for name, extra in (("fast", []), ("reference", ["--reference"])):
        out = tmp_path / name
        assert rs.main([*command, *extra, "--width", "20", "--quiet", "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text())["reference"] == bool(extra)
    assert_same_run(tmp_path / "fast" / "run.npz", tmp_path / "reference" / "run.npz")


def test_reference_runs_on_the_cpu_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rs.main(["train", "--reference", "--device", "gpu", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "--reference" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_other_trainers_command_writes_a_folder_of_its_own(tmp_path, monkeypatch, capsys):
    """The last line of train names the other trainer's command; run as printed, it keeps the
    first run (its own folder, by default and with --out), and the two default folders differ."""
    monkeypatch.chdir(tmp_path)
    base = ["train", "--steps", "400", "--T", "100", "--width", "10", "--quiet"]
    monkeypatch.setattr(sys, "argv", ["run_spiral.py", *base])
    assert rs.main(base) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.startswith("trained by the fast trainer")
    other = hint.split("python run_spiral.py ")[1].split()
    assert other == [*base, "--reference"]
    monkeypatch.setattr(sys, "argv", ["run_spiral.py", *other])
    assert rs.main(other) == 0
    back = capsys.readouterr().out.strip().splitlines()[-1]
    assert back.startswith("trained by spiral.train_reference") and back.endswith(" ".join(base))
    for folder, reference in (("runs/spiral-train", False), ("runs/spiral-train-reference", True)):
        assert json.loads((tmp_path / folder / "config.json").read_text())["reference"] is reference
    mine = [*base, "--reference", "--out", "mine"]
    monkeypatch.setattr(sys, "argv", ["run_spiral.py", *mine])
    assert rs.main(mine) == 0
    assert capsys.readouterr().out.strip().endswith(" ".join([*base, "--out", "mine-fast"]))
