"""The ``check`` command (apparatus/checks.py): the default tables pass and list every required
row, float32 passes with its own tolerances, a planted bug fails on its own row and nowhere
independent, a kink is reported and not failed, --at reads a real run, bad input is refused."""

import dataclasses
import os

import numpy as np
import pytest

import models
import run_spiral
from apparatus import check_myrtle5, checks
from apparatus.cli import Parser, run_main

SPIRAL_ROWS = [  # every derivative the issue names, as the table spells it
    "dynloss.loss_backward dF/dz (ce)", "dynloss.loss_backward dF/dz (mse)",
    "dynloss.loss_rop R{dF/dz} (ce)", "dynloss.loss_rop R{dF/dz} (mse)",
    "dynloss.class_weights Gamma(t)", "class_weights: sum_i Gamma_i",
    "class_weights: emphasised class", "class_weights: from the stop step on",
    "models.mlp_backward dF/dW1", "models.mlp_backward dF/db1", "models.mlp_backward dF/dW2",
    "models.mlp_backward dF/db2", "models.mlp_hvp Hv", "spectra.logits_jacobian J",
    "spectra.ntk Theta", "spectra.ntk_traced", "spectra.hessian H (dense)",
    "spectra.hessian(parts=True) Gauss-Newton", "spectra.hessian_top_eigs lambda_max",
    "spectra.warm_top_eig lambda_max", "softplus: models.mlp_backward",
    "softplus: models.mlp_hvp", "softplus: spectra.hessian (beta",
    "fast.mlp_spectra.hessian_matvec", "fast.mlp_spectra.ntk_matvec",
    "fast.mlp_spectra.ntk_traced_matvec",
]  # fmt: skip
MYRTLE5_ROWS = [
    "models.conv3x3_backward", "models.relu_backward", "models.avgpool2_backward",
    "models.global_avgpool_backward", "models.dense_backward",
    "fast/myrtle5.relu_avgpool2_backward", "fast/myrtle5.relu_conv3x3_backward",
    "models.nesterov_step", "models.myrtle5_backward", "models.myrtle5_hvp",
    "fast/myrtle5.myrtle5_loss_and_grads", "fast/myrtle5.myrtle5_hvp",
    "dynloss.loss_backward dF/dz (ce)", "dynloss.class_weights Gamma(t)",
]  # fmt: skip
SMALL = ["--width", "12"]  # a narrow MLP where a test needs no more


def parser(add):
    """A parser holding only the ``check`` command that ``add`` (one of the add_*) builds."""
    p = Parser(prog="x")
    add(p.add_subparsers(dest="command"))
    return p


def run_check(add, argv, capsys):
    """Run ``check argv`` through run_main (as the scripts do): the exit code, the table's rows
    by name, and everything printed."""
    code = run_main(parser(add), ["check", *argv], "x")
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    return code, {line[5:].split("  ")[0]: line for line in rows}, out


def status(table, start):
    """The status of the one row whose name starts with ``start``."""
    (line,) = [line for name, line in table.items() if name.startswith(start)]
    return next(word for word in line.split() if word in (checks.PASS, checks.FAIL, checks.KINK))


def test_default_spiral_check_passes_and_lists_every_row(capsys):
    p = parser(checks.add_spiral_check_command)
    args = p.parse_args(["check"])
    assert (args.width, args.loss, args.dtype, args.at) == (100, None, "float64", None)  # ce
    code, table, out = run_check(checks.add_spiral_check_command, [], capsys)
    assert code == 0 and "h = 1e-06" in out and "every derivative agrees" in out
    for name in SPIRAL_ROWS:
        assert status(table, name) == checks.PASS, name
    # the three origin points sit on every unit's kink at b1 = 0: left out of the b1 rows
    assert table["models.mlp_backward dF/db1"].split()[-2:] == ["3", "PASS"]
    assert table["models.mlp_backward dF/dW2"].split()[-2:] == ["0", "PASS"]


def test_myrtle5_check_passes_and_lists_every_layer(capsys):
    code, table, _ = run_check(check_myrtle5.add_cifar_check_command, [], capsys)
    assert code == 0
    for name in MYRTLE5_ROWS:
        assert status(table, name) == checks.PASS, name


