"""Spiral data, the batched trainer and the ``train`` command."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run_spiral as rs
from dynloss import class_weights
from models import init_mlp, mlp_loss_and_grads

ROOT = Path(__file__).resolve().parents[1]
EXACT = 1e-13  # fused trainer against the layer-by-layer reference: equal up to rounding


def spec_for(M, A, T, steps, lr=1.0, log_every=5, stop=None, loss="ce"):
    stop = np.full(M, steps + 1) if stop is None else np.full(M, stop)
    return rs.TrainSpec(
        np.full(M, float(A)), np.full(M, float(T)), stop, lr, steps, log_every, loss
    )


@pytest.fixture(scope="module")
def data():
    return (*rs.make_spiral_train(), *rs.make_spiral_val())


def test_spiral_data(data):
    X, y, Xv, yv = data
    assert X.shape == (300, 2) and Xv.shape == (300, 2)
    assert (np.bincount(y) == 100).all() and (np.bincount(yv) == 100).all()
    # one point of each class sits at the origin (radius 0): at most 298/300 can be right
    assert (np.linalg.norm(X, axis=1) == 0).sum() == 3
    # the notebook's legacy seed 0: the first class's noise is RandomState(0).randn(100) * 0.2
    noise = np.random.RandomState(0).randn(100) * 0.2
    a = np.linspace(0, 4 * np.pi, 100)[99] + noise[99]  # the last point: radius 1
    np.testing.assert_allclose(X[99], [np.cos(a), np.sin(a)], rtol=1e-12)
    # validation: the same arms, but no point at a training radius
    rt = np.unique(np.linalg.norm(X, axis=1).round(12))
    rv = np.linalg.norm(Xv, axis=1).round(12)
    assert not np.isin(rv, rt).any()
    assert rv.max() <= 1.0


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("width", [16, rs.CPU_TILE + 50])  # one tile; two, the second partial
def test_one_fused_step_equals_the_layer_by_layer_gradient(data, loss, width):
    X, y, _, _ = data
    params = init_mlp([0, 1], 2, width, 3)
    spec = spec_for(2, 8.0, 10, steps=1, lr=0.3, log_every=1, loss=loss)
    spec.T = np.array([10.0, 7.0])
    out = rs.train_block(params, data, spec)
    gamma = class_weights(0, spec.A, spec.T, 3)
    F, grads, logits = mlp_loss_and_grads(params, X, y, gamma, loss)
    for k in params:
        np.testing.assert_allclose(
            out["params"][k], params[k] - 0.3 * grads[k], rtol=EXACT, atol=EXACT
        )
    np.testing.assert_allclose(out["loss"][0], F, rtol=EXACT)


def test_batched_training_equals_networks_trained_alone(data):
    seeds = [3, 4, 5, 6]
    params = init_mlp(seeds, 2, 20, 3)
    spec = spec_for(4, 1.0, 10, steps=60)
    spec.A = np.array([1.0, 5.0, 20.0, 3.0])
    spec.T = np.array([10.0, 8.0, 30.0, 5.0])
    spec.stop_step = np.array([50, 52, 61, 40])
    together = rs.train_many(params, data, spec, block=3, workers=2, progress=False)
    for m, s in enumerate(seeds):
        one = rs.train_block(
            init_mlp([s], 2, 20, 3),
            data,
            rs.TrainSpec(
                spec.A[m : m + 1], spec.T[m : m + 1], spec.stop_step[m : m + 1], 1.0, 60, 5
            ),
        )
        for k in params:
            np.testing.assert_allclose(
                together["params"][k][m], one["params"][k][0], rtol=EXACT, atol=EXACT
            )
        for f in rs.LOG_FIELDS:
            np.testing.assert_allclose(together[f][:, m], one[f][:, 0], rtol=EXACT, atol=EXACT)


def test_logged_rows_and_gamma(data):
    out = rs.train_block(
        init_mlp([0], 2, 8, 3), data, spec_for(1, 5.0, 4, steps=23, log_every=5, stop=20)
    )
    np.testing.assert_array_equal(out["step"], [0, 5, 10, 15, 20, 23])
    np.testing.assert_allclose(out["gamma"][:, 0], class_weights(out["step"], 5.0, 4.0, 3, 20))
    assert (out["gamma"][-2:] == 1.0).all()
    assert np.isnan(out["dloss"][0]).all() and np.isfinite(out["dloss"][1:]).all()


def test_divergence_is_recorded_and_history_kept(data):
    out = rs.train_block(
        init_mlp([0, 1], 2, 30, 3),
        data,
        spec_for(2, 1.0, 10, steps=200, lr=1e4, log_every=1, loss="mse"),
    )
    assert (out["diverged_step"] >= 0).all()
    d = out["diverged_step"]
    assert out["logged"] == d.max() + 1 < 201  # stopped once every network diverged
    for m in range(2):  # what was logged before the divergence is kept, NaN after
        assert np.isfinite(out["loss"][: d[m], m]).all()
        assert not np.isfinite(out["loss"][d[m] :, m]).any()


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
        (["--A", "0.5"], "--A must be >= 1"),
        (["--T", "0"], "--T must be >= 1"),
        (["--width", "0"], "--width must be positive"),
        (["--steps", "-3"], "--steps must be positive"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lr", "nan"], "--lr must be positive"),
        (["--init", "xavier"], "unknown --init"),
        (["--loss", "hinge"], "unknown --loss"),
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
