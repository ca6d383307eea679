"""Small helpers shared by the test files (the tests folder is on sys.path under pytest)."""

import hashlib
import os
from pathlib import Path

import numpy as np

from models import init_mlp

KINK = 1e-3  # pre-activations closer than this to 0 would make central differences cross the kink


def load(path):
    """Every array of an .npz file, read into memory."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same(a, b):
    """Two dicts of arrays with the same keys and bit-for-bit equal values."""
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def tiny_problem(seed=0, kink=KINK, N=20, D=2, H=8, K=3):
    """One glorot MLP (M = 1) 2 -> 8 -> 3 and N = 20 inputs whose pre-activations avoid the kink."""
    params = init_mlp([seed], D, H, K, init="glorot")
    rng = np.random.default_rng(seed)
    while True:
        X = rng.normal(size=(N, D))
        if np.abs(X @ params["W1"][0] + params["b1"][0]).min() > kink:
            break
    y = np.arange(N) % K
    return params, X, y


def snapshot(root):
    """{relative path: sha256, or "dir"} of everything under root (lock files aside): equal
    snapshots mean nothing was written, changed or removed."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = "dir"
        for f in files:
            if not f.startswith(".lock"):
                path = os.path.join(folder, f)
                out[os.path.relpath(path, root)] = hashlib.sha256(
                    Path(path).read_bytes()
                ).hexdigest()
    return out
