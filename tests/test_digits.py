"""digits.py: scikit-learn's handwritten digits as a CIFAR-format data set, and a short run."""

import json
import sys

import numpy as np
import pytest

import run_cifar as rc
from apparatus import cifar_runs, digits
from apparatus.cifar_files import CifarError

pytest.importorskip("sklearn", reason="--data digits needs scikit-learn (requirements-digits.txt)")


def test_split_is_stratified_disjoint_and_fixed_by_its_seed():
    d = digits.load_digits(300, seed=0)
    assert d.x_train.shape == (300, 8, 8, 1) and d.x_test.shape == (1497, 8, 8, 1)
    assert d.x_train.dtype == np.uint8 and d.x_train.max() == digits.MAX_PIXEL
    counts = np.bincount(d.y_train, minlength=10)
    assert counts.sum() == 300 and counts.min() >= 29 and counts.max() <= 31  # ~30 per class
    again, other = digits.load_digits(300, seed=0), digits.load_digits(300, seed=1)
    np.testing.assert_array_equal(d.x_train, again.x_train)
    assert not np.array_equal(d.x_train, other.x_train)
    # the two splits partition the 1797 images: every image once
    all_images = np.concatenate([d.x_train, d.x_test]).reshape(1797, -1)
    assert len(np.unique(all_images, axis=0)) == len(np.unique(digits_images(), axis=0))


def digits_images():
    from sklearn.datasets import load_digits

    return load_digits().images.reshape(1797, -1).astype(np.uint8)


def test_largest_remainders_give_exactly_n_train():
    y = np.repeat(np.arange(3), [5, 7, 9])
    train, test = digits.stratified_split(y, 10, np.random.default_rng(0))
    assert len(train) == 10 and len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(y)


def test_sizes_without_every_class_are_refused():
    for n in (5, 1790):
        with pytest.raises(CifarError, match="--digits-train"):
            digits.load_digits(n)


def test_without_scikit_learn_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now fails
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(CifarError, match="needs scikit-learn") as err:
        digits.load_digits(300)
    assert "\n" not in str(err.value)


def test_a_short_run_on_the_digits(tmp_path):
    out = tmp_path / "d"
    argv = ["train", "--data", "digits", "--digits-train", "100", "--channels", "3"]
    argv += ["--batch", "20", "--epochs", "2", "--A", "5", "--T", "3", "--quiet"]
    assert rc.main([*argv, "--out", str(out)]) == 0
    z = np.load(out / "run.npz")
    assert z["W1"].shape == (3, 3, 1, 3)  # one input channel
    assert np.isfinite(z["test_acc"]).all() and int(z["steps_per_epoch"]) == 5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["settings"]["data"] == "digits" and cfg["settings"]["digits_train"] == 100
    assert "load_digits" in cfg["data_source"]


def test_digits_default_to_their_own_scale_and_cifar_to_the_papers():
    parser = rc.build_parser()
    for data, scale in (
        ("digits", cifar_runs.DIGITS_PROTOCOL),
        ("synthetic", cifar_runs.PAPER_PROTOCOL),
    ):
        args = parser.parse_args(["train", "--data", data])
        s = cifar_runs.resolve_settings(args)
        assert {k: s[k] for k in scale} == scale
    args = parser.parse_args(["train", "--data", "digits", "--channels", "8", "--epochs", "7"])
    s = cifar_runs.resolve_settings(args)
    assert (s["channels"], s["epochs"], s["batch"]) == (8, 7, cifar_runs.DIGITS_PROTOCOL["batch"])
    assert s["peak_epoch"] == 3 and s["stop_epoch"] == 6  # the schedule scales with --epochs
