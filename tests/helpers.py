"""Small helpers shared by the test files (the tests folder is on sys.path under pytest)."""

import numpy as np


def load(path):
    """Every array of an .npz file, read into memory."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same(a, b):
    """Two dicts of arrays with the same keys and bit-for-bit equal values."""
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