@pytest.mark.parametrize(
    "add, argv",
    [(checks.add_spiral_check_command, SMALL + ["--init", "glorot", "--loss", "mse"]),
     (check_myrtle5.add_cifar_check_command, ["--width", "2", "--loss", "mse"])],
    ids=["spiral", "myrtle5"],
)  # fmt: skip
def test_float32_passes_with_its_own_tolerances(add, argv, capsys):
    code, table, out = run_check(add, argv + ["--dtype", "float32"], capsys)
    assert code == 0
    tol = f"{checks.FD_RTOL_F32:.0e}"
    assert tol in table["dynloss.loss_backward dF/dz (ce)"].split()
    assert "derivatives in float32; central differences in float64, h = 1e-06" in out
    assert all(checks.PASS in line.split() for line in table.values())


def test_a_sign_flipped_db_fails_on_the_bias_rows_only(monkeypatch, capsys):
    """models.affine_backward with the sign of db flipped: dF/db1 and dF/db2 fail; the weights'
    rows, the loss rows, the Jacobian (built without affine_backward) still pass."""
    reference = models.affine_backward

    def flipped(dout, cache):
        dx, dW, db = reference(dout, cache)
        return dx, dW, -db

    monkeypatch.setattr(models, "affine_backward", flipped)
    code, table, _ = run_check(checks.add_spiral_check_command, SMALL, capsys)
    assert code == 1
    for name in ("models.mlp_backward dF/db1", "models.mlp_backward dF/db2"):
        assert status(table, name) == checks.FAIL, name
    for name in ("models.mlp_backward dF/dW1", "models.mlp_backward dF/dW2",
                 "dynloss.loss_backward dF/dz (ce)", "spectra.logits_jacobian J",
                 "spectra.hessian(parts=True) Gauss-Newton", "class_weights: sum_i Gamma_i"):  # fmt: skip
        assert status(table, name) == checks.PASS, name


def test_a_sign_flipped_myrtle5_layer_fails_on_its_row(monkeypatch, capsys):
    reference = models.avgpool2_backward
    flipped = lambda dout, cache: -reference(dout, cache)
    monkeypatch.setattr(models, "avgpool2_backward", flipped)
    code, table, _ = run_check(check_myrtle5.add_cifar_check_command, [], capsys)
    assert code == 1
    failing = {"models.avgpool2_backward", "models.myrtle5_backward", "models.myrtle5_hvp",
               "fast/myrtle5.myrtle5_loss_and_grads", "fast/myrtle5.myrtle5_hvp"}  # fmt: skip
    for name in failing - {"models.myrtle5_hvp", "fast/myrtle5.myrtle5_hvp"}:
        assert status(table, name) == checks.FAIL, name  # the layer, and the network using it
    for name in set(MYRTLE5_ROWS) - failing:
        assert status(table, name) == checks.PASS, name


def test_eqs_2_to_5_by_hand_catch_an_unnormalised_gamma(monkeypatch):
    reference = checks.class_weights
    raw = lambda t, A, T, K, stop_step=None: reference(t, A, T, K, stop_step) * 2.0
    monkeypatch.setattr(checks, "class_weights", raw)
    rows = {r.what: r.status for r in checks.gamma_rows(checks.SPIRAL_SCHEDULE, 3)}
    assert rows["dynloss.class_weights Gamma(t), 11 steps"] == checks.FAIL
    assert rows["class_weights: sum_i Gamma_i"] == checks.FAIL
    assert rows["class_weights: emphasised class"] == checks.PASS


def test_a_difference_across_every_sample_kink_is_reported_not_failed():
    """Four points at the origin with b1 = 0: every difference in b1 crosses all of their
    kinks, so the b1 row is KINK (nothing left to compare); W1 does not move them."""
    prob = checks.spiral_problem(width=6)
    prob = dataclasses.replace(prob, X=np.zeros((4, 2)), y=np.array([0, 1, 2, 0]))
    rows = {r.what: r for r in checks.mlp_rows(prob)}
    kink = rows["models.mlp_backward dF/db1"]
    assert (kink.status, kink.kinks) == (checks.KINK, 4) and np.isnan(kink.error)
    assert rows["models.mlp_backward dF/dW1"].status == checks.PASS
    assert checks.exit_code(list(rows.values())) == 0


def test_at_the_final_parameters_of_a_real_run(tmp_path, capsys):
    folder = str(tmp_path / "run")
    train = ["train", "--width", "8", "--steps", "60", "--T", "20", "--A", "5", "--seed", "0,1"]
    assert run_spiral.main(train + ["--out", folder, "--quiet"]) == 0
    capsys.readouterr()
    code, _, _ = run_check(checks.add_spiral_check_command, ["--at", folder], capsys)
    assert code == 0
    prob = checks.spiral_problem(at=folder)
    assert prob.params["W1"].shape == (1, 2, 8) and "(first seed)" in prob.where
    with np.load(os.path.join(folder, "run.npz")) as z:
        np.testing.assert_array_equal(prob.params["W2"][0], z["W2"][0])  # seed 0, final
        assert not np.array_equal(z["W2"][0], z["W2_init"][0])


def test_myrtle5_at_a_run_npz_takes_its_width_channels_and_classes(tmp_path, capsys):
    params = models.init_myrtle5(0, c=2, in_channels=1, n_classes=4)
    np.savez(tmp_path / "run.npz", **params)
    code, _, _ = run_check(check_myrtle5.add_cifar_check_command, ["--at", str(tmp_path)], capsys)
    assert code == 0
    prob = check_myrtle5.myrtle5_problem(at=str(tmp_path))
    assert prob.X.shape[3] == 1 and len(prob.gamma) == 4 and prob.params["W2"].shape[3] == 2


def bad_spiral_run(kind, folder):
    """A folder holding a run.npz that ``check --at`` must refuse (or none at all)."""
    os.makedirs(folder)
    arrays = {k: v[0] for k, v in models.init_mlp([0], 2, 4, 3).items()}
    arrays.update(X_train=np.zeros((5, 2)), y_train=np.zeros(5, dtype=np.int64))
    if kind == "lacks":
        del arrays["b1"]
    elif kind == "has shape":
        arrays["W2"] = np.zeros((5, 3))
    elif kind == "not finite":
        arrays["W1"][0, 0] = np.nan
    if kind == "does not read":
        with open(os.path.join(folder, "run.npz"), "wb") as f:
            f.write(b"not a zip archive")
    elif kind != "holds no run.npz":
        np.savez(os.path.join(folder, "run.npz"), **arrays)


@pytest.mark.parametrize(
    "kind", ["no such folder", "holds no run.npz", "lacks", "has shape", "not finite",
             "does not read"],
)  # fmt: skip
def test_a_bad_at_folder_is_refused_in_one_line(kind, tmp_path, capsys):
    folder = str(tmp_path / "run")
    if kind != "no such folder":
        bad_spiral_run(kind, folder)
    with pytest.raises(SystemExit) as exit_:
        run_main(parser(checks.add_spiral_check_command), ["check", "--at", folder], "x")
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and kind in err


def test_myrtle5_at_a_run_of_wrong_shapes_is_refused(tmp_path, capsys):
    params = models.init_myrtle5(0, c=2)
    params["W3"] = params["W3"][:, :, :1]
    np.savez(tmp_path / "run.npz", **params)
    with pytest.raises(SystemExit) as exit_:
        run_main(
            parser(check_myrtle5.add_cifar_check_command), ["check", "--at", str(tmp_path)], "x"
        )
    assert exit_.value.code == 2 and "'W3' has shape" in capsys.readouterr().err


def test_a_width_whose_dense_hessian_does_not_fit_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main(parser(checks.add_spiral_check_command), ["check", "--width", "100000"], "x")
    assert exit_.value.code == 2 and "dense Hessians" in capsys.readouterr().err


def test_device_gpu_without_cupy_is_refused_in_one_line(capsys):
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("CuPy finds a GPU here")
    except Exception:  # no CuPy, or no driver: the case under test
        pass
    with pytest.raises(SystemExit) as exit_:
        run_main(parser(check_myrtle5.add_cifar_check_command), ["check", "--device", "gpu"], "x")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "--device gpu" in err


def test_gpu_rows_cover_every_fast_entry():
    """The GPU rows name every entry of fast/layers.py's table that differs from fast/myrtle5.py's
    NumPy layers (on NumPy arrays that table falls back to them, so only the coverage is tested
    here; the kernels themselves: tests/test_igemm.py)."""
    from fast.layers import GPU_LAYERS
    from fast.myrtle5 import CPU_LAYERS

    rows = check_myrtle5.gpu_rows(check_myrtle5.myrtle5_problem(width=2), np)
    fast = {k for k, f in vars(GPU_LAYERS).items() if f is not getattr(CPU_LAYERS, k)}
    assert {r.what.removeprefix("GPU_LAYERS.") for r in rows} >= fast


def test_both_scripts_run_check_and_its_exit_code_is_theirs(monkeypatch, capsys):
    """The wired commands: exit 0 when every row passes, 1 when a planted bug fails one."""
    import models
    import run_cifar
    import run_spiral

    assert run_spiral.main(["check"]) == 0
    assert run_cifar.main(["check"]) == 0
    backward = models.affine_backward

    def wrong_sign(dout, cache):
        dx, dW, db = backward(dout, cache)
        return dx, -dW, db

    monkeypatch.setattr(models, "affine_backward", wrong_sign)
    assert run_spiral.main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out
